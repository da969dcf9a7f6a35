"""The PNG figures, one a claim, drawn with matplotlib (Agg: no display needed).

    figure1a_accuracy.png       test accuracy against steps, mean and seed range
    figure1bc_percentiles.png   15/50/85th percentiles of one sigmoid's input, no BN | BN
    learning_rates.png          final test accuracy, and steps to 85%, against the rate
    initialization.png          the same against the initial weights' scale
    small_batch.png             final test accuracy against the batch size, per method
"""

from __future__ import annotations

import os

import numpy as np

from training.paper.config import PERCENTILES, USABLE_ACCURACY

DPI = 100
SIZE = (7.0, 4.3)
STYLES = {
    "none": {"color": "tab:red", "label": "no BN"},
    "kerasbn": {"color": "tab:blue", "label": "kerasbn BN"},
    "keras": {"color": "black", "linestyle": (0, (3, 3)), "label": "stock Keras BN"},
}
SMALL_BATCH_STYLES = {
    "bn_moving": ("BN, moving averages", "tab:blue", "o"),
    "bn_population": ("BN, population statistics", "tab:cyan", "s"),
    "renorm": ("Batch Renormalization", "tab:green", "^"),
    "ghost": ("ghost BN: batch 64 in groups of this size", "tab:purple", "D"),
    "none": ("no BN", "tab:red", "x"),
}
PERCENTILE_STYLES = ({"color": "tab:gray", "linestyle": "--", "linewidth": 1.4},
                     {"color": "black", "linewidth": 1.8},
                     {"color": "tab:gray", "linestyle": "-.", "linewidth": 1.4})
SWEEP_TARGET = 0.85
FILES = ("figure1a_accuracy.png", "figure1bc_percentiles.png", "learning_rates.png",
         "initialization.png", "small_batch.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, out_dir, name):
    path = os.path.join(out_dir, name)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    _pyplot().close(figure)
    return path


def figure1a(series, dataset, out_dir):
    """Test accuracy against training steps: mean over seeds, shaded min..max."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=SIZE)
    steps = np.asarray(series["steps"])
    for variant, style in STYLES.items():
        curves = np.asarray(series[variant]["accuracy"])
        axes.plot(steps, curves.mean(0), linewidth=3.0 if variant == "kerasbn" else 1.5,
                  **style)
        if len(curves) > 1 and variant != "keras":
            axes.fill_between(steps, curves.min(0), curves.max(0), color=style["color"],
                              alpha=0.18, linewidth=0)
    axes.set_ylim(max(0.0, min(0.7, _low(series))), 1.0)
    axes.set_xlabel(f"training steps (batch {series['batch_size']}, "
                    f"SGD lr {series['learning_rate']:g})")
    axes.set_ylabel("test accuracy")
    seeds = len(series["none"]["accuracy"])
    axes.set_title(f"Figure 1a: test accuracy, {dataset} "
                   f"({seeds} seed{'s' if seeds > 1 else ''}: mean, shaded min..max)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, out_dir, FILES[0])


def _low(series):
    """A lower y limit that shows where the BN curves rise (their 2nd evaluation)."""
    values = [np.asarray(series[v]["accuracy"])[:, 1:].min() for v in STYLES]
    return float(np.floor(min(values) * 10) / 10)


def figure1bc(series, dataset, out_dir):
    """The plotted unit's percentiles over training (first seed), without and with BN."""
    plt = _pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(SIZE[0] * 1.5, SIZE[1]), sharey=True)
    steps = np.asarray(series["steps"])
    for axes, variant, letter in zip(panels, ("none", "kerasbn"), "bc"):
        table = np.asarray(series[variant]["percentiles"][0])  # steps x 3
        for column in reversed(range(len(PERCENTILES))):
            axes.plot(steps, table[:, column], label=f"{PERCENTILES[column]}th percentile",
                      **PERCENTILE_STYLES[column])
        axes.set_title(f"({letter}) {STYLES[variant]['label']}")
        axes.set_xlabel("training steps")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel(f"input of sigmoid {series['unit']} of the last hidden layer")
    panels[1].legend(loc="lower right")
    figure.suptitle(f"Figure 1b/1c: one sigmoid's input on the test images over training, "
                    f"{dataset} (seed 0)")
    return _save(figure, out_dir, FILES[1])


def sweep(series, what, dataset, out_dir, name):
    """A sweep, no BN and kerasbn: final test accuracy | steps to 85%, against the value."""
    from training.paper.analysis import steps_to

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(SIZE[0] * 1.5, SIZE[1]))
    values = np.asarray(series["values"], float)
    last = series["steps"][-1]
    for variant in ("none", "kerasbn"):
        curves = series[variant]["accuracy"]
        style = dict(STYLES[variant], marker="o")
        left.plot(values, [curve[-1] for curve in curves], **style)
        reached = [(v, steps_to(series["steps"], c, SWEEP_TARGET))
                   for v, c in zip(values, curves)]
        right.plot(*zip(*[(v, s if s is not None else np.nan) for v, s in reached]),
                   **style)
        never = [v for v, s in reached if s is None]
        right.plot(never, [last * 1.05] * len(never), linestyle="none", marker="x",
                   markersize=9, color=style["color"])
    left.axhline(USABLE_ACCURACY, color="gray", linestyle=":", linewidth=1,
                 label=f"'trains': {USABLE_ACCURACY:.0%}")
    left.set_ylim(0.0, 1.0)
    left.set_ylabel(f"test accuracy after {last} steps")
    left.set_title("final test accuracy")
    left.legend(loc="center right")
    right.set_ylim(0, last * 1.12)
    right.set_ylabel(f"steps to {SWEEP_TARGET:.0%} test accuracy (×: never)")
    right.set_title(f"steps to reach {SWEEP_TARGET:.0%} (evaluated every "
                    f"{series['steps'][1]} steps)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel(what)
        axes.grid(alpha=0.3, which="both")
    figure.suptitle(f"{what[0].upper()}{what[1:]}: no BN vs BN, {dataset}")
    return _save(figure, out_dir, name)


def small_batch(series, dataset, out_dir):
    """Final test accuracy against the batch size, per method."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(SIZE[0], SIZE[1] * 1.25))
    sizes = np.asarray(series["batch_sizes"])
    for method, (label, color, marker) in SMALL_BATCH_STYLES.items():
        points = [(s, a) for s, a in zip(sizes, series[method]) if a is not None]
        if points:
            axes.plot(*zip(*points), color=color, marker=marker, label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(s) for s in sizes])
    shown = [a for m in SMALL_BATCH_STYLES for a in series[m] if a is not None]
    axes.set_ylim(max(0.0, np.floor(min(shown) * 10 - 0.5) / 10), 1.0)
    axes.set_xlabel(f"batch size (each trained {series['epochs']:g} epochs, "
                    "learning rate ∝ batch)")
    axes.set_ylabel("final test accuracy")
    axes.set_title(f"Small batches: final test accuracy, {dataset}")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                fontsize="small", frameon=False)
    return _save(figure, out_dir, FILES[4])


def draw_all(results, out_dir):
    """Draws every figure into `out_dir`; returns their paths in `FILES` order."""
    dataset = results["dataset"]["name"]
    return [
        figure1a(results["figure1"], dataset, out_dir),
        figure1bc(results["figure1"], dataset, out_dir),
        sweep(results["learning_rates"], "learning rate", dataset, out_dir, FILES[2]),
        sweep(results["initialization"], "scale of the hidden layers' initial weights",
              dataset, out_dir, FILES[3]),
        small_batch(results["small_batch"], dataset, out_dir),
    ]
