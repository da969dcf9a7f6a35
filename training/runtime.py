"""TensorFlow set-up for the training programs, and every Keras or TensorFlow workaround.

`configure_runtime` must run before TensorFlow initializes: it splits the CPU into
logical devices and decides, once, what XLA compiles (an `XlaPlan`). `make_strategy`,
`task_of` and `describe_devices` follow once TensorFlow runs.

    runtime = configure_runtime(replicas=4, multi_worker=False, xla=True)
    strategy = make_strategy(runtime)
    model.compile(..., jit_compile=runtime.xla.step_jit_compile)

Each workaround of a Keras or TensorFlow defect lives here, marked "WORKAROUND", with the
upstream behaviour it works around: delete it when upstream is fixed. (Those of
tensorflow-datasets are hooks on its objects and stay beside them, in `training.data`
and `training.offline_builder`, marked the same way.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Union

from training.program import first_error_line

# XLA auto-clustering on CPU: cluster every compilable op (level 2), on CPUs too.
AUTO_JIT_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit")

DEFAULT = "default"
MIRRORED = "mirrored"
MULTI_WORKER = "multi_worker"


class ConfigurationError(RuntimeError):
    """The requested devices or XLA arrangement cannot be had in this process."""


@dataclasses.dataclass(frozen=True)
class XlaPlan:
    """What XLA compiles in this run: decided once, read by whatever compiles.

    Attributes:
        requested: whether XLA was asked for (--xla).
        step_jit_compile: `model.compile(jit_compile=...)` of the training step.
        layer_jit_compile: the kerasbn layers' `jit_compile` (their math as XLA
            programs of their own): False, or "auto" (from 1M values an input, see
            `kerasbn.programs.worth_compiling`; inside a whole compiled step the math is
            part of that program).
        auto_clustering: whether XLA auto-clustering (TF_XLA_FLAGS) is in force in
            this process.
        evaluation_jit_compile: `model.compile(jit_compile=...)` of an evaluation on
            one device, which XLA can always compile whole.
        description: one sentence saying what is compiled, for the "xla:" line.
    """

    requested: bool
    step_jit_compile: bool
    layer_jit_compile: Union[bool, str]  # False or "auto"
    auto_clustering: bool
    evaluation_jit_compile: bool
    description: str

    @property
    def compiles(self):
        """Whether XLA compiles any part of the training step."""
        return bool(self.step_jit_compile or self.layer_jit_compile or self.auto_clustering)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The devices and the XLA plan of a run, as `configure_runtime` set them up.

    Attributes:
        strategy: `DEFAULT` (one device), `MIRRORED` or `MULTI_WORKER`.
        devices: the device names of a `MIRRORED` strategy, else None.
        on_gpu: whether TensorFlow found a GPU.
        xla: the `XlaPlan`.
    """

    strategy: str
    devices: tuple | None
    on_gpu: bool
    xla: XlaPlan


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in a cluster.

    Attributes:
        chief: whether it is the chief (always, outside a cluster).
        name: "<task type>_<task id>" in a cluster, else None.
    """

    chief: bool
    name: str | None


# ------------------------------------------------------------------ before TensorFlow


def configure_runtime(*, replicas=1, multi_worker=False, xla=True, try_whole_step=False):
    """Sets up devices and XLA before TensorFlow initializes; returns the arrangement.

    Splits the CPU into `replicas` logical devices when there is no GPU, and switches
    XLA auto-clustering on (XLA with several CPU replicas or workers) or off. In a
    process where TensorFlow already runs, it uses what is there.

    Args:
        replicas: replicas of a MirroredStrategy (1: one device).
        multi_worker: use MultiWorkerMirroredStrategy (`replicas` is then ignored).
        xla: compile with XLA, as much as the configuration allows.
        try_whole_step: see `plan_xla`.

    Returns:
        A `Runtime`.

    Raises:
        ConfigurationError: the devices or the XLA arrangement cannot be had, because
            TensorFlow was already initialized or there are too few GPUs.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    several = multi_worker or replicas > 1
    wanted = xla and several and not gpus_expected()
    # XLA reads TF_XLA_FLAGS once, when TensorFlow first looks at its devices.
    if tensorflow_started():
        in_force = _auto_clustering_flags_set()
    else:
        _set_auto_clustering(wanted)
        in_force = wanted

    with startup_noise_filtered():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")

    strategy, devices = DEFAULT, None
    if multi_worker:
        strategy = MULTI_WORKER
    elif replicas > 1:
        strategy = MIRRORED
        devices = _gpu_devices(gpus, replicas) if gpus else split_cpu(replicas)
    plan = plan_xla(xla, strategy, replicas, on_gpu=bool(gpus), auto_clustering=in_force,
                    try_whole_step=try_whole_step)
    if wanted and gpus:
        plan = dataclasses.replace(plan, description=plan.description + (
            "; NOTE: GPUs were found only after auto-clustering had been switched on"))
    return Runtime(strategy, devices, bool(gpus), plan)


def plan_xla(requested, strategy, replicas, *, on_gpu, auto_clustering,
             try_whole_step=False):
    """The largest XLA compilation the configuration allows (see the README's table).

    Args:
        requested: whether XLA was asked for.
        strategy: `DEFAULT`, `MIRRORED` or `MULTI_WORKER`.
        replicas: the replicas of a `MIRRORED` strategy.
        on_gpu: whether the replicas are GPUs.
        auto_clustering: whether XLA auto-clustering is in force in this process.
        try_whole_step: plan the whole compiled step on CPU replicas too, as on GPUs,
            which TensorFlow refuses on CPUs: what tests the fallback
            (`whole_step_fallback`) where there is no GPU.

    Returns:
        An `XlaPlan`.

    Raises:
        ConfigurationError: XLA is requested on several CPU replicas or workers but
            auto-clustering is not in force (it can only be switched on before
            TensorFlow starts).
    """
    if not requested:
        text = ("off: nothing is compiled (model.compile(jit_compile=False), kerasbn "
                "layers with jit_compile=False, no auto-clustering)")
        if auto_clustering:
            text += ("; NOTE: XLA auto-clustering was already on in this process "
                     "(TF_XLA_FLAGS) and stays on")
        return XlaPlan(False, False, False, auto_clustering, False, text)
    if strategy == DEFAULT or on_gpu or try_whole_step:
        kind = "GPU" if on_gpu else "CPU"
        where = {DEFAULT: "one device", MIRRORED: f"{replicas} {kind} replicas",
                 MULTI_WORKER: f"{kind} workers"}[strategy]
        text = (f"{where}: the whole training step is compiled "
                "(model.compile(jit_compile=True): forward, backward and optimizer update "
                "in one XLA program per replica)")
        if auto_clustering:
            text += "; XLA auto-clustering is on as well (TF_XLA_FLAGS)"
        return XlaPlan(True, True, "auto", auto_clustering, True, text)
    if not auto_clustering:
        raise ConfigurationError(
            "--xla with several CPU replicas or workers needs XLA auto-clustering, "
            "which must be switched on before TensorFlow initializes: run "
            "`python -m training.train` in a fresh process, or set TF_XLA_FLAGS="
            f"\"{' '.join(AUTO_JIT_FLAGS)}\" before starting Python (or use --no-xla)")
    # WORKAROUND: TensorFlow cannot compile a whole step that reads variables on other
    # devices ("Trying to access resource ... located in device CPU:1 from device
    # CPU:0") nor a collective on CPU ("Collectives are not yet implemented for CPU
    # devices when compiling with XLA"), so on CPU replicas XLA compiles clusters.
    what = "workers" if strategy == MULTI_WORKER else f"{replicas} CPU replicas"
    text = (f"{what}: TensorFlow cannot compile a whole multi-replica step on CPUs, so "
            f"XLA auto-clustering ({' '.join(AUTO_JIT_FLAGS)}) compiles the step in "
            "clusters around the cross-replica ops"
            + (" (the collectives stay outside: XLA has no CPU kernel for them)"
               if strategy == MULTI_WORKER else "")
            + ", and the kerasbn layers run their math as XLA programs of their own "
              "from 1M values an input (model.compile(jit_compile=False), layers' "
              "jit_compile=\"auto\")")
    return XlaPlan(True, False, "auto", True, True, text)


def whole_step_fallback(plan, error):
    """The plan after TensorFlow refused to compile the whole step on several replicas.

    The whole step per replica (`model.compile(jit_compile=True)` under a strategy of
    several replicas) has not run on GPUs in this project's tests, and on CPU replicas
    TensorFlow refuses it; the training program tries it on its first step and, when
    it is refused, trains with what runs on CPU replicas: the kerasbn layers' own XLA
    programs, and auto-clustering when it is in force.

    Args:
        plan: the `XlaPlan` whose whole step was refused.
        error: the exception TensorFlow raised.

    Returns:
        An `XlaPlan` with `step_jit_compile=False` and a description that says why.
    """
    reason = f"{type(error).__name__}: {first_error_line(error, limit=200)}"
    return dataclasses.replace(
        plan, step_jit_compile=False, layer_jit_compile="auto",
        description=(
            f"TensorFlow refused the whole compiled step on several replicas ({reason}); "
            "fell back to the kerasbn layers' own XLA programs (from 1M values an "
            "input) (model.compile(jit_compile=False))"
            + (" with XLA auto-clustering" if plan.auto_clustering else "")))


def gpus_expected():
    """Whether this machine seems to have a usable GPU, found without starting TensorFlow.

    Asking TensorFlow would initialize it, after which XLA's auto-clustering flags can no
    longer be set. The answer is checked against TensorFlow's once it runs.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(path) for path in ("/dev/nvidia0", "/dev/kfd"))


def _set_auto_clustering(enabled):
    """Adds (or removes) XLA auto-clustering in TF_XLA_FLAGS; read when TF initializes."""
    tokens = [t for t in os.environ.get("TF_XLA_FLAGS", "").split()
              if not t.startswith(("--tf_xla_auto_jit", "--tf_xla_cpu_global_jit"))]
    if enabled:
        tokens += list(AUTO_JIT_FLAGS)
    if tokens:
        os.environ["TF_XLA_FLAGS"] = " ".join(tokens)
    else:
        os.environ.pop("TF_XLA_FLAGS", None)


def _auto_clustering_flags_set():
    flags = os.environ.get("TF_XLA_FLAGS", "").split()
    return all(flag in flags for flag in AUTO_JIT_FLAGS)


def tensorflow_started():
    """Whether TensorFlow has looked at its devices (and so read TF_XLA_FLAGS) already."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context

    ctx = context.context()
    # WORKAROUND: TensorFlow has no public query for "initialized"; these private
    # attributes are what list_physical_devices and the first op set.
    return ctx._physical_devices is not None or ctx._initialized  # noqa: SLF001


# WORKAROUND: TensorFlow's C++ start-up prints this on a machine without a GPU (and, on
# CPUs where it turns oneDNN on, that it did) before its logging is set up, so
# TF_CPP_MIN_LOG_LEVEL cannot hide it: dropped, the rest kept.
_STARTUP_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:.]+\s+\d+ (cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics"
    r"|cuda_fft|cuda_dnn|cuda_blas)\.cc:\d+\] .*(cuda drivers|cuInit|driver version"
    r"|kernel driver|Unable to register|GPU will not be used)"
    r"|^I\d{4} [\d:.]+\s+\d+ port\.cc:\d+\] oneDNN custom operations are on")


@contextlib.contextmanager
def startup_noise_filtered():
    """Drops TensorFlow's no-GPU start-up chatter from stderr (file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if not _STARTUP_NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


# ------------------------------------------------------------------ devices


def _gpu_devices(gpus, replicas):
    if len(gpus) < replicas:
        raise ConfigurationError(
            f"--replicas {replicas} needs {replicas} GPUs; this machine has {len(gpus)}.")
    return tuple(f"/gpu:{i}" for i in range(replicas))


def split_cpu(replicas):
    """Names of `replicas` logical CPU devices, splitting the CPU if TF has not started.

    Raises:
        ConfigurationError: TensorFlow already runs with fewer logical CPU devices.
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        pass  # TensorFlow already runs: use the logical devices it has.
    available = tf.config.list_logical_devices("CPU")
    if len(available) < replicas:
        raise ConfigurationError(
            f"--replicas {replicas} needs {replicas} logical CPU devices, but TensorFlow "
            f"was initialized with {len(available)} before the CPU could be split; run "
            "`python -m training.train` in a fresh process")
    return tuple(device.name for device in available[:replicas])


# WORKAROUND: TensorFlow numbers the collectives of every MirroredStrategy from the same
# keys (group 1, instance 100, ...). A second strategy over the same devices in one
# process would reuse the keys of different collectives, and TensorFlow aborts them
# ("Shape mismatch in the collective instance 100"). Each strategy made here starts its
# keys past those of the ones before, as TensorFlow's own tests do, through the private
# class attribute `MirroredStrategy._collective_key_base`.
COLLECTIVE_KEYS_PER_STRATEGY = 100_000


def make_strategy(runtime):
    """The `tf.distribute.Strategy` of `runtime`; call first once TensorFlow runs.

    MultiWorkerMirroredStrategy must configure collectives before anything else starts
    TensorFlow's runtime.

    Args:
        runtime: the `Runtime` from `configure_runtime`.

    Returns:
        MultiWorkerMirroredStrategy (cluster from TF_CONFIG), a MirroredStrategy over
        `runtime.devices` with collective keys of its own, or the default strategy.
    """
    import tensorflow as tf

    if runtime.strategy == MULTI_WORKER:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if runtime.strategy == MIRRORED:
        return mirrored_strategy(runtime.devices)
    return tf.distribute.get_strategy()


def mirrored_strategy(devices):
    """A MirroredStrategy over `devices` with collective keys of its own (WORKAROUND above).

    The keys start past those of every strategy made before, and the next strategy,
    made here or by `tf.distribute.MirroredStrategy` directly, starts past these.
    """
    import tensorflow as tf

    tf.distribute.MirroredStrategy._collective_key_base += (  # noqa: SLF001
        COLLECTIVE_KEYS_PER_STRATEGY)
    strategy = tf.distribute.MirroredStrategy(list(devices))
    tf.distribute.MirroredStrategy._collective_key_base += (  # noqa: SLF001
        COLLECTIVE_KEYS_PER_STRATEGY)
    return strategy


def task_of(strategy):
    """This process's place in the cluster of `strategy`.

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        A `Task`: the chief is the "chief" task, else worker 0 when there is none.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return Task(chief=True, name=None)
    kind, index = resolver.task_type, resolver.task_id
    cluster = resolver.cluster_spec().as_dict()
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return Task(chief=chief, name=f"{kind}_{index}")


def describe_devices(runtime, strategy):
    """What the run trains on, in words, for the "devices:" line.

    Args:
        runtime: the `Runtime` from `configure_runtime`.
        strategy: the strategy `make_strategy` made from it.
    """
    if runtime.strategy == MULTI_WORKER:
        resolver = strategy.cluster_resolver
        workers = sum(len(v) for k, v in resolver.cluster_spec().as_dict().items()
                      if k in ("chief", "worker"))
        return (f"MultiWorkerMirroredStrategy, {workers} workers, this is "
                f"{resolver.task_type} {resolver.task_id}, "
                f"{strategy.num_replicas_in_sync} replicas in sync")
    if runtime.strategy == MIRRORED:
        kind = "GPUs" if runtime.on_gpu else "logical CPU devices"
        return f"MirroredStrategy over {len(runtime.devices)} {kind}"
    return "one device (" + ("GPU" if runtime.on_gpu else "CPU") + ")"


# ------------------------------------------------------------------ Keras


def prepare_multi_worker_fit(model, example_batch):
    """WORKAROUND of two failures of Keras 3's `fit` under MultiWorkerMirroredStrategy.

    Upstream: keras-team/keras#20585 (Keras 3.15). First, `fit` builds the model's
    compiled state from a batch of the distributed dataset, which it first averages
    across replicas with `strategy.reduce`: MultiWorkerMirroredStrategy cannot reduce an
    (inputs, labels) pair ("Attempt to convert a value (PerReplica...) to a Tensor").
    Here it is built from `example_batch` instead, through the private
    `_symbolic_build`, and `_maybe_symbolic_build` is made a no-op. Second, Keras
    averages the logged loss and metrics of a step with `strategy.reduce("MEAN", value,
    axis=0)`, which fails on scalars ("Invalid reduction dimension 0 for input with 0
    dimensions"): they are logged as [1] vectors, which that average turns back into
    scalars. Training itself is Keras's, unchanged.

    Args:
        model: a compiled `keras.Model`, in the strategy's scope (call it there).
        example_batch: a local `(inputs, labels)` batch of the right shapes and dtypes.
    """
    import tensorflow as tf

    model._symbolic_build(data_batch=example_batch)  # noqa: SLF001
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # noqa: SLF001
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        return tf.nest.map_structure(lambda value: tf.reshape(value, [-1]), train_step(data))

    model.train_step = train_step_with_vector_logs


def backed_up_epoch(backup_dir):
    """The epoch `keras.callbacks.BackupAndRestore` will resume from (0 without a backup).

    WORKAROUND: Keras has no public way to ask, before `fit`, which epoch a backup
    resumes from; this reads the metadata file BackupAndRestore writes
    (`training_metadata.json`, Keras 3.15).
    """
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])
