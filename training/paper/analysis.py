"""The numbers of the summary, and whether each of the paper's claims held.

Each function reads the JSON-ready series of `experiments` and returns plain numbers;
`claims` turns them into one verdict a claim: held (True), did not hold (False), or could
not be judged (None), with the evidence in words.
"""

from __future__ import annotations

import numpy as np

from training.paper.config import PLOTTED_UNIT, USABLE_ACCURACY

TARGETS = (0.80, 0.85, 0.90)
# kerasbn and stock Keras BN agree when their mean curves are apart by no more than
# AGREEMENT_SIGMAS seed standard deviations plus AGREEMENT_FLOOR (accuracy) at every
# evaluation; with one seed, by no more than ONE_SEED_TOLERANCE.
AGREEMENT_SIGMAS = 2.0
AGREEMENT_FLOOR = 0.005
ONE_SEED_TOLERANCE = 0.01


def steps_to(steps, curve, target):
    """The first evaluation step at which `curve` reaches `target`, or None."""
    for step, value in zip(steps, curve):
        if value >= target:
            return step
    return None


def convergence(figure1, variants=("none", "kerasbn", "keras")):
    """Steps to each of `TARGETS`, per variant and seed, and the final accuracies.

    Returns:
        A dict variant -> {"steps_to": {target: [per seed, None if never]},
        "median_steps_to": {target: the median over seeds, None if any seed never got
        there}, "final": [per seed], "final_mean", "final_sd", "train_mean" (the
        final accuracy on the training split, mean over seeds)}.
    """
    result = {}
    for variant in variants:
        curves = figure1[variant]["accuracy"]
        per_target = {str(t): [steps_to(figure1["steps"], c, t) for c in curves]
                      for t in TARGETS}
        finals = [c[-1] for c in curves]
        result[variant] = {
            "steps_to": per_target,
            "median_steps_to": {t: (None if None in s else float(np.median(s)))
                                for t, s in per_target.items()},
            "final": finals,
            "final_mean": float(np.mean(finals)),
            "final_sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
            "train_mean": float(np.mean(figure1[variant].get("train_accuracy", np.nan))),
        }
    return result


def agreement(figure1):
    """Whether kerasbn's and stock Keras BN's accuracy curves agree within seed noise.

    Returns:
        A dict: "agree" (bool), "max_difference" (the largest gap between the two mean
        curves), "at_step", "allowed_there" (at the step closest to failing),
        "final_difference", "seeds", "rule", and "max_percentile_difference" (the
        largest gap between their plotted unit's percentiles: the two are different
        computations, not one).
    """
    ours = np.asarray(figure1["kerasbn"]["accuracy"], np.float64)
    theirs = np.asarray(figure1["keras"]["accuracy"], np.float64)
    gap = np.abs(ours.mean(0) - theirs.mean(0))
    if len(ours) > 1:
        noise = np.sqrt((ours.std(0, ddof=1) ** 2 + theirs.std(0, ddof=1) ** 2) / 2)
        allowed = AGREEMENT_SIGMAS * noise + AGREEMENT_FLOOR
        rule = (f"|mean(kerasbn) - mean(keras)| <= {AGREEMENT_SIGMAS:g} x seed sd + "
                f"{AGREEMENT_FLOOR:g} at every evaluation")
    else:
        allowed = np.full_like(gap, ONE_SEED_TOLERANCE)
        rule = f"one seed: |kerasbn - keras| <= {ONE_SEED_TOLERANCE:g} at every evaluation"
    worst = int(np.argmax(gap - allowed))
    percentiles = [np.asarray(figure1[v].get("percentiles", np.nan), np.float64)
                   for v in ("kerasbn", "keras")]
    return {
        "max_percentile_difference": float(np.max(np.abs(percentiles[0] - percentiles[1]))),
        "agree": bool(np.all(gap <= allowed)),
        "max_difference": float(gap.max()),
        "at_step": int(figure1["steps"][int(np.argmax(gap))]),
        "worst_excess_step": int(figure1["steps"][worst]),
        "allowed_there": float(allowed[worst]),
        "final_difference": float(ours[:, -1].mean() - theirs[:, -1].mean()),
        "seeds": int(len(ours)),
        "rule": rule,
    }


def drift(unit_percentiles):
    """How much the sigmoid inputs' distribution moved over training.

    Per run and unit: "median_travel", the range of the 50th percentile over the
    evaluations in units of the unit's mean 15-85 spread; "spread_ratio", its largest
    15-85 spread over its smallest.

    Args:
        unit_percentiles: per seed, `(evaluations, 3, units)`.

    Returns:
        A dict: the median over units and seeds of each measure, and the same for the
        plotted unit (median over seeds) under "plotted_unit".
    """
    travels, ratios = [], []
    for table in unit_percentiles:
        table = np.asarray(table, np.float64)
        spread = table[:, 2] - table[:, 0]
        travels.append(np.ptp(table[:, 1], axis=0) / spread.mean(axis=0))
        ratios.append(spread.max(axis=0) / np.maximum(spread.min(axis=0), 1e-12))
    travels, ratios = np.asarray(travels), np.asarray(ratios)
    return {
        "median_travel": float(np.nanmedian(travels)),
        "spread_ratio": float(np.nanmedian(ratios)),
        "plotted_unit": {"median_travel": float(np.nanmedian(travels[:, PLOTTED_UNIT])),
                         "spread_ratio": float(np.nanmedian(ratios[:, PLOTTED_UNIT]))},
    }


def sweep_summary(sweep):
    """Final accuracies of a sweep, the values that trained, and steps to 85% each.

    Returns:
        A dict variant -> {"final": [...], "usable": [values reaching
        `USABLE_ACCURACY`], "largest_usable", "smallest_usable", "steps_to_85": [...]}.
    """
    result = {}
    for variant in ("none", "kerasbn"):
        finals = [curve[-1] for curve in sweep[variant]["accuracy"]]
        usable = [v for v, f in zip(sweep["values"], finals) if f >= USABLE_ACCURACY]
        result[variant] = {
            "final": finals,
            "usable": usable,
            "largest_usable": max(usable) if usable else None,
            "smallest_usable": min(usable) if usable else None,
            "steps_to_85": [steps_to(sweep["steps"], c, 0.85)
                            for c in sweep[variant]["accuracy"]],
            "spread": float(max(finals) - min(finals)),
        }
    return result


def summarize(results):
    """Every number of the summary, from the experiments' results.

    Args:
        results: a dict with the JSON-ready "figure1", "learning_rates",
            "initialization" and "small_batch" series, and "unit_percentiles" (per
            variant, from `experiments.figure1`).

    Returns:
        A dict: "convergence", "agreement", "drift" (per variant), "learning_rates",
        "initialization".
    """
    figure1 = results["figure1"]
    return {
        "convergence": convergence(figure1),
        "agreement": agreement(figure1),
        "drift": {variant: drift(tables)
                  for variant, tables in results["unit_percentiles"].items()},
        "learning_rates": sweep_summary(results["learning_rates"]),
        "initialization": sweep_summary(results["initialization"]),
    }


def _faster(convergence_numbers):
    """Per target: (BN steps, no-BN steps) medians, where at least one got there."""
    ours = convergence_numbers["kerasbn"]["median_steps_to"]
    theirs = convergence_numbers["none"]["median_steps_to"]
    return {t: (ours[t], theirs[t]) for t in ours if (ours[t], theirs[t]) != (None, None)}


def _steps(value):
    return "never" if value is None else f"{value:.0f}"


def claim_convergence(summary, steps):
    """Figure 1a: BN reaches a test accuracy in fewer steps."""
    pairs = _faster(summary["convergence"])
    if not pairs:
        return None, "neither network reached 80% test accuracy"
    held = all(ours is not None and (theirs is None or ours < theirs)
               for ours, theirs in pairs.values())
    text = "; ".join(f"{float(t):.0%}: BN {_steps(o)}, no BN {_steps(n)}"
                     for t, (o, n) in pairs.items())
    return held, f"median steps to a test accuracy of {text} (of {steps} steps)"


def claim_final_accuracy(summary):
    """Figure 1a: BN ends at a higher test accuracy."""
    ours, theirs = (summary["convergence"][v] for v in ("kerasbn", "none"))
    difference = ours["final_mean"] - theirs["final_mean"]
    noise = np.sqrt((ours["final_sd"] ** 2 + theirs["final_sd"] ** 2) / 2)
    held = bool(difference > AGREEMENT_SIGMAS * noise + 0.002)
    return held, (f"final test accuracy BN {ours['final_mean']:.3f} ± {ours['final_sd']:.3f},"
                  f" no BN {theirs['final_mean']:.3f} ± {theirs['final_sd']:.3f} "
                  f"(mean ± sd over seeds; difference {difference:+.3f}); on the training "
                  f"images BN {ours['train_mean']:.3f}, no BN {theirs['train_mean']:.3f}")


def claim_steady(summary):
    """Figure 1b/1c: BN keeps the sigmoid inputs' distribution steady."""
    ours, theirs = summary["drift"]["kerasbn"], summary["drift"]["none"]
    held = (ours["median_travel"] < theirs["median_travel"]
            and ours["spread_ratio"] < theirs["spread_ratio"])
    return held, (f"the 50th percentile moved {ours['median_travel']:.2f} (BN) vs "
                  f"{theirs['median_travel']:.2f} (no BN) 15-85 spreads; the spread changed "
                  f"×{ours['spread_ratio']:.1f} vs ×{theirs['spread_ratio']:.1f} "
                  "(medians over 100 units and the seeds)")


def claim_learning_rates(summary, rates):
    """Higher learning rates: BN trains at a larger rate than no BN."""
    ours = summary["learning_rates"]["kerasbn"]["largest_usable"]
    theirs = summary["learning_rates"]["none"]["largest_usable"]
    text = (f"largest rate reaching {USABLE_ACCURACY:.0%}: BN {_value(ours)}, no BN "
            f"{_value(theirs)} (swept {min(rates):g} to {max(rates):g})")
    if ours is None:
        return False, text
    if theirs is not None and ours == theirs == max(rates):
        return None, text + "; both trained at the largest rate swept"
    return theirs is None or ours > theirs, text


def claim_initialization(summary, scales):
    """Less sensitivity to the initial weights' scale."""
    ours, theirs = (summary["initialization"][v] for v in ("kerasbn", "none"))
    held = (len(ours["usable"]) >= len(theirs["usable"])
            and ours["spread"] < theirs["spread"])
    return held, (f"final test accuracy over scales ×{min(scales):g}..×{max(scales):g} "
                  f"ranged {min(ours['final']):.3f}..{max(ours['final']):.3f} with BN "
                  f"({len(ours['usable'])}/{len(scales)} reached {USABLE_ACCURACY:.0%}), "
                  f"{min(theirs['final']):.3f}..{max(theirs['final']):.3f} without "
                  f"({len(theirs['usable'])}/{len(scales)}); steps to 85% at the slowest "
                  f"scale: BN {_slowest(ours)}, no BN {_slowest(theirs)}")


def _slowest(numbers):
    steps = numbers["steps_to_85"]
    return "never" if None in steps else f"{max(steps)}"


def _value(value):
    return "none" if value is None else f"{value:g}"


def claim_small_batch(table):
    """Small batches hurt BN: its accuracy drops as the batch shrinks."""
    sizes = table["batch_sizes"]
    small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
    if small == large:
        return None, "one batch size only"
    drop = table["bn_moving"][large] - table["bn_moving"][small]
    return bool(drop >= 0.01), (
        f"BN (moving averages) {table['bn_moving'][large]:.3f} at batch {sizes[large]}, "
        f"{table['bn_moving'][small]:.3f} at batch {sizes[small]}; no BN "
        f"{table['none'][large]:.3f} and {table['none'][small]:.3f}; at batch "
        f"{sizes[small]}: population statistics {table['bn_population'][small]:.3f}, "
        f"renorm {table['renorm'][small]:.3f}")


def claims(results, summary):
    """The verdict on each claim.

    Returns:
        A list of dicts: "claim", "figure" (where the paper makes it), "held" (True,
        False or None: could not be judged) and "evidence".
    """
    config = results["config"]
    verdicts = [
        ("BN reaches a given test accuracy in fewer training steps", "Figure 1a",
         claim_convergence(summary, config["steps"])),
        ("BN ends at a higher test accuracy", "Figure 1a", claim_final_accuracy(summary)),
        ("BN keeps the distribution of a sigmoid's input steady during training",
         "Figure 1b, 1c", claim_steady(summary)),
        ("BN trains at higher learning rates", "abstract, section 3.3",
         claim_learning_rates(summary, config["learning_rates"])),
        ("BN is less sensitive to the initial weights' scale", "abstract, section 3.3",
         claim_initialization(summary, config["init_scales"])),
        ("Small batches make BN's statistics noisy and hurt its accuracy",
         "known limitation (Ioffe 2017)", claim_small_batch(results["small_batch"])),
    ]
    return [{"claim": claim, "figure": figure, "held": held, "evidence": evidence}
            for claim, figure, (held, evidence) in verdicts]
