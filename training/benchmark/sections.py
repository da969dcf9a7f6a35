"""The sections of the benchmark: one function each, registered in `SECTIONS`.

A section function takes a `Run` and appends its comparisons to `run.report` (through
`harness.measure`). To add a section: write `section_<name>(run)` and add one
`Section` entry to `SECTIONS`; `--sections`, `--help` and the order of the run follow
from the table. (Its targets, if it has any, go in `results.TARGETS`.) The first_step
section times fresh processes (`first_step.py`) instead of calls in this one, and
records its comparisons with `harness.record` as `harness.measure` does.
"""

import dataclasses
import tempfile
from typing import Callable, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

import kerasbn
from training.benchmark import contenders as contending
from training.benchmark import compile_time, first_step, optional
from training.benchmark.config import BYTES_MOVED, COPIES, NUM_CLASSES, REPLICAS, Config, \
    SYNC_EXCHANGES_ONLY
from training.benchmark.harness import OURS, REFERENCE, THEIRS, Contender, Report, Timing, \
    describe, measure, record, summarize
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
            if mode == "inference":
                contenders += contending.least_inference_contenders(x_np, axis)
            else:
                contenders += contending.least_exact_training(x_np, dy_np, axis)
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

    copies = {n: gbps("copy", r["median_ms"]) for n, r in results.items() if n in COPIES}
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


# ------------------------------------------------------------------ accuracy


def section_accuracy(run: Run):
    """The statistics each layer records for one batch (`contenders.one_batch_statistics`)
    of `config.accuracy_shape` whose mean is `offset` standard deviations, for each of
    `config.accuracy_offsets`, against float64 statistics of the same float32 input:
    the largest error of a channel's mean (in standard deviations) and of its variance
    (relative)."""
    for name in ("tf_keras", "torch"):
        if optional.missing(name):
            run.report.skip("accuracy", name, optional.missing(name))
    shape = run.config.accuracy_shape
    for offset in run.config.accuracy_offsets:
        x_np = (run.rng.standard_normal(shape) + offset).astype(np.float32)
        exact = x_np.astype(np.float64)
        axes = tuple(range(exact.ndim - 1))
        mean, variance = exact.mean(axis=axes), exact.var(axis=axes)
        case = f"NHWC {'x'.join(map(str, shape))}, mean {offset:g} standard deviations"
        print(f"[accuracy] {case}", flush=True)
        results = {}
        for name, role, recorded_mean, recorded_variance in \
                contending.one_batch_statistics(x_np):
            results[name] = {
                "role": role,
                "mean_error_std": float(np.max(np.abs(recorded_mean - mean)
                                               / np.sqrt(variance))),
                "variance_error": float(np.max(np.abs(recorded_variance - variance)
                                               / variance))}
            print(f"    {name:<26} mean {results[name]['mean_error_std']:9.2e} std, "
                  f"variance {results[name]['variance_error']:9.2e}", flush=True)
        run.report.groups.append({"section": "accuracy", "case": case,
                                  "params": {"shape": list(shape), "offset": offset},
                                  "contenders": results, "ratios": []})


# ------------------------------------------------------------------ ghost


def section_ghost(run: Run):
    """One layer's training step on `config.ghost_shape` with virtual batches of
    `config.ghost_virtual_batch_size` (Ghost Batch Normalization), kerasbn's against
    kerasbn without them and tf_keras's with them."""
    if optional.missing("tf_keras"):
        run.report.skip("ghost", "tf_keras", optional.missing("tf_keras"))
    config = run.config
    shape, size = tuple(config.ghost_shape), config.ghost_virtual_batch_size
    x_np = run.rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
    dy_np = run.rng.standard_normal(shape, dtype=np.float32)
    ghost = f"kerasbn vbs={size}"
    measure(run.report, "ghost",
            f"NHWC {'x'.join(map(str, shape))} training, virtual batches of {size}",
            contending.ghost_contenders(x_np, dy_np, size),
            Timing(config.ghost_reps, config.warmup),
            params={"shape": list(shape), "virtual_batch_size": size},
            pairs=[(ghost, "kerasbn"), (ghost, f"tf_keras vbs={size}")])


# ------------------------------------------------------------------ sync


def section_sync(run: Run):
    """A small conv net's SGD step on `REPLICAS` logical CPU devices, synchronized
    batch norms against unsynchronized ones, kerasbn's and Keras's, and the
    unsynchronized layer with a synchronized one's exchanges alone (the least a
    synchronized step costs)."""
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
        Contender(SYNC_EXCHANGES_ONLY, REFERENCE,
                  step(contending.UnsynchronizedWithExchanges, False)),
        Contender("keras sync", THEIRS, step(keras.layers.BatchNormalization, True)),
        Contender("keras", THEIRS, step(keras.layers.BatchNormalization, False))]
    measure(run.report, "sync",
            f"conv net ({config.sync_blocks} conv+BN) {'x'.join(map(str, (batch,) + image))}"
            f" on {REPLICAS} replicas",
            contenders, Timing(config.sync_reps, config.warmup),
            params={"batch": batch, "image": list(image), "replicas": REPLICAS,
                    "blocks": config.sync_blocks},
            pairs=[("kerasbn sync", "kerasbn"), ("kerasbn sync", "keras sync"),
                   ("keras sync", "keras"), (SYNC_EXCHANGES_ONLY, "kerasbn"),
                   ("kerasbn sync", SYNC_EXCHANGES_ONLY)])


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


# ------------------------------------------------------------------ statistics


def section_statistics(run: Run):
    """A population-statistics pass over the ResNet against a training-mode forward
    pass over the same batches, for each of `config.statistics_cases`."""
    config = run.config
    for image, batch, batches in config.statistics_cases:
        x = run.rng.standard_normal((batch * batches,) + image, dtype=np.float32) * 2.0 + 0.5
        weights = build_model("resnet", image, NUM_CLASSES, bn="kerasbn").get_weights()
        measure(run.report, "statistics",
                f"ResNet {'x'.join(map(str, image))}, {batches} batches of {batch}",
                contending.statistics_contenders(image, weights, x, batch),
                Timing(config.statistics_reps, config.warmup),
                params={"image": list(image), "batch": batch, "batches": batches},
                pairs=[("recompute_statistics", "training forward"),
                       ("PopulationPass reused", "training forward")])


# ------------------------------------------------------------------ first_step

FIRST_STEP_XLA = {"off": "jit_compile=False", "step": "jit_compile=True",
                  "plan": "training's --xla plan"}


def section_first_step(run: Run):
    """For each of `config.first_step_cases`, the time to the end of a first `fit`
    of kerasbn's model and of the stock one, each in `config.first_step_reps` fresh
    processes (alternating), with its parts (`FIRST_STEP_PARTS`) and, for a converted
    model, the conversion's own time and that of Keras's copy of the same stock model
    (`first_step.keras_copy_time`, in none of the other times)."""
    for case in run.config.first_step_cases:
        devices = "1 device" if case.replicas == 1 else f"{case.replicas} CPU replicas"
        name = f"{case.model}, {devices}, {FIRST_STEP_XLA[case.xla]}"
        print(f"[first_step] {name}: {run.config.first_step_reps} fresh process(es) "
              "each for kerasbn and keras", flush=True)
        processes = first_step.fresh_processes(run.config, run.report, case, name)
        results = {}
        for bn, role in (("kerasbn", OURS), ("keras", THEIRS)):
            if not processes[bn]:
                continue
            for suffix, key in FIRST_STEP_PARTS:
                results[bn + suffix] = summarize(role, [p[key] for p in processes[bn]])
            if any(p["convert_s"] for p in processes[bn]):
                results[f"{bn} conversion"] = summarize(
                    role, [p["convert_s"] for p in processes[bn]])
                results[f"{bn}: Keras's copy of the same model"] = summarize(
                    REFERENCE, [p["clone_s"] for p in processes[bn]])
        record(run.report, "first_step", name, results,
               params={**case._asdict(), "image": list(run.config.first_step_image),
                       "batch": run.config.first_step_batch,
                       "steps": run.config.first_step_steps, "processes": processes},
               pairs=[("kerasbn" + suffix, "keras" + suffix)
                      for suffix, _ in FIRST_STEP_PARTS]
               + [("kerasbn conversion", "kerasbn: Keras's copy of the same model")])


# What the first_step section compares: the first step (from before the model is
# built to the end of the fit's last step), from the process's start, the first
# step's two parts: the build (with the conversion, for a converted model) and
# compile + the first fit, and the wait after the last step until `fit` returns
# (TensorFlow's, see `first_step.training_end_callback`).
FIRST_STEP_PARTS = (("", "first_step_s"), (" from process start", "total_s"),
                    (" build", "build_s"), (" compile and fit", "fit_s"),
                    (" fit's return after its last step", "teardown_s"))


def section_xla_compile(run: Run):
    """For each of `config.xla_compile_models`, XLA's compile of the model's training
    step compiled whole, kerasbn's model against the stock one, in this one process,
    alternating, `config.xla_compile_reps` times each (see
    `compile_time.xla_compile_time`); the models are first_step's, built once."""
    config = run.config
    image, batch = tuple(config.first_step_image), config.first_step_batch
    x = tf.constant(run.rng.standard_normal((batch,) + image, dtype=np.float32))
    y = tf.constant(run.rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
    for model_name in config.xla_compile_models:
        name = f"{model_name} training step compiled whole, batch {batch}"
        print(f"[xla_compile] {name}: {config.xla_compile_reps} compile(s) each", flush=True)
        models = {bn: first_step.build(model_name, bn, image, tf.distribute.get_strategy()).model
                  for bn in ("kerasbn", "keras")}
        times = {"kerasbn": [], "keras": []}
        for rep in range(config.xla_compile_reps):
            for bn in (("kerasbn", "keras") if rep % 2 == 0 else ("keras", "kerasbn")):
                times[bn].append(compile_time.xla_compile_time(models[bn], x, y))
                print(f"    {bn:<8} trace {times[bn][-1][0]:.2f} s, XLA compile "
                      f"{times[bn][-1][1]:.2f} s", flush=True)
        results = {}
        for bn, role in (("kerasbn", OURS), ("keras", THEIRS)):
            results[f"{bn} trace"] = summarize(role, [t for t, _ in times[bn]])
            results[f"{bn} XLA compile"] = summarize(role, [c for _, c in times[bn]])
        record(run.report, "xla_compile", name, results,
               params={"model": model_name, "image": list(image), "batch": batch},
               pairs=[("kerasbn XLA compile", "keras XLA compile"),
                      ("kerasbn trace", "keras trace")])


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
    "accuracy": Section(section_accuracy, """\
not a time: the moving mean and variance each layer records for one batch
(momentum 0; PyTorch's 1) of NHWC 64x32x32x64 whose mean is 0, 1e2, 1e3
and 1e4 standard deviations, against float64 statistics of the same
float32 input: kerasbn, Keras 3, tf_keras (fused: oneDNN's kernel where
TensorFlow turns oneDNN on) and PyTorch channels-last. The largest error
of a channel: mean in standard deviations, variance relative."""),
    "ghost": Section(section_ghost, """\
Ghost Batch Normalization: one layer's training step (as in "layer") on
NHWC 64x32x32x64 with virtual batches of 8, kerasbn's against kerasbn
without virtual batches and tf_keras's virtual_batch_size=8."""),
    "sync": Section(section_sync, """\
one SGD step of a small conv net (--quick: one conv + BN) on 4 logical CPU
replicas (MirroredStrategy, custom loop): synchronized=True against False,
for kerasbn and for Keras 3's synchronized layer.""", logical_devices=REPLICAS),
    "resnet": Section(section_resnet, """\
one train_on_batch of training.models' ResNet with kerasbn against the
same model (same weights) with Keras's batch norm, with and without XLA
(--quick: without; compiling two whole ResNets takes longer than the rest)."""),
    "statistics": Section(section_statistics, """\
the population-statistics pass over the ResNet (8x8x1, 22 batches of 64,
as training.train's; and 32x32x3, 8 batches of 64) against a tf.function
calling model(x, training=True) on the same batches (moving statistics
updated): kerasbn.recompute_statistics as called (a new PopulationPass,
so new traces, each call) and one PopulationPass run again and again (as
kerasbn.callbacks does). Steady state: every contender has run before."""),
    "export": Section(section_export, """\
serving latency of the ResNet exported by kerasbn.export.export_saved_model
(batch norms folded) against Keras's model.export of the same model; the
full run adds Keras's export of its stock-BN twin (same weights), our
unfolded export and the model with no batch norm at all. Each is loaded
with tf.saved_model.load and called through its serving signature."""),
    "first_step": Section(section_first_step, """\
the time to a first model.fit (compile included; 2 steps, batch 32,
32x32x3), each in a fresh process (python -m training.benchmark.first_step),
kerasbn against stock batch norms (unsynchronized, the kerasbn layers as
they come): Keras's MobileNetV2 (alpha 0.35) through convert_to_kerasbn,
and training.models' ResNet; on one device and on 4 CPU replicas
(training.runtime's CPU split and strategy); compile(jit_compile=False)
and jit_compile=True (which fails on CPU replicas: recorded as "not
runnable here" with the error). The figure is from before the model is
built to the end of the fit's last step (Keras's on_train_end); the time
from the process's start is shown beside it, and apart from it the wait
after the last step until fit returns (an idle wait, on tf.data's
autotuning as far as measured); the imports are in results.json. A
converted model's process also times Keras's own copy of the same stock
model with its weights (keras.models.clone_model, then set_weights; after
the conversion, in no other time), the reference for the conversion's
cost. Median of 3 processes
(--reps N: N). Cost: 16 processes of 10 s to 3 min each, 16 min at
--reps 1 on 2 cores at load 7-8 (3 times that by default); --quick: the
ResNet 8x8x1 on one device, one process each."""),
    "xla_compile": Section(section_xla_compile, """\
what first_step's jit_compile=True rows wait for, measured in one process:
the tracing and the XLA compile of one SGD step compiled whole
(tf.function(jit_compile=True): forward in training mode, loss, gradients,
update), kerasbn's model against the stock one, first_step's models
(MobileNetV2 converted, the ResNet) at its image and batch, alternating, a
new function each time (6 compiles each; a compile is the first call less
a second). Fresh processes' compile times drift by seconds here, which
first_step's 3 processes cannot resolve; in one process both contenders
drift alike. --quick: the ResNet 8x8x1, one compile each."""),
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
