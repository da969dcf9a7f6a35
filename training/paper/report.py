"""The run's outputs besides the figures: `results.json` and `summary.md`.

`results.json` holds every series plotted (under "figure1", "learning_rates",
"initialization", "small_batch"), the run's "config", "dataset", "summary" numbers,
"claims" verdicts, the kerasbn-vs-Keras "agreement" check and its "timing".
`summary.md` says, claim by claim, whether it held on this data, with the numbers.
"""

from __future__ import annotations

import json
import math
import os

from training.paper.analysis import TARGETS
from training.paper.config import PERCENTILES, PLOTTED_UNIT, RENORM_CLIPPING, \
    USABLE_ACCURACY
from training.paper.experiments import SMALL_BATCH_METHODS

JSON_NAME = "results.json"
SUMMARY_NAME = "summary.md"
SIGNIFICANT_DIGITS = 6
VERDICTS = {True: "held", False: "did not hold", None: "not judged"}
METHOD_NAMES = {
    "bn_moving": "BN (moving averages)",
    "bn_population": "BN (population statistics)",
    "renorm": "renorm",
    "ghost": "ghost BN (batch 64 in groups of b)",
    "none": "no BN",
}


def write_json(results, out_dir):
    """Writes `results` to `out_dir`/results.json; returns the path.

    Floats are kept to `SIGNIFICANT_DIGITS` significant digits, NaN and infinities
    written as null.
    """
    path = os.path.join(out_dir, JSON_NAME)
    with open(path, "w") as file:
        json.dump(_finite(results), file, separators=(",", ":"))
        file.write("\n")
    return path


def _finite(value):
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _accuracy(value):
    return "—" if value is None else f"{value:.3f}"


def _verdicts(results):
    lines = ["| claim | paper | on this data | evidence |", "| --- | --- | --- | --- |"]
    for claim in results["claims"]:
        lines.append(f"| {claim['claim']} | {claim['figure']} | "
                     f"**{VERDICTS[claim['held']]}** | {claim['evidence']} |")
    check = results["agreement"]
    lines += ["", f"kerasbn against stock Keras BN (same seeds, weights and batches): "
              f"**{'agree' if check['agree'] else 'DO NOT agree'} within seed noise** — "
              f"largest gap between the mean curves {check['max_difference']:.4f} (step "
              f"{check['at_step']}), final accuracies differ by "
              f"{check['final_difference']:+.4f} (the plotted unit's percentiles differ by "
              f"up to {check['max_percentile_difference']:.2g}: two computations that agree, "
              f"not one); rule: {check['rule']}."]
    return lines


def _convergence(results):
    numbers = results["summary"]["convergence"]
    head = " | ".join(f"steps to {t:.0%}" for t in TARGETS)
    lines = [f"| network | {head} | final test accuracy | final training accuracy |",
             "| --- |" + " --- |" * (len(TARGETS) + 2)]
    for variant, name in (("none", "no BN"), ("kerasbn", "kerasbn BN"),
                          ("keras", "stock Keras BN")):
        row = numbers[variant]
        cells = [", ".join("never" if s is None else str(s) for s in row["steps_to"][str(t)])
                 for t in TARGETS]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {row['final_mean']:.3f} ± {row['final_sd']:.3f} | "
                     f"{row['train_mean']:.3f} |")
    return lines + ["", "Steps are per seed (first evaluation at or above the target); "
                    "final accuracies are mean ± sd (test) and mean (training) over seeds."]


def _drift(results):
    drift = results["summary"]["drift"]
    lines = ["| network | median moved (15–85 spreads), all units | spread max/min, all "
             f"units | unit {PLOTTED_UNIT}: moved | unit {PLOTTED_UNIT}: max/min |",
             "| --- | --- | --- | --- | --- |"]
    for variant, name in (("none", "no BN"), ("kerasbn", "kerasbn BN"),
                          ("keras", "stock Keras BN")):
        d = drift[variant]
        lines.append(f"| {name} | {d['median_travel']:.2f} | {d['spread_ratio']:.1f} | "
                     f"{d['plotted_unit']['median_travel']:.2f} | "
                     f"{d['plotted_unit']['spread_ratio']:.1f} |")
    return lines


def _sweep(results, key, label):
    series, numbers = results[key], results["summary"][key]
    lines = [f"| {label} | no BN | BN | no BN: steps to 85% | BN: steps to 85% |",
             "| --- | --- | --- | --- | --- |"]
    for i, value in enumerate(series["values"]):
        lines.append(
            f"| {value:g} | {numbers['none']['final'][i]:.3f} | "
            f"{numbers['kerasbn']['final'][i]:.3f} | "
            f"{_never(numbers['none']['steps_to_85'][i])} | "
            f"{_never(numbers['kerasbn']['steps_to_85'][i])} |")
    return lines


def _never(step):
    return "never" if step is None else str(step)


def _small_batch(results):
    table = results["small_batch"]
    lines = ["| batch | steps | lr | " + " | ".join(METHOD_NAMES[m] for m in
                                                     SMALL_BATCH_METHODS) + " |",
             "| --- | --- | --- |" + " --- |" * len(SMALL_BATCH_METHODS)]
    for i, size in enumerate(table["batch_sizes"]):
        cells = " | ".join(_accuracy(table[m][i]) for m in SMALL_BATCH_METHODS)
        lines.append(f"| {size} | {table['steps'][i]} | {table['learning_rates'][i]:.3g} | "
                     f"{cells} |")
    return lines


def _timing(timing):
    load = timing["load_average_1_5_15"][1]
    return (f"Wall time {timing['wall_seconds']:.0f} s, {timing['cpu_seconds']:.0f} s of CPU "
            f"time; 5-minute load average {load:.1f} on {timing['cpus']} CPUs at the end.")


def summary_markdown(results):
    """The markdown summary of a run (see the module docstring)."""
    config, dataset = results["config"], results["dataset"]
    figure1 = results["figure1"]
    lines = [
        f"# Batch normalization's claims on {dataset['name']}",
        "",
        f"`{results['command']}`: {dataset['num_train']} training and "
        f"{dataset['num_test']} test images; the paper's network (3 hidden layers of 100 "
        f"sigmoids, BN before each sigmoid), batch {figure1['batch_size']}, plain SGD "
        f"(learning rate {config['learning_rate']:g}), {config['steps']} steps, "
        f"{config['seeds']} seed(s) for Figure 1. Test accuracy is read in inference mode "
        "(BN with its moving averages, momentum 0.99). " + _timing(results["timing"]),
        "",
        *(["**A --quick run: sizes that test the program, too small to judge the "
           "claims.**", ""] if results["quick"] else []),
        "## Verdicts", "", *_verdicts(results),
        "", "## Figure 1a: convergence", "", *_convergence(results),
        "", f"## Figure 1b/1c: the {'/'.join(map(str, PERCENTILES))}th percentiles of a "
        "sigmoid's input", "",
        "Read in training mode on the test images (batches of 60, each normalized with its "
        "own statistics, as a sigmoid sees it while training). 'Moved': the range of the "
        "50th percentile over training in units of the mean 15–85 spread; 'max/min': the "
        "largest 15–85 spread over the smallest. Medians over seeds (and units).", "",
        *_drift(results),
        "", "## Learning rates", "",
        f"Final test accuracy after {config['steps']} steps; a rate 'trains' when it "
        f"reaches {USABLE_ACCURACY:.0%}.", "",
        *_sweep(results, "learning_rates", "learning rate"),
        "", "## Initialization", "",
        "The hidden layers' initial kernels (Glorot-uniform) multiplied by the scale; "
        f"learning rate {config['learning_rate']:g}.", "",
        *_sweep(results, "initialization", "scale"),
        "", "## Small batches", "",
        f"Every batch size trains {config['small_batch_epochs']:g} epochs (the same "
        "examples), learning rate scaled by batch/60. Population statistics: "
        "`kerasbn.recompute_statistics` over the training images at the training batch "
        f"size. Renorm clipping {RENORM_CLIPPING}. Ghost BN trains at batch 64, "
        "normalizing groups of b examples: the statistics' noise of batch b with the "
        "gradient of 64.", "",
        *_small_batch(results),
    ]
    return "\n".join(lines) + "\n"


def write_summary(results, out_dir):
    """Writes `summary_markdown(results)` to `out_dir`/summary.md; returns the path."""
    path = os.path.join(out_dir, SUMMARY_NAME)
    with open(path, "w") as file:
        file.write(summary_markdown(results))
    return path
