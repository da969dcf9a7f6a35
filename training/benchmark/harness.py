"""How the benchmark measures: contenders timed in one round-robin, and the report.

How it measures: every comparison is one round-robin. Each contender is built, called
`warmup` times (tracing, compilation), then each repetition calls every contender once,
in an order that rotates by one each repetition, so that drift of the machine hits all
alike; after every contender has had every place, the cycle is shuffled, so that no
contender always follows the same one (see `repetition_order`). Before each timed call
the program sleeps a moment, so that the worker threads of the previous contender
(TensorFlow's and PyTorch's pools spin before they sleep) are idle, then calls the
contender once untimed, so that the timed call finds its own threads awake, as a
training step does after the one before it; the garbage collector is off while
timing. Every call ends by fetching a result to Python, which on CPU means the work is
done. TensorFlow and PyTorch use the same number of threads (the cores this process
may use). The figure is the median; ratios are kerasbn / contender within the run:
absolute times move with the machine's load, ratios much less.
"""

import dataclasses
import gc
import random
import time
from typing import Callable, List, Optional, Tuple

import numpy as np

from training.program import first_error_line

# Roles of a contender: ours and theirs are compared; a reference (a copy of x, a model
# without batch norm) is timed in the same round-robin but left out of the ratios.
OURS, THEIRS, REFERENCE = "ours", "theirs", "reference"
SETTLE_SECONDS = 0.002


@dataclasses.dataclass(frozen=True)
class Contender:
    """Something to time.

    Attributes:
        name: its name in the tables, unique within a comparison.
        role: `OURS`, `THEIRS` or `REFERENCE`.
        make: builds the contender and returns a callable that runs it once and
            returns when the work is done (having fetched a result to Python).
    """

    name: str
    role: str
    make: Callable[[], Callable[[], object]]


@dataclasses.dataclass(frozen=True)
class Timing:
    """How many times to call each contender, and with which clock.

    Attributes:
        reps: timed calls per contender.
        warmup: untimed calls per contender before the first timed one.
        settle_seconds: the pause before each (untimed, timed) pair of calls.
        clock: returns the time in seconds (tests give a fake one).
        sleep: pauses for a number of seconds.
    """

    reps: int
    warmup: int
    settle_seconds: float = SETTLE_SECONDS
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


class Report:
    """What a run found: the comparisons, skipped contenders (with why) and notes.

    Attributes:
        groups: one dict per comparison (see `measure`), in the order they ran.
        skipped: dicts with "section", "contender" and "reason".
        notes: sentences about the run as a whole (the machine's load, say).
    """

    def __init__(self):
        self.groups, self.skipped, self.notes = [], [], []

    def skip(self, section, contender, reason):
        """Records and prints that `contender` of `section` was not timed, and why."""
        self.skipped.append({"section": section, "contender": contender, "reason": reason})
        print(f"  skipped [{section}] {contender}: {reason}", flush=True)


def describe(error):
    """An exception as one short line: its type and the first line of its message
    (for TensorFlow's graph execution errors, the first line after their preamble)."""
    name, line = type(error).__name__, first_error_line(error)
    return name if line == name else f"{name}: {line}"


def repetition_order(names, rep):
    """The order in which repetition `rep` (0, 1, ...) calls the contenders `names`.

    Repetitions come in blocks of len(names): within a block the order rotates by one
    each repetition, so every contender has every place once; block 0 is `names` as
    given, each later block a shuffle of it (seeded by the block's number, so a run's
    orders are reproducible). A fixed cycle would leave each contender always after
    the same one, and what a contender leaves behind (memory handed back to the system,
    threads asleep) is then paid by the same neighbour at every repetition. The layer
    as it comes and with `jit_compile=True` run the same program at inference (NHWC
    64x32x32x64), yet took 1.91 and 1.66 ms in run 16, 1.75 and 1.59 in run 16b, the
    first always called after TensorFlow's copy of x; in 4 processes each (session 17),
    the first was 5-10 % slower with the fixed cycle (median 6 %), 0-9 % with the
    cycle shuffled (median 2 %).

    Args:
        names: the contenders' names.
        rep: the repetition's index.

    Returns:
        A list holding each name once.
    """
    cycle = list(names)
    block, shift = divmod(rep, max(len(cycle), 1))
    if block:
        random.Random(block).shuffle(cycle)
    return cycle[shift:] + cycle[:shift]


def round_robin(calls, timing, on_error):
    """Times every callable `timing.reps` times after `timing.warmup` calls.

    Each repetition calls the contenders in the order `repetition_order` gives; each
    timed call follows a pause and an untimed call of the same contender (see the
    module docstring). The garbage collector is off while timing.

    Args:
        calls: a dict name -> callable with no arguments.
        timing: a `Timing`.
        on_error: called as `on_error(name, error)` when a callable raises; that
            callable is then dropped.

    Returns:
        A dict name -> list of `timing.reps` durations in seconds, for the callables
        that never raised.
    """
    calls, times = dict(calls), {name: [] for name in calls}

    def run(name):
        try:
            start = timing.clock()
            calls[name]()
            return timing.clock() - start
        except Exception as error:  # noqa: BLE001 - a failing contender is skipped
            on_error(name, error)
            del calls[name], times[name]

    for _ in range(timing.warmup):
        for name in list(calls):
            run(name)
    gc.collect()
    gc.disable()
    try:
        for rep in range(timing.reps):
            for name in repetition_order(list(calls), rep):
                if name in calls:
                    timing.sleep(timing.settle_seconds)
                    # The timed call follows an untimed one of the same contender, as
                    # steps follow each other in training: its thread pools are awake.
                    # (A lone call after a pause pays ~0.7 ms of TensorFlow's thread
                    # wake-up, as much as the work of a small layer.)
                    if run(name) is None:
                        continue
                    elapsed = run(name)
                    if elapsed is not None:
                        times[name].append(elapsed)
    finally:
        gc.enable()
    return times


def summarize(role, seconds):
    """One contender's entry of a comparison: its role, median, quartiles and times."""
    ms = np.asarray(seconds) * 1e3
    return {"role": role, "median_ms": float(np.median(ms)),
            "p25_ms": float(np.percentile(ms, 25)),
            "p75_ms": float(np.percentile(ms, 75)),
            "times_ms": [round(float(t), 4) for t in ms]}


def measure(report: Report, section: str, case: str, contenders: List[Contender],
            timing: Timing, params: Optional[dict] = None,
            pairs: Optional[List[Tuple[str, str]]] = None):
    """Times the contenders in one round-robin and records the comparison.

    A contender whose `make` or call raises is skipped with the reason.

    Args:
        report: the `Report` the comparison is appended to.
        section: the section's name, e.g. "layer".
        case: what is compared, e.g. "NHWC 64x32x32x64 axis=-1 training".
        contenders: the `Contender`s.
        timing: a `Timing`.
        params: the case's parameters, kept in the output.
        pairs: the (numerator, denominator) names of the ratios to report; by
            default every OURS contender against every THEIRS one.

    Returns:
        The comparison: a dict with "section", "case", "params", "contenders" (name
        -> `summarize`'s dict) and "ratios" (dicts with "numerator", "denominator"
        and "ratio", the ratio of their medians).
    """
    print(f"[{section}] {case}", flush=True)

    def fail(name, error):
        report.skip(section, f"{name} ({case})", describe(error))

    calls, roles = {}, {}
    for contender in contenders:
        try:
            calls[contender.name] = contender.make()
            roles[contender.name] = contender.role
        except Exception as error:  # noqa: BLE001
            fail(contender.name, error)
    results = {}
    for name, seconds in round_robin(calls, timing, fail).items():
        results[name] = summarize(roles[name], seconds)
        print(f"    {name:<26} {results[name]['median_ms']:10.3f} ms", flush=True)
    return record(report, section, case, results, params, pairs)


def record(report: Report, section: str, case: str, results: dict,
           params: Optional[dict] = None, pairs: Optional[List[Tuple[str, str]]] = None):
    """Appends a comparison to the report, with the ratios of its medians.

    Args:
        report: the `Report`.
        section, case, params, pairs: as for `measure`.
        results: name -> `summarize`'s dict, for the contenders that were timed.

    Returns:
        The comparison, as `measure` describes it.
    """
    if pairs is None:
        pairs = [(a, b) for a in results for b in results
                 if results[a]["role"] == OURS and results[b]["role"] == THEIRS]
    ratios = [{"numerator": a, "denominator": b,
               "ratio": results[a]["median_ms"] / results[b]["median_ms"]}
              for a, b in pairs if a in results and b in results]
    group = {"section": section, "case": case, "params": params or {},
             "contenders": results, "ratios": ratios}
    report.groups.append(group)
    return group
