"""`python -m training.benchmark`: the command line and a short main."""

import argparse
import dataclasses
import datetime
import os
import sys
import time
from typing import Optional, Tuple

import numpy as np

from training.benchmark import harness, machine, results
from training.benchmark.config import FULL, QUICK, Config
from training.benchmark.harness import Report
from training.benchmark.sections import SECTIONS, Run, describe_sections, logical_devices, \
    run_sections

USAGE = """\
Benchmark of kerasbn against the batch norms of Keras 3, tf_keras and PyTorch.

    python -m training.benchmark                      # the full run: most of an hour
    python -m training.benchmark --quick              # small shapes, about two minutes
    python -m training.benchmark --sections layer,bandwidth --out results/mine"""


def body(module):
    """A module's docstring without its first paragraph (its one-line summary)."""
    return module.__doc__.split("\n\n", 1)[1].strip()


DESCRIPTION = "\n\n".join([USAGE, "Sections (all by default):", describe_sections(),
                           body(harness), body(results)]) + "\n"


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line, checked.

    Attributes:
        quick: small shapes and few repetitions (`config.QUICK`).
        sections: the sections asked for, in the order of `sections.SECTIONS`.
        out: the output directory.
        reps: timed repetitions per contender for every section, or None for the
            sizes' own.
    """

    quick: bool
    sections: Tuple[str, ...]
    out: str
    reps: Optional[int]

    @property
    def config(self) -> Config:
        """The run's sizes: `QUICK` or `FULL`, with `reps` if given."""
        config = QUICK if self.quick else FULL
        return config if self.reps is None else config.with_reps(self.reps)


def build_parser():
    """The argument parser of `python -m training.benchmark`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Missing optional contenders (pip install -e '.[bench]' torch==2.13.0) "
        "and contenders that fail are skipped, with the reason in the output.")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repetitions: about two minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, among {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: results/bench-<date-time>)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per contender, for every section")
    return parser


def parse_args(argv):
    """The `Options` of the command line `argv` (without the program name); exits
    with status 2 and a message on a bad argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        parser.error(f"--sections must name some of {','.join(SECTIONS)}; "
                     f"received {args.sections!r}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1; received {args.reps}")
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("results", f"bench-{stamp}")
    return Options(quick=args.quick, sections=tuple(s for s in SECTIONS if s in sections),
                   out=out, reps=args.reps)


def start(options, report):
    """Configures TensorFlow and PyTorch, notes a busy machine, prints the headline;
    returns `machine.machine_info`'s dict."""
    threads = machine.usable_cores()
    report.notes += machine.configure(threads, logical_devices(options.sections))
    info = machine.machine_info(threads)
    load = info["load_average_at_start"][0]
    if load > 0.5:
        report.notes.append(f"The 1-minute load average was {load:.2f} at the start: "
                            "something else was using the CPU, so times are noisier.")
    versions = info["versions"]
    print(f"kerasbn benchmark ({'quick' if options.quick else 'full'}), sections "
          f"{','.join(options.sections)}: {info['cpu_model']}, {threads} threads; TensorFlow "
          f"{versions['tensorflow']}, Keras {versions['keras']}, tf_keras "
          f"{versions['tf_keras']}, PyTorch {versions['torch']}", flush=True)
    return info


def finish(report, paths, out):
    """Prints the tables, the notes and the files written."""
    print("\nRatios of medians (kerasbn / contender; below 1: kerasbn is faster)")
    print(results.render(report))
    for note in report.notes:
        print(f"Note: {note}")
    for path in paths:
        print(f"Wrote {path}")
    print(f"Results directory: {out}")


def main(argv=None):
    """Runs the benchmark with the command line `argv` (default: `sys.argv[1:]`);
    returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parse_args(argv)
    started = time.time()
    report = Report()
    info = start(options, report)
    run = Run(config=options.config, sections=options.sections,
              rng=np.random.default_rng(0), report=report)
    run_sections(run)
    info["load_average_at_end"] = list(os.getloadavg())
    paths = results.write_outputs(
        report, options.out, command=" ".join(["python -m training.benchmark"] + argv),
        started=started, quick=options.quick, sections=options.sections,
        config=run.config, machine=info)
    finish(report, paths, options.out)
    return 0
