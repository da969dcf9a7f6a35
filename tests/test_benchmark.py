"""Tests of training/benchmark/: the harness on fake contenders, targets and tables on
fixed numbers, the table of sections, the command line, and one quick run end to end.

Nothing here is about speed. The harness is tested with a fake clock that moves only
when a fake contender runs, so every time it reports is known exactly. The quick run
(`--quick --reps 1`) runs in a subprocess: the program configures TensorFlow's devices
and threads before TensorFlow starts, which this pytest process has already done its
own way.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.benchmark import cli, compile_time, config, first_step, harness, optional, \
    results, sections
from training.benchmark.harness import OURS, REFERENCE, THEIRS, Contender, Report, Timing
from training.models import build_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 900  # 1-2 minutes on an idle 2-core machine; far more when it is busy


# ------------------------------------------------------------------ the harness


class FakeClock:
    """A clock that moves only when a fake contender runs (by that call's cost) or the
    harness sleeps (by a whole second, so that a pause inside a timed interval would
    show as 1000 ms)."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def timing(self, reps, warmup):
        return Timing(reps, warmup, settle_seconds=1.0, clock=self.clock, sleep=self.sleep)

    def contender(self, name, costs_ms, fail_at=None):
        """A callable whose i-th call costs costs_ms[i] (the last one once they run
        out) and raises RuntimeError on call number `fail_at` (0-based)."""
        count = [0]

        def call():
            i = count[0]
            count[0] += 1
            self.calls.append(name)
            if i == fail_at:
                raise RuntimeError(f"{name} broke")
            self.now += costs_ms[min(i, len(costs_ms) - 1)] * 1e-3
        return call


def test_round_robin_times_only_the_call_that_follows_an_untimed_one():
    fake, failures = FakeClock(), []
    # One warmup call, then (untimed, timed) pairs: the warmup (100 ms) and the
    # untimed calls (50 ms) must not show; c breaks on its first untimed call.
    calls = {"a": fake.contender("a", [100, 50, 1, 50, 2, 50, 3]),
             "b": fake.contender("b", [100, 50, 4]),
             "c": fake.contender("c", [100], fail_at=1)}
    times = harness.round_robin(calls, fake.timing(reps=3, warmup=1),
                                on_error=lambda name, error: failures.append(name))
    assert failures == ["c"] and set(times) == {"a", "b"}
    assert times["a"] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert times["b"] == pytest.approx([4e-3, 4e-3, 4e-3])
    # Warmup a, b, c; then repetition 0 in order (c dropped), 1 rotated by one, and
    # 2, a new block for the two left, the cycle shuffled (`repetition_order`).
    assert harness.repetition_order(["a", "b"], 2) == ["b", "a"]
    assert fake.calls == ["a", "b", "c", "a", "a", "b", "b", "c", "b", "b", "a", "a",
                          "b", "b", "a", "a"]


def test_round_robin_rotates_by_one_each_repetition():
    fake = FakeClock()
    calls = {name: fake.contender(name, [1]) for name in "abc"}
    times = harness.round_robin(calls, fake.timing(reps=3, warmup=1), on_error=None)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert fake.calls[3:] == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a",
                              "c", "c", "a", "a", "b", "b"]


@pytest.mark.parametrize("count", [2, 3, 5, 12])
def test_repetition_orders_give_every_place_in_each_block_and_vary_the_neighbours(count):
    names = [f"c{i}" for i in range(count)]
    blocks = 6
    orders = [harness.repetition_order(names, rep) for rep in range(blocks * count)]
    assert orders[:count] == [names[shift:] + names[:shift] for shift in range(count)]
    for block in range(blocks):
        rows = orders[block * count:(block + 1) * count]
        assert all(sorted(order) == sorted(names) for order in rows)
        # Within a block, each contender has each place once.
        assert all(sorted(column) == sorted(names) for column in zip(*rows))
    # Across blocks a contender does not always follow the same one (a fixed cycle
    # would give it one predecessor at every repetition).
    predecessors = {name: {order[order.index(name) - 1] for order in orders}
                    for name in names}
    assert all(len(before) > 1 for before in predecessors.values()) or count == 2
    assert orders == [harness.repetition_order(names, rep) for rep in range(len(orders))]


def test_measure_reports_medians_quartiles_and_ratios_of_known_costs(capsys):
    fake, report = FakeClock(), Report()

    def broken():
        raise ValueError("cannot build\nsecond line")

    contenders = [
        # Timed calls (every second call after the warmup) cost 5, 1, 4, 2, 3 ms.
        Contender("ours", OURS, lambda: fake.contender("ours", [9, 9, 5, 9, 1, 9, 4, 9, 2,
                                                                9, 3])),
        Contender("theirs", THEIRS, lambda: fake.contender("theirs", [6])),
        Contender("copy", REFERENCE, lambda: fake.contender("copy", [0.5])),
        Contender("broken", THEIRS, broken)]
    group = harness.measure(report, "layer", "case 1", contenders,
                            fake.timing(reps=5, warmup=1), params={"n": 1})
    assert report.groups == [group]
    assert group["section"] == "layer" and group["params"] == {"n": 1}
    ours = group["contenders"]["ours"]
    assert ours["role"] == OURS and ours["times_ms"] == pytest.approx([5, 1, 4, 2, 3])
    assert (ours["median_ms"], ours["p25_ms"], ours["p75_ms"]) == pytest.approx((3, 2, 4))
    assert group["contenders"]["theirs"]["median_ms"] == pytest.approx(6)
    assert set(group["contenders"]) == {"ours", "theirs", "copy"}
    # By default: every one of ours against every one of theirs, no reference.
    assert [(r["numerator"], r["denominator"]) for r in group["ratios"]] == [("ours",
                                                                              "theirs")]
    assert group["ratios"][0]["ratio"] == pytest.approx(0.5)
    assert report.skipped == [{"section": "layer", "contender": "broken (case 1)",
                               "reason": "ValueError: cannot build"}]
    assert "[layer] case 1" in capsys.readouterr().out


def test_measure_keeps_only_the_pairs_asked_for_that_were_timed():
    fake, report = FakeClock(), Report()
    contenders = [Contender(name, role, lambda name=name, cost=cost: fake.contender(
        name, [cost])) for name, role, cost in (("a", OURS, 2), ("b", OURS, 3),
                                                ("c", THEIRS, 4))]
    group = harness.measure(report, "sync", "case", contenders, fake.timing(2, 0),
                            pairs=[("a", "b"), ("b", "c"), ("a", "missing")])
    assert [(r["numerator"], r["denominator"], r["ratio"]) for r in group["ratios"]] \
        == [("a", "b", pytest.approx(2 / 3)), ("b", "c", pytest.approx(0.75))]


def test_describe_gives_the_message_of_a_graph_execution_error():
    message = ("Graph execution error:\n\nDetected at node StatefulPartitionedCall defined "
               "at (most recent call last):\n  File \"x.py\", line 6, in <module>\n\n"
               "  File \"y.py\", line 9, in fit\n\nTrying to access resource k located "
               "in device CPU:1 from device CPU:0\n Cf. https://example\n")
    assert harness.describe(RuntimeError(message)) == (
        "RuntimeError: Trying to access resource k located in device CPU:1 from device CPU:0")
    assert harness.describe(ValueError("")) == "ValueError"


# ------------------------------------------------------------------ targets, tables


def group(section, params, medians, roles=None):
    """A comparison as `measure` records it, with the given medians (ms)."""
    roles = roles or {}
    return {"section": section, "case": f"{section} case", "params": params, "ratios": [],
            "contenders": {name: {"role": roles.get(name, THEIRS), "median_ms": ms,
                                  "p25_ms": ms, "p75_ms": ms, "times_ms": [ms]}
                           for name, ms in medians.items()}}


def test_targets_on_fixed_numbers():
    report = Report()
    ours = {"kerasbn": OURS, "kerasbn XLA": OURS}
    report.groups = [
        group("layer", {"shape_name": "NHWC", "mode": "training"},
              {"kerasbn": 4.0, "kerasbn XLA": 5.0, "keras": 9.0, "keras XLA": 5.0,
               "tf_keras": 6.0, "torch NCHW": 3.0, "torch channels-last": 2.0}, ours),
        group("layer", {"shape_name": "NHWC", "mode": "inference"},
              {"kerasbn": 1.0, "kerasbn XLA": 0.5, "keras": 9.0, "keras XLA": 2.0}, ours),
        group("layer", {"shape_name": "dense", "mode": "inference"},
              {"kerasbn": 1.5, "keras XLA": 1.0, "a*x+b (ops)": 1.4, "a*x+b (y in XLA)": 1.6},
              dict(ours, **{"a*x+b (ops)": REFERENCE, "a*x+b (y in XLA)": REFERENCE})),
        group("layer", {"shape_name": "NCHW", "mode": "training"},
              {"kerasbn": 1.0, "keras": 9.0}, ours),
        group("layer", {"shape_name": "dense", "mode": "training"},  # no PyTorch
              {"kerasbn": 3.0, "kerasbn XLA": 6.0, "keras": 2.0}, ours),
        group("layer", {"shape_name": "dense-small", "shape": [64, 256], "mode": "training"},
              {"kerasbn": 1.3, "keras": 1.5, "keras XLA": 1.25, "copy (tf)": 1.0}, ours),
        group("bandwidth", {}, {"kerasbn": 1.0}),
        group("sync", {}, {"kerasbn sync": 11.5, "kerasbn": 10.0, "keras sync": 11.5,
                           "keras": 9.0}),
        group("resnet", {}, {"kerasbn": 10.0, "keras": 8.0}),  # no XLA pair
        group("export", {"batch": 1}, {"kerasbn export folded": 4.0, "keras export": 5.0,
                                       "keras export, stock BN": 4.8})]
    found = [(c["target"], c["ratio"], c["limit"], c["met"])
             for c in results.targets(report)]
    assert found == [
        ("layer training NHWC: kerasbn / fastest TensorFlow", pytest.approx(0.8), 0.8, True),
        ("layer training NHWC: kerasbn / fastest PyTorch", pytest.approx(2.0), 1.0, False),
        # The layer as it comes, not compiled whole, against Keras compiled whole.
        ("layer inference NHWC: kerasbn as it comes / keras XLA", pytest.approx(0.5), 1.0,
         True),
        # The least a layer as it comes costs (1.4 ms) is above Keras XLA (1.0 ms).
        ("layer inference dense: kerasbn as it comes / keras XLA", pytest.approx(1.5), 1.0,
         False),
        ("layer inference dense: kerasbn as it comes / max(keras XLA, the least a layer "
         "as it comes costs)", pytest.approx(1.5 / 1.4), 1.0, False),
        ("layer training dense: kerasbn / fastest TensorFlow", pytest.approx(1.5), 0.8,
         False),
        ("layer training dense 64x256: kerasbn / fastest TensorFlow", pytest.approx(1.04),
         0.8, False),
        # 1.2 x 1.0 ms of floor + the 0.25 ms Keras XLA spends above it.
        ("layer training dense 64x256: kerasbn / (1.2 x TF floor + fastest TensorFlow "
         "above it)", pytest.approx(1.3 / 1.45), 1.0, True),
        ("sync: kerasbn synchronized / unsynchronized", pytest.approx(1.15), 1.15, True),
        # The one strict target: equal is not faster.
        ("sync: kerasbn synchronized / Keras synchronized", pytest.approx(1.0), 1.0, False),
        ("resnet step: kerasbn / keras", pytest.approx(1.25), 1.0, False),
        ("export batch 1: folded / fastest Keras export", pytest.approx(4 / 4.8), 0.85,
         True)]


def test_targets_of_ghost_statistics_and_first_step_on_fixed_numbers():
    report = Report()
    report.groups = [
        group("ghost", {"virtual_batch_size": 8},
              {"kerasbn vbs=8": 11.5, "kerasbn": 10.0, "tf_keras vbs=8": 11.5}),
        group("ghost", {"virtual_batch_size": 4}, {"kerasbn vbs=4": 12.0, "kerasbn": 10.0}),
        group("statistics", {}, {"recompute_statistics": 26.0,
                                 "PopulationPass reused": 12.0, "training forward": 10.0}),
        group("first_step", {}, {"kerasbn": 9.0, "kerasbn from process start": 30.0,
                                 "keras": 10.0, "keras from process start": 20.0}),
        group("first_step", {}, {"keras": 10.0})]  # kerasbn not runnable: no target
    found = [(c["target"], c["ratio"], c["limit"], c["met"])
             for c in results.targets(report)]
    assert found == [
        ("ghost vbs=8: kerasbn / kerasbn without virtual batches", pytest.approx(1.15),
         1.15, True),
        ("ghost vbs=8: kerasbn / tf_keras", pytest.approx(1.0), 1.0, False),  # strictly
        ("ghost vbs=4: kerasbn / kerasbn without virtual batches", pytest.approx(1.2),
         1.15, False),  # tf_keras missing: its target left out
        ("statistics statistics case: recompute_statistics / training forward",
         pytest.approx(2.6), 1.3, False),
        ("statistics statistics case: PopulationPass reused / training forward",
         pytest.approx(1.2), 1.3, True),
        # From before the model is built, not from the process's start.
        ("first step first_step case: kerasbn / keras", pytest.approx(0.9), 1.0, True)]


def test_add_bandwidth_on_fixed_numbers():
    report = Report()
    layer = group("layer", {"mode": "training", "bytes": 10**6},
                  {"kerasbn": 4.0, "copy (numpy)": 0.5, "copy (tf)": 1.0,
                   config.LEAST_EXACT_TRAINING: 0.1},
                  {"kerasbn": OURS, "copy (numpy)": REFERENCE, "copy (tf)": REFERENCE,
                   config.LEAST_EXACT_TRAINING: REFERENCE})  # a reference, not a copy
    sections.add_bandwidth(report, layer)
    (bandwidth,) = report.groups
    # A copy moves 2 MB: 4 GB/s in 0.5 ms; the step moves 8 MB: 2 GB/s in 4 ms.
    assert bandwidth["params"]["bytes_moved"] == 8 * 10**6
    assert bandwidth["params"]["copy_gbps"] == pytest.approx(
        {"copy (numpy)": 4.0, "copy (tf)": 2.0})
    assert bandwidth["params"]["fastest_copy_gbps"] == pytest.approx(4.0)
    assert bandwidth["contenders"] == {"kerasbn": {
        "role": OURS, "median_ms": 4.0, "gbps": pytest.approx(2.0),
        "fraction": pytest.approx(0.5)}}
    sections.add_bandwidth(report, group("layer", {"mode": "inference", "bytes": 1},
                                         {"kerasbn": 1.0}, {"kerasbn": OURS}))
    assert len(report.groups) == 1
    assert report.skipped[0]["reason"] == "no copy could be timed"


@pytest.mark.parametrize("shape", [(8, 4, 4, 16), (64, 32)])
def test_least_exact_training_runs_kerasbns_fused_math_on_given_statistics(rng, shape):
    """The reference's dγ is the layer's (γ = 1, β = 0): the same kernels, the same
    statistics; channels first has no such reference."""
    import kerasbn
    from training.benchmark import contenders

    x_np = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy_np = rng.standard_normal(shape).astype(np.float32)
    (reference,) = contenders.least_exact_training(x_np, dy_np, -1)
    assert reference.name == config.LEAST_EXACT_TRAINING and reference.role == REFERENCE
    layer = kerasbn.BatchNormalization(epsilon=config.EPSILON)
    ours = contenders.tf_layer_call(layer, tf.constant(x_np), tf.constant(dy_np),
                                    training=True, xla=False)
    np.testing.assert_allclose(reference.make()(), ours(), rtol=1e-5, atol=1e-5)
    assert contenders.least_exact_training(x_np.reshape(8, 16, -1), dy_np, 1) == []


def test_the_exchanges_alone_change_no_number_of_the_unsynchronized_layer(
        mirrored_strategy, rng):
    """The sync section's reference adds a synchronized layer's two exchanges to the
    unsynchronized layer: its outputs and gradients are that layer's, to the bit."""
    import kerasbn
    from training.benchmark import contenders

    replicas = mirrored_strategy.num_replicas_in_sync
    x_np = (rng.standard_normal((4 * replicas, 6, 6, 8)) * 2 + 3).astype(np.float32)
    x = mirrored_strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(np.split(x_np, replicas)[context.replica_id_in_sync_group]))

    def step(layer_class):
        with mirrored_strategy.scope():
            layer = layer_class(momentum=0.5)
            layer.build((None, 6, 6, 8))

        def replica(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.sin(y))
            return [y] + tape.gradient(loss, [x, layer.gamma])

        results = tf.function(lambda x: mirrored_strategy.run(replica, (x,)))(x)
        return [np.concatenate(mirrored_strategy.experimental_local_results(t))
                for t in results] + [layer.moving_mean.numpy()]

    for ours, plain in zip(step(contenders.UnsynchronizedWithExchanges),
                           step(kerasbn.BatchNormalization)):
        np.testing.assert_array_equal(ours, plain)


def test_accuracy_section_measures_errors_against_float64_statistics(monkeypatch):
    """On fake layers whose statistics are off by known amounts."""
    def one_batch_statistics(x_np):
        exact = x_np.astype(np.float64)
        mean, variance = exact.mean(axis=(0, 1, 2)), exact.var(axis=(0, 1, 2))
        off_mean = mean + np.where(np.arange(mean.size) == 1, 0.25, 0.0) * np.sqrt(variance)
        return [("exact", OURS, mean, variance),
                ("off", THEIRS, off_mean, variance * np.linspace(1.0, 1.02, variance.size))]

    monkeypatch.setattr(sections.contending, "one_batch_statistics", one_batch_statistics)
    quick = dataclasses.replace(config.QUICK, accuracy_offsets=(0.0, 1e4))
    report = Report()
    sections.section_accuracy(sections.Run(quick, ("accuracy",), np.random.default_rng(0),
                                           report))
    assert [g["params"]["offset"] for g in report.groups] == [0.0, 1e4]
    for g in report.groups:
        assert g["section"] == "accuracy" and g["ratios"] == []
        exact, off = g["contenders"]["exact"], g["contenders"]["off"]
        assert exact == {"role": OURS, "mean_error_std": 0.0, "variance_error": 0.0}
        assert off["mean_error_std"] == pytest.approx(0.25)
        assert off["variance_error"] == pytest.approx(0.02)
    assert results.group_table(report.groups[0]) == (
        ("contender", "mean error (std)", "variance error (relative)"),
        [("exact", "0.00e+00", "0.00e+00"), ("off", "2.50e-01", "2.00e-02")])


def test_table_as_text_and_as_markdown():
    rows = [("x", 1.0), ("long name", 0.12345)]
    assert results.table(("a", "bb"), rows) == (
        "a          bb\n"
        "---------  -----\n"
        "x          1.000\n"
        "long name  0.123")
    assert results.table(("a", "bb"), rows, markdown=True) == (
        "| a | bb |\n"
        "|---|---|\n"
        "| x | 1.000 |\n"
        "| long name | 0.123 |")


def test_render_prints_ratios_targets_and_skips():
    report = Report()
    comparison = group("resnet", {}, {"kerasbn": 9.0, "keras": 10.0}, {"kerasbn": OURS})
    comparison["contenders"]["keras"]["p75_ms"] = 12.5
    comparison["ratios"] = [{"numerator": "kerasbn", "denominator": "keras", "ratio": 0.9}]
    report.groups = [comparison]
    report.skipped = [{"section": "layer", "contender": "torch", "reason": "not here"}]
    assert results.render(report) == (
        "\n"
        "resnet: resnet case\n"
        "contender  median ms  p25-p75 ms     kerasbn / it\n"
        "---------  ---------  -------------  ------------\n"
        "kerasbn    9.000      9.000-9.000\n"
        "keras      10.000     10.000-12.500  0.900\n"
        "\n"
        "targets (kerasbn's fastest variant against the fastest contender of the kind "
        "named)\n"
        "target                        ratio  limit  met\n"
        "----------------------------  -----  -----  ---\n"
        "resnet step: kerasbn / keras  0.900  1.000  yes\n"
        "\n"
        "skipped\n"
        "section  contender  reason\n"
        "-------  ---------  --------\n"
        "layer    torch      not here\n")


# ------------------------------------------------------------------ config, sections, CLI


def test_config_with_reps_and_as_json():
    quick = config.QUICK.with_reps(2)
    changed = {f.name for f in dataclasses.fields(quick)
               if getattr(quick, f.name) != getattr(config.QUICK, f.name)}
    assert changed == {"layer_reps", "sync_reps", "resnet_reps", "export_reps",
                       "statistics_reps", "ghost_reps", "first_step_reps",
                       "xla_compile_reps"}
    assert quick.layer_reps == quick.sync_reps == quick.resnet_reps == \
        quick.export_reps == quick.statistics_reps == quick.ghost_reps == \
        quick.first_step_reps == quick.xla_compile_reps == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.warmup = 5
    document = json.loads(json.dumps(config.QUICK.to_json()))
    assert list(document) == [
        "layer_cases", "layer_reps", "sync_reps", "resnet_reps", "export_reps", "warmup",
        "sync_batch", "sync_image", "sync_blocks", "resnet_batch", "resnet_image",
        "resnet_xla", "export_batches", "export_all", "statistics_cases", "statistics_reps",
        "ghost_shape", "ghost_virtual_batch_size", "ghost_reps", "first_step_cases",
        "first_step_reps", "first_step_image", "first_step_batch", "first_step_steps",
        "first_step_timeout", "xla_compile_models", "xla_compile_reps", "accuracy_shape",
        "accuracy_offsets"]
    assert document["layer_cases"] == [["NHWC", [16, 16, 16, 32], -1],
                                       ["dense", [64, 256], -1],
                                       ["NCHW", [16, 32, 16, 16], 1]]
    assert document["first_step_cases"] == [["resnet", 1, "off"]]
    # The full run: median of 3 fresh processes, every configuration the section names.
    assert config.FULL.first_step_reps == 3
    assert {(c.model, c.replicas, c.xla) for c in config.FULL.first_step_cases} >= {
        (model, replicas, xla) for model in ("mobilenet", "resnet")
        for replicas in (1, config.REPLICAS) for xla in ("off", "step")}


def test_a_registered_section_runs_once_in_table_order(monkeypatch):
    ran = []

    def record(name):
        return lambda run: ran.append((name, run.sections))

    table = {"layer": sections.Section(record("layer"), "the layer"),
             "bandwidth": sections.Section(None, "from the layer", part_of="layer"),
             "sync": sections.Section(record("sync"), "replicas", logical_devices=4),
             "statistics": sections.Section(record("statistics"), "a new one")}
    monkeypatch.setattr(sections, "SECTIONS", table)
    monkeypatch.setattr(cli, "SECTIONS", table)
    options = cli.parse_args(["--sections", "statistics,bandwidth,layer"])
    assert options.sections == ("layer", "bandwidth", "statistics")
    sections.run_sections(sections.Run(config.QUICK, options.sections,
                                       np.random.default_rng(0), Report()))
    assert [name for name, _ in ran] == ["layer", "statistics"]
    assert sections.logical_devices(("bandwidth", "statistics")) == 1
    assert sections.logical_devices(("sync", "layer")) == 4
    assert sections.describe_sections().splitlines()[-1] == "  statistics a new one"


def test_parse_args():
    options = cli.parse_args(["--quick", "--sections", " export, layer ", "--reps", "2",
                              "--out", "somewhere"])
    assert options == cli.Options(quick=True, sections=("layer", "export"),
                                  out="somewhere", reps=2)
    assert options.config == config.QUICK.with_reps(2)
    options = cli.parse_args([])
    assert options.sections == tuple(sections.SECTIONS) and options.config is config.FULL
    assert options.out.startswith(os.path.join("results", "bench-"))


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--quick", "--sections", "--out", "--reps"))
    assert all(f"\n  {name:<10} " in text for name in sections.SECTIONS)
    assert "How it measures:" in text and "Writes results.json" in text
    for argv, word in ((["--sections", "layer,nonsense"], "nonsense"),
                       (["--sections", ","], "--sections"),
                       (["--reps", "0"], "--reps")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert word in capsys.readouterr().err


# ------------------------------------------------------------------ first_step


def fake_child(code):
    """A command line running `code` in a fresh Python (it receives --spawned-at)."""
    return [sys.executable, "-c", code]


def test_run_fresh_reads_the_times_or_the_error_of_a_fresh_process():
    times = {"first_step_s": 1.5, "total_s": 4.0}
    printed = fake_child("import json, sys; print('TensorFlow chatter'); "
                         f"print({first_step.MARKER!r} + json.dumps({times!r})); "
                         "assert sys.argv[1] == '--spawned-at' and float(sys.argv[2]) > 0")
    assert first_step.run_fresh(printed, timeout=60) == times
    error = {"error": "InvalidArgumentError: Trying to access resource"}
    failed = fake_child(f"import json, sys; print({first_step.MARKER!r} + "
                        f"json.dumps({error!r})); sys.exit(1)")
    assert first_step.run_fresh(failed, timeout=60) == error
    crashed = fake_child("import sys; sys.stderr.write('noise\\nSegmentation fault\\n'); "
                         "sys.exit(-11)")
    assert first_step.run_fresh(crashed, timeout=60) == {"error": "Segmentation fault"}
    assert first_step.run_fresh(fake_child("import sys; sys.exit(3)"), timeout=60) == {
        "error": "exit status 3"}
    assert first_step.run_fresh(fake_child("import time; time.sleep(30)"), timeout=0.5) \
        == {"error": "no first step within 0 s"}


def test_first_step_command_is_what_the_child_parses():
    argv = first_step.command("mobilenet", "kerasbn", 4, "plan", (32, 32, 3), 32, 2)
    assert argv[:3] == [sys.executable, "-m", "training.benchmark.first_step"]
    args = first_step.build_parser().parse_args(argv[3:] + ["--spawned-at", "12.5"])
    assert (args.model, args.bn, args.replicas, args.xla, args.image, args.batch,
            args.steps, args.spawned_at) == ("mobilenet", "kerasbn", 4, "plan", "32,32,3",
                                             32, 2, 12.5)


def test_first_step_build_times_the_conversion_of_a_converted_model_only():
    import kerasbn

    strategy = tf.distribute.get_strategy()  # the default: one device
    converted, convert_s, original = first_step.build("mobilenet", "kerasbn", (32, 32, 3),
                                                      strategy)
    assert convert_s > 0
    assert any(isinstance(layer, kerasbn.BatchNormalization) for layer in converted.layers)
    assert not any(isinstance(layer, kerasbn.BatchNormalization) for layer in original.layers)
    assert first_step.keras_copy_time(original, strategy) > 0  # Keras's copy, the reference
    stock, stock_convert_s, none = first_step.build("mobilenet", "keras", (32, 32, 3),
                                                    strategy)
    assert stock_convert_s == 0.0 and none is None
    assert not any(isinstance(layer, kerasbn.BatchNormalization) for layer in stock.layers)
    assert first_step.build("resnet", "kerasbn", (8, 8, 1), strategy).convert_s == 0.0


def test_first_step_build_makes_the_trained_variables_in_the_strategy_scope(
        mirrored_strategy):
    for bn in first_step.BATCH_NORMS:
        model = first_step.build("mobilenet", bn, (32, 32, 3), mirrored_strategy).model
        assert all(isinstance(weight.value, tf.distribute.DistributedValues)
                   for weight in model.weights), bn


def test_first_step_section_alternates_processes_and_records_what_is_not_runnable(
        monkeypatch):
    launched = []

    def run_fresh(argv, timeout):
        bn, replicas = argv[argv.index("--bn") + 1], int(argv[argv.index("--replicas") + 1])
        launched.append((replicas, bn))
        if replicas == 4 and bn == "kerasbn":
            return {"error": "InvalidArgumentError: Trying to access resource"}
        cost = {"kerasbn": 2.0, "keras": 4.0}[bn] + len(launched) / 100
        convert_s = {"kerasbn": 0.25, "keras": 0.0}[bn]
        clone_s = {"kerasbn": 0.2, "keras": 0.0}[bn]
        return {"python_s": 0.1, "imports_s": 5.0, "build_s": 0.5, "convert_s": convert_s,
                "clone_s": clone_s,
                "fit_s": cost - 0.5, "first_step_s": cost, "total_s": cost + 5.1,
                "teardown_s": cost / 10}

    monkeypatch.setattr(first_step, "run_fresh", run_fresh)
    cases = (config.FirstStepCase("resnet", 1, "off"), config.FirstStepCase("resnet", 4, "step"))
    run = sections.Run(dataclasses.replace(config.QUICK, first_step_cases=cases,
                                           first_step_reps=3),
                       ("first_step",), np.random.default_rng(0), Report())
    sections.section_first_step(run)
    # Alternating order; a contender whose process failed is not started again.
    assert launched == [(1, "kerasbn"), (1, "keras"), (1, "keras"), (1, "kerasbn"),
                        (1, "kerasbn"), (1, "keras"), (4, "kerasbn"), (4, "keras"),
                        (4, "keras"), (4, "keras")]
    one, four = run.report.groups
    assert one["case"] == "resnet, 1 device, jit_compile=False"
    assert one["params"]["replicas"] == 1 and one["params"]["xla"] == "off"
    assert [p["first_step_s"] for p in one["params"]["processes"]["kerasbn"]] == \
        pytest.approx([2.01, 2.04, 2.05])
    assert one["contenders"]["kerasbn"]["median_ms"] == pytest.approx(2040)
    assert one["contenders"]["keras from process start"]["median_ms"] == pytest.approx(9130)
    # The first step's parts: the build (conversion included) and compile + fit.
    assert one["contenders"]["kerasbn build"]["median_ms"] == pytest.approx(500)
    assert one["contenders"]["kerasbn compile and fit"]["median_ms"] == pytest.approx(1540)
    assert one["contenders"]["kerasbn conversion"]["median_ms"] == pytest.approx(250)
    assert one["contenders"]["kerasbn: Keras's copy of the same model"] == {
        "role": REFERENCE, "median_ms": pytest.approx(200), "p25_ms": pytest.approx(200),
        "p75_ms": pytest.approx(200), "times_ms": [200.0] * 3}
    # The wait after the last step until fit returns is reported, and no target.
    assert one["contenders"]["kerasbn fit's return after its last step"]["median_ms"] == \
        pytest.approx(204)
    assert "keras conversion" not in one["contenders"]  # nothing converted
    assert [(r["numerator"], r["denominator"]) for r in one["ratios"]] == [
        ("kerasbn", "keras"), ("kerasbn from process start", "keras from process start"),
        ("kerasbn build", "keras build"), ("kerasbn compile and fit", "keras compile and fit"),
        ("kerasbn fit's return after its last step", "keras fit's return after its last step"),
        ("kerasbn conversion", "kerasbn: Keras's copy of the same model")]
    assert set(four["contenders"]) == {"keras", "keras from process start", "keras build",
                                       "keras compile and fit",
                                       "keras fit's return after its last step"}
    assert four["case"] == "resnet, 4 CPU replicas, jit_compile=True"
    assert run.report.skipped == [{
        "section": "first_step", "contender": f"kerasbn ({four['case']})",
        "reason": "not runnable here: InvalidArgumentError: Trying to access resource"}]


# ------------------------------------------------------------------ xla_compile


def test_xla_compile_time_compiles_a_new_step_that_trains(rng):
    model = build_model("resnet", (8, 8, 1), config.NUM_CLASSES, bn="kerasbn")
    x = tf.constant(rng.standard_normal((16, 8, 8, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, config.NUM_CLASSES, 16).astype(np.int32))
    before = [weight.numpy() for weight in model.weights]
    trace_s, compile_s = compile_time.xla_compile_time(model, x, y)
    again = compile_time.xla_compile_time(model, x, y)
    assert trace_s > 0 and compile_s > 0 and again[1] > 0  # a new function, compiled anew
    after = [weight.numpy() for weight in model.weights]
    changed = [not np.array_equal(b, a) for b, a in zip(before, after)]
    assert all(changed[:2]), "the step trains (the first conv's kernel and bias)"
    moving = [i for i, w in enumerate(model.weights) if "moving_mean" in w.path]
    assert moving and all(changed[i] for i in moving), "and moves the statistics"


def test_xla_compile_section_alternates_and_records_the_ratio(monkeypatch):
    built, compiled = [], []
    monkeypatch.setattr(sections.first_step, "build",
                        lambda name, bn, image, strategy: built.append((name, bn)) or
                        first_step.Built((name, bn), 0.0))

    def xla_compile_time(model, x, y):
        compiled.append(model[1])
        return 0.5, {"kerasbn": 3.0, "keras": 2.0}[model[1]] + len(compiled) / 100

    monkeypatch.setattr(compile_time, "xla_compile_time", xla_compile_time)
    run = sections.Run(dataclasses.replace(config.QUICK, xla_compile_reps=3,
                                           xla_compile_models=("mobilenet", "resnet")),
                       ("xla_compile",), np.random.default_rng(0), Report())
    sections.section_xla_compile(run)
    assert built == [("mobilenet", "kerasbn"), ("mobilenet", "keras"),
                     ("resnet", "kerasbn"), ("resnet", "keras")]
    assert compiled[:6] == ["kerasbn", "keras", "keras", "kerasbn", "kerasbn", "keras"]
    mobilenet, resnet = run.report.groups
    assert mobilenet["case"] == "mobilenet training step compiled whole, batch 16"
    assert mobilenet["contenders"]["kerasbn XLA compile"]["median_ms"] == \
        pytest.approx(3040)
    assert mobilenet["contenders"]["keras XLA compile"]["median_ms"] == pytest.approx(2030)
    assert mobilenet["contenders"]["keras trace"]["median_ms"] == pytest.approx(500)
    assert [(r["numerator"], r["denominator"]) for r in resnet["ratios"]] == [
        ("kerasbn XLA compile", "keras XLA compile"), ("kerasbn trace", "keras trace")]
    assert resnet["ratios"][0]["ratio"] == pytest.approx(3.10 / 2.09)  # medians


# ------------------------------------------------------------------ the quick run

LAYER_CONTENDERS = ["kerasbn", "kerasbn XLA", "kerasbn jit_compile=True",
                    "kerasbn jit_compile=False", "keras",
                    "keras XLA"]
SYNC_CONTENDERS = ["kerasbn sync", "kerasbn", config.SYNC_EXCHANGES_ONLY, "keras sync",
                   "keras"]
EXPORT_CONTENDERS = ["kerasbn export folded", "keras export"]
DOCUMENT_KEYS = ["command", "started", "seconds", "quick", "sections", "config",
                 "bytes_moved", "machine", "notes", "skipped", "groups", "ratios",
                 "targets"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m training.benchmark --quick --reps 1`: (out dir, results.json, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(
        [sys.executable, "-m", "training.benchmark", "--quick", "--reps", "1",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert process.returncode == 0, (
        f"exit {process.returncode}\nstdout:\n{process.stdout[-4000:]}\n"
        f"stderr:\n{process.stderr[-4000:]}")
    return out, json.loads((out / "results.json").read_text()), process.stdout


def groups(document, section):
    return [g for g in document["groups"] if g["section"] == section]


def assert_timed(group, required, optional_names=(), skipped=()):
    """`required` were timed once each, positive times; each of `optional_names` was
    timed or skipped (by its name or its library's)."""
    assert not set(required) - set(group["contenders"]), group["case"]
    for name in optional_names:
        assert name in group["contenders"] or name in skipped \
            or name.split()[0] in skipped, (group["case"], name)
    for name, result in group["contenders"].items():
        assert len(result["times_ms"]) == 1 and result["times_ms"][0] > 0, name
        assert result["p25_ms"] == result["median_ms"] == result["p75_ms"]


def test_quick_run_writes_and_prints_what_it_measured(quick_run):
    out, document, stdout = quick_run
    assert list(document) == DOCUMENT_KEYS
    assert document["quick"] is True
    assert document["sections"] == list(sections.SECTIONS)
    assert document["config"] == json.loads(json.dumps(config.QUICK.with_reps(1).to_json()))
    assert document["machine"]["threads"] >= 1 and document["machine"]["versions"]["keras"]
    assert all(s["reason"] for s in document["skipped"])
    report = Report()
    report.groups, report.skipped = document["groups"], document["skipped"]
    assert results.render(report) in stdout
    assert results.render(report, markdown=True) in (out / "results.md").read_text()
    assert f"Results directory: {out}" in stdout
    if optional.matplotlib is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "chart" in {s["section"] for s in document["skipped"]}
    assert {t["target"].split(":")[0] for t in document["targets"]} >= {
        "layer training NHWC 16x16x16x32", "layer inference dense 64x256", "sync",
        "resnet step", "export batch 1",
        "statistics ResNet 8x8x1, 3 batches of 16",
        "first step resnet, 1 device, jit_compile=False"}


def test_quick_run_timed_every_section(quick_run):
    _, document, _ = quick_run
    skipped = {s["contender"].split(" (")[0] for s in document["skipped"]}
    layer = groups(document, "layer")
    assert [(g["params"]["shape_name"], g["params"]["mode"]) for g in layer] == [
        (case.name, mode) for case in config.QUICK.layer_cases
        for mode in ("training", "inference")]
    for g in layer:
        torch_names = (["torch NCHW", "torch channels-last"]
                       if len(g["params"]["shape"]) == 4 else ["torch"])
        least = list(config.LEAST_INFERENCE) if g["params"]["mode"] == "inference" else []
        assert_timed(g, LAYER_CONTENDERS + least, ["tf_keras"] + torch_names, skipped)
        assert {(r["numerator"], r["denominator"]) for r in g["ratios"]} >= {
            ("kerasbn", "keras"), ("kerasbn XLA", "keras XLA")}
    bandwidth = groups(document, "bandwidth")
    assert [g["case"] for g in bandwidth] == [g["case"] for g in layer]
    assert all(r["fraction"] > 0 for g in bandwidth for r in g["contenders"].values())
    (sync,) = groups(document, "sync")
    assert sync["params"]["replicas"] == config.REPLICAS
    assert_timed(sync, SYNC_CONTENDERS)
    (resnet,) = groups(document, "resnet")
    assert_timed(resnet, ["kerasbn", "keras"])
    export = groups(document, "export")
    assert [g["params"]["batch"] for g in export] == list(config.QUICK.export_batches)
    for g in export:
        assert_timed(g, EXPORT_CONTENDERS)


def test_quick_run_measured_what_each_layer_records_for_one_batch(quick_run):
    _, document, _ = quick_run
    skipped = {s["contender"] for s in document["skipped"] if s["section"] == "accuracy"}
    accuracy = groups(document, "accuracy")
    assert [g["params"]["offset"] for g in accuracy] == list(config.QUICK.accuracy_offsets)
    for g in accuracy:
        names = set(g["contenders"])
        assert names >= {"kerasbn", "keras"}
        assert ("tf_keras" in names) != ("tf_keras" in skipped)
        assert ("torch channels-last" in names) != ("torch" in skipped)
        # float32 rounding, whatever the mean: the contract of kerasbn's statistics
        assert g["contenders"]["kerasbn"]["variance_error"] < 1e-5
        assert g["contenders"]["kerasbn"]["mean_error_std"] < 1e-3
    # At mean 0 every layer is accurate: a variance recorded times n/(n - 1) and not
    # undone would be off by 1/n (n = 1024 values a channel).
    assert all(r["variance_error"] < 1e-4 for r in accuracy[0]["contenders"].values())


def test_quick_run_timed_ghost_statistics_first_step_and_xla_compile(quick_run):
    _, document, _ = quick_run
    skipped = {s["contender"].split(" (")[0] for s in document["skipped"]}
    (ghost,) = groups(document, "ghost")
    assert ghost["params"] == {"shape": list(config.QUICK.ghost_shape),
                               "virtual_batch_size": config.QUICK.ghost_virtual_batch_size}
    assert_timed(ghost, ["kerasbn vbs=8", "kerasbn"], ["tf_keras vbs=8"], skipped)
    assert ("kerasbn vbs=8", "kerasbn") in {(r["numerator"], r["denominator"])
                                             for r in ghost["ratios"]}
    (statistics,) = groups(document, "statistics")
    assert statistics["params"] == {"image": [8, 8, 1], "batch": 16, "batches": 3}
    assert_timed(statistics, ["recompute_statistics", "PopulationPass reused",
                              "training forward"])
    (first,) = groups(document, "first_step")
    assert first["case"] == "resnet, 1 device, jit_compile=False"
    assert_timed(first, ["kerasbn", "keras", "kerasbn from process start",
                         "keras from process start", "kerasbn build", "keras build",
                         "kerasbn compile and fit", "keras compile and fit",
                         "kerasbn fit's return after its last step",
                         "keras fit's return after its last step"])
    for bn in ("kerasbn", "keras"):
        (process,) = first["params"]["processes"][bn]
        assert set(process) == {"python_s", "imports_s", "build_s", "convert_s", "clone_s",
                                "fit_s", "first_step_s", "total_s", "teardown_s"}
        assert process["clone_s"] == 0.0  # nothing converted, nothing copied
        assert process["teardown_s"] >= 0
        assert process["convert_s"] == 0.0  # the ResNet is written with its batch norm
        assert process["build_s"] + process["fit_s"] == pytest.approx(process["first_step_s"])
        assert 0 < process["first_step_s"] < process["total_s"]
        assert first["contenders"][bn]["median_ms"] == pytest.approx(
            process["first_step_s"] * 1e3)
    (compile_,) = groups(document, "xla_compile")
    assert compile_["params"] == {"model": "resnet", "image": [8, 8, 1], "batch": 16}
    assert_timed(compile_, ["kerasbn trace", "keras trace", "kerasbn XLA compile",
                            "keras XLA compile"])
    found = {t["target"] for t in document["targets"]}
    assert found >= {"ghost vbs=8: kerasbn / kerasbn without virtual batches",
                     "statistics ResNet 8x8x1, 3 batches of 16: recompute_statistics / "
                     "training forward",
                     "statistics ResNet 8x8x1, 3 batches of 16: PopulationPass reused / "
                     "training forward",
                     "first step resnet, 1 device, jit_compile=False: kerasbn / keras"}
