"""Tests of training.runtime: the XLA plan, devices, strategies, the start-up filter.

TensorFlow already runs in this process (conftest.py split the CPU into 4 logical
devices), which is what `configure_runtime` meets when `training.train.main` is called
from Python; the fresh-process path is tested end to end in test_train.py.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import tensorflow as tf

from training import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the XLA plan


@pytest.mark.parametrize("strategy, on_gpu, auto_clustering, expected", [
    # (strategy, GPUs, auto-clustering in force) -> (step, layers, auto-clustering)
    (runtime.DEFAULT, False, False, (True, "auto", False)),
    (runtime.DEFAULT, True, False, (True, "auto", False)),
    (runtime.MIRRORED, True, False, (True, "auto", False)),
    (runtime.MULTI_WORKER, True, False, (True, "auto", False)),
    (runtime.MIRRORED, False, True, (False, "auto", True)),
    (runtime.MULTI_WORKER, False, True, (False, "auto", True)),
])
def test_xla_takes_the_largest_compilation_each_configuration_allows(
        strategy, on_gpu, auto_clustering, expected):
    plan = runtime.plan_xla(True, strategy, 4, on_gpu=on_gpu,
                            auto_clustering=auto_clustering)
    assert (plan.step_jit_compile, plan.layer_jit_compile, plan.auto_clustering) == expected
    assert plan.requested and plan.compiles
    # The final evaluation runs on one device, which XLA always compiles whole.
    assert plan.evaluation_jit_compile
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.step_jit_compile = not plan.step_jit_compile


def test_the_plan_says_what_is_compiled():
    one = runtime.plan_xla(True, runtime.DEFAULT, 1, on_gpu=False, auto_clustering=False)
    assert one.description.startswith("one device: the whole training step is compiled")
    cpus = runtime.plan_xla(True, runtime.MIRRORED, 4, on_gpu=False, auto_clustering=True)
    assert cpus.description.startswith("4 CPU replicas:")
    assert "auto-clustering" in cpus.description
    workers = runtime.plan_xla(True, runtime.MULTI_WORKER, 1, on_gpu=False,
                               auto_clustering=True)
    assert "XLA has no CPU kernel" in workers.description


def test_no_xla_compiles_nothing_but_reports_auto_clustering_already_on():
    off = runtime.plan_xla(False, runtime.MIRRORED, 4, on_gpu=False, auto_clustering=False)
    assert not (off.requested or off.compiles or off.evaluation_jit_compile)
    assert off.description.startswith("off: nothing is compiled")
    stuck = runtime.plan_xla(False, runtime.DEFAULT, 1, on_gpu=False, auto_clustering=True)
    assert stuck.auto_clustering and stuck.compiles
    assert not (stuck.step_jit_compile or stuck.layer_jit_compile)
    assert "already on" in stuck.description


@pytest.mark.parametrize("auto_clustering", [True, False])
def test_a_refused_whole_step_falls_back_to_the_layers_programs(auto_clustering):
    tried = runtime.plan_xla(True, runtime.MIRRORED, 4, on_gpu=False,
                             auto_clustering=auto_clustering, try_whole_step=True)
    assert tried.step_jit_compile
    assert tried.description.startswith("4 CPU replicas: the whole training step")
    error = tf.errors.InvalidArgumentError(None, None, "Trying to access resource x\nmore")
    fallback = runtime.whole_step_fallback(tried, error)
    assert (fallback.step_jit_compile, fallback.layer_jit_compile,
            fallback.auto_clustering, fallback.evaluation_jit_compile) == (
        False, "auto", auto_clustering, True)
    assert "InvalidArgumentError: Trying to access resource x)" in fallback.description
    assert ("with XLA auto-clustering" in fallback.description) == auto_clustering
    assert "\n" not in fallback.description


@pytest.mark.parametrize("strategy", [runtime.MIRRORED, runtime.MULTI_WORKER])
def test_xla_on_cpu_replicas_without_auto_clustering_is_refused(strategy):
    with pytest.raises(runtime.ConfigurationError, match="TF_XLA_FLAGS") as error:
        runtime.plan_xla(True, strategy, 4, on_gpu=False, auto_clustering=False)
    assert "\n" not in str(error.value)


def test_auto_clustering_flags_are_added_and_removed_keeping_the_others(monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=1 --xla_other=3")
    runtime._set_auto_clustering(True)
    flags = os.environ["TF_XLA_FLAGS"].split()
    assert flags == ["--xla_other=3", *runtime.AUTO_JIT_FLAGS]
    assert runtime._auto_clustering_flags_set()
    runtime._set_auto_clustering(False)
    assert os.environ["TF_XLA_FLAGS"] == "--xla_other=3"
    assert not runtime._auto_clustering_flags_set()
    monkeypatch.delenv("TF_XLA_FLAGS")
    runtime._set_auto_clustering(False)
    assert "TF_XLA_FLAGS" not in os.environ


# ------------------------------------------------------------------ in a running TensorFlow


def test_configure_runtime_uses_the_devices_tensorflow_has():
    assert runtime.tensorflow_started()
    arrangement = runtime.configure_runtime(replicas=4, multi_worker=False, xla=False)
    assert arrangement.strategy == runtime.MIRRORED and not arrangement.on_gpu
    assert len(arrangement.devices) == 4
    assert arrangement.xla == runtime.plan_xla(False, runtime.MIRRORED, 4, on_gpu=False,
                                               auto_clustering=False)
    one = runtime.configure_runtime(replicas=1, multi_worker=False, xla=True)
    assert (one.strategy, one.devices, one.xla.step_jit_compile) == (
        runtime.DEFAULT, None, True)


def test_more_cpu_replicas_than_tensorflow_has_are_refused():
    assert len(runtime.split_cpu(4)) == 4
    with pytest.raises(runtime.ConfigurationError, match="fresh process"):
        runtime.split_cpu(8)


def test_two_mirrored_strategies_in_one_process_both_reduce_right():
    # Without a fresh range of collective keys per strategy, the second strategy's
    # collectives reuse the first one's keys and TensorFlow aborts them.
    arrangement = runtime.configure_runtime(replicas=4, multi_worker=False, xla=False)
    sums = []
    for size in (3, 5):
        strategy = runtime.make_strategy(arrangement)

        @tf.function
        def step(size=size, strategy=strategy):
            def replica_fn():
                context = tf.distribute.get_replica_context()
                value = tf.ones([size]) * tf.cast(context.replica_id_in_sync_group + 1,
                                                  tf.float32)
                return context.all_reduce("SUM", value)

            return strategy.run(replica_fn)

        sums.append(strategy.experimental_local_results(step())[0].numpy().tolist())
    assert sums == [[10.0] * 3, [10.0] * 5]


def test_startup_noise_is_dropped_and_everything_else_kept(capfd):
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are "
             "written to STDERR\n"
             "I0000 00:00:1796185967.755217    4060 cudart_stub.cc:31] Could not find "
             "cuda drivers on your machine, GPU will not be used.\n"
             "I0000 00:00:1796221640.611286   23449 port.cc:153] oneDNN custom operations "
             "are on. You may see slightly different numerical results due to "
             "floating-point round-off errors from different computation orders. To turn "
             "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n")
    with runtime.startup_noise_filtered():
        os.write(2, noise.encode())
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert err == "a real warning\n"


# ------------------------------------------------------------------ tasks, backups


def resolver_strategy(task_type, task_id, cluster):
    spec = types.SimpleNamespace(as_dict=lambda: cluster)
    resolver = types.SimpleNamespace(task_type=task_type, task_id=task_id,
                                     cluster_spec=lambda: spec)
    return types.SimpleNamespace(cluster_resolver=resolver)


@pytest.mark.parametrize("task_type, task_id, cluster, chief", [
    ("worker", 0, {"worker": ["a", "b"]}, True),
    ("worker", 1, {"worker": ["a", "b"]}, False),
    ("chief", 0, {"chief": ["c"], "worker": ["a"]}, True),
    ("worker", 0, {"chief": ["c"], "worker": ["a"]}, False),
])
def test_the_chief_of_a_cluster(task_type, task_id, cluster, chief):
    task = runtime.task_of(resolver_strategy(task_type, task_id, cluster))
    assert task == runtime.Task(chief=chief, name=f"{task_type}_{task_id}")


def test_outside_a_cluster_the_process_is_the_chief():
    assert runtime.task_of(tf.distribute.get_strategy()) == runtime.Task(True, None)


def test_backed_up_epoch_reads_backup_and_restore_metadata(tmp_path):
    assert runtime.backed_up_epoch(os.fspath(tmp_path / "none")) == 0
    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 3}))
    assert runtime.backed_up_epoch(os.fspath(tmp_path)) == 3


def test_the_programs_import_without_starting_tensorflow():
    # Device and XLA set-up must come before TensorFlow starts: importing the programs
    # (and what their parsers read) must not import it.
    code = ("import sys; import training.train, training.demo; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'kerasbn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"
