"""The sections of the benchmark: one function each, registered in `SECTIONS`.

A section function takes a `Run` and appends its comparisons to `run.report` (through
`harness.measure`). To add a section: write `section_<name>(run)` and add one
`Section` entry to `SECTIONS`; `--sections`, `--help` and the order of the run follow
from the table. (Its targets, if it has any, go in `results.TARGETS`.) Sections still
to come fit the same mould: "statistics" (a population-statistics recompute pass
against a training-mode forward pass over the same data) and "first_step" (the wall
time of the first `fit`, measured in fresh processes).
"""

import dataclasses
import tempfile
from typing import Callable, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

import kerasbn
from training.benchmark import contenders as contending
from training.benchmark import optional
from training.benchmark.config import BYTES_MOVED, NUM_CLASSES, REPLICAS, Config
from training.benchmark.harness import OURS, REFERENCE, THEIRS, Contender, Report, Timing, \
    describe, measure
from training.models import build_model


@dataclasses.dataclass
class Run:
    """What every section gets.

    Attributes:
        config: the sizes (`config.FULL` or `config.QUICK`, maybe with other reps).
        sections: the names of the sections asked for, in the order of `SECTIONS`.
        rng: the NumPy generator every section draws its inputs from, in turn.
        report: the `harness.Report` the comparisons go to.
    """

    config: Config
    sections: Tuple[str, ...]
    rng: np.random.Generator
    report: Report


@dataclasses.dataclass(frozen=True)
class Section:
    """One entry of the table of sections.

    Attributes:
        run: the section's function, called with a `Run`; None for a section that
            another one computes (`part_of`).
        description: the text of `--help`, in lines of at most 78 characters.
        part_of: the section whose function produces this one's comparisons
            ("bandwidth": "layer", which times copies of x when bandwidth is asked).
        logical_devices: the logical CPU devices the section needs; the CPU is split
            into the largest number any section asked for needs, before TensorFlow
            starts.
    """

    run: Optional[Callable[[Run], None]]
    description: str
    part_of: Optional[str] = None
    logical_devices: int = 1


# ------------------------------------------------------------------ layer, bandwidth


def section_layer(run: Run):
    """One layer, training step and inference call, for each of `config.layer_cases`;
    with copies of x in the same round-robin when "bandwidth" is asked for."""
    for name in ("tf_keras", "torch"):
        if optional.missing(name):
            run.report.skip("layer", name, optional.missing(name))
    bandwidth = "bandwidth" in run.sections
    timing = Timing(run.config.layer_reps, run.config.warmup)
    for name, shape, axis in run.config.layer_cases:
        x_np = run.rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
        dy_np = run.rng.standard_normal(shape, dtype=np.float32)
        for mode in ("training", "inference"):
            contenders = contending.layer_contenders(x_np, dy_np, axis, mode == "training")
            if bandwidth:
                contenders += contending.copy_contenders(x_np)
            group = measure(run.report, "layer",
                            f"{name} {'x'.join(map(str, shape))} axis={axis} {mode}",
                            contenders, timing,
                            params={"shape_name": name, "shape": list(shape), "axis": axis,
                                    "mode": mode, "bytes": int(x_np.nbytes)})
            if bandwidth:
                add_bandwidth(run.report, group)


def add_bandwidth(report, layer_group):
    """Appends the layer comparison's times as GB/s and as fractions of the fastest
    copy of x timed with them (`BYTES_MOVED` per mode)."""
    params, results = layer_group["params"], layer_group["contenders"]

    def gbps(kind, median_ms):
        return BYTES_MOVED[kind] * params["bytes"] / (median_ms * 1e-3) / 1e9

    copies = {n: gbps("copy", r["median_ms"]) for n, r in results.items()
              if r["role"] == REFERENCE}
    if not copies:
        report.skip("bandwidth", layer_group["case"], "no copy could be timed")
        return
    fastest_copy = max(copies.values())
    contenders = {}
    for name, r in results.items():
        if r["role"] != REFERENCE:
            rate = gbps(params["mode"], r["median_ms"])
            contenders[name] = {"role": r["role"], "median_ms": r["median_ms"],
                                "gbps": rate, "fraction": rate / fastest_copy}
    report.groups.append({
        "section": "bandwidth", "case": layer_group["case"],
        "params": dict(params, bytes_moved=BYTES_MOVED[params["mode"]] * params["bytes"],
                       copy_gbps=copies, fastest_copy_gbps=fastest_copy),
        "contenders": contenders, "ratios": []})


# ------------------------------------------------------------------ sync


def section_sync(run: Run):
    """A small conv net's SGD step on `REPLICAS` logical CPU devices, synchronized
    batch norms against unsynchronized ones, kerasbn's and Keras's."""
    config = run.config
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < REPLICAS:
        run.report.skip("sync", "all", f"needs {REPLICAS} logical CPU devices, found "
                        f"{len(devices)} (TensorFlow was initialized before the split)")
        return
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:REPLICAS]])
    batch, image = config.sync_batch, config.sync_image
    x_np = run.rng.standard_normal((batch,) + image, dtype=np.float32)
    y_np = run.rng.integers(0, NUM_CLASSES, batch).astype(np.int32)

    def step(layer_class, synchronized):
        return contending.sync_step(strategy, layer_class, synchronized, image,
                                    config.sync_blocks, x_np, y_np)

    contenders = [
        Contender("kerasbn sync", OURS, step(kerasbn.BatchNormalization, True)),
        Contender("kerasbn", OURS, step(kerasbn.BatchNormalization, False)),
        Contender("keras sync", THEIRS, step(keras.layers.BatchNormalization, True)),
        Contender("keras", THEIRS, step(keras.layers.BatchNormalization, False))]
    measure(run.report, "sync",
            f"conv net ({config.sync_blocks} conv+BN) {'x'.join(map(str, (batch,) + image))}"
            f" on {REPLICAS} replicas",
            contenders, Timing(config.sync_reps, config.warmup),
            params={"batch": batch, "image": list(image), "replicas": REPLICAS,
                    "blocks": config.sync_blocks},
            pairs=[("kerasbn sync", "kerasbn"), ("kerasbn sync", "keras sync"),
                   ("keras sync", "keras")])


# ------------------------------------------------------------------ resnet, export


def section_resnet(run: Run):
    """One `train_on_batch` of training.models' ResNet with kerasbn against the same
    model (same weights) with Keras's batch norm; also both compiled whole if
    `config.resnet_xla`."""
    config = run.config
    batch, image = config.resnet_batch, tuple(config.resnet_image)
    x = run.rng.standard_normal((batch,) + image, dtype=np.float32)
    y = run.rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    weights = build_model("resnet", image, NUM_CLASSES, bn="kerasbn").get_weights()

    def step(bn, xla):
        return contending.resnet_step(bn, xla, image, weights, x, y)

    contenders = [Contender("kerasbn", OURS, step("kerasbn", False)),
                  Contender("keras", THEIRS, step("keras", False))]
    if config.resnet_xla:
        contenders += [Contender("kerasbn XLA", OURS, step("kerasbn", True)),
                       Contender("keras XLA", THEIRS, step("keras", True))]
    measure(run.report, "resnet",
            f"ResNet train step {'x'.join(map(str, (batch,) + image))}",
            contenders, Timing(config.resnet_reps, config.warmup),
            params={"batch": batch, "image": list(image)},
            pairs=[("kerasbn", "keras"), ("kerasbn XLA", "keras XLA"),
                   ("kerasbn", "keras XLA"), ("kerasbn XLA", "keras")])


def section_export(run: Run):
    """Serving latency of the ResNet exported by kerasbn (batch norms folded) against
    Keras's `model.export` of it, at each of `config.export_batches`."""
    config = run.config
    image = tuple(config.resnet_image)
    model = build_model("resnet", image, NUM_CLASSES, bn="kerasbn")
    for _ in range(3):  # moving statistics away from their initial values
        model(run.rng.standard_normal((8,) + image, dtype=np.float32) + 0.3, training=True)
    with tempfile.TemporaryDirectory(prefix="kerasbn-bench-") as workdir:
        served = {}
        for name, role, export in contending.export_contenders(
                model, image, workdir, config.export_all):
            try:
                served[name] = (role, export())
            except Exception as error:  # noqa: BLE001 - a failing export is skipped
                run.report.skip("export", name, describe(error))
        for batch in config.export_batches:
            x = tf.constant(run.rng.standard_normal((batch,) + image, dtype=np.float32))
            contenders = [Contender(name, role, lambda call=call: (lambda: call(x)))
                          for name, (role, call) in served.items()]
            measure(run.report, "export", f"ResNet serving batch {batch}", contenders,
                    Timing(config.export_reps, config.warmup), params={"batch": batch},
                    pairs=[("kerasbn export folded", name) for name in served
                           if name != "kerasbn export folded"])


# ------------------------------------------------------------------ the table

SECTIONS = {
    "layer": Section(section_layer, """\
one batch-norm layer, float32: a training step (forward in training mode,
moving statistics updated, gradients w.r.t. x, gamma and beta for a given
upstream dy) and an inference call, on an NHWC, a dense and a channels-first
input. Contenders: kerasbn (its defaults: the math as XLA pieces inside a
plain tf.function), kerasbn XLA (the whole step compiled), kerasbn
jit_compile=False, Keras 3 with and without XLA, tf_keras (fused for 4-D
inputs), torch.nn.BatchNorm2d/1d (NCHW and channels-last memory; on all
threads, and on one: with OpenMP's spinning barriers, PyTorch on every
core slows down sharply as soon as anything else runs on the machine)."""),
    "bandwidth": Section(None, """\
the layer timings as bytes moved per second, as a fraction of the copy
bandwidth measured in the same round-robin (copies of x are timed with
the layers). Bytes, with S the size of x: training 8 S (statistics: read
x; normalize: read x, write y; backward sums: read x, dy; dx: read x, dy,
write dx), inference 2 S (read x, write y), a copy 2 S.""", part_of="layer"),
    "sync": Section(section_sync, """\
one SGD step of a small conv net (--quick: one conv + BN) on 4 logical CPU
replicas (MirroredStrategy, custom loop): synchronized=True against False,
for kerasbn and for Keras 3's synchronized layer.""", logical_devices=REPLICAS),
    "resnet": Section(section_resnet, """\
one train_on_batch of training.models' ResNet with kerasbn against the
same model (same weights) with Keras's batch norm, with and without XLA
(--quick: without; compiling two whole ResNets takes longer than the rest)."""),
    "export": Section(section_export, """\
serving latency of the ResNet exported by kerasbn.export.export_saved_model
(batch norms folded) against Keras's model.export of the same model; the
full run adds Keras's export of its stock-BN twin (same weights), our
unfolded export and the model with no batch norm at all. Each is loaded
with tf.saved_model.load and called through its serving signature."""),
}


def describe_sections():
    """The sections as `--help` lists them: the name, then the description indented."""
    lines = []
    for name, section in SECTIONS.items():
        first, *rest = section.description.splitlines()
        lines.append(f"  {name:<10} {first}")
        lines += [" " * 13 + line for line in rest]
    return "\n".join(lines)


def logical_devices(names):
    """The logical CPU devices the sections `names` need (1: the CPU stays whole)."""
    return max((SECTIONS[name].logical_devices for name in names), default=1)


def run_sections(run: Run):
    """Runs the sections of `run.sections`, each section function once, in the
    order of `SECTIONS` (a section that is `part_of` another runs as that one)."""
    functions = dict.fromkeys(SECTIONS[name].part_of or name for name in run.sections)
    for name in functions:
        SECTIONS[name].run(run)
