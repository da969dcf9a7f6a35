"""Trains a model of `training.models` on a tensorflow-datasets image-classification set.

    python -m training.train                                  # ResNet on digits, 1 device
    python -m training.train --replicas 4 --sync-bn --xla     # 4 replicas (GPUs, else CPUs)
    python -m training.train --dataset mnist --data-dir ~/tensorflow_datasets --epochs 5
    TF_CONFIG='{...}' python -m training.train --multi-worker # one process per worker

What a run does: loads the dataset (`training.data`; "digits" is the offline default),
builds the model with kerasbn's, Keras's or no batch norm, trains it with `model.fit`
(SGD with momentum, a Keras progress bar per epoch), then recomputes every batch norm's
statistics over the training data (`kerasbn.recompute_statistics` under the run's
strategy, on every worker; --no-population-statistics skips it), saves and evaluates
the model on the test split, with the population statistics it serves and with the
moving averages training left, and prints one final line (wrapped here):

    final: test_accuracy=0.9750 examples_per_second=1234.5
        test_accuracy_moving_averages=0.1056 statistics=population
        checkpoint=runs/train/model.keras

`statistics=` says what the checkpoint's batch norms hold: `population`,
`moving_averages` (--no-population-statistics; both accuracies are then the same) or
`none` (--bn none).

Under --out (default runs/train/) it writes

    model.keras      the trained model (`keras.models.load_model` reads it back)
    logs/            TensorBoard: Keras's losses and metrics, and per batch-norm layer the
                     histograms and channel means of moving_mean and moving_variance
                     (each epoch) and of the population statistics (at the last epoch)
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

import dataclasses
import importlib
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
    whole_step_fallback,
)
from training.train_flags import (  # noqa: F401 -- the flag names are read here too
    BACKUP_DIR,
    BATCH_NORMS,
    CHECKPOINT_NAME,
    DEFAULT_OUT,
    LOGS_DIR,
    MIXED_PRECISION,
    MODELS,
    MOMENTUM,
    UsageError,
    build_parser,
    bn_options,
    check_batch_split,
    check_bn_momentum,
    check_bn_options,
    check_flags,
    make_directory,
    parse_args,
)

# The batch-norm statistics' TensorBoard directory, in --out's logs/.
BATCH_NORM_LOGS = "batch_norm"
# Evaluation batches: large, so that a small test split is one shape (one compilation).
EVAL_BATCH_SIZE = 512

EXIT_DATASET_UNAVAILABLE = 2
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3

FINAL_LINE_PREFIX = "final:"
# What the checkpoint's batch norms hold: the final line's `statistics=`.
POPULATION, MOVING_AVERAGES, NO_STATISTICS = "population", "moving_averages", "none"

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
    "population_batches": "training.data",
    "evaluate_statistics": "training.evaluation",
    "correct_examples": "training.evaluation",
}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        """The paths of `task` in a run whose --out is `out`."""
        work_dir = out if task.chief else os.path.join(out, "workers", task.name)
        backup_dir = os.path.join(out, BACKUP_DIR, *([task.name] if task.name else []))
        return cls(out, task, work_dir, backup_dir)

    @property
    def checkpoint(self):
        """The .keras file this process saves."""
        return os.path.join(self.work_dir, CHECKPOINT_NAME)

    @property
    def log_dir(self):
        """The TensorBoard directory this process writes."""
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
        in all), "test_accuracy_moving_averages", "test_loss_moving_averages" and
        "test_correct_moving_averages" (the same with the moving averages training
        left, before the population pass; equal to the above without a pass),
        "statistics" (what the checkpoint's batch norms hold: "population",
        "moving_averages" or "none"), "population_statistics" (the pass's
        `kerasbn.StatisticsSummary`, or None), "population_seconds" (its time),
        "examples_per_second" (see `training.callbacks.examples_per_second`),
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
                                xla=args.xla, try_whole_step=args.try_whole_step)
    import keras
    import tensorflow as tf

    from training import data, evaluation

    tf.get_logger().setLevel("ERROR")
    strategy = make_strategy(runtime)
    replicas = strategy.num_replicas_in_sync
    check_batch_split(args.batch_size, replicas, "the replicas in sync")
    check_bn_options(args)
    train, test, info = data.load(args.dataset, data_dir=args.data_dir,
                                  allow_download=args.download)
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(MIXED_PRECISION[args.mixed_precision])
    paths = RunPaths.of(args.out, task_of(strategy))
    make_directory("--out", paths.work_dir)
    initial_epoch = backed_up_epoch(paths.backup_dir)
    _print_setup(args, info, runtime, strategy, paths, initial_epoch)

    model = _compiled_model(args, info, runtime, strategy)
    if runtime.xla.step_jit_compile and replicas > 1:
        model, runtime = _whole_step_or_fallback(model, args, train, info, runtime,
                                                 strategy, paths.task.chief)
    fitted = _fit(model, args, train, info, paths, initial_epoch)
    moving_averages = model.get_weights()
    population = _population_pass(model, args, train, strategy, paths)
    model.save(paths.checkpoint)
    # The checkpoint is evaluated, on one device: inference needs no replicas, and
    # compiling it once beats compiling it for every replica.
    evaluated = evaluation.evaluate_statistics(
        paths.checkpoint, data.batched(test, EVAL_BATCH_SIZE, shuffle=False),
        info.num_test, moving_averages if population["statistics"] == POPULATION else None,
        jit_compile=runtime.xla.evaluation_jit_compile)
    paths = paths.finish()

    results = {
        **evaluated,
        **population,
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
            bn_jit_compile=runtime.xla.layer_jit_compile, **bn_options(args))
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


def _whole_step_or_fallback(model, args, train, info, runtime, strategy, chief):
    """Checks, on a first step, that TensorFlow compiles the whole step on the replicas.

    The step runs on one batch and is undone (weights, moving statistics, optimizer
    state and metrics as they were): when it runs, `fit` reuses the step it compiled;
    when TensorFlow refuses it, the model is compiled again as
    `runtime.whole_step_fallback` says, and one line says so.

    Returns:
        `(model, runtime)`: the model to train and the runtime whose plan it follows.
    """
    from training import data

    first = next(iter(data.batched(train, args.batch_size, shuffle=False)))
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    weights = model.get_weights()
    optimizer_state = [variable.numpy() for variable in model.optimizer.variables]
    try:
        model.train_on_batch(*first)
    except Exception as error:  # noqa: BLE001 -- any refusal means: fall back
        runtime = dataclasses.replace(runtime, xla=whole_step_fallback(runtime.xla, error))
        _say(chief, f"xla: {runtime.xla.description}")
        model = _compiled_model(args, info, runtime, strategy)
    model.set_weights(weights)
    for variable, value in zip(model.optimizer.variables, optimizer_state):
        variable.assign(value)
    model.reset_metrics()
    return model, runtime


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


def _population_pass(model, args, train, strategy, paths):
    """Recomputes the batch norms' population statistics (or says why not)."""
    import kerasbn
    from training import callbacks

    chief = paths.task.chief
    if args.bn == "none" or not args.population_statistics:
        statistics = NO_STATISTICS if args.bn == "none" else MOVING_AVERAGES
        why = "--bn none" if args.bn == "none" else "--no-population-statistics"
        _say(chief, f"population statistics: skipped ({why})")
        return {"statistics": statistics, "population_statistics": None,
                "population_seconds": 0.0}
    from training import data

    batches = data.population_batches(train, args.batch_size, args.seed, args.epochs)
    steps = args.population_batches
    _say(chief, "population statistics: recomputing every batch norm's moving mean and "
                f"variance over {'one pass of' if steps is None else f'{steps} batches of'}"
                f" the training data (batches of {args.batch_size})")
    start = time.perf_counter()
    with strategy.scope():
        summary = kerasbn.recompute_statistics(model, batches, steps=steps,
                                               verbose=1 if chief else 0)
    seconds = time.perf_counter() - start
    _say(chief, f"{summary}\n({seconds:.1f} s; mean change in units of the new "
                "standard deviation, variance change relative to the old variance)")
    callbacks.write_population_statistics(
        os.path.join(paths.log_dir, BATCH_NORM_LOGS), model, step=args.epochs - 1)
    # Renorm layers keep their moving statistics (see kerasbn.recompute_statistics).
    return {"statistics": POPULATION if len(summary) else MOVING_AVERAGES,
            "population_statistics": summary, "population_seconds": seconds}


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
    options = "".join(f", {key}={value}" for key, value in bn_options(args).items())
    _say(chief, f"model: {args.model}, batch norm: {args.bn}{synchronized}{options}, "
                f"mixed precision: {args.mixed_precision}")
    _say(chief, f"devices: {describe_devices(runtime, strategy)}; global batch "
                f"{args.batch_size} ({args.batch_size // strategy.num_replicas_in_sync} "
                "per replica)")
    _say(chief, f"xla: {runtime.xla.description}")
    if initial_epoch:
        _say(chief, f"resuming from the backup in {paths.backup_dir}: epoch "
                    f"{initial_epoch + 1} of {args.epochs}")


def _print_results(results, chief):
    if results["statistics"] == POPULATION:
        _say(chief, f"test accuracy: {results['test_accuracy']:.4f} with the population "
                    f"statistics (what {CHECKPOINT_NAME} serves), "
                    f"{results['test_accuracy_moving_averages']:.4f} with the moving "
                    "averages")
    _say(chief, f"checkpoint: {results['checkpoint']}")
    _say(chief, f"tensorboard: tensorboard --logdir {results['log_dir']}")
    print(f"{FINAL_LINE_PREFIX} test_accuracy={results['test_accuracy']:.4f} "
          f"examples_per_second={results['examples_per_second']:.1f} "
          f"test_accuracy_moving_averages={results['test_accuracy_moving_averages']:.4f} "
          f"statistics={results['statistics']} "
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
