"""What the command-line programs of `training` share, written once.

The flag types of argparse, the one-line usage error, the checks of an output directory
and of an optional module, the progress lines, and the writing of a result document
(its markdown table, its JSON file and, where there is one, its figure). Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time


class UsageError(ValueError):
    """A flag value or an installation a program cannot use; printed as one line."""


def checked(convert, accepts, allowed):
    """An argparse `type`: `convert(text)`, refused unless `accepts(value)`.

    Args:
        convert: the conversion, e.g. `int`; a `ValueError` from it is a refusal.
        accepts: a predicate on the converted value.
        allowed: what is allowed, for the message ("expected <allowed>, got '<text>'").

    Returns:
        A function of the flag's text, as argparse's `type` takes it.
    """

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def int_at_least(low):
    """An argparse `type`: an int >= `low`."""
    return checked(int, lambda value: value >= low, f"an int >= {low}")


positive_int = checked(int, lambda value: value >= 1, "a positive integer")
positive_float = checked(float, lambda value: value > 0 and math.isfinite(value),
                         "a positive number")


# The lines TensorFlow puts before the message of an error raised in a graph.
_GRAPH_ERROR_PREAMBLE = ("Graph execution error:", "Detected at node ", "  File ")


def first_error_line(error, limit=300):
    """The first line of an error's message that says something, at most `limit` chars.

    TensorFlow's errors from graph execution start with "Graph execution error:" and a
    Python stack; those lines are skipped. An error without a message gives its type.
    """
    lines = [line for line in str(error).strip().splitlines()
             if line.strip() and not line.startswith(_GRAPH_ERROR_PREAMBLE)]
    line = (lines[0] if lines else type(error).__name__).rstrip(" :")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def parse_args(parser, argv, defaults, quick_defaults, check):
    """Parses `argv`, fills the flags not given, then checks the whole.

    Args:
        parser: the program's `argparse.ArgumentParser`; its flags default to None
            where `defaults` or `quick_defaults` decide, and it has `--quick`.
        argv: the arguments after the program name; None for `sys.argv[1:]`.
        defaults: {attribute: value} for flags not given.
        quick_defaults: {attribute: value} for flags not given with --quick (before
            `defaults`).
        check: a function of the parsed arguments raising `UsageError`.

    Returns:
        The `argparse.Namespace`, lists (nargs="+") turned into tuples.

    Raises:
        SystemExit: exit code 2 with a one-line message, for a value not allowed.
    """
    args = parser.parse_args(argv)
    fill = {**defaults, **(quick_defaults if args.quick else {})}
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in vars(args).items():
        if isinstance(value, list):
            setattr(args, name, tuple(value))
    try:
        check(args)
    except UsageError as error:
        parser.error(str(error))
    return args


def check_out_dir(out, flag="--out"):
    """Refuses an output directory that names an existing file.

    Raises:
        UsageError: naming `flag` and `out`, when `out` is a file.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"argument {flag} must be a directory; received {out!r}, a file")


def check_installed(module, purpose, install_hint):
    """Refuses a run that needs `module` when it is not installed.

    Args:
        module: the module's import name, e.g. "matplotlib".
        purpose: what needs it, e.g. "the figure is drawn with it".
        install_hint: how to install it.

    Raises:
        UsageError: when `module` cannot be found.
    """
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{module} is not installed; {purpose}: {install_hint}")


def progress(start, width=5):
    """A function printing a message after the seconds since `start` (perf_counter)."""

    def say(message):
        print(f"[{time.perf_counter() - start:{width}.0f} s] {message}", flush=True)

    return say


def write_document(document, out_dir, stem, markdown, plot=None):
    """Writes a program's result: `<stem>.png` (if `plot`), `<stem>.md`, `<stem>.json`.

    Args:
        document: the JSON-serializable result.
        out_dir: the output directory, made if missing.
        stem: the file names without their extension.
        markdown: a function of `document` returning the markdown table.
        plot: None, or a function `(document, path)` drawing the figure to `path`.

    Returns:
        The paths written, the figure first.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if plot is not None:
        paths.append(os.path.join(out_dir, f"{stem}.png"))
        plot(document, paths[-1])
    table, data = (os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "json"))
    with open(table, "w", encoding="utf-8") as file:
        file.write(markdown(document))
    with open(data, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=1)
        file.write("\n")
    return paths + [table, data]
