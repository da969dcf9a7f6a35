"""Write a trained Keras checkpoint as a versioned SavedModel for TF Serving.

    python -m training.export --checkpoint checkpoints/resnet.keras --name digits
    # -> saved_models/digits/1/, batch norms folded into the convolutions before them

The export is written beside its target under a hidden name, loaded back in a fresh
process and compared with the checkpoint's outputs, then renamed into place, so TF
Serving (which watches saved_models/NAME/ for all-digit version directories) never
sees a partial or wrong version.
"""

import argparse
import os
import re
import sys
import zipfile

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
    return parser


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fail(message, code):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv=None):
    """Runs the command line; returns the exit code (0 done, 1 export failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    problem = _checkpoint_problem(args.checkpoint) or _out_dir_problem(args.out_dir,
                                                                       args.name)
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
                     f"{_first_line(error)}", 2)

    try:
        path, report = export_checkpoint(model, os.path.join(args.out_dir, args.name),
                                         version=args.version, fold=args.fold,
                                         verify=args.verify)
    except FileExistsError as error:
        return _fail(f"--version: {error}", 2)
    except (OSError, ValueError, TypeError, RuntimeError) as error:
        return _fail(_first_line(error), 1)
    print(f"exported model {model.name!r} to {path}")
    print_summary(path, report)
    return 0


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
