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


def _fail(message, code):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv=None):
    """Runs the command line; returns the exit code (0 done, 1 export failed, 2 usage)."""
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        return _fail(f"--checkpoint: no such file: {args.checkpoint!r}", 2)

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import kerasbn  # noqa: F401  (registers kerasbn.BatchNormalization for loading)

    try:
        model = keras.saving.load_model(args.checkpoint, compile=False)
    except Exception as error:  # Keras raises many kinds for an unreadable file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return _fail(f"--checkpoint: cannot load {args.checkpoint!r}: {first_line}", 2)

    try:
        path, report = export_checkpoint(model, os.path.join(args.out_dir, args.name),
                                         version=args.version, fold=args.fold,
                                         verify=args.verify)
    except FileExistsError as error:
        return _fail(f"--version: {error}", 2)
    except (ValueError, TypeError, RuntimeError) as error:
        return _fail(str(error), 1)
    print(f"exported model {model.name!r} to {path}")
    print_summary(path, report)
    return 0


def export_checkpoint(model, export_dir, *, version=None, fold=True, verify=True):
    """Exports `model` with `kerasbn.export.export_saved_model`.

    Returns:
        `(path, report)`: the version directory written and the `FoldReport` of what
        happened to each batch norm.
    """
    from kerasbn import export

    rebuild = export.fold_batch_norms if fold else export.freeze_batch_norms
    _, report = rebuild(model, return_report=True)
    path = export.export_saved_model(model, export_dir, version=version, fold=fold,
                                     verify=verify)
    return path, report


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
