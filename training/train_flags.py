"""The command line of `python -m training.train`: its flags, and the checks of their values.

    args = parse_args(["--replicas", "4", "--batch-size", "64"])
    check_flags(args)               # before TensorFlow starts
    check_bn_options(args)          # the batch-norm layer's own checks (imports kerasbn)

A value a run cannot use is refused with a `UsageError`, whose one-line message names
the flag, before it can end in a TensorFlow traceback. Importing this module does not
import TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from training import models
from training.program import UsageError, positive_float, positive_int

MODELS = models.MODELS
BATCH_NORMS = models.BATCH_NORMS
MIXED_PRECISION = {"off": "float32", "float16": "mixed_float16",
                   "bfloat16": "mixed_bfloat16"}

DEFAULT_OUT = os.path.join("runs", "train")
CHECKPOINT_NAME = "model.keras"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"
# The momentum of SGD (the optimizer's, not the batch norms').
MOMENTUM = 0.9
# Modules of the `train` extra (setup.cfg) that every run needs.
TRAIN_EXTRA_MODULES = ("tensorboard",)


# ------------------------------------------------------------------ command line


def build_parser():
    """The argument parser of `python -m training.train`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a ResNet or an MLP with kerasbn's, Keras's or no batch norm on a "
        "tensorflow-datasets image-classification dataset, on one device, several "
        "replicas (GPUs, or logical CPU devices) or several workers, with or without "
        "XLA; then recompute the batch norms' population statistics over the training "
        "data. Prints a progress bar per epoch and a final line with the test accuracy "
        "(with the population statistics, and with the moving averages) and the "
        "training speed; writes a .keras checkpoint and TensorBoard logs under --out; "
        "an interrupted run started again with the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add_group in (add_data_flags, _model_flags, _training_flags, _statistics_flags,
                      _device_flags, _output_flags):
        add_group(parser)
    return parser


def add_data_flags(parser):
    """--dataset, --data-dir and --download (python -m training.export reads them too)."""
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
    group.add_argument("--bn-momentum-warmup", action="store_true",
                       help="kerasbn only: moving averages that start right "
                            "(momentum_warmup=True): update t uses the momentum "
                            "min(M, t/(t+1)), the exact mean of the batches seen until "
                            "that reaches M")
    group.add_argument("--virtual-batch-size", type=int, default=None, metavar="K",
                       help="kerasbn only: ghost batch norm (virtual_batch_size=K): in "
                            "training, each group of K consecutive examples of a "
                            "replica's batch is normalized with its own statistics (a "
                            "last, smaller group with its own); inference is unchanged. "
                            "Unset, a replica's whole batch is one group")
    group.add_argument("--renorm", action="store_true",
                       help="Batch Renormalization (renorm=True, Ioffe 2017), with "
                            "kerasbn's or Keras's layer; no clipping of r and d")


def _training_flags(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=10, metavar="N",
                       help="epochs to train (in total, counting resumed ones)")
    group.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                       help="global batch size, a multiple of the replicas, split evenly "
                            "across them; the last partial batch of an epoch is kept")
    group.add_argument("--learning-rate", type=positive_float, default=0.05, metavar="LR",
                       help=f"learning rate of SGD with momentum {MOMENTUM}")
    group.add_argument("--steps-per-epoch", type=positive_int, default=None, metavar="N",
                       help="batches per epoch (default: one pass over the training "
                            "split); fewer for quick tests, more to repeat the data")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of weights, dropout-free training and data order "
                            "(keras.utils.set_random_seed)")


def _statistics_flags(parser):
    group = parser.add_argument_group("population statistics (after training)")
    group.add_argument("--population-statistics", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="before the final evaluation and checkpoint, set every batch "
                            "norm's moving statistics to the exact mean and variance of "
                            "its inputs over the training data "
                            "(kerasbn.recompute_statistics, under the run's strategy); "
                            "the test accuracy with the moving averages is reported too. "
                            "Skipped with --bn none")
    group.add_argument("--population-batches", type=positive_int, default=None,
                       metavar="N",
                       help="batches of --batch-size (shuffled by --seed) the pass reads, "
                            "at most one pass (default: one pass over the training split)")


def _device_flags(parser):
    group = parser.add_argument_group("devices and compilation")
    group.add_argument("--replicas", type=positive_int, default=1, metavar="N",
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
    group.add_argument("--try-whole-step", action="store_true",
                       help="with --xla on several CPU replicas: try the whole compiled "
                            "step, as on GPUs. TensorFlow refuses it on CPUs, and the run "
                            "falls back to what runs there, saying so in one line; for "
                            "testing that fallback")
    group.add_argument("--mixed-precision", choices=tuple(MIXED_PRECISION), default="off",
                       help="compute in float16 or bfloat16 with float32 weights "
                            "(Keras mixed precision); batch-norm statistics stay float32")


def _output_flags(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help=f"where {CHECKPOINT_NAME}, {LOGS_DIR}/ (TensorBoard) and "
                            f"{BACKUP_DIR}/ (resumption state) go")
    group.add_argument("--interrupt-after-epoch", type=positive_int, default=None,
                       metavar="N",
                       help="stop (exit code 3) once epoch N is finished and backed up, "
                            "as if the job were preempted; run the same command without "
                            "this flag to resume. For testing resumption")


def parse_args(argv=None):
    """Parses the command line (`sys.argv[1:]` when `argv` is None)."""
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------ checks


def check_flags(args):
    """Refuses, before TensorFlow starts, what would otherwise end in a traceback.

    Raises:
        UsageError: a module of the `train` extra is missing, a batch-norm option is
            given with a --bn that does not have it, --batch-size does not split
            evenly across --replicas, or --out cannot be a directory.
    """
    missing = [name for name in TRAIN_EXTRA_MODULES if not _installed(name)]
    if missing:
        raise UsageError(f"{', '.join(missing)} is not installed; training.train needs "
                         "the train extra: pip install -e '.[train]'")
    _check_bn_supports(args)
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


def make_directory(flag, path):
    """Makes the directory `path` and its parents.

    Raises:
        UsageError: naming `flag`, when the directory cannot be made.
    """
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag}: cannot make the directory {path}: "
                         f"{error.strerror or error}") from None


# Batch-norm flags: (flag, attribute of args, the --bn values whose layer has it).
_BN_OPTION_FLAGS = (
    ("--bn-momentum-warmup", "bn_momentum_warmup", ("kerasbn",)),
    ("--virtual-batch-size", "virtual_batch_size", ("kerasbn",)),
    ("--renorm", "renorm", ("kerasbn", "keras")),
)
_LAYER_OF = {"kerasbn": "kerasbn.BatchNormalization",
             "keras": "keras.layers.BatchNormalization"}


def _check_bn_supports(args):
    """Refuses a batch-norm option flag given with a --bn whose layer has no such option."""
    for flag, attribute, supported in _BN_OPTION_FLAGS:
        value = getattr(args, attribute)
        if value is None or value is False or args.bn in supported:
            continue
        given = flag if value is True else f"{flag} {value}"
        layers = " or ".join(f"--bn {bn} ({_LAYER_OF[bn]})" for bn in supported)
        why = ("--bn none has no batch norm" if args.bn == "none" else
               f"{_LAYER_OF[args.bn]} (--bn {args.bn}) has no such option")
        raise UsageError(f"{given} needs {layers}: {why}")


def bn_options(args):
    """The keyword options of the batch-norm layers that the flags ask for.

    Returns:
        A dict for `training.models.build_model(..., **options)`: only the options
        given (`momentum_warmup`, `virtual_batch_size`, `renorm`), so that a run
        without them builds the layers it always built.
    """
    options = {}
    if args.bn_momentum_warmup:
        options["momentum_warmup"] = True
    if args.virtual_batch_size is not None:
        options["virtual_batch_size"] = args.virtual_batch_size
    if args.renorm:
        options["renorm"] = True
    return options


def check_bn_options(args):
    """Refuses batch-norm flag values the layer refuses, in one line naming the flag.

    --bn-momentum is checked against `kerasbn.BatchNormalization` whatever --bn is
    (`check_bn_momentum`); --virtual-batch-size, a kerasbn option, likewise: the layer
    itself decides what it allows, and its message follows the flag.

    Raises:
        UsageError: `check_flags`'s batch-norm checks, or a value the layer refuses.
    """
    import kerasbn

    _check_bn_supports(args)
    check_bn_momentum(args.bn_momentum)
    if args.virtual_batch_size is not None:
        try:
            kerasbn.BatchNormalization(virtual_batch_size=args.virtual_batch_size,
                                       name="batch_norm")
        except ValueError as error:
            raise UsageError(f"--virtual-batch-size {args.virtual_batch_size}: "
                             f"{error}") from None


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
