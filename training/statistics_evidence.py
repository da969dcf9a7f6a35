"""Test accuracy by epoch for four ways of getting the statistics a batch norm serves.

    python -m training.statistics_evidence [--epochs 10] [--seeds 0 1 2] [--out DIR]

Trains the digits ResNet of `training.models` once per series and seed, on one device,
with what `python -m training.train` uses by default (SGD with learning rate 0.05 and
momentum 0.9, batch 64, one pass over the 1,437 training images an epoch, XLA off here
to keep compile time down), and evaluates the 360 test images after every epoch with
the statistics each series serves:

- moving averages at momentum 0.99 (Keras's default),
- moving averages at momentum 0.9,
- warmed-up moving averages at momentum 0.99 (`momentum_warmup=True`),
- population statistics recomputed over the training data before each evaluation
  (`kerasbn.callbacks.PopulationStatistics`).

A seed fixes the initial weights and the order of the batches, so the runs of a seed
train the same weights: batch norms in training mode never read their moving
statistics, so only what is served differs (the program checks it and reports the
largest weight difference). It writes, in `--out`:

    accuracy_by_epoch.png    test accuracy against epochs, mean over seeds, shaded min..max
    accuracy_by_epoch.md     the numbers behind it, a markdown table
    accuracy_by_epoch.json   the same, per seed, with the settings and the command

`--quick` checks the plumbing in well under a minute: the MLP, 2 epochs of 3 batches,
seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time

from training import program
from training.program import (UsageError, check_installed, check_out_dir, int_at_least,
                              progress, write_document)

PROGRAM = "python -m training.statistics_evidence"
DEFAULT_OUT = os.path.join("docs", "statistics")
FILE_STEM = "accuracy_by_epoch"
DEFAULT_EPOCHS = 10
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_MODEL = "resnet"
BATCH_SIZE = 64
LEARNING_RATE = 0.05
SGD_MOMENTUM = 0.9
QUICK = {"model": "mlp", "epochs": 2, "steps_per_epoch": 3, "seeds": (0,)}
MODEL_NAMES = {"resnet": "ResNet", "mlp": "MLP"}
PLOT_INSTALL_HINT = ("pip install matplotlib (it is in the bench extra: "
                     "pip install -e '.[bench]')")


@dataclasses.dataclass(frozen=True)
class Series:
    """One way of getting the statistics that the trained model serves.

    Attributes:
        key: the series' name in the JSON file, e.g. "moving_0.99".
        label: the series' name in the figure and the table.
        momentum: the batch norms' `momentum`.
        warmup: whether the batch norms have `momentum_warmup=True`.
        population: whether population statistics are recomputed before each
            evaluation (`kerasbn.callbacks.PopulationStatistics`).
    """

    key: str
    label: str
    momentum: float
    warmup: bool = False
    population: bool = False


SERIES = (
    Series("moving_0.99", "moving averages, momentum 0.99", 0.99),
    Series("moving_0.9", "moving averages, momentum 0.9", 0.9),
    Series("warmup_0.99", "warmed-up moving averages, momentum 0.99", 0.99, warmup=True),
    Series("population", "population statistics, recomputed each epoch", 0.99,
           population=True),
)


def parse_args(argv=None):
    """Parses and checks the command line.

    Args:
        argv: the arguments after the program name; None for `sys.argv[1:]`.

    Returns:
        An `argparse.Namespace` with `epochs`, `seeds` (a tuple), `steps_per_epoch`
        (None for one pass over the training data), `model`, `out`, `data_dir`, `quick`.

    Raises:
        SystemExit: exit code 2 with a one-line message, for a flag value not allowed.
    """
    defaults = {"epochs": DEFAULT_EPOCHS, "seeds": DEFAULT_SEEDS, "model": DEFAULT_MODEL}
    return program.parse_args(_parser(), argv, defaults, QUICK, _check)


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__.split("\n\n")[0],
        epilog="Writes accuracy_by_epoch.png, .md and .json in --out.")
    parser.add_argument("--epochs", type=int_at_least(1), default=None, metavar="N",
                        help=f"epochs per run (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=None,
                        metavar="SEED",
                        help="seeds, one run of every series each (default "
                             f"{' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="a plumbing check for the tests: the MLP, 2 epochs of 3 "
                             "batches, seed 0 (flags given explicitly win)")
    parser.add_argument("--model", choices=("resnet", "mlp"), default=None,
                        help=f"the model of training.models (default {DEFAULT_MODEL})")
    parser.add_argument("--steps-per-epoch", type=int_at_least(1), default=None,
                        metavar="N",
                        help="batches per epoch (default: one pass over the training data)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="tfds data dir (default $KERASBN_DATA_DIR, else tfds's)")
    return parser


def _check(args):
    """Refuses, before anything long starts, what would end in a traceback."""
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"argument --seeds: each seed once; received "
                         f"{' '.join(map(str, args.seeds))}")
    check_out_dir(args.out)
    check_installed("matplotlib", "the figure is drawn with it", PLOT_INSTALL_HINT)


def command_line(args):
    """The command that reproduces a run with `args`, for the table and the JSON file."""
    defaults = QUICK if args.quick else {"model": DEFAULT_MODEL, "steps_per_epoch": None}
    words = ["--quick"] if args.quick else []
    if not args.quick or args.epochs != QUICK["epochs"]:
        words += ["--epochs", str(args.epochs)]
    if not args.quick or args.seeds != QUICK["seeds"]:
        words += ["--seeds", *map(str, args.seeds)]
    if args.model != defaults["model"]:
        words += ["--model", args.model]
    if args.steps_per_epoch != defaults["steps_per_epoch"]:
        words += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if os.path.normpath(args.out) != DEFAULT_OUT:
        words += ["--out", args.out]
    return " ".join([PROGRAM, *map(shlex.quote, words)])


def build_model(series, model_name, info, seed):
    """The compiled model of `series`, with the initial weights of `seed`.

    Args:
        series: a `Series`.
        model_name: "resnet" or "mlp" (`training.models`).
        info: the dataset's `training.data.DatasetInfo`.
        seed: the seed of the initial weights; every series of a seed starts equal.

    Returns:
        A `keras.Model` compiled with SGD and sparse categorical cross-entropy.
    """
    import keras

    import kerasbn
    from training import models

    keras.utils.set_random_seed(seed)
    model = models.build_model(model_name, info.image_shape, info.num_classes, "kerasbn",
                               bn_momentum=series.momentum, bn_jit_compile=False)
    if series.warmup:  # copies the weights: the same start as the other series
        model = kerasbn.convert_to_kerasbn(model, synchronized=False, momentum_warmup=True)
    model.compile(keras.optimizers.SGD(LEARNING_RATE, momentum=SGD_MOMENTUM),
                  "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=False)
    return model


def run_series(series, args, datasets, seed):
    """Trains one run of `series` and evaluates it after every epoch.

    Args:
        series: a `Series`.
        args: the parsed flags (model, epochs, steps per epoch).
        datasets: a `Datasets`.
        seed: the run's seed: initial weights and order of the batches.

    Returns:
        A tuple `(test_accuracy, training_accuracy, weights)`: per epoch, the test
        accuracy with the statistics the series serves and the training accuracy of
        `fit` (its running mean over the epoch, batch statistics); and the trained
        weights, a list of NumPy arrays.
    """
    from training import data

    model = build_model(series, args.model, datasets.info, seed)
    stream = data.training_stream(datasets.train, datasets.info.num_train, BATCH_SIZE,
                                  seed, 0, args.epochs, datasets.steps_per_epoch)
    callbacks = []
    if series.population:
        import kerasbn

        callbacks.append(kerasbn.callbacks.PopulationStatistics(datasets.train_in_order))
    history = model.fit(stream, epochs=args.epochs,
                        steps_per_epoch=datasets.steps_per_epoch,
                        validation_data=datasets.test, callbacks=callbacks, verbose=0)
    return (_floats(history.history["val_accuracy"]), _floats(history.history["accuracy"]),
            [weight.numpy() for weight in model.trainable_weights])


def _floats(values):
    return [float(value) for value in values]


@dataclasses.dataclass(frozen=True)
class Datasets:
    """The data of every run.

    Attributes:
        info: the `training.data.DatasetInfo` of the digits.
        train: the unbatched training split (for `training.data.training_stream`).
        train_in_order: the training split in batches of `BATCH_SIZE`, not shuffled:
            the data of the population statistics.
        test: the test split in batches of `BATCH_SIZE`.
        steps_per_epoch: batches per epoch.
    """

    info: object
    train: object
    train_in_order: object
    test: object
    steps_per_epoch: int


def load_datasets(args):
    """The `Datasets` of a run with `args` (the embedded digits)."""
    from training import data

    train, test, info = data.load("digits", data_dir=args.data_dir)
    steps = args.steps_per_epoch or math.ceil(info.num_train / BATCH_SIZE)
    return Datasets(info, train, data.batched(train, BATCH_SIZE, shuffle=False),
                    data.batched(test, BATCH_SIZE, shuffle=False), steps)


def run_all(args, datasets, say=print):
    """Every series for every seed.

    Returns:
        A dict: "test_accuracy" {series key: {seed: [per epoch]}}, "training_accuracy"
        {seed: [per epoch]} (of the first series; the same weights train in every
        series), "weight_difference" {series key: the largest absolute difference
        between its trained weights and the first series', over seeds}.
    """
    import numpy as np

    results = {"test_accuracy": {s.key: {} for s in SERIES}, "training_accuracy": {},
               "weight_difference": {s.key: 0.0 for s in SERIES[1:]}}
    for seed in args.seeds:
        reference = None
        for series in SERIES:
            start = time.perf_counter()
            test, training, weights = run_series(series, args, datasets, seed)
            results["test_accuracy"][series.key][seed] = test
            if reference is None:
                reference = weights
                results["training_accuracy"][seed] = training
            else:
                difference = max(float(np.max(np.abs(a - b)))
                                 for a, b in zip(weights, reference))
                results["weight_difference"][series.key] = max(
                    results["weight_difference"][series.key], difference)
            say(f"seed {seed}, {series.label}: test accuracy by epoch "
                f"{' '.join(f'{a:.3f}' for a in test)} "
                f"({time.perf_counter() - start:.0f} s)")
    return results


def summary(results, args, datasets, wall_seconds):
    """The JSON document of a run: settings, per-seed numbers and their mean, min, max."""
    import numpy as np

    series = []
    for item in SERIES:
        per_seed = results["test_accuracy"][item.key]
        curves = np.array([per_seed[seed] for seed in args.seeds])
        series.append({
            "key": item.key, "label": item.label, "momentum": item.momentum,
            "momentum_warmup": item.warmup, "population_statistics": item.population,
            "test_accuracy": {str(seed): per_seed[seed] for seed in args.seeds},
            "mean": _floats(curves.mean(0)), "min": _floats(curves.min(0)),
            "max": _floats(curves.max(0)),
        })
    return {
        "command": command_line(args),
        "dataset": "digits", "num_train": datasets.info.num_train,
        "num_test": datasets.info.num_test, "model": args.model,
        "batch_size": BATCH_SIZE, "steps_per_epoch": datasets.steps_per_epoch,
        "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={SGD_MOMENTUM})",
        "devices": 1, "xla": False, "seeds": list(args.seeds),
        "epochs": list(range(1, args.epochs + 1)),
        "series": series,
        "training_accuracy": {str(seed): results["training_accuracy"][seed]
                              for seed in args.seeds},
        "weight_difference_vs_first_series": results["weight_difference"],
        "wall_seconds": round(wall_seconds, 1),
    }


def markdown(document):
    """The markdown table of `document` (from `summary`), with the command above it."""
    several = len(document["seeds"]) > 1
    cell = "{mean:.3f} ({low:.3f}–{high:.3f})" if several else "{mean:.3f}"
    lines = [
        f"Test accuracy of the {MODEL_NAMES[document['model']]} on the digits "
        f"({document['num_test']} test images) after each epoch "
        f"(batch {document['batch_size']}, {document['steps_per_epoch']} steps an epoch, "
        f"{document['optimizer']}, 1 device), "
        + (f"mean (min–max) over seeds {', '.join(map(str, document['seeds']))}"
           if several else f"seed {document['seeds'][0]}")
        + f". Made by `{document['command']}`.",
        "",
        "| epoch | " + " | ".join(s["label"] for s in document["series"])
        + " | training accuracy (fit, batch statistics) |",
        "|---:|" + "---:|" * (len(document["series"]) + 1),
    ]
    training = [document["training_accuracy"][str(seed)] for seed in document["seeds"]]
    for index, epoch in enumerate(document["epochs"]):
        cells = [cell.format(mean=s["mean"][index], low=s["min"][index],
                             high=s["max"][index]) for s in document["series"]]
        values = [curve[index] for curve in training]
        cells.append(cell.format(mean=sum(values) / len(values), low=min(values),
                                 high=max(values)))
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(document, path):
    """Draws test accuracy against epochs (mean over seeds, shaded min..max) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"moving_0.99": ("tab:red", "o"), "moving_0.9": ("tab:orange", "s"),
              "warmup_0.99": ("tab:green", "^"), "population": ("tab:blue", "D")}
    figure, axes = plt.subplots(figsize=(8.0, 5.0))
    epochs = document["epochs"]
    for series in document["series"]:
        color, marker = styles[series["key"]]
        axes.plot(epochs, series["mean"], color=color, marker=marker, linewidth=1.8,
                  label=series["label"])
        if len(document["seeds"]) > 1:
            axes.fill_between(epochs, series["min"], series["max"], color=color,
                              alpha=0.15, linewidth=0)
    axes.set_xlabel(f"epoch ({document['steps_per_epoch']} steps of batch "
                    f"{document['batch_size']} each)")
    axes.set_ylabel(f"test accuracy ({document['num_test']} digits)")
    axes.set_xticks(epochs)
    axes.set_ylim(0.0, 1.02)
    seeds = len(document["seeds"])
    spread = f"{seeds} seeds: mean, shaded min–max" if seeds > 1 else "1 seed"
    axes.set_title(f"Digits {MODEL_NAMES[document['model']]}: test accuracy by the "
                   f"statistics served\n"
                   f"(same weights in every series; {spread})", fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    """Runs the program with `argv` (None: `sys.argv[1:]`); returns the JSON document."""
    args = parse_args(argv)
    start = time.perf_counter()
    from training import runtime

    runtime.configure_runtime(replicas=1, xla=False)
    datasets = load_datasets(args)
    say = progress(start)
    say(f"{args.model}, {len(SERIES)} series x {len(args.seeds)} seed(s), {args.epochs} "
        f"epochs of {datasets.steps_per_epoch} steps")
    results = run_all(args, datasets, say)
    document = summary(results, args, datasets, time.perf_counter() - start)
    for path in write_document(document, args.out, FILE_STEM, markdown, plot):
        say(f"wrote {path}")
    print(markdown(document))
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
