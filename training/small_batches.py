"""Test accuracy at small per-replica batches, for five kinds of batch norm.

    python -m training.small_batches [--steps 300] [--seeds 0] [--per-replica 2 4 8]

Trains the paper's MLP of `training.models` (three hidden layers of 100 sigmoid units,
a batch norm before each nonlinearity) on the embedded digits with a MirroredStrategy
over 4 logical CPU devices (`--replicas`; the CPU is split by `training.runtime` before
TensorFlow starts), each replica seeing 2, 4 or 8 examples a step (global batches of
8, 16, 32), for a fixed number of steps of SGD (learning rate 0.05, momentum 0.9, as
`python -m training.train`), with:

- plain BN: `kerasbn.BatchNormalization()`, each replica's own statistics;
- synchronized BN: `synchronized=True`, the statistics of the global batch;
- renorm: Batch Renormalization (`renorm=True`, r clipped to [1/3, 3] and d to
  [-5, 5], the paper's final bounds), each replica's own statistics;
- ghost BN: `virtual_batch_size=2`, each replica's batch in groups of 2 (only where 2
  is smaller than the per-replica batch: at 2 it would be plain BN);
- no BN.

Every batch norm has Keras's default momentum, 0.99. Each model is evaluated on the
360 test images twice: with the moving averages training left, then after
`kerasbn.recompute_statistics` under the strategy has set population statistics over
the training data (in the training's global batches, unshuffled). A seed fixes the
initial weights and the order of the batches, the same for every kind of batch norm.
A last partial global batch is dropped, in training and in the recompute (fewer than
one global batch of the 1,437 images). The test accuracy is computed in inference mode
on one device, from the replicas' common weights. Writes `small_batches.md` and
`small_batches.json` in `--out`.

`--quick` checks the plumbing for the tests: 2 replicas of 4 examples, 3 steps, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time

from training import program
from training.program import UsageError, check_out_dir, int_at_least, progress, write_document

PROGRAM = "python -m training.small_batches"
DEFAULT_OUT = os.path.join("docs", "statistics")
FILE_STEM = "small_batches"
DEFAULT_REPLICAS = 4
DEFAULT_STEPS = 300
DEFAULT_SEEDS = (0,)
DEFAULT_PER_REPLICA = (2, 4, 8)
QUICK = {"steps": 3, "seeds": (0,), "per_replica": (4,), "replicas": 2}
MODEL = "mlp"
BN_MOMENTUM = 0.99
LEARNING_RATE = 0.05
SGD_MOMENTUM = 0.9
GHOST_SIZE = 2
RENORM_CLIPPING = {"rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0}
EVALUATION_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Method:
    """One kind of batch norm (or none).

    Attributes:
        key: its name in the JSON file.
        label: its name in the table.
        bn: `training.models.build_model`'s `bn`: "kerasbn" or "none".
        synchronized: whether the batch norms use the global batch's statistics.
        options: further `kerasbn.BatchNormalization` arguments.
    """

    key: str
    label: str
    bn: str = "kerasbn"
    synchronized: bool = False
    options: dict = dataclasses.field(default_factory=dict)

    def applies_to(self, per_replica):
        """Whether the method is defined at `per_replica` examples per replica."""
        size = self.options.get("virtual_batch_size")
        return size is None or size < per_replica

    def has_statistics(self):
        """Whether the model has batch-norm statistics to recompute."""
        return self.bn != "none"


METHODS = (
    Method("plain", "plain BN"),
    Method("synchronized", "synchronized BN", synchronized=True),
    Method("renorm", "renorm (rmax 3, dmax 5)",
           options={"renorm": True, "renorm_clipping": RENORM_CLIPPING}),
    Method("ghost", f"ghost BN (virtual_batch_size={GHOST_SIZE})",
           options={"virtual_batch_size": GHOST_SIZE}),
    Method("none", "no BN", bn="none"),
)
STATISTICS = ("moving", "population")


def parse_args(argv=None):
    """Parses and checks the command line.

    Args:
        argv: the arguments after the program name; None for `sys.argv[1:]`.

    Returns:
        An `argparse.Namespace` with `steps`, `replicas`, `seeds` and `per_replica`
        (tuples), `out`, `data_dir` and `quick`.

    Raises:
        SystemExit: exit code 2 with a one-line message, for a flag value not allowed.
    """
    defaults = {"steps": DEFAULT_STEPS, "seeds": DEFAULT_SEEDS,
                "per_replica": DEFAULT_PER_REPLICA, "replicas": DEFAULT_REPLICAS}
    return program.parse_args(_parser(), argv, defaults, QUICK, _check)


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__.split("\n\n")[0],
        epilog="Writes small_batches.md and small_batches.json in --out.")
    parser.add_argument("--steps", type=int_at_least(1), default=None, metavar="N",
                        help=f"training steps of every run (default {DEFAULT_STEPS})")
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=None,
                        metavar="SEED", help="seeds, one run of every cell each (default "
                                             f"{' '.join(map(str, DEFAULT_SEEDS))})")
    parser.add_argument("--per-replica", type=int_at_least(2), nargs="+", default=None,
                        metavar="N", help="examples per replica a step (default "
                                          f"{' '.join(map(str, DEFAULT_PER_REPLICA))})")
    parser.add_argument("--replicas", type=int_at_least(2), default=None, metavar="N",
                        help=f"replicas: logical CPU devices of a MirroredStrategy "
                             f"(default {DEFAULT_REPLICAS})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="a plumbing check for the tests: 2 replicas of 4 examples, "
                             "3 steps, seed 0 (flags given explicitly win)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="tfds data dir (default $KERASBN_DATA_DIR, else tfds's)")
    return parser


def _check(args):
    """Refuses, before anything long starts, what would end in a traceback."""
    for flag, values in (("--seeds", args.seeds), ("--per-replica", args.per_replica)):
        if len(set(values)) != len(values):
            raise UsageError(f"argument {flag}: each value once; received "
                             f"{' '.join(map(str, values))}")
    check_out_dir(args.out)


def command_line(args):
    """The command that reproduces a run with `args`, for the table and the JSON file."""
    words = ["--quick"] if args.quick else []
    for flag, name in (("--steps", "steps"), ("--seeds", "seeds"),
                       ("--per-replica", "per_replica"), ("--replicas", "replicas")):
        value = getattr(args, name)
        if args.quick and value == QUICK[name] or (
                not args.quick and name == "replicas" and value == DEFAULT_REPLICAS):
            continue
        words += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
    if os.path.normpath(args.out) != DEFAULT_OUT:
        words += ["--out", args.out]
    return " ".join([PROGRAM, *map(shlex.quote, words)])


def build_model(method, info, strategy, seed):
    """The compiled model of `method` under `strategy`, with the initial weights of `seed`.

    Every method of a seed starts from the same kernels (and, with batch norms, the
    same γ = 1, β = 0 and statistics).
    """
    import keras

    from training import models

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = models.build_model(MODEL, info.image_shape, info.num_classes, method.bn,
                                   synchronized=method.synchronized,
                                   bn_momentum=BN_MOMENTUM, bn_jit_compile=False)
        if method.options:
            model = with_batch_norm_options(model, method.options)
        model.compile(keras.optimizers.SGD(LEARNING_RATE, momentum=SGD_MOMENTUM),
                      "sparse_categorical_crossentropy", metrics=["accuracy"],
                      jit_compile=False)
    return model


def with_batch_norm_options(model, options):
    """A copy of `model` whose kerasbn batch norms get `options`, other weights copied.

    `kerasbn.convert_to_kerasbn` takes only the options that Keras's layer lacks, and
    `renorm` is one Keras has, so the copy is made with `keras.models.clone_model`.
    The batch norms start anew (γ = 1, β = 0, statistics at their initial values, as
    in `model`).

    Args:
        model: a functional model of `training.models` with kerasbn batch norms.
        options: `kerasbn.BatchNormalization` arguments, e.g. {"renorm": True}.

    Returns:
        The copy, a new `keras.Model` (built under the current strategy scope).
    """
    import keras

    import kerasbn

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, kerasbn.BatchNormalization):
            config.update(options)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if not isinstance(layer, kerasbn.BatchNormalization):
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


@dataclasses.dataclass(frozen=True)
class Data:
    """The embedded digits.

    Attributes:
        train: the training split, an unbatched `tf.data.Dataset`.
        test_images: the test images, a NumPy array.
        test_labels: their labels, a NumPy array.
        info: the `training.data.DatasetInfo`.
    """

    train: object
    test_images: object
    test_labels: object
    info: object


def load_data(data_dir=None):
    """The `Data` of the embedded digits (tfds data dir `data_dir`; None: the default)."""
    import numpy as np

    from training import data as datasets

    train, test, info = datasets.load("digits", data_dir=data_dir)
    images, labels = zip(*test.as_numpy_iterator())
    return Data(train, np.stack(images), np.asarray(labels), info)


def training_batches(train, info, global_batch, seed):
    """Global batches of the shuffled training data, repeated; each pass reshuffled."""
    return (train.shuffle(info.num_train, seed=seed, reshuffle_each_iteration=True)
            .batch(global_batch, drop_remainder=True).repeat())


def run_cell(method, per_replica, seed, data, strategy, steps):
    """Trains and evaluates one run.

    Returns:
        A dict: "moving" and "population" test accuracy (the latter None without
        batch norms), "training" the training accuracy of the run's last step
        (fit's running mean over the run, batch statistics).
    """
    import kerasbn

    global_batch = per_replica * strategy.num_replicas_in_sync
    model = build_model(method, data.info, strategy, seed)
    history = model.fit(training_batches(data.train, data.info, global_batch, seed),
                        epochs=1, steps_per_epoch=steps, verbose=0)
    result = {"moving": served_accuracy(model, data), "population": None,
              "training": float(history.history["accuracy"][-1])}
    if method.has_statistics():
        with strategy.scope():
            # Renorm layers too (not the default), to measure what that serves.
            kerasbn.recompute_statistics(
                model, data.train.batch(global_batch, drop_remainder=True), verbose=0,
                recompute_renorm=True)
        result["population"] = served_accuracy(model, data)
    return result


def served_accuracy(model, data):
    """The accuracy of `model` in inference mode on the test images.

    Computed on one device, outside the strategy (inference mode reads the same
    mirrored weights on every replica), which spares tracing an evaluation under the
    strategy for every model.
    """
    import numpy as np

    predictions = []
    for start in range(0, len(data.test_images), EVALUATION_BATCH):
        batch = data.test_images[start:start + EVALUATION_BATCH]
        predictions.append(np.argmax(model(batch, training=False), axis=-1))
    return float(np.mean(np.concatenate(predictions) == data.test_labels))


def run_all(args, data, strategy, say=print):
    """Every cell for every seed.

    Returns:
        {method key: {per-replica batch: {seed: run_cell's dict}}}, leaving out the
        per-replica batches a method does not apply to.
    """
    results = {method.key: {} for method in METHODS}
    for per_replica in args.per_replica:
        for method in METHODS:
            if not method.applies_to(per_replica):
                continue
            for seed in args.seeds:
                start = time.perf_counter()
                cell = run_cell(method, per_replica, seed, data, strategy, args.steps)
                results[method.key].setdefault(per_replica, {})[seed] = cell
                population = ("-" if cell["population"] is None
                              else f"{cell['population']:.3f}")
                say(f"{strategy.num_replicas_in_sync}x{per_replica}, {method.label}, "
                    f"seed {seed}: test accuracy {cell['moving']:.3f} (moving averages), "
                    f"{population} (population) ({time.perf_counter() - start:.0f} s)")
    return results


def summary(results, args, data, wall_seconds):
    """The JSON document of a run: settings, and per cell the seeds' accuracies.

    A cell is None where it does not apply: ghost BN where its group is not smaller
    than the per-replica batch, and population statistics without batch norms.
    """
    methods = []
    for method in METHODS:
        cells = {}
        for per_replica in args.per_replica:
            runs = results[method.key].get(per_replica)
            cells[str(per_replica)] = {
                statistic: _cell(runs, statistic, args.seeds) for statistic in STATISTICS}
            cells[str(per_replica)]["training"] = _cell(runs, "training", args.seeds)
        methods.append({"key": method.key, "label": method.label,
                        "synchronized": method.synchronized,
                        "options": _json_options(method.options), "accuracy": cells})
    return {
        "command": command_line(args), "dataset": "digits",
        "num_train": data.info.num_train, "num_test": data.info.num_test,
        "model": MODEL, "replicas": args.replicas,
        "per_replica_batches": list(args.per_replica),
        "steps": args.steps, "seeds": list(args.seeds),
        "optimizer": f"SGD(learning_rate={LEARNING_RATE}, momentum={SGD_MOMENTUM})",
        "bn_momentum": BN_MOMENTUM, "methods": methods,
        "wall_seconds": round(wall_seconds, 1),
    }


def _cell(runs, statistic, seeds):
    if runs is None or runs[seeds[0]][statistic] is None:
        return None
    values = [runs[seed][statistic] for seed in seeds]
    return {"per_seed": {str(seed): value for seed, value in zip(seeds, values)},
            "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _json_options(options):
    return {key: (dict(value) if isinstance(value, dict) else value)
            for key, value in options.items()}


def markdown(document):
    """The markdown table of `document` (from `summary`), with its settings and command."""
    seeds = document["seeds"]
    several = len(seeds) > 1
    lines = [
        f"Test accuracy of the {document['model'].upper()} on the digits "
        f"({document['num_test']} test images) after {document['steps']} steps on "
        f"{document['replicas']} replicas (MirroredStrategy over logical CPU devices), "
        f"{document['optimizer']}, batch-norm momentum {document['bn_momentum']}; "
        + (f"mean (min–max) over seeds {', '.join(map(str, seeds))}"
           if several else f"seed {seeds[0]}")
        + f". Made by `{document['command']}`.",
        "",
        "| batch norm | statistics served | "
        + " | ".join(f"{document['replicas']} × {n} (global {document['replicas'] * n})"
                     for n in document["per_replica_batches"]) + " |",
        "|---|---|" + "---:|" * len(document["per_replica_batches"]),
    ]
    names = {"moving": "moving averages", "population": "population statistics"}
    for method in document["methods"]:
        for statistic in STATISTICS:
            if statistic == "population" and method["key"] == "none":
                continue
            cells = [_markdown_cell(method["accuracy"][str(n)][statistic], several)
                     for n in document["per_replica_batches"]]
            shown = "— (no statistics)" if method["key"] == "none" else names[statistic]
            lines.append(f"| {method['label']} | {shown} | " + " | ".join(cells) + " |")
    if any(method["accuracy"][str(n)]["moving"] is None
           for method in document["methods"] for n in document["per_replica_batches"]):
        lines += ["", f"— : not run: ghost BN's groups of {GHOST_SIZE} would be the whole "
                      f"per-replica batch of {GHOST_SIZE}, which is plain BN."]
    return "\n".join(lines) + "\n"


def _markdown_cell(cell, several):
    if cell is None:
        return "—"
    if several:
        return f"{cell['mean']:.3f} ({cell['min']:.3f}–{cell['max']:.3f})"
    return f"{cell['mean']:.3f}"


def main(argv=None):
    """Runs the program with `argv` (None: `sys.argv[1:]`); returns the JSON document."""
    args = parse_args(argv)
    start = time.perf_counter()
    from training import runtime

    # Splits the CPU into logical devices (runtime.split_cpu) before TensorFlow starts.
    setup = runtime.configure_runtime(replicas=args.replicas, xla=False)
    strategy = runtime.make_strategy(setup)
    data = load_data(args.data_dir)
    say = progress(start)
    say(f"{MODEL} on {strategy.num_replicas_in_sync} replicas, {args.steps} steps, "
        f"per-replica batches {' '.join(map(str, args.per_replica))}, "
        f"seeds {' '.join(map(str, args.seeds))}")
    results = run_all(args, data, strategy, say)
    document = summary(results, args, data, time.perf_counter() - start)
    for path in write_document(document, args.out, FILE_STEM, markdown):
        say(f"wrote {path}")
    print(markdown(document))
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
