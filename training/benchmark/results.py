"""What a run makes of its measurements: targets, tables, the chart and the files.

Writes results.json (every time, the machine, skipped contenders and why), results.png
(bar charts) and results.md (the tables in Markdown) under --out.
"""

import datetime
import json
import os
import time

from training.benchmark import optional
from training.benchmark.config import BYTES_MOVED, LEAST_INFERENCE, TF_COPY
from training.benchmark.harness import OURS, REFERENCE, THEIRS

# ------------------------------------------------------------------ targets


def fastest(group, names):
    """The smallest median (ms) among the contenders `names` of a comparison that were
    timed; None if none was."""
    times = [group["contenders"][n]["median_ms"] for n in names
             if n in group["contenders"]]
    return min(times) if times else None


def check(target, ours, theirs, limit, strictly=False):
    """A target's verdict: {"target", "ratio", "limit", "met"}, met if ours / theirs
    <= limit (< limit if `strictly`); None if either time is missing."""
    if ours is None or theirs is None:
        return None
    ratio = ours / theirs
    return {"target": target, "ratio": ratio, "limit": limit,
            "met": ratio < limit if strictly else ratio <= limit}


def layer_targets(group):
    """Training step, NHWC and dense: kerasbn's fastest variant against the fastest
    TensorFlow contender (<= 0.8) and the fastest PyTorch one (<= 1.0); dense, where
    TensorFlow's per-call floor (the copy of x in a `tf.function`) is timed too: at most
    1.2 times that floor plus the fastest TensorFlow contender's time above it.
    Inference, NHWC and dense: the layer as it comes (no whole-step XLA) against
    Keras's layer compiled whole (<= 1.0); where the least a layer as it comes can cost
    (`config.LEAST_INFERENCE`, timed in the same run) is above Keras XLA, against
    that least (<= 1.0)."""
    params, names = group["params"], group["contenders"]
    kind = params["shape_name"].split("-")[0]
    if kind not in ("NHWC", "dense"):
        return []
    case = f"{kind} {'x'.join(map(str, params['shape']))}" if "shape" in params else kind
    if params["mode"] == "inference":
        as_it_comes, keras_xla = fastest(group, ["kerasbn"]), fastest(group, ["keras XLA"])
        checks = [check(f"layer inference {case}: kerasbn as it comes / keras XLA",
                        as_it_comes, keras_xla, 1.0)]
        least = fastest(group, list(LEAST_INFERENCE))
        if least is not None and keras_xla is not None:
            checks.append(check(
                f"layer inference {case}: kerasbn as it comes / max(keras XLA, the least "
                "a layer as it comes costs)", as_it_comes, max(keras_xla, least), 1.0))
        return checks
    ours = fastest(group, [n for n in names if names[n]["role"] == OURS])
    tensorflow = fastest(group, ["keras", "keras XLA", "tf_keras"])
    torch_names = [n for n in names if n.startswith("torch")]
    checks = [check(f"layer training {case}: kerasbn / fastest TensorFlow",
                    ours, tensorflow, 0.8),
              check(f"layer training {case}: kerasbn / fastest PyTorch",
                    ours, fastest(group, torch_names), 1.0)]
    floor = fastest(group, [TF_COPY])
    if kind == "dense" and floor is not None and tensorflow is not None:
        checks.append(check(
            f"layer training {case}: kerasbn / (1.2 x TF floor + fastest TensorFlow "
            "above it)", ours, 1.2 * floor + (tensorflow - floor), 1.0))
    return checks


def sync_targets(group):
    """Synchronizing costs kerasbn at most 15%, and kerasbn's synchronized step is
    faster than Keras's."""
    ours = fastest(group, ["kerasbn sync"])
    return [check("sync: kerasbn synchronized / unsynchronized",
                  ours, fastest(group, ["kerasbn"]), 1.15),
            check("sync: kerasbn synchronized / Keras synchronized",
                  ours, fastest(group, ["keras sync"]), 1.0, strictly=True)]


def resnet_targets(group):
    """The ResNet step no slower with kerasbn, without and with XLA."""
    return [check("resnet step: kerasbn / keras", fastest(group, ["kerasbn"]),
                  fastest(group, ["keras"]), 1.0),
            check("resnet step: kerasbn XLA / keras XLA", fastest(group, ["kerasbn XLA"]),
                  fastest(group, ["keras XLA"]), 1.0)]


def export_targets(group):
    """Serving the folded export at most 0.85x Keras's fastest export."""
    return [check(f"export batch {group['params']['batch']}: folded / fastest Keras export",
                  fastest(group, ["kerasbn export folded"]),
                  fastest(group, ["keras export", "keras export, stock BN"]), 0.85)]


def ghost_targets(group):
    """Virtual batches cost kerasbn at most 15%, and its ghost step is faster than
    tf_keras's."""
    size = group["params"]["virtual_batch_size"]
    ghost = fastest(group, [f"kerasbn vbs={size}"])
    return [check(f"ghost vbs={size}: kerasbn / kerasbn without virtual batches",
                  ghost, fastest(group, ["kerasbn"]), 1.15),
            check(f"ghost vbs={size}: kerasbn / tf_keras", ghost,
                  fastest(group, [f"tf_keras vbs={size}"]), 1.0, strictly=True)]


def statistics_targets(group):
    """A population-statistics pass costs at most 1.3x a training-mode forward pass
    over the same batches: as `recompute_statistics` is called, and reused."""
    case, forward = group["case"], fastest(group, ["training forward"])
    return [check(f"statistics {case}: {name} / training forward",
                  fastest(group, [name]), forward, 1.3)
            for name in ("recompute_statistics", "PopulationPass reused")]


def first_step_targets(group):
    """The first fit (from before the model is built) no slower with kerasbn."""
    return [check(f"first step {group['case']}: kerasbn / keras",
                  fastest(group, ["kerasbn"]), fastest(group, ["keras"]), 1.0)]


# A section's targets: its comparisons -> checks (None where a time is missing).
TARGETS = {"layer": layer_targets, "ghost": ghost_targets, "sync": sync_targets,
           "resnet": resnet_targets, "statistics": statistics_targets,
           "export": export_targets, "first_step": first_step_targets}


def targets(report):
    """The targets on this run's medians, in the order of the comparisons.

    "kerasbn" is its fastest variant in the comparison, the contender the fastest
    of the kind named.

    Returns:
        A list of dicts {"target", "ratio", "limit", "met"}.
    """
    checks = []
    for group in report.groups:
        make_checks = TARGETS.get(group["section"])
        if make_checks is not None:
            checks += [c for c in make_checks(group) if c is not None]
    return checks


# ------------------------------------------------------------------ tables


def table(headers, rows, markdown=False):
    """Rows as text: aligned columns under a rule, or a Markdown table. Floats are
    written with 3 decimals."""
    cells = [list(map(str, headers))] + [
        [f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
    else:
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                 for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def group_table(group):
    """(headers, rows) of a comparison: each contender's median (or bandwidth), and
    the ratio of each of ours to it."""
    results = group["contenders"]
    if group["section"] == "bandwidth":
        return (("contender", "median ms", "GB/s", "fraction of copy"),
                [(n, r["median_ms"], r["gbps"], r["fraction"]) for n, r in results.items()])
    if group["section"] == "accuracy":
        return (("contender", "mean error (std)", "variance error (relative)"),
                [(n, f"{r['mean_error_std']:.2e}", f"{r['variance_error']:.2e}")
                 for n, r in results.items()])
    numerators = list(dict.fromkeys(r["numerator"] for r in group["ratios"]))
    ratio = {(r["numerator"], r["denominator"]): r["ratio"] for r in group["ratios"]}
    return (("contender", "median ms", "p25-p75 ms") + tuple(f"{n} / it" for n in numerators),
            [(n, r["median_ms"], f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f}")
             + tuple(ratio.get((m, n), "") for m in numerators)
             for n, r in results.items()])


def headline(group):
    """A comparison's title: section and case (and, for bandwidth, bytes and copy)."""
    text = f"{group['section']}: {group['case']}"
    if group["section"] == "bandwidth":
        text += (f" ({group['params']['bytes_moved'] / 1e6:.1f} MB moved a call; "
                 f"fastest copy {group['params']['fastest_copy_gbps']:.1f} GB/s)")
    return text


def render(report, markdown=False):
    """Every comparison's table, then the targets and the skipped contenders, as
    text (printed at the end of a run) or Markdown (results.md)."""
    title = (lambda text: f"\n#### {text}\n") if markdown else (lambda text: f"\n{text}")
    parts = []
    for group in report.groups:
        parts += [title(headline(group)), table(*group_table(group), markdown=markdown)]
    checks = targets(report)
    if checks:
        parts += [title("targets (kerasbn's fastest variant against the fastest "
                        "contender of the kind named)"),
                  table(("target", "ratio", "limit", "met"),
                        [(c["target"], c["ratio"], c["limit"], "yes" if c["met"] else "NO")
                         for c in checks], markdown=markdown)]
    if report.skipped:
        parts += [title("skipped"), table(
            ("section", "contender", "reason"),
            [(s["section"], s["contender"], s["reason"]) for s in report.skipped],
            markdown=markdown)]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ files

COLORS = {OURS: "tab:blue", THEIRS: "tab:orange", REFERENCE: "tab:gray"}


def draw_group(ax, group):
    """One comparison as horizontal bars: medians with their interquartile range
    (fractions of the copy bandwidth for bandwidth; variance errors, on a log scale
    from 1e-9, for accuracy)."""
    results = group["contenders"]
    names = list(results)
    if group["section"] == "bandwidth":
        values, spread, label = [results[n]["fraction"] for n in names], None, \
            "fraction of copy bandwidth"
    elif group["section"] == "accuracy":
        values, spread, label = [max(results[n]["variance_error"], 1e-9) for n in names], \
            None, "variance error (relative)"
        ax.set_xscale("log")
    else:
        values, label = [results[n]["median_ms"] for n in names], "median ms"
        spread = [[results[n]["median_ms"] - results[n]["p25_ms"] for n in names],
                  [results[n]["p75_ms"] - results[n]["median_ms"] for n in names]]
    ax.barh(names, values, xerr=spread, capsize=2,
            color=[COLORS[results[n]["role"]] for n in names])
    ax.invert_yaxis()
    ax.set_title(f"{group['section']}: {group['case']}", fontsize=9)
    ax.set_xlabel(label, fontsize=8)
    ax.tick_params(labelsize=7)


def write_chart(report, path):
    """One bar chart per comparison, two a row, as a PNG: kerasbn blue, contenders
    orange, references grey. Needs matplotlib (`optional.Figure` not None)."""
    groups = [g for g in report.groups if g["contenders"]]
    rows = max(1, (len(groups) + 1) // 2)
    figure = optional.Figure(figsize=(14, 2.8 * rows))
    axes = figure.subplots(rows, 2, squeeze=False)
    for ax, group in zip(axes.flat, groups):
        draw_group(ax, group)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def document(report, *, command, started, quick, sections, config, machine):
    """The content of results.json: the run's settings, every comparison, the ratios
    with their medians, and the targets."""
    return {
        "command": command,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "quick": quick,
        "sections": list(sections),
        "config": config.to_json(),
        "bytes_moved": {k: f"{v} x size of x" for k, v in BYTES_MOVED.items()},
        "machine": machine,
        "notes": report.notes,
        "skipped": report.skipped,
        "groups": report.groups,
        "ratios": [{"section": g["section"], "case": g["case"], "numerator": r["numerator"],
                    "numerator_ms": g["contenders"][r["numerator"]]["median_ms"],
                    "denominator": r["denominator"],
                    "denominator_ms": g["contenders"][r["denominator"]]["median_ms"],
                    "ratio": r["ratio"]}
                   for g in report.groups for r in g["ratios"]],
        "targets": targets(report),
    }


def markdown(report, command, machine):
    """The content of results.md: the command, the machine, then `render`'s tables."""
    versions = machine["versions"]
    return (f"Command: `{command}`\n\nMachine: {machine['cpu_model']}, {machine['nproc']} "
            f"cores, {machine['threads']} threads for TensorFlow and PyTorch; TensorFlow "
            f"{versions['tensorflow']}, Keras {versions['keras']}, tf_keras "
            f"{versions['tf_keras']}, PyTorch {versions['torch']}; load average at "
            f"start {machine['load_average_at_start']}.\n" + render(report, markdown=True))


def write_outputs(report, out, *, command, started, quick, sections, config, machine):
    """Writes results.json, results.png (if matplotlib is installed; else the chart
    is skipped with the reason) and results.md under `out`.

    Args:
        report: the run's `harness.Report`.
        out: the output directory, created if missing.
        command: the command line, as recorded.
        started: the start of the run, seconds since the epoch.
        quick: whether the sizes were `config.QUICK`.
        sections: the names of the sections asked for.
        config: the run's `config.Config`.
        machine: `machine.machine_info`'s dict.

    Returns:
        The paths written.
    """
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name)
             for name in ("results.json", "results.png", "results.md")}
    if optional.Figure is not None:
        write_chart(report, paths["results.png"])
    else:
        report.skip("chart", "results.png", f"matplotlib is not installed "
                    f"({optional.ERRORS['matplotlib']}); {optional.INSTALL['matplotlib']}")
        del paths["results.png"]
    content = document(report, command=command, started=started, quick=quick,
                       sections=sections, config=config, machine=machine)
    with open(paths["results.json"], "w") as f:
        json.dump(content, f, indent=1)
    with open(paths["results.md"], "w") as f:
        f.write(markdown(report, command, machine))
    return list(paths.values())
