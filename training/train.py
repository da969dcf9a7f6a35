"""Trains a model of `training.models` on a tensorflow-datasets image-classification set.

    python -m training.train                                  # ResNet on digits, 1 device
    python -m training.train --replicas 4 --sync-bn --xla     # 4 replicas (GPUs, else CPUs)
    python -m training.train --dataset mnist --data-dir ~/tensorflow_datasets --epochs 5
    TF_CONFIG='{...}' python -m training.train --multi-worker # one process per worker

What a run does: loads the dataset (`training.data`; "digits" is the offline default),
builds the model with kerasbn's, Keras's or no batch norm, trains it with `model.fit`
(SGD with momentum, a Keras progress bar per epoch), evaluates it on the test split and
prints one final line:

    final: test_accuracy=0.9750 examples_per_second=1234.5 checkpoint=runs/train/model.keras

Under --out (default runs/train/) it writes

    model.keras      the trained model (`keras.models.load_model` reads it back)
    logs/            TensorBoard: Keras's losses and metrics, and per batch-norm layer the
                     histograms and channel means of moving_mean and moving_variance
    backup/          `keras.callbacks.BackupAndRestore`'s state while training runs; an
                     interrupted run started again with the same --out resumes after the
                     last finished epoch, weights, optimizer and moving statistics included

XLA (--xla, the default) compiles the training step in every configuration, but what
is compiled depends on where the step runs (the line "xla: ..." at the start says which):

    one device                      the whole step: model.compile(jit_compile=True)
    several GPUs (MirroredStrategy) the whole step per replica, likewise
    several CPU replicas or CPU     TensorFlow refuses to compile a whole multi-replica
    workers                         step on CPUs, so XLA auto-clustering compiles the
                                    step's ops in clusters around the cross-replica ones
                                    (TF_XLA_FLAGS, set before TensorFlow starts), and each
                                    kerasbn layer runs its math as XLA programs of its own

Data order is a function of --seed and the epoch alone (epoch e reads the training split
shuffled with seed (seed, e)), so a resumed run sees exactly the batches the
uninterrupted one would have.

Python API: `main(argv) -> dict` runs the same program and returns its results. It sets
up devices and XLA flags before TensorFlow initializes; called in a process where
TensorFlow already runs, it uses the devices there are, and it refuses --xla with
several CPU replicas (auto-clustering can only be switched on before TensorFlow starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

MODELS = ("resnet", "mlp")
BATCH_NORMS = ("kerasbn", "keras", "none")
MIXED_PRECISION = {"off": "float32", "float16": "mixed_float16",
                   "bfloat16": "mixed_bfloat16"}

DEFAULT_OUT = os.path.join("runs", "train")
CHECKPOINT_NAME = "model.keras"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"
BATCH_NORM_LOGS = "batch_norm"
MOMENTUM = 0.9
SHUFFLE_BUFFER = 10_000
# Evaluation batches: large, so that a small test split is one shape (one compilation).
EVAL_BATCH_SIZE = 512

# XLA auto-clustering on CPU: cluster every compilable op (level 2), on CPUs too.
AUTO_JIT_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit")

EXIT_DATASET_UNAVAILABLE = 2
EXIT_INTERRUPTED = 3

FINAL_LINE_PREFIX = "final:"


class TrainingInterrupted(RuntimeError):
    """Raised by `--interrupt-after-epoch`: training stopped as if the job were preempted.

    The backup of the last finished epoch is in place; the same command resumes it.
    """


class ConfigurationError(RuntimeError):
    """The requested devices or XLA arrangement cannot be had in this process."""


# ------------------------------------------------------------------ command line


def build_parser():
    """The argument parser of `python -m training.train`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a ResNet or an MLP with kerasbn's, Keras's or no batch norm on a "
        "tensorflow-datasets image-classification dataset, on one device, several "
        "replicas (GPUs, or logical CPU devices) or several workers, with or without "
        "XLA. Prints a progress bar per epoch and a final line with the test accuracy "
        "and the training speed; writes a .keras checkpoint and TensorBoard logs under "
        "--out; an interrupted run started again with the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", metavar="NAME",
                      help="tensorflow-datasets name of an image-classification dataset "
                           "(digits, mnist, fashion_mnist, cifar10, ...). 'digits' "
                           "(scikit-learn's 8x8 digits) is prepared offline; any other "
                           "is read from --data-dir, or downloaded there by tfds")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="tfds data dir (default: $KERASBN_DATA_DIR, else tfds's "
                           "default, ~/tensorflow_datasets)")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                      help="let tensorflow-datasets download and prepare a dataset that "
                           "--data-dir does not hold (digits never needs the network)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default="resnet",
                       help="resnet: a small residual network (3 stages of 16/32/64 "
                            "channels); mlp: 3 hidden layers of 100 sigmoid units "
                            "(Ioffe & Szegedy 2015, section 4.1)")
    model.add_argument("--bn", choices=BATCH_NORMS, default="kerasbn",
                       help="batch norm: kerasbn.BatchNormalization, "
                            "keras.layers.BatchNormalization, or none")
    model.add_argument("--bn-momentum", type=_momentum, default=0.99, metavar="M",
                       help="momentum of the batch norms' moving statistics, Keras's "
                            "convention (the weight of the old value; PyTorch's momentum "
                            "0.1 is 0.9 here). Lower it for short runs: with M the "
                            "averages forget the initial values after about 3/(1-M) steps")
    model.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="with several replicas, compute batch-norm statistics over "
                            "the global batch (synchronized=True); no effect on one device")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=10, metavar="N",
                          help="epochs to train (in total, counting resumed ones)")
    training.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                          help="global batch size, split evenly across replicas; the "
                               "last partial batch of an epoch is kept")
    training.add_argument("--learning-rate", type=_positive_float, default=0.05,
                          metavar="LR",
                          help=f"learning rate of SGD with momentum {MOMENTUM}")
    training.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                          metavar="N",
                          help="batches per epoch (default: one pass over the training "
                               "split); fewer for quick tests, more to repeat the data")
    training.add_argument("--seed", type=int, default=0,
                          help="seed of weights, dropout-free training and data order "
                               "(keras.utils.set_random_seed)")
    devices = parser.add_argument_group("devices and compilation")
    devices.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                         help="train N replicas with MirroredStrategy: over N GPUs, or, "
                              "with no GPU, over N logical devices the CPU is split into")
    devices.add_argument("--multi-worker", action="store_true",
                         help="train with MultiWorkerMirroredStrategy, one process per "
                              "worker, the cluster read from the TF_CONFIG environment "
                              "variable (see the README); --replicas is then ignored")
    devices.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                         help="compile the training step with XLA: the whole step on one "
                              "device or on GPUs; on several CPU replicas or workers, "
                              "XLA auto-clustering plus kerasbn's compiled layer math. "
                              "--no-xla compiles nothing")
    devices.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default="off",
                         help="compute in float16 or bfloat16 with float32 weights "
                              "(Keras mixed precision); batch-norm statistics stay float32")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where {CHECKPOINT_NAME}, {LOGS_DIR}/ (TensorBoard) and "
                             f"{BACKUP_DIR}/ (resumption state) go")
    output.add_argument("--interrupt-after-epoch", type=_positive_int, default=None,
                        metavar="N",
                        help="stop (exit code 3) once epoch N is finished and backed up, "
                             "as if the job were preempted; run the same command without "
                             "this flag to resume. For testing resumption")
    return parser


def _checked(convert, accepts, allowed):
    """An argparse `type`: `convert(text)`, refused unless `accepts(value)`."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_momentum = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def parse_args(argv=None):
    """Parses the command line (`sys.argv[1:]` when `argv` is None)."""
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------ runtime set-up


def _gpus_expected():
    """Whether this machine seems to have a usable GPU, found without starting TensorFlow.

    Asking TensorFlow would initialize it, after which XLA's auto-clustering flags can no
    longer be set. The answer is checked against TensorFlow's once it runs.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(path) for path in ("/dev/nvidia0", "/dev/kfd"))


def _multi_replica(args):
    return args.multi_worker or args.replicas > 1


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


def configure_runtime(args):
    """Sets up devices and XLA before TensorFlow initializes; returns the arrangement.

    Splits the CPU into `--replicas` logical devices when there is no GPU, and switches
    XLA auto-clustering on (--xla with several CPU replicas or workers) or off.

    Returns:
        A dict: "strategy" ("default", "mirrored" or "multi_worker"), "devices" (names
        for MirroredStrategy, or None), "on_gpu" (bool), "jit_compile" (the
        model.compile argument), "bn_jit_compile" (kerasbn layers' jit_compile),
        "auto_clustering" (bool) and "xla" (a sentence saying what is compiled).

    Raises:
        ConfigurationError: when the devices or the XLA arrangement cannot be had
            because TensorFlow was already initialized (or there are too few GPUs).
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    want_auto_clustering = args.xla and _multi_replica(args) and not _gpus_expected()
    # XLA reads TF_XLA_FLAGS once, when TensorFlow first looks at its devices.
    started = _tensorflow_started()
    flags_in_force = _auto_clustering_flags_set() if started else want_auto_clustering
    if not started:
        _set_auto_clustering(want_auto_clustering)
    auto_clustering = flags_in_force

    with _startup_noise_filtered():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")

    strategy, devices = "default", None
    if args.multi_worker:
        strategy = "multi_worker"
    elif args.replicas > 1:
        strategy = "mirrored"
        if gpus:
            if len(gpus) < args.replicas:
                raise ConfigurationError(
                    f"--replicas {args.replicas} needs {args.replicas} GPUs; this machine "
                    f"has {len(gpus)}.")
            devices = [f"/gpu:{i}" for i in range(args.replicas)]
        else:
            devices = _split_cpu(tf, args.replicas)
    on_gpu = bool(gpus)

    if not args.xla:
        jit, bn_jit = False, False
        xla = "off: nothing is compiled (model.compile(jit_compile=False), kerasbn " \
              "layers with jit_compile=False, no auto-clustering)"
        if auto_clustering:
            xla += "; NOTE: XLA auto-clustering was already on in this process " \
                   "(TF_XLA_FLAGS) and stays on"
    elif strategy == "default" or on_gpu:
        jit, bn_jit = True, True
        where = {"default": "one device", "mirrored": f"{args.replicas} GPU replicas",
                 "multi_worker": "GPU workers"}[strategy]
        xla = (f"{where}: the whole training step is compiled "
               "(model.compile(jit_compile=True): forward, backward and optimizer update "
               "in one XLA program per replica)")
        if auto_clustering:
            xla += "; XLA auto-clustering is on as well (TF_XLA_FLAGS)"
    else:
        if not auto_clustering:
            raise ConfigurationError(
                "--xla with several CPU replicas or workers needs XLA auto-clustering, "
                "which must be switched on before TensorFlow initializes: run "
                "`python -m training.train` in a fresh process, or set TF_XLA_FLAGS="
                f"\"{' '.join(AUTO_JIT_FLAGS)}\" before starting Python (or use --no-xla)")
        jit, bn_jit = False, True
        what = "workers" if strategy == "multi_worker" else f"{args.replicas} CPU replicas"
        xla = (f"{what}: TensorFlow cannot compile a whole multi-replica step on CPUs, so "
               f"XLA auto-clustering ({' '.join(AUTO_JIT_FLAGS)}) compiles the step in "
               "clusters around the cross-replica ops"
               + (" (the collectives stay outside: XLA has no CPU kernel for them)"
                  if strategy == "multi_worker" else "")
               + ", and each kerasbn layer runs its math as XLA programs "
                 "(model.compile(jit_compile=False))")
    if want_auto_clustering and on_gpu:
        xla += "; NOTE: GPUs were found only after auto-clustering had been switched on"
    return {"strategy": strategy, "devices": devices, "on_gpu": on_gpu,
            "jit_compile": jit, "bn_jit_compile": bn_jit,
            "auto_clustering": auto_clustering, "xla": xla}


# What TensorFlow's C++ start-up prints on a machine without a GPU, before its logging
# is set up (so TF_CPP_MIN_LOG_LEVEL cannot hide it): dropped, everything else kept.
_STARTUP_NOISE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^[IWE]\d{4} [\d:.]+\s+\d+ (cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics"
    r"|cuda_fft|cuda_dnn|cuda_blas)\.cc:\d+\] .*(cuda drivers|cuInit|driver version"
    r"|kernel driver|Unable to register|GPU will not be used)")


@contextlib.contextmanager
def _startup_noise_filtered():
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


def _tensorflow_started():
    """Whether TensorFlow has looked at its devices (and so read TF_XLA_FLAGS) already."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context

    ctx = context.context()
    # No public query exists; these are what list_physical_devices and the first op set.
    return ctx._physical_devices is not None or ctx._initialized  # noqa: SLF001


def _split_cpu(tf, replicas):
    """Names of `replicas` logical CPU devices, splitting the CPU if TF has not started."""
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
    return [device.name for device in available[:replicas]]


# TensorFlow numbers the collectives of every MirroredStrategy from the same keys (group 1,
# instance 100, ...). A second strategy over the same devices in one process (main()
# called again, or after other code made one) would then reuse the keys of different
# collectives, and TensorFlow aborts them ("Shape mismatch in the collective instance
# 100"). Each strategy made here starts its group keys past those of the ones before, as
# TensorFlow's own tests do.
_COLLECTIVE_KEYS_PER_STRATEGY = 100_000


def _make_strategy(tf, runtime):
    if runtime["strategy"] == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if runtime["strategy"] == "mirrored":
        tf.distribute.MirroredStrategy._collective_key_base += (  # noqa: SLF001
            _COLLECTIVE_KEYS_PER_STRATEGY)
        return tf.distribute.MirroredStrategy(runtime["devices"])
    return tf.distribute.get_strategy()


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


def _task_name(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    return f"{resolver.task_type}_{resolver.task_id}"


# ------------------------------------------------------------------ data


def examples_per_epoch(num_examples, batch_size, steps_per_epoch):
    """Training examples one epoch reads: a pass, or `steps_per_epoch` batches of passes."""
    batches_per_pass = math.ceil(num_examples / batch_size)
    if steps_per_epoch is None:
        return num_examples
    passes, extra = divmod(steps_per_epoch, batches_per_pass)
    return passes * num_examples + extra * batch_size


def examples_per_second(examples_in_epoch, epoch_seconds):
    """Training speed of a typical epoch: examples / the median epoch time.

    The first epoch is left out when there are others: it includes tracing and XLA
    compilation. The median leaves out later one-off compilations too (a new shape,
    such as the last partial batch, compiles when it comes back in the next epoch).
    """
    timed = sorted(epoch_seconds[1:] or epoch_seconds)
    if not timed:
        return float("nan")
    middle = len(timed) // 2
    median = timed[middle] if len(timed) % 2 else (timed[middle - 1] + timed[middle]) / 2
    return examples_in_epoch / median if median > 0 else float("nan")


def training_stream(tf, train, num_examples, batch_size, seed, first_epoch, epochs,
                    steps_per_epoch):
    """The batches of epochs `first_epoch` .. `epochs - 1`, one after another.

    Epoch e reads `steps_per_epoch` batches from passes over the training split, pass p
    shuffled with a seed made of (seed, e, p) and batched by `data.batched` (the last
    partial batch of a pass kept). What an epoch sees thus depends on the seed and e
    only: not on the epochs before it in this process, nor on how often the dataset
    is iterated (Keras iterates it once more to build a model under a strategy). A
    resumed run continues with the very batches an uninterrupted one reads.
    """
    from training import data

    batches_per_pass = math.ceil(num_examples / batch_size)
    buffer = min(num_examples, SHUFFLE_BUFFER)

    def one_pass(epoch, index):
        order = train.shuffle(buffer, seed=pass_seed(seed, epoch, index),
                              reshuffle_each_iteration=False)
        return data.batched(order, batch_size, shuffle=False)

    def epoch_batches(epoch):
        passes = math.ceil(steps_per_epoch / batches_per_pass)
        return _joined([lambda p=p: one_pass(epoch, p) for p in range(passes)]).take(
            steps_per_epoch)

    epochs_left = [lambda e=e: epoch_batches(e) for e in range(first_epoch, epochs)]
    if not epochs_left:
        return _with_data_sharding(tf, one_pass(first_epoch, 0).take(0))
    return _with_data_sharding(tf, _joined(epochs_left).prefetch(tf.data.AUTOTUNE))


def _joined(makers):
    """The datasets made by `makers`, concatenated as a balanced tree (shallow nesting)."""
    if len(makers) == 1:
        return makers[0]()
    middle = len(makers) // 2
    return _joined(makers[:middle]).concatenate(_joined(makers[middle:]))


def pass_seed(seed, epoch, index):
    """The shuffle seed of pass `index` of epoch `epoch` (both 0-based) under --seed."""
    return (seed * 1_000_003 + epoch * 1_009 + index) % (2**31 - 1)


def _with_data_sharding(tf, dataset):
    # Workers split the batches (DATA); a generated stream has no files to split.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


# ------------------------------------------------------------------ callbacks


def _callbacks_module():
    import keras
    import tensorflow as tf

    class EpochTimer(keras.callbacks.Callback):
        """Wall time of each epoch's training steps (no evaluation, no saving)."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._last = self._start

        def on_train_batch_end(self, batch, logs=None):
            self._last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(self._last - self._start)

    class BatchNormStatistics(keras.callbacks.Callback):
        """Writes each batch-norm layer's moving statistics to TensorBoard every epoch.

        For every kerasbn or Keras `BatchNormalization` layer, histograms of
        `moving_mean` and `moving_variance` over the channels and scalars of their
        channel means, under `<layer name>/...`, at step = epoch (as Keras's own
        TensorBoard callback counts epochs).

        Args:
            log_dir: directory of the summaries (a `tf.summary` file writer), or None
                to read the statistics without writing them (non-chief workers: the
                read may be a collective every worker must join).
        """

        def __init__(self, log_dir):
            super().__init__()
            self.log_dir = log_dir
            self._writer = None

        def on_train_begin(self, logs=None):
            if self.log_dir is not None and self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)

        def on_epoch_end(self, epoch, logs=None):
            statistics = batch_norm_statistics(self.model)
            if self._writer is None:
                return
            with self._writer.as_default(step=epoch):
                for name, stats in statistics.items():
                    for key in ("moving_mean", "moving_variance"):
                        tf.summary.histogram(f"{name}/{key}", stats[key])
                        tf.summary.scalar(f"{name}/{key}_channel_mean",
                                          float(stats[key].mean()))
            self._writer.flush()

        def on_train_end(self, logs=None):
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    class InterruptAfterEpoch(keras.callbacks.Callback):
        """Raises `TrainingInterrupted` at the end of epoch `epoch` (1-based)."""

        def __init__(self, epoch):
            super().__init__()
            self.epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == self.epoch:
                raise TrainingInterrupted(
                    f"stopped after epoch {self.epoch} as asked (--interrupt-after-epoch);"
                    " run the same command without that flag to resume")

    return EpochTimer, BatchNormStatistics, InterruptAfterEpoch


def batch_norm_layers(model):
    """The kerasbn and Keras batch-norm layers of `model`, in order."""
    import keras

    import kerasbn

    kinds = (kerasbn.BatchNormalization, keras.layers.BatchNormalization)
    return [layer for layer in model._flatten_layers(include_self=False)  # noqa: SLF001
            if isinstance(layer, kinds)]


def batch_norm_statistics(model):
    """{layer name: {"moving_mean": array, "moving_variance": array}} of every BN layer."""
    return {layer.name: {"moving_mean": _numpy(layer.moving_mean),
                         "moving_variance": _numpy(layer.moving_variance)}
            for layer in batch_norm_layers(model)}


def _numpy(variable):
    import keras

    return keras.ops.convert_to_numpy(variable.value)


# ------------------------------------------------------------------ the program


def main(argv=None):
    """Runs `python -m training.train` with `argv` and returns its results.

    Args:
        argv: command-line arguments (without the program name); None for
            `sys.argv[1:]`.

    Returns:
        A dict: "test_accuracy" and "test_loss" (of the saved checkpoint on the test
        split), "examples_per_second" (see `examples_per_second`), "checkpoint" (path
        of the .keras file), "log_dir", "initial_epoch" (the 0-based epoch training
        started from: > 0 when resumed), "epochs_run", "epoch_seconds", "history"
        (Keras's), "xla" (what was compiled), "replicas" (replicas in sync) and
        "seconds" (time in `model.fit`).

    Raises:
        training.data.DatasetUnavailableError: the dataset is unknown or its data cannot
            be had here (the message is one line and names the offline default).
        ConfigurationError: the devices or XLA arrangement cannot be had in this process.
        TrainingInterrupted: with --interrupt-after-epoch.
    """
    args = parse_args(argv)
    runtime = configure_runtime(args)

    import keras
    import tensorflow as tf

    from training import data, models

    tf.get_logger().setLevel("ERROR")
    # First: MultiWorkerMirroredStrategy must configure collectives before anything
    # else starts TensorFlow's runtime.
    strategy = _make_strategy(tf, runtime)
    train, test, info = data.load(args.dataset, data_dir=args.data_dir,
                                  allow_download=args.download)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(MIXED_PRECISION[args.mixed_precision])
    replicas = strategy.num_replicas_in_sync
    chief = _is_chief(strategy)
    task = _task_name(strategy)

    steps_per_epoch = args.steps_per_epoch or math.ceil(info.num_train / args.batch_size)
    out = args.out
    # Every worker writes (saving may read variables through collectives); the chief
    # into --out, the others into a private directory beside it.
    work_dir = out if chief else os.path.join(out, "workers", task)
    backup_dir = os.path.join(out, BACKUP_DIR) if task is None else os.path.join(
        out, BACKUP_DIR, task)
    checkpoint = os.path.join(work_dir, CHECKPOINT_NAME)
    log_dir = os.path.join(work_dir, LOGS_DIR)
    os.makedirs(work_dir, exist_ok=True)
    initial_epoch = _backed_up_epoch(backup_dir)

    _say(chief, f"dataset: {args.dataset} ({info.num_train} train / {info.num_test} test "
                f"images {info.image_shape}, {info.num_classes} classes)")
    _say(chief, f"model: {args.model}, batch norm: {args.bn}"
                f"{' (synchronized)' if args.sync_bn and args.bn != 'none' else ''}, "
                f"mixed precision: {args.mixed_precision}")
    _say(chief, f"devices: {_describe_devices(runtime, strategy)}; global batch "
                f"{args.batch_size} ({_per_replica(args.batch_size, replicas)} per replica)")
    _say(chief, f"xla: {runtime['xla']}")
    if initial_epoch:
        _say(chief, f"resuming from the backup in {backup_dir}: epoch {initial_epoch + 1} "
                    f"of {args.epochs}")

    with strategy.scope():
        model = models.build_model(
            args.model, info.image_shape, info.num_classes, args.bn,
            synchronized=args.sync_bn, bn_momentum=args.bn_momentum,
            bn_jit_compile=runtime["bn_jit_compile"])
        model.compile(
            optimizer=keras.optimizers.SGD(args.learning_rate, momentum=MOMENTUM),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=runtime["jit_compile"],
        )
        if runtime["strategy"] == "multi_worker":
            _build_for_multi_worker_fit(model, info)

    stream = training_stream(tf, train, info.num_train, args.batch_size, args.seed,
                             initial_epoch, args.epochs, steps_per_epoch)

    EpochTimer, BatchNormStatistics, InterruptAfterEpoch = _callbacks_module()
    timer = EpochTimer()
    callbacks = [
        timer,
        keras.callbacks.BackupAndRestore(backup_dir),
        keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False),
        BatchNormStatistics(os.path.join(log_dir, BATCH_NORM_LOGS)),
    ]
    if args.interrupt_after_epoch:
        callbacks.append(InterruptAfterEpoch(args.interrupt_after_epoch))

    start = time.perf_counter()
    history = model.fit(stream, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                        shuffle=False, callbacks=callbacks, verbose=1 if chief else 0)
    seconds = time.perf_counter() - start
    model.save(checkpoint)
    # The checkpoint is evaluated, on one device: inference needs no replicas, and
    # compiling it once beats compiling it for every replica.
    test_loss, test_accuracy = evaluate_checkpoint(
        checkpoint, data.batched(test, EVAL_BATCH_SIZE, shuffle=False), jit_compile=args.xla)

    if task is not None:
        _remove_empty_dir(os.path.dirname(backup_dir))  # out/backup/, once all are done
    if not chief:  # a copy of the chief's; the chief's checkpoint and logs are the run's
        shutil.rmtree(work_dir, ignore_errors=True)
        _remove_empty_dir(os.path.dirname(work_dir))
        checkpoint = os.path.join(out, CHECKPOINT_NAME)
        log_dir = os.path.join(out, LOGS_DIR)

    per_epoch = examples_per_epoch(info.num_train, args.batch_size, args.steps_per_epoch)
    speed = examples_per_second(per_epoch, timer.seconds)
    results = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "examples_per_second": float(speed),
        "checkpoint": checkpoint,
        "log_dir": log_dir,
        "initial_epoch": initial_epoch,
        "epochs_run": len(timer.seconds),
        "history": history.history,
        "xla": runtime["xla"],
        "replicas": replicas,
        "seconds": seconds,
        "epoch_seconds": list(timer.seconds),
    }
    _say(chief, f"checkpoint: {checkpoint}")
    _say(chief, f"tensorboard: tensorboard --logdir {log_dir}")
    print(f"{FINAL_LINE_PREFIX} test_accuracy={test_accuracy:.4f} "
          f"examples_per_second={speed:.1f} checkpoint={checkpoint}", flush=True)
    return results


def _build_for_multi_worker_fit(model, info):
    """Works around two failures of Keras 3.15's `fit` under MultiWorkerMirroredStrategy.

    Keras 3 (3.15) builds them in `fit` from a batch of the distributed dataset, which
    it first averages across replicas with `strategy.reduce` -- a call that
    MultiWorkerMirroredStrategy cannot make on an (images, labels) pair ("Attempt to
    convert a value (PerReplica...) to a Tensor"). Built from shapes here, in the
    strategy's scope, the model skips that step. Second, see the comment below.
    """
    import numpy as np

    batch = (np.zeros((1,) + tuple(info.image_shape), np.float32), np.zeros((1,), np.int32))
    model._symbolic_build(data_batch=batch)  # noqa: SLF001 -- see the docstring
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # noqa: SLF001

    # Keras then averages the logged loss and metrics of a multi-worker step with
    # strategy.reduce("MEAN", value, axis=0), which fails on scalars ("Invalid
    # reduction dimension 0 for input with 0 dimensions"): they are logged as [1]
    # vectors, which that average turns back into scalars.
    import tensorflow as tf

    train_step = model.train_step

    def train_step_with_vector_logs(data):
        return tf.nest.map_structure(lambda value: tf.reshape(value, [-1]), train_step(data))

    model.train_step = train_step_with_vector_logs


def evaluate_checkpoint(path, batches, jit_compile=False):
    """Loss and accuracy of the model saved at `path` on `batches`, on one device.

    Args:
        path: a `.keras` file written by this program.
        batches: a `tf.data.Dataset` of (images, labels) batches.
        jit_compile: compile the evaluation step with XLA.

    Returns:
        `(loss, accuracy)` as floats.
    """
    import keras

    import kerasbn  # noqa: F401 -- registers kerasbn.BatchNormalization for loading

    model = keras.models.load_model(path, compile=False)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=jit_compile)
    loss, accuracy = model.evaluate(batches, verbose=0)
    return float(loss), float(accuracy)


def _remove_empty_dir(path):
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (another worker still uses it) or already gone


def _backed_up_epoch(backup_dir):
    """The epoch BackupAndRestore will resume from (0 without a backup)."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


def _describe_devices(runtime, strategy):
    if runtime["strategy"] == "multi_worker":
        resolver = strategy.cluster_resolver
        workers = sum(len(v) for k, v in resolver.cluster_spec().as_dict().items()
                      if k in ("chief", "worker"))
        return (f"MultiWorkerMirroredStrategy, {workers} workers, this is "
                f"{resolver.task_type} {resolver.task_id}, "
                f"{strategy.num_replicas_in_sync} replicas in sync")
    if runtime["strategy"] == "mirrored":
        kind = "GPUs" if runtime["on_gpu"] else "logical CPU devices"
        return f"MirroredStrategy over {len(runtime['devices'])} {kind}"
    return "one device (" + ("GPU" if runtime["on_gpu"] else "CPU") + ")"


def _per_replica(batch_size, replicas):
    per, extra = divmod(batch_size, replicas)
    return str(per) if not extra else f"{per}-{per + 1}"


def _say(chief, message):
    if chief:
        print(message, flush=True)


def run(argv=None):
    """The command-line entry point: `main`, with one-line errors and exit codes.

    Returns:
        0 on success; 2 when the dataset is unavailable or the configuration cannot be
        had (one line on stderr, no traceback); 3 after --interrupt-after-epoch.
    """
    try:
        main(argv)
    except TrainingInterrupted as error:
        print(str(error), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        from training.data import DatasetUnavailableError

        if not isinstance(error, (DatasetUnavailableError, ConfigurationError)):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DATASET_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(run())
