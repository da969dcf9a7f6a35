"""`python -m training.benchmark.first_step`: one fresh process's time to its first steps.

    python -m training.benchmark.first_step --model mobilenet --bn kerasbn \\
        --replicas 4 --xla off --spawned-at "$(date +%s.%N)"

Builds a model (Keras's MobileNetV2, alpha 0.35, 10 classes, converted with
`kerasbn.convert_to_kerasbn` for --bn kerasbn; or training.models' ResNet with kerasbn's
or Keras's batch norm), compiles it and runs one `fit` of a few steps on random data,
on one device or on a MirroredStrategy over logical CPU replicas (set up by
`training.runtime.configure_runtime` and `make_strategy`), and prints one line,
"first_step: " and a JSON dict of wall times in seconds, counted from --spawned-at (the
parent's clock just before it started this process):

    python_s      until this module's first line: the interpreter's start-up
    imports_s     then TensorFlow, Keras (and kerasbn where the model needs it) imported,
                  the devices set up
    build_s       then the model built (and converted), its variables made in the
                  strategy's scope (a converted model's: its copy's, see `build`)
    convert_s     of build_s, the time `convert_to_kerasbn` took (0 when nothing is
                  converted: the stock models, and the ResNet written with kerasbn)
    clone_s       for a converted model, the time Keras then takes to copy the same
                  stock model with its weights (`keras_copy_time`; made after the
                  conversion and thrown away; counted in no other time; 0 when
                  nothing is converted)
    fit_s         then `compile` and the first `fit` trained: to the end of its last step
                  (Keras's `on_train_end`, see `training_end_callback`)
    first_step_s  build_s + fit_s: from before the model is built to the end of the
                  fit's last step
    total_s       from --spawned-at to the end of the fit's last step
    teardown_s    after the last step, until `fit` returned

A configuration that fails prints {"error": "<type>: <first line>"} and exits with 1.
The parent side is `run_fresh` (one process) and `fresh_processes` (a configuration's
processes, alternating); the first_step section of the benchmark runs them.
"""

import time

STARTED = time.time()  # noqa: E402 - before anything else this process imports

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

from training.benchmark.harness import describe  # noqa: E402

MARKER = "first_step: "
MODELS = ("mobilenet", "resnet")
BATCH_NORMS = ("kerasbn", "keras")
XLA = ("off", "step", "plan")
NUM_CLASSES = 10
REPO = Path(__file__).resolve().parents[2]


def build_parser():
    """The argument parser of `python -m training.benchmark.first_step`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark.first_step",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--bn", choices=BATCH_NORMS, required=True)
    parser.add_argument("--replicas", type=int, default=1,
                        help="logical CPU replicas of a MirroredStrategy (1: one device)")
    parser.add_argument("--xla", choices=XLA, default="off",
                        help="off: compile(jit_compile=False); step: jit_compile=True; "
                        "plan: training.runtime's plan for --xla (auto-clustering on "
                        "CPU replicas: MobileNetV2 on 4 took 16 min to its first step "
                        "on 2 busy cores)")
    parser.add_argument("--image", default="32,32,3", help="height,width,channels")
    parser.add_argument("--batch", type=int, default=32, help="the global batch")
    parser.add_argument("--steps", type=int, default=2, help="steps of the first fit")
    parser.add_argument("--spawned-at", type=float, default=None,
                        help="the parent's time.time() before it started this process "
                        "(default: this module's first line)")
    return parser


def command(model, bn, replicas, xla, image, batch, steps):
    """The command line of a fresh process for one configuration (see `run_fresh`)."""
    return [sys.executable, "-m", "training.benchmark.first_step", "--model", model,
            "--bn", bn, "--replicas", str(replicas), "--xla", xla,
            "--image", ",".join(map(str, image)), "--batch", str(batch),
            "--steps", str(steps)]


def run_fresh(argv, timeout):
    """Runs `argv` (a `command`) as a fresh process and reads its times.

    Args:
        argv: the command line; "--spawned-at" and the time are appended.
        timeout: seconds after which the process is killed.

    Returns:
        The process's dict: its times (see the module docstring), or {"error": ...}
        with the process's own error, the last line it wrote to stderr, or the
        timeout.
    """
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    spawned_at = time.time()
    try:
        process = subprocess.run(argv + ["--spawned-at", repr(spawned_at)], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no first step within {timeout:.0f} s"}
    lines = [line for line in process.stdout.splitlines() if line.startswith(MARKER)]
    if lines:
        return json.loads(lines[-1][len(MARKER):])
    stderr = process.stderr.strip().splitlines()
    return {"error": stderr[-1] if stderr else f"exit status {process.returncode}"}


def fresh_processes(config, report, case, name):
    """Runs `case` (a `config.FirstStepCase`) in fresh processes, kerasbn's and keras's
    in turn, `config.first_step_reps` times each; a contender whose process fails is
    recorded in `report` (a `harness.Report`) as not runnable here, under the
    comparison's `name`, and not run again.

    Returns:
        A dict "kerasbn"/"keras" -> the times of its processes (`first_step`'s dicts).
    """
    processes, failed = {"kerasbn": [], "keras": []}, set()
    for rep in range(config.first_step_reps):
        for bn in (("kerasbn", "keras") if rep % 2 == 0 else ("keras", "kerasbn")):
            if bn in failed:
                continue
            result = run_fresh(command(
                case.model, bn, case.replicas, case.xla, config.first_step_image,
                config.first_step_batch, config.first_step_steps),
                config.first_step_timeout)
            if "error" in result:
                failed.add(bn)
                report.skip("first_step", f"{bn} ({name})",
                            f"not runnable here: {result['error']}")
                continue
            processes[bn].append(result)
            print(f"    {bn:<8} process {rep + 1}: build to first step "
                  f"{result['first_step_s']:.1f} s (build {result['build_s']:.1f}, compile "
                  f"and fit {result['fit_s']:.1f}; then {result['teardown_s']:.1f} until fit "
                  f"returned); imports {result['imports_s']:.1f} s, "
                  f"from process start {result['total_s']:.1f} s", flush=True)
    return processes


class Built(NamedTuple):
    """What `build` returns.

    Attributes:
        model: the model that trains.
        convert_s: the seconds its conversion took (0.0 when it was not converted).
        original: the stock model it was converted from (None when not converted).
    """

    model: object
    convert_s: float
    original: object = None


def build(model_name, bn, image, strategy):
    """The model of the configuration, uncompiled, its variables made in `strategy`'s
    scope: MobileNetV2 (converted to kerasbn for `bn` "kerasbn"), or the ResNet with
    `bn`'s batch norms.

    The converted MobileNetV2 is made as README shows a user (Distributed training,
    "Converting an existing model"): the stock model built outside the scope, its
    copy, the model that trains, made inside it by `convert_to_kerasbn`.

    Returns:
        A `Built`.
    """
    import keras

    if model_name == "resnet":
        from training.models import build_model

        with strategy.scope():
            return Built(build_model("resnet", image, NUM_CLASSES, bn=bn), 0.0)
    if bn != "kerasbn":
        with strategy.scope():
            return Built(keras.applications.MobileNetV2(
                alpha=0.35, input_shape=image, weights=None, classes=NUM_CLASSES), 0.0)
    import kerasbn

    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=image, weights=None,
                                          classes=NUM_CLASSES)
    started = time.perf_counter()
    with strategy.scope():
        model = kerasbn.convert_to_kerasbn(base, synchronized=False)
    return Built(model, time.perf_counter() - started, base)


def keras_copy_time(model, strategy):
    """The seconds Keras takes to copy `model` with its weights in `strategy`'s scope,
    as `convert_to_kerasbn` copies it: `keras.models.clone_model` (new layers, new
    weights) then `set_weights(model.get_weights())`. The reference for the
    conversion's cost; the copy is thrown away."""
    import keras

    started = time.perf_counter()
    with strategy.scope():
        keras.models.clone_model(model).set_weights(model.get_weights())
    return time.perf_counter() - started


def training_end_callback():
    """A Keras callback whose `ended` is the time of `on_train_end`: the end of a fit's
    last step, its logs fetched.

    `fit` returns later, once it has let go of its input pipeline, and with TensorFlow
    2.21 that can take seconds of idle waiting. Measured in fresh processes of the
    ResNet compiled whole, for either batch norm: 0 to 2.4 s, with 0.003 s of CPU time
    in the whole wait; with tf.data's autotuning off
    (`tf.data.Options().autotune.enabled = False`) it was gone in 10 processes of 10.
    Our reading, not a trace: the wait is on tf.data's autotuning thread, which sleeps
    between optimizations for a period that doubles as the pipeline lives. It is no
    part of the model's first step and falls on either library at random, so
    `first_fit`'s times stop at the last step and report the wait on its own
    (`teardown_s`).
    """
    import keras

    class TrainingEnd(keras.callbacks.Callback):
        ended = None

        def on_train_end(self, logs=None):
            self.ended = time.time()

    return TrainingEnd()


def first_fit(args, spawned_at):
    """Sets up the devices, builds, compiles and fits; returns the times (seconds
    since `spawned_at`) of the module docstring."""
    from training.runtime import configure_runtime, make_strategy

    runtime = configure_runtime(replicas=args.replicas, xla=args.xla == "plan")
    import keras
    import numpy as np

    if args.bn == "kerasbn" or args.model == "resnet":  # training.models imports it
        importlib.import_module("kerasbn")  # here, so that its import counts as one
    strategy = make_strategy(runtime)
    image = tuple(int(n) for n in args.image.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch * args.steps,) + image, dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, len(x)).astype(np.int32)
    imported = time.time()
    model, convert_s, original = build(args.model, args.bn, image, strategy)
    built = time.time()
    clone_s = 0.0 if original is None else keras_copy_time(original, strategy)
    compiling = time.time()
    with strategy.scope():
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy",
                      jit_compile={"off": False, "step": True,
                                   "plan": runtime.xla.step_jit_compile}[args.xla])
    training_end = training_end_callback()
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=[training_end])
    returned = time.time()
    trained = training_end.ended
    fit_s = trained - compiling
    return {"python_s": STARTED - spawned_at, "imports_s": imported - STARTED,
            "build_s": built - imported, "convert_s": convert_s, "clone_s": clone_s,
            "fit_s": fit_s, "first_step_s": built - imported + fit_s,
            "total_s": trained - spawned_at - clone_s, "teardown_s": returned - trained}


def main(argv=None):
    """Runs one configuration and prints its line; returns the exit status."""
    args = build_parser().parse_args(argv)
    spawned_at = STARTED if args.spawned_at is None else args.spawned_at
    try:
        result, status = first_fit(args, spawned_at), 0
    except Exception as error:  # noqa: BLE001 - reported as "not runnable here"
        result, status = {"error": describe(error)}, 1
    print(MARKER + json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
