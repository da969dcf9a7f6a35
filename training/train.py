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

What XLA compiles (--xla, the default) depends on where the step runs; the line
"xla: ..." at the start says which (`training.runtime.plan_xla`, and the README's table).
Data order is a function of --seed and the epoch alone (`training.data.training_stream`),
so a resumed run sees exactly the batches the uninterrupted one would have.

Python API: `main(argv) -> dict` runs the same program and returns its results. It sets
up devices and XLA flags before TensorFlow initializes; called in a process where
TensorFlow already runs, it uses the devices there are, and it refuses --xla with
several CPU replicas (auto-clustering can only be switched on before TensorFlow starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import os
import shutil
import sys
import time

from training import models
from training.runtime import (
    MULTI_WORKER,
    ConfigurationError,
    Task,
    backed_up_epoch,
    configure_runtime,
    describe_devices,
    make_strategy,
    prepare_multi_worker_fit,
    task_of,
)

MODELS = models.MODELS
BATCH_NORMS = models.BATCH_NORMS
MIXED_PRECISION = {"off": "float32", "float16": "mixed_float16",
                   "bfloat16": "mixed_bfloat16"}

DEFAULT_OUT = os.path.join("runs", "train")
CHECKPOINT_NAME = "model.keras"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"
BATCH_NORM_LOGS = "batch_norm"
MOMENTUM = 0.9
# Evaluation batches: large, so that a small test split is one shape (one compilation).
EVAL_BATCH_SIZE = 512
# Modules of the `train` extra (setup.cfg) that every run needs.
TRAIN_EXTRA_MODULES = ("tensorboard",)

EXIT_DATASET_UNAVAILABLE = 2
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3

FINAL_LINE_PREFIX = "final:"

# Names that moved to modules importing TensorFlow, which this one may not import
# before `configure_runtime` has run; still readable here, as they were.
_MOVED = {
    "TrainingInterrupted": "training.callbacks",
    "batch_norm_layers": "training.callbacks",
    "batch_norm_statistics": "training.callbacks",
    "examples_per_second": "training.callbacks",
    "examples_per_epoch": "training.data",
    "pass_seed": "training.data",
    "training_stream": "training.data",
}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(ValueError):
    """A flag value the run cannot use, or a missing dependency; the message is one line."""


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
    for add_group in (_data_flags, _model_flags, _training_flags, _device_flags,
                      _output_flags):
        add_group(parser)
    return parser


def _data_flags(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", metavar="NAME",
                       help="tensorflow-datasets name of an image-classification dataset "
                            "(digits, mnist, fashion_mnist, cifar10, ...). 'digits' "
                            "(scikit-learn's 8x8 digits) is prepared offline; any other "
                            "is read from --data-dir, or downloaded there by tfds")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="tfds data dir (default: $KERASBN_DATA_DIR, else tfds's "
                            "default, ~/tensorflow_datasets)")
    group.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                       help="let tensorflow-datasets download and prepare a dataset that "
                            "--data-dir does not hold (digits never needs the network)")


def _model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=MODELS, default="resnet",
                       help="resnet: a small residual network (3 stages of 16/32/64 "
                            "channels); mlp: 3 hidden layers of 100 sigmoid units "
                            "(Ioffe & Szegedy 2015, section 4.1)")
    group.add_argument("--bn", choices=BATCH_NORMS, default="kerasbn",
                       help="batch norm: kerasbn.BatchNormalization, "
                            "keras.layers.BatchNormalization, or none")
    group.add_argument("--bn-momentum", type=float, default=0.99, metavar="M",
                       help="momentum of the batch norms' moving statistics, Keras's "
                            "convention (the weight of the old value; PyTorch's momentum "
                            "0.1 is 0.9 here), within the range kerasbn.BatchNormalization "
                            "allows. Lower it for short runs: with M the averages forget "
                            "the initial values after about 3/(1-M) steps")
    group.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="with several replicas, compute batch-norm statistics over "
                            "the global batch (synchronized=True); no effect on one device")


def _training_flags(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=_positive_int, default=10, metavar="N",
                       help="epochs to train (in total, counting resumed ones)")
    group.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                       help="global batch size, a multiple of the replicas, split evenly "
                            "across them; the last partial batch of an epoch is kept")
    group.add_argument("--learning-rate", type=_positive_float, default=0.05, metavar="LR",
                       help=f"learning rate of SGD with momentum {MOMENTUM}")
    group.add_argument("--steps-per-epoch", type=_positive_int, default=None, metavar="N",
                       help="batches per epoch (default: one pass over the training "
                            "split); fewer for quick tests, more to repeat the data")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of weights, dropout-free training and data order "
                            "(keras.utils.set_random_seed)")


def _device_flags(parser):
    group = parser.add_argument_group("devices and compilation")
    group.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                       help="train N replicas with MirroredStrategy: over N GPUs, or, "
                            "with no GPU, over N logical devices the CPU is split into")
    group.add_argument("--multi-worker", action="store_true",
                       help="train with MultiWorkerMirroredStrategy, one process per "
                            "worker, the cluster read from the TF_CONFIG environment "
                            "variable (see the README); --replicas is then ignored")
    group.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                       help="compile the training step with XLA: the whole step on one "
                            "device or on GPUs; on several CPU replicas or workers, "
                            "XLA auto-clustering plus kerasbn's compiled layer math. "
                            "--no-xla compiles nothing")
    group.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default="off",
                       help="compute in float16 or bfloat16 with float32 weights "
                            "(Keras mixed precision); batch-norm statistics stay float32")


def _output_flags(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help=f"where {CHECKPOINT_NAME}, {LOGS_DIR}/ (TensorBoard) and "
                            f"{BACKUP_DIR}/ (resumption state) go")
    group.add_argument("--interrupt-after-epoch", type=_positive_int, default=None,
                       metavar="N",
                       help="stop (exit code 3) once epoch N is finished and backed up, "
                            "as if the job were preempted; run the same command without "
                            "this flag to resume. For testing resumption")


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
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def parse_args(argv=None):
    """Parses the command line (`sys.argv[1:]` when `argv` is None)."""
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------ checks


def check_flags(args):
    """Refuses, before TensorFlow starts, what would otherwise end in a traceback.

    Raises:
        UsageError: a module of the `train` extra is missing, --batch-size does not
            split evenly across --replicas, or --out cannot be a directory.
    """
    missing = [name for name in TRAIN_EXTRA_MODULES if not _installed(name)]
    if missing:
        raise UsageError(f"{', '.join(missing)} is not installed; training.train needs "
                         "the train extra: pip install -e '.[train]'")
    if not args.multi_worker:
        check_batch_split(args.batch_size, args.replicas, f"--replicas {args.replicas}")
    _check_directory("--out", args.out)


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_batch_split(batch_size, replicas, source):
    """Refuses a global batch that does not split evenly across the replicas.

    TensorFlow distributes a global batch in equal shares; Keras's `fit` fails on the
    first batch otherwise.

    Args:
        batch_size: --batch-size.
        replicas: the replicas in sync.
        source: where `replicas` comes from, for the message ("--replicas 4").

    Raises:
        UsageError: `batch_size` is not a multiple of `replicas`.
    """
    if batch_size % replicas:
        below = batch_size - batch_size % replicas
        nearest = f"{below} or {below + replicas}" if below else str(replicas)
        raise UsageError(f"--batch-size {batch_size} does not split evenly across "
                         f"{replicas} replicas ({source}): use a multiple of {replicas}, "
                         f"such as {nearest}")


def _check_directory(flag, path):
    """Refuses `path` when it, or the nearest existing directory above it, is a file."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory; "
                         "name a directory (it is made if missing)")


def _make_directory(flag, path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag}: cannot make the directory {path}: "
                         f"{error.strerror or error}") from None


def check_bn_momentum(momentum):
    """Refuses a --bn-momentum the batch-norm layer refuses, whatever --bn is.

    The allowed range is `kerasbn.BatchNormalization`'s; Keras's stock layer checks
    nothing, so the flag is checked against kerasbn's layer for every --bn.

    Raises:
        UsageError: the layer refuses `momentum` (its message, after the flag).
    """
    import kerasbn

    try:
        kerasbn.BatchNormalization(momentum=momentum, name="batch_norm")
    except ValueError as error:
        raise UsageError(f"--bn-momentum {momentum}: {error}") from None


# ------------------------------------------------------------------ the program


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a process of a run writes.

    Every worker writes (saving may read variables through collectives): the chief
    into --out, the others into a private directory beside it, removed at the end.

    Attributes:
        out: --out.
        task: this process's `Task`.
        work_dir: the directory of its checkpoint and logs.
        backup_dir: BackupAndRestore's directory (one per worker).
    """

    out: str
    task: Task
    work_dir: str
    backup_dir: str

    @classmethod
    def of(cls, out, task):
        work_dir = out if task.chief else os.path.join(out, "workers", task.name)
        backup_dir = os.path.join(out, BACKUP_DIR, *([task.name] if task.name else []))
        return cls(out, task, work_dir, backup_dir)

    @property
    def checkpoint(self):
        return os.path.join(self.work_dir, CHECKPOINT_NAME)

    @property
    def log_dir(self):
        return os.path.join(self.work_dir, LOGS_DIR)

    def finish(self):
        """Removes a worker's private copies; returns the paths of the run's results."""
        if self.task.name is not None:
            _remove_empty_dir(os.path.dirname(self.backup_dir))  # once all are done
        if self.task.chief:
            return self
        shutil.rmtree(self.work_dir, ignore_errors=True)
        _remove_empty_dir(os.path.dirname(self.work_dir))
        return dataclasses.replace(self, work_dir=self.out)


def main(argv=None):
    """Runs `python -m training.train` with `argv` and returns its results.

    Args:
        argv: command-line arguments (without the program name); None for
            `sys.argv[1:]`.

    Returns:
        A dict: "test_accuracy" and "test_loss" (of the saved checkpoint on the test
        split), "test_correct" and "test_examples" (test images classified right, and
        in all), "examples_per_second" (see `training.callbacks.examples_per_second`),
        "checkpoint" (path of the .keras file), "log_dir", "initial_epoch" (the 0-based
        epoch training started from: > 0 when resumed), "epochs_run", "epoch_seconds",
        "history" (Keras's), "xla" (what was compiled, in words), "xla_plan" (the
        `training.runtime.XlaPlan`), "replicas" (replicas in sync) and "seconds" (time
        in `model.fit`).

    Raises:
        UsageError: a flag the run cannot use, or the train extra is missing.
        training.data.DatasetUnavailableError: the dataset is unknown or its data cannot
            be had here (the message is one line and names the offline default).
        ConfigurationError: the devices or XLA arrangement cannot be had in this process.
        training.callbacks.TrainingInterrupted: with --interrupt-after-epoch.
    """
    args = parse_args(argv)
    check_flags(args)
    runtime = configure_runtime(replicas=args.replicas, multi_worker=args.multi_worker,
                                xla=args.xla)
    import keras
    import tensorflow as tf

    from training import data

    tf.get_logger().setLevel("ERROR")
    strategy = make_strategy(runtime)
    replicas = strategy.num_replicas_in_sync
    check_batch_split(args.batch_size, replicas, "the replicas in sync")
    check_bn_momentum(args.bn_momentum)
    train, test, info = data.load(args.dataset, data_dir=args.data_dir,
                                  allow_download=args.download)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(MIXED_PRECISION[args.mixed_precision])
    paths = RunPaths.of(args.out, task_of(strategy))
    _make_directory("--out", paths.work_dir)
    initial_epoch = backed_up_epoch(paths.backup_dir)
    _print_setup(args, info, runtime, strategy, paths, initial_epoch)

    model = _compiled_model(args, info, runtime, strategy)
    fitted = _fit(model, args, train, info, paths, initial_epoch)
    model.save(paths.checkpoint)
    # The checkpoint is evaluated, on one device: inference needs no replicas, and
    # compiling it once beats compiling it for every replica.
    test_loss, test_accuracy = evaluate_checkpoint(
        paths.checkpoint, data.batched(test, EVAL_BATCH_SIZE, shuffle=False),
        jit_compile=runtime.xla.evaluation_jit_compile)
    paths = paths.finish()

    results = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "test_correct": correct_examples(test_accuracy, info.num_test),
        "test_examples": info.num_test,
        "checkpoint": paths.checkpoint,
        "log_dir": paths.log_dir,
        "initial_epoch": initial_epoch,
        "xla": runtime.xla.description,
        "xla_plan": runtime.xla,
        "replicas": replicas,
        **fitted,
    }
    _print_results(results, paths.task.chief)
    return results


def _compiled_model(args, info, runtime, strategy):
    import keras
    import numpy as np

    with strategy.scope():
        model = models.build_model(
            args.model, info.image_shape, info.num_classes, args.bn,
            synchronized=args.sync_bn, bn_momentum=args.bn_momentum,
            bn_jit_compile=runtime.xla.layer_jit_compile)
        model.compile(
            optimizer=keras.optimizers.SGD(args.learning_rate, momentum=MOMENTUM),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=runtime.xla.step_jit_compile,
        )
        if runtime.strategy == MULTI_WORKER:
            prepare_multi_worker_fit(model, (
                np.zeros((1,) + tuple(info.image_shape), np.float32),
                np.zeros((1,), np.int32)))
    return model


def _fit(model, args, train, info, paths, initial_epoch):
    """Trains `model` with the run's stream and callbacks; returns the timing results."""
    import keras

    from training import callbacks, data

    steps_per_epoch = args.steps_per_epoch or math.ceil(info.num_train / args.batch_size)
    stream = data.training_stream(train, info.num_train, args.batch_size, args.seed,
                                  initial_epoch, args.epochs, steps_per_epoch)
    timer = callbacks.EpochTimer()
    run_callbacks = [
        timer,
        keras.callbacks.BackupAndRestore(paths.backup_dir),
        keras.callbacks.TensorBoard(log_dir=paths.log_dir, write_graph=False),
        callbacks.BatchNormStatistics(os.path.join(paths.log_dir, BATCH_NORM_LOGS)),
    ]
    if args.interrupt_after_epoch:
        run_callbacks.append(callbacks.InterruptAfterEpoch(args.interrupt_after_epoch))

    start = time.perf_counter()
    history = model.fit(stream, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                        shuffle=False, callbacks=run_callbacks,
                        verbose=1 if paths.task.chief else 0)
    seconds = time.perf_counter() - start
    per_epoch = data.examples_per_epoch(info.num_train, args.batch_size,
                                        args.steps_per_epoch)
    speed = callbacks.examples_per_second(per_epoch, timer.seconds)
    return {
        "examples_per_second": float(speed),
        "epochs_run": len(timer.seconds),
        "epoch_seconds": list(timer.seconds),
        "history": history.history,
        "seconds": seconds,
    }


def evaluate_checkpoint(path, batches, jit_compile=False):
    """Loss and accuracy of the model saved at `path` on `batches`, on one device.

    Args:
        path: a `.keras` file written by this program.
        batches: a `tf.data.Dataset` of (images, labels) batches.
        jit_compile: compile the evaluation step with XLA (the run's
            `XlaPlan.evaluation_jit_compile`).

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


def correct_examples(accuracy, examples):
    """The number of examples classified right, from Keras's accuracy over `examples`.

    Keras's accuracy is a float32 quotient (correct / examples), a hair off the exact
    fraction (342 of 360 comes out just below 0.95); below 2**23 examples it is close
    enough to round back to the integer count.
    """
    return round(accuracy * examples)


def _remove_empty_dir(path):
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (another worker still uses it) or already gone


def _print_setup(args, info, runtime, strategy, paths, initial_epoch):
    chief = paths.task.chief
    synchronized = " (synchronized)" if args.sync_bn and args.bn != "none" else ""
    _say(chief, f"dataset: {args.dataset} ({info.num_train} train / {info.num_test} test "
                f"images {info.image_shape}, {info.num_classes} classes)")
    _say(chief, f"model: {args.model}, batch norm: {args.bn}{synchronized}, "
                f"mixed precision: {args.mixed_precision}")
    _say(chief, f"devices: {describe_devices(runtime, strategy)}; global batch "
                f"{args.batch_size} ({args.batch_size // strategy.num_replicas_in_sync} "
                "per replica)")
    _say(chief, f"xla: {runtime.xla.description}")
    if initial_epoch:
        _say(chief, f"resuming from the backup in {paths.backup_dir}: epoch "
                    f"{initial_epoch + 1} of {args.epochs}")


def _print_results(results, chief):
    _say(chief, f"checkpoint: {results['checkpoint']}")
    _say(chief, f"tensorboard: tensorboard --logdir {results['log_dir']}")
    print(f"{FINAL_LINE_PREFIX} test_accuracy={results['test_accuracy']:.4f} "
          f"examples_per_second={results['examples_per_second']:.1f} "
          f"checkpoint={results['checkpoint']}", flush=True)


def _say(chief, message):
    if chief:
        print(message, flush=True)


def error_report(error):
    """How the programs report `error` without a traceback, or None to raise it.

    Returns:
        `(exit code, line for stderr)`, or None for an error that is not one of the
        program's own.
    """
    if isinstance(error, (UsageError, ConfigurationError)):
        return EXIT_USAGE, f"error: {error}"
    # A class whose module was never imported cannot have raised.
    data = sys.modules.get("training.data")
    if data is not None and isinstance(error, data.DatasetUnavailableError):
        return EXIT_DATASET_UNAVAILABLE, f"error: {error}"
    callbacks = sys.modules.get("training.callbacks")
    if callbacks is not None and isinstance(error, callbacks.TrainingInterrupted):
        return EXIT_INTERRUPTED, str(error)
    return None


def run(argv=None):
    """The command-line entry point: `main`, with one-line errors and exit codes.

    Returns:
        0 on success; 2 when a flag cannot be used, the dataset is unavailable or the
        configuration cannot be had (one line on stderr, no traceback); 3 after
        --interrupt-after-epoch.
    """
    try:
        main(argv)
    except Exception as error:
        report = error_report(error)
        if report is None:
            raise
        code, line = report
        print(line, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run())
