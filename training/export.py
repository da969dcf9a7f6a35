"""Write a trained Keras checkpoint as a versioned SavedModel for TF Serving.

    python -m training.export --checkpoint checkpoints/resnet.keras --name digits
    # -> saved_models/digits/1/, batch norms folded into the convolutions before them
    python -m training.export --checkpoint elsewhere.keras --name digits \
        --recompute-statistics --population-batches 20
    # first: every batch norm's moving statistics recomputed over the training data

The export is written beside its target under a hidden name, loaded back in a fresh
process and compared with the checkpoint's outputs, then renamed into place, so TF
Serving (which watches saved_models/NAME/ for all-digit version directories) never
sees a partial or wrong version.

With --recompute-statistics, the batch norms' moving statistics are first set to the
population statistics of the training split (`kerasbn.recompute_statistics`, on one
device), read as `python -m training.train`'s own pass reads it
(`training.data.population_batches`): for a checkpoint trained elsewhere, or
with moving averages that lag behind its weights.
"""

import argparse
import os
import re
import sys
import zipfile

from training import train_flags
from training.program import first_error_line, positive_int

PROG = "python -m training.export"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def _model_name(value):
    if not _NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"must be letters, digits, '_', '.' or '-', not starting with '_', '.' or "
            f"'-' (a directory name TF Serving accepts); received {value!r}")
    return value


def _version(value):
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; received {value!r}")
    return int(value)


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained Keras checkpoint as a SavedModel for TF Serving, "
                    "to OUT_DIR/NAME/VERSION/, with its batch norms frozen and folded "
                    "into the Conv/Dense layers before them.",
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH",
        help="the .keras file to export (written by `python -m training.train` or "
             "model.save); kerasbn and Keras batch norms are both understood")
    parser.add_argument(
        "--name", required=True, type=_model_name,
        help="the model's name: the directory under OUT_DIR that TF Serving serves "
             "as MODEL_NAME")
    parser.add_argument(
        "--version", type=_version, metavar="N",
        help="the version number (an integer >= 1); default: one more than the largest "
             "existing version, 1 for a new model. An existing version is refused")
    parser.add_argument(
        "--no-fold", dest="fold", action="store_false",
        help="do not fold batch norms into the layers before them; only freeze each one "
             "into a constant per-channel scale and offset")
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false",
        help="skip loading the export in a fresh process and comparing its outputs "
             "with the checkpoint's before it is moved into place")
    parser.add_argument(
        "--out-dir", default="saved_models", metavar="DIR",
        help="the directory holding one subdirectory per model (default: saved_models)")
    _statistics_flags(parser)
    return parser


# Flags that only mean something with --recompute-statistics (their defaults are None).
_RECOMPUTE_FLAGS = (("--population-batches", "population_batches"),
                    ("--batch-size", "batch_size"), ("--seed", "seed"))
DEFAULT_BATCH_SIZE = 64  # training.train's default --batch-size
DEFAULT_SEED = 0


def _statistics_flags(parser):
    """--recompute-statistics and what it reads: training.train's flags, same meaning."""
    group = parser.add_argument_group(
        "population statistics (before export)",
        "the training data is read as `python -m training.train` reads it for its own "
        "population pass; --dataset, --data-dir and --download are training.train's")
    group.add_argument(
        "--recompute-statistics", action="store_true",
        help="before exporting, set every batch norm's moving statistics to the exact "
             "mean and variance of its inputs over the training split "
             "(kerasbn.recompute_statistics): for a checkpoint trained elsewhere or "
             "whose moving averages lag behind its weights. Renorm layers keep theirs")
    group.add_argument(
        "--population-batches", type=positive_int, default=None,
        metavar="N",
        help="batches of --batch-size (shuffled by --seed) the pass reads, at most one "
             "pass (default: one pass over the training split)")
    group.add_argument(
        "--batch-size", type=positive_int, default=None, metavar="N",
        help="examples per batch of the pass, best the batch size the model was trained "
             f"with (default: {DEFAULT_BATCH_SIZE})")
    group.add_argument("--seed", type=int, default=None,
                       help=f"seed of the order of the pass's batches (default: "
                            f"{DEFAULT_SEED})")
    train_flags.add_data_flags(parser)


def _fail(message, code):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv=None):
    """Runs the command line; returns the exit code (0 done, 1 export failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    problem = (_recompute_problem(args) or _checkpoint_problem(args.checkpoint)
               or _out_dir_problem(args.out_dir, args.name))
    if problem:
        return _fail(problem, 2)

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import kerasbn  # noqa: F401  (registers kerasbn's layers for loading)

    try:
        model = keras.saving.load_model(args.checkpoint, compile=False)
    except Exception as error:  # Keras raises many kinds for an unreadable file
        return _fail(f"--checkpoint: cannot load {args.checkpoint!r}: "
                     f"{first_error_line(error)}", 2)

    if args.recompute_statistics:
        problem = recompute_on_training_data(model, args)
        if problem:
            return _fail(problem, 2)
    try:
        path, report = export_checkpoint(model, os.path.join(args.out_dir, args.name),
                                         version=args.version, fold=args.fold,
                                         verify=args.verify)
    except FileExistsError as error:
        return _fail(f"--version: {error}", 2)
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        return _fail(first_error_line(error), 1)
    print(f"exported model {model.name!r} to {path}")
    print_summary(path, report)
    return 0


def _recompute_problem(args):
    """Why the population-statistics flags do not go together, or None."""
    if args.recompute_statistics:
        return None
    given = [flag for flag, attribute in _RECOMPUTE_FLAGS
             if getattr(args, attribute) is not None]
    if given:
        return (f"{given[0]} is an option of the population pass: it needs "
                "--recompute-statistics")
    return None


def recompute_on_training_data(model, args):
    """Recomputes `model`'s batch-norm statistics over the training split; prints them.

    Args:
        model: the loaded checkpoint.
        args: the parsed command line (--dataset, --data-dir, --download,
            --batch-size, --seed, --population-batches).

    Returns:
        None when done, else a one-line message naming the flag at fault (the data
        cannot be had, or does not fit the model, or the model has no batch norm).
    """
    import kerasbn
    from training import data

    try:
        split, _, _ = data.load(args.dataset, data_dir=args.data_dir,
                                allow_download=args.download)
    except data.DatasetUnavailableError as error:
        return f"--dataset: {error}"
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    seed = DEFAULT_SEED if args.seed is None else args.seed
    batches = data.population_batches(split, batch_size, seed, epochs=0)
    amount = ("one pass of" if args.population_batches is None
              else f"{args.population_batches} batches of")
    print(f"population statistics: recomputing over {amount} the training split of "
          f"{args.dataset!r} (batches of {batch_size})", flush=True)
    try:
        summary = kerasbn.recompute_statistics(model, batches,
                                               steps=args.population_batches, verbose=0)
    except ValueError as error:  # recompute_statistics's messages name the argument
        culprit = (f"--checkpoint {args.checkpoint}" if "argument `model`" in str(error)
                   else f"--dataset {args.dataset}")
        return f"--recompute-statistics with {culprit}: {first_error_line(error)}"
    print(summary)
    return None


def _checkpoint_problem(path):
    """Why `path` cannot be a checkpoint to load, or None."""
    if os.path.isdir(path):
        return f"--checkpoint: {path!r} is a directory, not a .keras file"
    if not os.path.isfile(path):
        return f"--checkpoint: no such file: {path!r}"
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        return (f"--checkpoint: {path!r} is not a Keras file: a .keras file is a zip "
                "archive (written by model.save), and this file is not one")
    return None


def _out_dir_problem(out_dir, name):
    """Why OUT_DIR/NAME cannot hold versions, or None (it need not exist yet)."""
    target = existing = os.path.join(out_dir, name)
    while not os.path.exists(existing) and os.path.dirname(existing) not in ("", existing):
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        flag = "--name" if existing == target else "--out-dir"
        return f"{flag}: {existing!r} is a file, not a directory"
    return None


def export_checkpoint(model, export_dir, *, version=None, fold=True, verify=True):
    """Exports `model` with `kerasbn.export.export_saved_model`.

    Returns:
        `(path, report)`: the version directory written and the `FoldReport` of the
        model written there (what happened to each of its batch norms).
    """
    from kerasbn import export

    return export.export_saved_model(model, export_dir, version=version, fold=fold,
                                     verify=verify, return_report=True)


def print_summary(path, report):
    """Prints the serving signature of the SavedModel at `path` and the fold report."""
    from kerasbn import export

    signature = export.describe_signature(path)
    print("signature serving_default:")
    for kind in ("inputs", "outputs"):
        for name, (dtype, shape) in signature[kind].items():
            print(f"  {kind[:-1]:<6} {name}: {dtype} {shape}")
    print(f"batch norms: {len(report.folded)} folded into the layer before them, "
          f"{len(report.frozen)} frozen")
    for bn, reason in report.frozen:
        print(f"  frozen {bn}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
