"""The five experiments, each returning the JSON-ready series it measured.

    figure1         test accuracy against steps (no BN, kerasbn, stock Keras BN; every
                    seed) and the 15/50/85th percentiles of the last hidden layer's
                    sigmoid inputs on the test images along the way
    learning_rates  accuracy curves at each learning rate of the sweep, no BN and kerasbn
    initialization  accuracy curves at each initial-weight scale, no BN and kerasbn
    small_batch     final accuracy at each small batch size: kerasbn evaluated with its
                    moving averages and with population statistics
                    (`kerasbn.recompute_statistics`), Batch Renormalization, Ghost BN
                    (batch 64 normalized in groups of that size), and no BN

Every function takes the `Runner`, the `Config` and a `progress(message)` callable.
"""

from __future__ import annotations

import time

import numpy as np

from training.paper.config import BATCH_SIZE, PLOTTED_UNIT
from training.paper.runner import evaluation_steps

FIGURE1_VARIANTS = ("none", "kerasbn", "keras")
SWEEP_VARIANTS = ("none", "kerasbn")
SWEEP_EVALUATIONS = 20
GHOST_BATCH = 64
SMALL_BATCH_METHODS = ("bn_moving", "bn_population", "renorm", "ghost", "none")


def _timed(progress, label, function):
    start = time.perf_counter()
    run = function()
    note = " (diverged: loss not finite)" if run.diverged else ""
    progress(f"{label}: test accuracy {run.final_accuracy:.3f}{note} "
             f"[{time.perf_counter() - start:.0f} s]")
    return run


def figure1(runner, config, progress):
    """Figure 1a/1b/1c: every variant of `FIGURE1_VARIANTS` for every seed.

    Returns:
        A dict: "steps" (the evaluation steps), "learning_rate", "unit" (the plotted
        unit), and per variant: "accuracy" (seeds × steps), "train_accuracy" (one a
        seed: on the training split at the end), "percentiles" (seeds × steps × 3: the
        plotted unit's 15/50/85th), and "unit_percentiles" (seeds × steps × 3 × units,
        for the drift over all units; not written to the JSON).
    """
    steps = evaluation_steps(config.steps, config.evaluations)
    result = {"steps": steps, "learning_rate": config.learning_rate, "unit": PLOTTED_UNIT,
              "batch_size": BATCH_SIZE}
    for variant in FIGURE1_VARIANTS:
        result[variant] = {"accuracy": [], "train_accuracy": [], "percentiles": [],
                           "unit_percentiles": []}
    for seed in range(config.seeds):
        for variant in FIGURE1_VARIANTS:
            run = _timed(progress, f"figure 1, seed {seed + 1}/{config.seeds}, {variant}",
                         lambda: runner.run(variant, seed, learning_rate=config.learning_rate,
                                            steps=config.steps, batch_size=BATCH_SIZE,
                                            evaluate_at=steps, with_percentiles=True))
            series = result[variant]
            series["accuracy"].append(run.accuracy)
            series["train_accuracy"].append(runner.train_accuracy(runner.model(variant)))
            series["percentiles"].append(run.percentiles[:, :, PLOTTED_UNIT].tolist())
            series["unit_percentiles"].append(run.percentiles)
    return result


def _sweep(runner, config, progress, name, values, run_one):
    steps = evaluation_steps(config.steps, SWEEP_EVALUATIONS)
    result = {"steps": steps, "values": list(values)}
    for variant in SWEEP_VARIANTS:
        result[variant] = {"accuracy": [], "diverged": []}
        for value in values:
            run = _timed(progress, f"{name} {value:g}, {variant}",
                         lambda: run_one(variant, value, steps))
            result[variant]["accuracy"].append(run.accuracy)
            result[variant]["diverged"].append(run.diverged)
    return result


def learning_rates(runner, config, progress):
    """The learning-rate sweep (first seed, `config.steps` steps at batch 60).

    Returns:
        A dict: "steps" (evaluation steps), "values" (the rates), and per variant
        "accuracy" (rates × steps) and "diverged" (one bool a rate).
    """
    return _sweep(runner, config, progress, "learning rate", config.learning_rates,
                  lambda variant, rate, steps: runner.run(
                      variant, 0, learning_rate=rate, steps=config.steps,
                      batch_size=BATCH_SIZE, evaluate_at=steps))


def initialization(runner, config, progress):
    """The initialization sweep: the hidden layers' initial kernels scaled.

    Returns:
        A dict as `learning_rates` returns, "values" being the scales, plus
        "learning_rate".
    """
    result = _sweep(runner, config, progress, "initial weights ×", config.init_scales,
                    lambda variant, scale, steps: runner.run(
                        variant, 0, learning_rate=config.learning_rate, steps=config.steps,
                        batch_size=BATCH_SIZE, evaluate_at=steps, init_scale=scale))
    result["learning_rate"] = config.learning_rate
    return result


def small_batch_plan(config, num_train, batch_size):
    """The steps and learning rate of a small-batch run at `batch_size`.

    Returns:
        `(steps, learning_rate)`: `small_batch_epochs` passes over `num_train` examples
        (at least one step), and `config.learning_rate` scaled by batch_size/60.
    """
    steps = max(1, int(round(config.small_batch_epochs * num_train / batch_size)))
    return steps, config.learning_rate * batch_size / BATCH_SIZE


def small_batch(runner, config, progress):
    """The small-batch table (first seed, the same examples for every batch size).

    Returns:
        A dict: "batch_sizes", "steps" and "learning_rates" (one a batch size),
        "epochs", "ghost_batch", and per method of `SMALL_BATCH_METHODS` a list of final
        test accuracies (None where the method does not apply: ghost at a batch size
        not below `GHOST_BATCH`).
    """
    import tensorflow as tf

    import kerasbn

    sizes = list(config.small_batch_sizes)
    num_train = len(runner.arrays.train_labels)
    result = {"batch_sizes": sizes, "epochs": config.small_batch_epochs,
              "ghost_batch": GHOST_BATCH, "steps": [], "learning_rates": []}
    result.update({method: [] for method in SMALL_BATCH_METHODS})
    ghost_steps, ghost_rate = small_batch_plan(config, num_train, GHOST_BATCH)
    for size in sizes:
        steps, rate = small_batch_plan(config, num_train, size)
        result["steps"].append(steps)
        result["learning_rates"].append(rate)

        def one(variant, label, batch=size, batch_steps=steps, batch_rate=rate, vbs=None):
            return _timed(progress, f"batch {size}, {label}", lambda: runner.run(
                variant, 0, learning_rate=batch_rate, steps=batch_steps, batch_size=batch,
                virtual_batch_size=vbs)).final_accuracy

        result["bn_moving"].append(one("kerasbn", "kerasbn (moving averages)"))
        trained = runner.model("kerasbn")
        images = tf.data.Dataset.from_tensor_slices(runner.arrays.train_images)
        kerasbn.recompute_statistics(trained.model, images.batch(size), verbose=0)
        result["bn_population"].append(runner.evaluate(trained)[0])
        progress(f"batch {size}, kerasbn (population statistics): test accuracy "
                 f"{result['bn_population'][-1]:.3f}")
        result["renorm"].append(one("renorm", "renorm"))
        result["ghost"].append(
            one("ghost", f"ghost (batch {GHOST_BATCH} in groups of {size})",
                batch=GHOST_BATCH, batch_steps=ghost_steps, batch_rate=ghost_rate, vbs=size)
            if size < GHOST_BATCH else None)
        result["none"].append(one("none", "no BN"))
    return result


def json_ready(series):
    """A copy of an experiment's result without its in-memory-only entries."""
    if isinstance(series, dict):
        return {key: json_ready(value) for key, value in series.items()
                if key != "unit_percentiles"}
    if isinstance(series, np.ndarray):
        return series.tolist()
    return series
