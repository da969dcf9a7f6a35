"""Benchmark of kerasbn against the batch norms of Keras 3, tf_keras and PyTorch.

    python -m training.benchmark                      # the full run, several minutes
    python -m training.benchmark --quick              # small shapes, under a minute
    python -m training.benchmark --sections layer,bandwidth --out results/mine

Sections (all by default):

  layer      one batch-norm layer, float32: a training step (forward in training mode,
             moving statistics updated, gradients w.r.t. x, gamma and beta for a given
             upstream dy) and an inference call, on an NHWC, a dense and a channels-first
             input. Contenders: kerasbn (its defaults: the math as XLA pieces inside a
             plain tf.function), kerasbn XLA (the whole step compiled), kerasbn
             jit_compile=False, Keras 3 with and without XLA, tf_keras (fused for 4-D
             inputs), torch.nn.BatchNorm2d/1d (NCHW and channels-last memory; on all
             threads, and on one: with OpenMP's spinning barriers, PyTorch on every
             core slows down sharply as soon as anything else runs on the machine).
  bandwidth  the layer timings as bytes moved per second, as a fraction of the copy
             bandwidth measured in the same round-robin (copies of x are timed with
             the layers). Bytes, with S the size of x: training 8 S (statistics: read
             x; normalize: read x, write y; backward sums: read x, dy; dx: read x, dy,
             write dx), inference 2 S (read x, write y), a copy 2 S.
  sync       one SGD step of a small conv net (--quick: one conv + BN) on 4 logical CPU
             replicas (MirroredStrategy, custom loop): synchronized=True against False,
             for kerasbn and for Keras 3's synchronized layer.
  resnet     one train_on_batch of training.models' ResNet with kerasbn against the
             same model (same weights) with Keras's batch norm, with and without XLA
             (--quick: without; compiling two whole ResNets takes longer than the rest).
  export     serving latency of the ResNet exported by kerasbn.export.export_saved_model
             (batch norms folded) against Keras's model.export of the same model; the
             full run adds Keras's export of its stock-BN twin (same weights), our
             unfolded export and the model with no batch norm at all. Each is loaded
             with tf.saved_model.load and called through its serving signature.

How it measures: every comparison is one round-robin. Each contender is built, called
`warmup` times (tracing, compilation), then each repetition calls every contender once,
in an order that rotates by one each repetition, so that drift of the machine hits all
alike. Before each timed call the program sleeps a moment, so that the worker threads of
the previous contender (TensorFlow's and PyTorch's pools spin before they sleep) are
idle, then calls the contender once untimed, so that the timed call finds its own
threads awake, as a training step does after the one before it; the garbage collector
is off while timing. Every call ends by fetching a
result to Python, which on CPU means the work is done. TensorFlow and PyTorch use the
same number of threads (the cores this process may use). The figure is the median;
ratios are kerasbn / contender within the run: absolute times move with the machine's
load, ratios much less.

Writes results.json (every time, the machine, skipped contenders and why), results.png
(bar charts) and results.md (the tables in Markdown) under --out.
"""

import argparse
import datetime
import gc
import importlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

SECTIONS = ("layer", "bandwidth", "sync", "resnet", "export")
REPLICAS = 4
EPSILON, MOMENTUM = 1e-3, 0.99  # Keras's defaults, given to every contender
SETTLE_SECONDS = 0.002
BYTES_MOVED = {"training": 8, "inference": 2, "copy": 2}  # multiples of x's size

FULL = {
    "layer_cases": [("NHWC", (64, 32, 32, 64), -1), ("dense", (256, 1024), -1),
                    ("NCHW", (64, 64, 32, 32), 1)],
    "layer_reps": 60, "sync_reps": 80, "resnet_reps": 30, "export_reps": 100, "warmup": 3,
    "sync_batch": 128, "sync_image": (32, 32, 16), "sync_blocks": 2,
    "resnet_batch": 64, "resnet_image": (32, 32, 3), "resnet_xla": True,
    "export_batches": (1, 64), "export_all": True,
}
QUICK = {
    "layer_cases": [("NHWC", (16, 16, 16, 32), -1), ("dense", (64, 256), -1),
                    ("NCHW", (16, 32, 16, 16), 1)],
    "layer_reps": 5, "sync_reps": 3, "resnet_reps": 3, "export_reps": 5, "warmup": 1,
    "sync_batch": 32, "sync_image": (8, 8, 4), "sync_blocks": 1,
    "resnet_batch": 16, "resnet_image": (8, 8, 1), "resnet_xla": False,
    "export_batches": (1, 16), "export_all": False,
}
NUM_CLASSES = 10

OURS, THEIRS, REFERENCE = "ours", "theirs", "reference"  # reference: not in ratios


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Missing optional contenders (pip install -e '.[bench]' torch==2.13.0) "
        "and contenders that fail are skipped, with the reason in the output.")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repetitions: under a minute")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, among {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: results/bench-<date-time>)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per contender, for every section")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        parser.error(f"--sections must name some of {','.join(SECTIONS)}; "
                     f"received {args.sections!r}")
    args.sections = [s for s in SECTIONS if s in sections]
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1; received {args.reps}")
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("results", f"bench-{stamp}")
    return args


# ------------------------------------------------------------------ setup


def optional_import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()


def configure(threads, logical_devices):
    """Thread counts for TensorFlow and PyTorch alike, and (for the sync section) the
    CPU split into logical devices; must run before TensorFlow initializes."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        if logical_devices > 1:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0],
                [tf.config.LogicalDeviceConfiguration()] * logical_devices)
    except RuntimeError as error:
        return [f"TensorFlow was initialized before the benchmark could configure it "
                f"({error}); its settings were kept."]
    torch = optional_import("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return []


def machine_info(threads):
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "tensorflow": tf.__version__, "keras": keras.__version__}
    for name in ("tf_keras", "torch", "matplotlib"):
        versions[name] = getattr(optional_import(name), "__version__", None)
    return {"cpu_model": cpu, "nproc": os.cpu_count(), "threads": threads,
            "platform": platform.platform(), "versions": versions,
            "load_average_at_start": list(os.getloadavg())}


# ------------------------------------------------------------------ measuring


class Report:
    """What a run found: the comparisons, skipped contenders (with why) and notes."""

    def __init__(self):
        self.groups, self.skipped, self.notes = [], [], []

    def skip(self, section, contender, reason):
        self.skipped.append({"section": section, "contender": contender, "reason": reason})
        print(f"  skipped [{section}] {contender}: {reason}", flush=True)


def describe(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class Contender:
    """`make()` builds the contender and returns a callable that runs it once and
    returns when the work is done. Roles: OURS, THEIRS, or REFERENCE (timed in the same
    round-robin, left out of the ratios)."""

    def __init__(self, name, role, make):
        self.name, self.role, self.make = name, role, make


def round_robin(calls, reps, warmup, on_error):
    """Times every callable `reps` times after `warmup` calls (module docstring).

    Returns {name: [seconds, ...]}; a callable that raises is reported to
    on_error(name, error) and dropped.
    """
    calls, times = dict(calls), {name: [] for name in calls}

    def run(name):
        try:
            start = time.perf_counter()
            calls[name]()
            return time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - a failing contender is skipped
            on_error(name, error)
            del calls[name], times[name]

    for _ in range(warmup):
        for name in list(calls):
            run(name)
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            names = list(calls)
            shift = rep % max(len(names), 1)
            for name in names[shift:] + names[:shift]:
                if name in calls:
                    time.sleep(SETTLE_SECONDS)
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


def measure(report, section, case, contenders, reps, warmup, params=None, pairs=None):
    """Times the contenders in one round-robin and records the comparison.

    `pairs` are the (numerator, denominator) ratios to report; by default every
    OURS contender against every THEIRS one.
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
    for name, seconds in round_robin(calls, reps, warmup, fail).items():
        ms = np.asarray(seconds) * 1e3
        results[name] = {"role": roles[name], "median_ms": float(np.median(ms)),
                         "p25_ms": float(np.percentile(ms, 25)),
                         "p75_ms": float(np.percentile(ms, 75)),
                         "times_ms": [round(float(t), 4) for t in ms]}
        print(f"    {name:<26} {results[name]['median_ms']:10.3f} ms", flush=True)
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


# ------------------------------------------------------------------ layer, bandwidth


def tf_layer_call(layer, x, dy, training, xla):
    """One training step or inference call of a TensorFlow-backed layer, as one
    tf.function; returns a callable that runs it and fetches a small result."""
    import tensorflow as tf

    layer(x, training=False)  # builds the weights outside the traced function
    if training:
        @tf.function(jit_compile=xla)
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            dx, dgamma, dbeta = tape.gradient(
                y, [x, layer.gamma, layer.beta], output_gradients=dy)
            return y, dx, dgamma, dbeta

        return lambda: step(x, dy)[2].numpy()

    @tf.function(jit_compile=xla)
    def infer(x):
        y = layer(x, training=False)
        return y, y[(0,) * len(x.shape)]

    return lambda: infer(x)[1].numpy()


def torch_layer_call(x_np, dy_np, axis, training, memory_format, threads):
    """The same with torch.nn.BatchNorm1d/2d on `threads` threads: NHWC data is seen as
    N, C, H, W, in the given memory format (channels-last is NHWC's own layout)."""
    import torch

    def tensor(array):
        t = torch.from_numpy(array)
        if array.ndim == 4 and axis % 4 == 3:
            t = t.permute(0, 3, 1, 2)
        return t.to(memory_format=memory_format, copy=True)

    x, dy = tensor(x_np), tensor(dy_np)
    layer_class = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d
    bn = layer_class(x.shape[1], eps=EPSILON, momentum=1.0 - MOMENTUM).train(training)
    if training:
        x.requires_grad_(True)

        def run():
            y = bn(x)
            _, dgamma, _ = torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)
            return dgamma[0].item()
    else:
        def run():
            with torch.inference_mode():
                return bn(x)[(0,) * x.dim()].item()

    def call():
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(default)

    return call


def layer_contenders(x_np, dy_np, axis, training):
    import keras
    import tensorflow as tf

    import kerasbn

    x, dy = tf.constant(x_np), tf.constant(dy_np)
    options = {"axis": axis, "epsilon": EPSILON, "momentum": MOMENTUM}

    def tf_layer(make_layer, xla=False):
        return lambda: tf_layer_call(make_layer(), x, dy, training, xla)

    contenders = [
        Contender("kerasbn", OURS, tf_layer(lambda: kerasbn.BatchNormalization(**options))),
        Contender("kerasbn XLA", OURS,
                  tf_layer(lambda: kerasbn.BatchNormalization(**options), xla=True)),
        Contender("kerasbn jit_compile=False", OURS, tf_layer(
            lambda: kerasbn.BatchNormalization(jit_compile=False, **options))),
        Contender("keras", THEIRS, tf_layer(lambda: keras.layers.BatchNormalization(**options))),
        Contender("keras XLA", THEIRS,
                  tf_layer(lambda: keras.layers.BatchNormalization(**options), xla=True)),
    ]
    tf_keras = optional_import("tf_keras")
    if tf_keras is not None:
        fused = True if x_np.ndim == 4 else None  # None: tf_keras's own choice
        contenders.append(Contender("tf_keras", THEIRS, tf_layer(
            lambda: tf_keras.layers.BatchNormalization(fused=fused, **options))))
    torch = optional_import("torch")
    if torch is not None:
        formats = ([("torch NCHW", torch.contiguous_format),
                    ("torch channels-last", torch.channels_last)] if x_np.ndim == 4
                   else [("torch", torch.contiguous_format)])
        threads = torch.get_num_threads()
        for name, memory_format in formats:
            for n in dict.fromkeys([threads, 1]):
                contenders.append(Contender(
                    name + ("" if n == threads else " 1 thread"), THEIRS,
                    lambda f=memory_format, n=n: torch_layer_call(
                        x_np, dy_np, axis, training, f, n)))
    return contenders


def copy_contenders(x_np):
    """Copies of an array the size of x: what the bandwidth is measured against."""
    import tensorflow as tf

    def numpy_copy():
        out = np.empty_like(x_np)
        return lambda: np.copyto(out, x_np)

    def tf_copy():
        x = tf.constant(x_np)
        copy = tf.function(lambda a: tf.raw_ops.DeepCopy(x=a)[(0,) * a.shape.rank])
        return lambda: copy(x).numpy()

    return [Contender("copy (numpy)", REFERENCE, numpy_copy),
            Contender("copy (tf)", REFERENCE, tf_copy)]


def section_layer(report, config, args, rng):
    bandwidth = "bandwidth" in args.sections
    for name, shape, axis in config["layer_cases"]:
        x_np = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
        dy_np = rng.standard_normal(shape, dtype=np.float32)
        for mode in ("training", "inference"):
            contenders = layer_contenders(x_np, dy_np, axis, mode == "training")
            if bandwidth:
                contenders += copy_contenders(x_np)
            group = measure(report, "layer",
                            f"{name} {'x'.join(map(str, shape))} axis={axis} {mode}",
                            contenders, config["layer_reps"], config["warmup"],
                            params={"shape_name": name, "shape": list(shape), "axis": axis,
                                    "mode": mode, "bytes": int(x_np.nbytes)})
            if bandwidth:
                add_bandwidth(report, group)


def add_bandwidth(report, layer_group):
    """The layer comparison's times as GB/s and as fractions of the fastest copy."""
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


def conv_net(image_shape, blocks, make_bn):
    """`blocks` times conv -> batch norm -> ReLU (pooling between), then a classifier."""
    import keras

    layers = [keras.Input(image_shape)]
    for block in range(blocks):
        if block:
            layers.append(keras.layers.MaxPooling2D())
        layers += [keras.layers.Conv2D(32, 3, padding="same", use_bias=False), make_bn(),
                   keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(NUM_CLASSES)]
    return keras.Sequential(layers)


def distributed_step(strategy, model, x_np, y_np):
    """A callable running one custom-loop SGD step of `model` under `strategy`, the
    global batch split evenly over the replicas, and fetching the loss."""
    import keras
    import tensorflow as tf

    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    per_replica = len(x_np) // strategy.num_replicas_in_sync

    def shard(array):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(array[
                context.replica_id_in_sync_group * per_replica:
                (context.replica_id_in_sync_group + 1) * per_replica]))

    x, y = shard(x_np), shard(y_np)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / len(x_np)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    return lambda: step(x, y).numpy()


def section_sync(report, config, args, rng):
    import keras
    import tensorflow as tf

    import kerasbn

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < REPLICAS:
        report.skip("sync", "all", f"needs {REPLICAS} logical CPU devices, found "
                    f"{len(devices)} (TensorFlow was initialized before the split)")
        return
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:REPLICAS]])
    batch, image = config["sync_batch"], config["sync_image"]
    x_np = rng.standard_normal((batch,) + image, dtype=np.float32)
    y_np = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)

    def run(layer_class, synchronized):
        def make():
            with strategy.scope():
                model = conv_net(image, config["sync_blocks"], lambda: layer_class(
                    synchronized=synchronized, epsilon=EPSILON, momentum=MOMENTUM))
            return distributed_step(strategy, model, x_np, y_np)
        return make

    contenders = [Contender("kerasbn sync", OURS, run(kerasbn.BatchNormalization, True)),
                  Contender("kerasbn", OURS, run(kerasbn.BatchNormalization, False)),
                  Contender("keras sync", THEIRS, run(keras.layers.BatchNormalization, True)),
                  Contender("keras", THEIRS, run(keras.layers.BatchNormalization, False))]
    measure(report, "sync",
            f"conv net ({config['sync_blocks']} conv+BN) {'x'.join(map(str, (batch,) + image))}"
            f" on {REPLICAS} replicas",
            contenders, config["sync_reps"], config["warmup"],
            params={"batch": batch, "image": list(image), "replicas": REPLICAS,
                    "blocks": config["sync_blocks"]},
            pairs=[("kerasbn sync", "kerasbn"), ("kerasbn sync", "keras sync"),
                   ("keras sync", "keras")])


# ------------------------------------------------------------------ resnet, export


def attribute(report, section, module, name):
    """module.name, or None after skipping the section with the reason."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        report.skip(section, "all", f"{module}.{name} is not available ({describe(error)})")
        return None


def section_resnet(report, config, args, rng):
    import keras

    build_model = attribute(report, "resnet", "training.models", "build_model")
    if build_model is None:
        return
    batch, image = config["resnet_batch"], tuple(config["resnet_image"])
    x = rng.standard_normal((batch,) + image, dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    weights = build_model("resnet", image, NUM_CLASSES, bn="kerasbn").get_weights()

    def run(bn, xla):
        def make():
            model = build_model("resnet", image, NUM_CLASSES, bn=bn)
            model.set_weights(weights)
            model.compile(optimizer=keras.optimizers.SGD(0.01),
                          loss="sparse_categorical_crossentropy", jit_compile=xla)
            return lambda: model.train_on_batch(x, y)
        return make

    contenders = [Contender("kerasbn", OURS, run("kerasbn", False)),
                  Contender("keras", THEIRS, run("keras", False))]
    if config["resnet_xla"]:
        contenders += [Contender("kerasbn XLA", OURS, run("kerasbn", True)),
                       Contender("keras XLA", THEIRS, run("keras", True))]
    measure(report, "resnet",
            f"ResNet train step {'x'.join(map(str, (batch,) + image))}",
            contenders, config["resnet_reps"], config["warmup"],
            params={"batch": batch, "image": list(image)},
            pairs=[("kerasbn", "keras"), ("kerasbn XLA", "keras XLA"),
                   ("kerasbn", "keras XLA"), ("kerasbn XLA", "keras")])


def serving_call(path):
    """A callable x -> output (fetched) of the SavedModel's serving signature."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1]

    def call(x):
        return next(iter(signature(**{input_name: x}).values())).numpy()

    call.loaded = loaded  # keeps the restored objects alive
    return call


def section_export(report, config, args, rng):
    import tensorflow as tf

    build_model = attribute(report, "export", "training.models", "build_model")
    export_saved_model = attribute(report, "export", "kerasbn.export", "export_saved_model")
    if build_model is None or export_saved_model is None:
        return
    image = tuple(config["resnet_image"])
    model = build_model("resnet", image, NUM_CLASSES, bn="kerasbn")
    for _ in range(3):  # moving statistics away from their initial values
        model(rng.standard_normal((8,) + image, dtype=np.float32) + 0.3, training=True)
    options = {"verify": False} \
        if "verify" in inspect.signature(export_saved_model).parameters else {}
    workdir = tempfile.TemporaryDirectory(prefix="kerasbn-bench-")

    def ours(model, name, fold):
        return lambda: serving_call(export_saved_model(
            model, os.path.join(workdir.name, name), fold=fold, **options))

    def keras_export(model, name):
        def export():
            path = os.path.join(workdir.name, name)
            model.export(path, verbose=False)
            return serving_call(path)
        return export

    exports = [("kerasbn export folded", OURS, ours(model, "folded", True)),
               ("keras export", THEIRS, keras_export(model, "keras"))]
    if config["export_all"]:
        twin = build_model("resnet", image, NUM_CLASSES, bn="keras")
        twin.set_weights(model.get_weights())
        no_bn = build_model("resnet", image, NUM_CLASSES, bn="none")
        exports += [("keras export, stock BN", THEIRS, keras_export(twin, "keras_stock_bn")),
                    ("kerasbn export unfolded", REFERENCE, ours(model, "unfolded", False)),
                    ("no BN, kerasbn export", REFERENCE, ours(no_bn, "no_bn", True))]
    served = {}
    for name, role, export in exports:
        try:
            served[name] = (role, export())
        except Exception as error:  # noqa: BLE001
            report.skip("export", name, describe(error))
    for batch in config["export_batches"]:
        x = tf.constant(rng.standard_normal((batch,) + image, dtype=np.float32))
        contenders = [Contender(name, role, lambda call=call: (lambda: call(x)))
                      for name, (role, call) in served.items()]
        measure(report, "export", f"ResNet serving batch {batch}", contenders,
                config["export_reps"], config["warmup"], params={"batch": batch},
                pairs=[("kerasbn export folded", name) for name in served
                       if name != "kerasbn export folded"])
    workdir.cleanup()


# ------------------------------------------------------------------ targets


def targets(report):
    """The issue's targets on this run's medians. "kerasbn" is its fastest variant
    in the comparison, the contender the fastest of the kind named."""
    checks = []

    def fastest(group, names):
        times = [group["contenders"][n]["median_ms"] for n in names
                 if n in group["contenders"]]
        return min(times) if times else None

    def check(target, ours, theirs, limit, strictly=False):
        if ours is not None and theirs is not None:
            ratio = ours / theirs
            checks.append({"target": target, "ratio": ratio, "limit": limit,
                           "met": ratio < limit if strictly else ratio <= limit})

    for group in report.groups:
        section, params, names = group["section"], group["params"], group["contenders"]
        if section == "layer" and params["mode"] == "training" \
                and params["shape_name"] in ("NHWC", "dense"):
            ours = fastest(group, [n for n in names if names[n]["role"] == OURS])
            torch_names = [n for n in names if n.startswith("torch")]
            check(f"layer training {params['shape_name']}: kerasbn / fastest TensorFlow",
                  ours, fastest(group, ["keras", "keras XLA", "tf_keras"]), 0.8)
            check(f"layer training {params['shape_name']}: kerasbn / fastest PyTorch",
                  ours, fastest(group, torch_names), 1.0)
        elif section == "sync":
            check("sync: kerasbn synchronized / unsynchronized",
                  fastest(group, ["kerasbn sync"]), fastest(group, ["kerasbn"]), 1.15)
            check("sync: kerasbn synchronized / Keras synchronized",
                  fastest(group, ["kerasbn sync"]), fastest(group, ["keras sync"]), 1.0,
                  strictly=True)
        elif section == "resnet":
            check("resnet step: kerasbn / keras", fastest(group, ["kerasbn"]),
                  fastest(group, ["keras"]), 1.0)
            check("resnet step: kerasbn XLA / keras XLA", fastest(group, ["kerasbn XLA"]),
                  fastest(group, ["keras XLA"]), 1.0)
        elif section == "export":
            check(f"export batch {params['batch']}: folded / fastest Keras export",
                  fastest(group, ["kerasbn export folded"]),
                  fastest(group, ["keras export", "keras export, stock BN"]), 0.85)
    return checks


# ------------------------------------------------------------------ output


def table(headers, rows, markdown=False):
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
    """Rows: each contender's median (or bandwidth), and the ratio of each of ours to it."""
    results = group["contenders"]
    if group["section"] == "bandwidth":
        return (("contender", "median ms", "GB/s", "fraction of copy"),
                [(n, r["median_ms"], r["gbps"], r["fraction"]) for n, r in results.items()])
    numerators = list(dict.fromkeys(r["numerator"] for r in group["ratios"]))
    ratio = {(r["numerator"], r["denominator"]): r["ratio"] for r in group["ratios"]}
    return (("contender", "median ms", "p25-p75 ms") + tuple(f"{n} / it" for n in numerators),
            [(n, r["median_ms"], f"{r['p25_ms']:.3f}-{r['p75_ms']:.3f}")
             + tuple(ratio.get((m, n), "") for m in numerators)
             for n, r in results.items()])


def render(report, markdown=False):
    title = (lambda text: f"\n#### {text}\n") if markdown else (lambda text: f"\n{text}")
    parts = []
    for group in report.groups:
        headline = f"{group['section']}: {group['case']}"
        if group["section"] == "bandwidth":
            headline += (f" ({group['params']['bytes_moved'] / 1e6:.1f} MB moved a call; "
                         f"fastest copy {group['params']['fastest_copy_gbps']:.1f} GB/s)")
        parts += [title(headline), table(*group_table(group), markdown=markdown)]
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


def write_chart(report, path):
    """One horizontal bar chart per comparison: medians with their interquartile range
    (fractions of the copy bandwidth for bandwidth): kerasbn blue, contenders orange,
    references grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in report.groups if g["contenders"]]
    rows = max(1, (len(groups) + 1) // 2)
    figure, axes = plt.subplots(rows, 2, figsize=(14, 2.8 * rows), squeeze=False)
    colors = {OURS: "tab:blue", THEIRS: "tab:orange", REFERENCE: "tab:gray"}
    for ax, group in zip(axes.flat, groups):
        results = group["contenders"]
        names = list(results)
        if group["section"] == "bandwidth":
            values, spread, label = [results[n]["fraction"] for n in names], None, \
                "fraction of copy bandwidth"
        else:
            values, label = [results[n]["median_ms"] for n in names], "median ms"
            spread = [[results[n]["median_ms"] - results[n]["p25_ms"] for n in names],
                      [results[n]["p75_ms"] - results[n]["median_ms"] for n in names]]
        ax.barh(names, values, xerr=spread, capsize=2,
                color=[colors[results[n]["role"]] for n in names])
        ax.invert_yaxis()
        ax.set_title(f"{group['section']}: {group['case']}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs(report, args, config, info, started, argv):
    """results.json, results.png (if matplotlib is there) and results.md under --out."""
    os.makedirs(args.out, exist_ok=True)
    paths = {name: os.path.join(args.out, name)
             for name in ("results.json", "results.png", "results.md")}
    try:
        write_chart(report, paths["results.png"])
    except ImportError as error:
        report.skip("chart", "results.png", f"matplotlib is not installed ({error}); "
                    "pip install -e '.[bench]'")
        del paths["results.png"]
    command = " ".join(["python -m training.benchmark"] + list(argv))
    document = {
        "command": command,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "sections": args.sections,
        "config": config,
        "bytes_moved": {k: f"{v} x size of x" for k, v in BYTES_MOVED.items()},
        "machine": info,
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
    with open(paths["results.json"], "w") as f:
        json.dump(document, f, indent=1)
    versions = info["versions"]
    with open(paths["results.md"], "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {info['cpu_model']}, {info['nproc']} "
                f"cores, {info['threads']} threads for TensorFlow and PyTorch; TensorFlow "
                f"{versions['tensorflow']}, Keras {versions['keras']}, tf_keras "
                f"{versions['tf_keras']}, PyTorch {versions['torch']}; load average at "
                f"start {info['load_average_at_start']}.\n" + render(report, markdown=True))
    return list(paths.values())


# ------------------------------------------------------------------ main

SECTION_FUNCTIONS = {"layer": section_layer, "sync": section_sync,
                     "resnet": section_resnet, "export": section_export}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.time()
    config = dict(QUICK if args.quick else FULL)
    if args.reps is not None:
        config.update({key: args.reps for key in config if key.endswith("_reps")})
    threads = usable_cores()
    report = Report()
    report.notes += configure(threads, REPLICAS if "sync" in args.sections else 1)
    info = machine_info(threads)
    load = info["load_average_at_start"][0]
    if load > 0.5:
        report.notes.append(f"The 1-minute load average was {load:.2f} at the start: "
                            "something else was using the CPU, so times are noisier.")
    versions = info["versions"]
    print(f"kerasbn benchmark ({'quick' if args.quick else 'full'}), sections "
          f"{','.join(args.sections)}: {info['cpu_model']}, {threads} threads; TensorFlow "
          f"{versions['tensorflow']}, Keras {versions['keras']}, tf_keras "
          f"{versions['tf_keras']}, PyTorch {versions['torch']}", flush=True)
    runs = [("layer" if s == "bandwidth" else s) for s in args.sections]
    if "layer" in runs:
        for name, install in (("tf_keras", "pip install -e '.[bench]'"),
                              ("torch", "pip install torch==2.13.0")):
            if versions[name] is None:
                report.skip("layer", name, f"{name} is not installed ({install})")
    rng = np.random.default_rng(0)
    for section in dict.fromkeys(runs):
        SECTION_FUNCTIONS[section](report, config, args, rng)
    info["load_average_at_end"] = list(os.getloadavg())
    paths = write_outputs(report, args, config, info, started, argv)
    print("\nRatios of medians (kerasbn / contender; below 1: kerasbn is faster)")
    print(render(report))
    for note in report.notes:
        print(f"Note: {note}")
    for path in paths:
        print(f"Wrote {path}")
    print(f"Results directory: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
