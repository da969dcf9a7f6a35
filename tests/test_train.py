"""Tests of training.train: the command line end to end, XLA, replicas, resumption,
the population-statistics pass and the batch-norm option flags.

Runs that need a fresh TensorFlow (XLA auto-clustering must be switched on before it
starts) run `python -m training.train` as subprocesses, launched when this module's first
test starts so that they run while the in-process tests do; the in-process runs use the
4 logical CPU devices conftest.py makes. Most runs train the MLP for 2 epochs of 2
steps on "digits" (prepared into a temporary tfds data dir), from the same seed, with
batch-norm momentum 0.5 so that the moving statistics end far from their initial
values and a wrong or missing update shows; each ends with the population pass (one
pass over the training split, its last batch partial), so the weights compared across
devices, workers and XLA include the recomputed statistics. One run is the program's
defaults (the ResNet, 2 full epochs, momentum 0.99) on one device: the accuracy target
of the population pass. The same command on 4 replicas with XLA is not run here (2 CPU
minutes): the MLP runs show that 4 synchronized replicas, with or without XLA, and 2
workers reach the weights of one device.
"""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn  # noqa: F401  (registers kerasbn.BatchNormalization for loading checkpoints)
import workers
from training import data, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_SECONDS = 420
RUN_FLAGS = ["--model", "mlp", "--epochs", "2", "--steps-per-epoch", "2",
             "--batch-size", "64", "--learning-rate", "0.1", "--bn-momentum", "0.5",
             "--seed", "3"]
BATCH_NORM_LAYERS = ("hidden1_bn", "hidden2_bn", "hidden3_bn")
FINAL_LINE = re.compile(r"^final: test_accuracy=(\d\.\d{4}) examples_per_second=(\d+\.\d) "
                        r"test_accuracy_moving_averages=(\d\.\d{4}) "
                        r"statistics=(population|moving_averages|none) checkpoint=(\S+)$")
# The flags of the accuracy targets: the defaults, 2 epochs (46 steps at momentum 0.99,
# which move the moving averages only 37% of the way from their initial values).
TARGET_FLAGS = ["--epochs", "2"]
TARGET_ACCURACY = 0.95
# XLA ↔ no XLA, and 4 replicas ↔ 1 device, after 4 SGD steps.
XLA_TOLERANCE = 1e-4
REPLICA_TOLERANCE = 1e-5


# ------------------------------------------------------------------ fixtures


@dataclasses.dataclass
class Process:
    """A `python -m training.train` subprocess; `finished()` waits for it."""

    popen: subprocess.Popen
    out: str
    dump: str
    stdout_path: str
    stderr_path: str

    def finished(self, timeout=SUBPROCESS_TIMEOUT_SECONDS):
        self.popen.wait(timeout=timeout)
        with open(self.stdout_path) as f:
            self.stdout = f.read()
        with open(self.stderr_path) as f:
            self.stderr = f.read()
        return self


def launch(tmp_path, name, flags, dump=False):
    out = os.path.join(tmp_path, name)
    os.makedirs(out)
    env = {key: value for key, value in os.environ.items()
           if key not in ("TF_XLA_FLAGS", "XLA_FLAGS", "PYTEST_CURRENT_TEST")}
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    dump_dir = os.path.join(out, "xla_dump")
    if dump:
        env["XLA_FLAGS"] = f"--xla_dump_to={dump_dir}"
    stdout_path, stderr_path = os.path.join(out, "stdout"), os.path.join(out, "stderr")
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "training.train", *flags, "--out", os.path.join(out, "run")],
            cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    return Process(popen, os.path.join(out, "run"), dump_dir, stdout_path, stderr_path)


@pytest.fixture(scope="module")
def processes(tmp_path_factory, digits_data_dir):
    """The subprocess runs, all started at once."""
    tmp = os.fspath(tmp_path_factory.mktemp("processes"))
    flags = RUN_FLAGS + ["--data-dir", digits_data_dir]
    started = {
        "bad_dataset": launch(tmp, "bad_dataset",
                              ["--dataset", "no_such_dataset", "--data-dir", digits_data_dir]),
        "one_device_xla": launch(tmp, "one_device_xla", flags + ["--xla"], dump=True),
        # --try-whole-step: first the whole step, which TensorFlow refuses on CPU
        # replicas, then the fallback (auto-clustering and the layers' programs).
        "replicas_xla": launch(
            tmp, "replicas_xla",
            flags + ["--replicas", "4", "--sync-bn", "--xla", "--try-whole-step"], dump=True),
    }
    yield started
    for process in started.values():
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_processes_first(processes):
    """Starts the subprocesses before this module's first test."""


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, digits_data_dir):
    """`train.main` in this process, returning its results; runs are cached by name."""
    tmp = tmp_path_factory.mktemp("in_process")
    cache = {}

    def run(name, *flags):
        if name not in cache:
            cache[name] = train.main(RUN_FLAGS + ["--data-dir", digits_data_dir, *flags,
                                                  "--out", os.fspath(tmp / name)])
        return cache[name]

    return run


def one_device_plain(in_process):
    return in_process("one_device_plain", "--no-xla")


def replicas_plain(in_process):
    return in_process("replicas_plain", "--no-xla", "--replicas", "4", "--sync-bn")


def one_device_without_the_pass(in_process):
    return in_process("one_device_without_the_pass", "--no-xla",
                      "--no-population-statistics")


def weights_of(checkpoint):
    """{variable path: value} of a saved model, moving statistics included."""
    model = keras.models.load_model(checkpoint)
    return {variable.path: keras.ops.convert_to_numpy(variable) for variable in model.weights}


def assert_same_weights(a, b, atol):
    assert list(a) == list(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=0, atol=atol, err_msg=path)


def assert_statistics_moved(weights):
    """The moving statistics are far from their initial 0 and 1: equality means something."""
    for layer in BATCH_NORM_LAYERS:
        assert np.max(np.abs(weights[f"{layer}/moving_mean"])) > 0.05, layer
        assert np.max(np.abs(weights[f"{layer}/moving_variance"] - 1.0)) > 0.05, layer


@dataclasses.dataclass
class FinalLine:
    """The final line's values, in its order."""

    test_accuracy: float
    examples_per_second: float
    test_accuracy_moving_averages: float
    statistics: str
    checkpoint: str


def final_line(stdout):
    lines = stdout.strip().splitlines()
    match = FINAL_LINE.match(lines[-1])
    assert match, f"last line is not the final line: {lines[-1]!r}"
    accuracy, speed, moving, statistics, checkpoint = match.groups()
    return FinalLine(float(accuracy), float(speed), float(moving), statistics, checkpoint)


def hlo_modules(dump_dir, name_pattern):
    """{module file name: HLO text before optimizations} of the dumped modules matching."""
    modules = {}
    for path in glob.glob(os.path.join(dump_dir, "module_*.before_optimizations.txt")):
        if re.search(name_pattern, os.path.basename(path)):
            with open(path) as f:
                modules[os.path.basename(path)] = f.read()
    return modules


def op_names(hlo_texts):
    """The TensorFlow op names XLA's metadata attributes the HLO instructions to."""
    names = set()
    for text in hlo_texts:
        names.update(re.findall(r'op_name="([^"]*)"', text))
    return names


def summaries(log_dir):
    """{tag: [(step, value as array)]} of every tf.summary event file under log_dir."""
    found = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, tf.make_ndarray(value.tensor)))
    return found


# ------------------------------------------------------------------ command line


def test_help_explains_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--dataset", "--data-dir", "--model", "--epochs", "--batch-size",
                 "--learning-rate", "--bn", "--bn-momentum", "--replicas",
                 "--multi-worker", "--sync-bn", "--no-sync-bn", "--xla", "--no-xla",
                 "--mixed-precision", "--out", "--seed", "--steps-per-epoch",
                 "--interrupt-after-epoch", "--download", "--no-download",
                 "--population-statistics", "--no-population-statistics",
                 "--population-batches", "--virtual-batch-size", "--renorm",
                 "--bn-momentum-warmup"):
        assert flag in text, flag
    assert "{resnet,mlp}" in text and "{kerasbn,keras,none}" in text
    assert "{off,float16,bfloat16}" in text


@pytest.mark.parametrize("flags", [["--model", "vgg"], ["--bn", "batchnorm"],
                                   ["--epochs", "0"], ["--batch-size", "-1"],
                                   ["--learning-rate", "0"], ["--bn-momentum", "high"],
                                   ["--mixed-precision", "float8"],
                                   ["--population-batches", "0"],
                                   ["--virtual-batch-size", "four"]])
def test_bad_flags_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_unknown_dataset_exits_2_with_one_line_naming_digits(processes):
    process = processes["bad_dataset"].finished()
    assert process.popen.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert "'no_such_dataset'" in lines[0] and "--dataset digits" in lines[0]
    assert "offline default" in lines[0]
    assert process.stdout == ""


def test_a_dataset_not_held_with_downloads_off_exits_2_naming_digits(tmp_path, capfd):
    code = train.run(RUN_FLAGS + ["--dataset", "mnist", "--no-download", "--no-xla",
                                  "--data-dir", os.fspath(tmp_path / "empty"),
                                  "--out", os.fspath(tmp_path / "run")])
    assert code == train.EXIT_DATASET_UNAVAILABLE
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'mnist'" in err[0] and "--dataset digits" in err[0], err
    assert not os.path.exists(tmp_path / "run" / train.CHECKPOINT_NAME)


def one_line_on_stderr(capfd):
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("batch_size, nearest", [(30, "28 or 32"), (3, "4")])
def test_a_batch_that_does_not_split_across_the_replicas_is_refused_in_one_line(
        batch_size, nearest, tmp_path, capfd):
    # It used to print "7-8 per replica" and die in a TensorFlow traceback in fit.
    out = tmp_path / "run"
    code = train.run(["--replicas", "4", "--batch-size", str(batch_size), "--no-xla",
                      "--out", os.fspath(out)])
    assert code == train.EXIT_USAGE
    line = one_line_on_stderr(capfd)
    assert line.startswith(f"error: --batch-size {batch_size} ")
    assert "--replicas 4" in line and "multiple of 4" in line and nearest in line
    assert not out.exists()


def test_the_replicas_of_a_cluster_are_checked_too():
    train.check_batch_split(32, 4, "the replicas in sync")
    with pytest.raises(train.UsageError, match="--batch-size 30 .* 4 replicas"):
        train.check_batch_split(30, 4, "the replicas in sync")


@pytest.mark.parametrize("below", ["", "sub"], ids=["the-file", "below-the-file"])
def test_an_out_that_is_a_file_is_refused_in_one_line(below, tmp_path, capfd):
    # It used to end in a FileExistsError or NotADirectoryError traceback.
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    out = os.path.join(existing, below) if below else os.fspath(existing)
    assert train.run(["--no-xla", "--out", out]) == train.EXIT_USAGE
    line = one_line_on_stderr(capfd)
    assert line.startswith(f"error: --out {out}: ") and "is a file" in line
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("bn", ["kerasbn", "keras"])
@pytest.mark.parametrize("momentum", ["1.5", "-0.1", "nan"])
def test_a_momentum_the_layer_refuses_is_one_line_naming_the_flag(bn, momentum,
                                                                 digits_data_dir,
                                                                 tmp_path, capfd):
    code = train.run(RUN_FLAGS + ["--bn", bn, "--bn-momentum", momentum, "--no-xla",
                                  "--data-dir", digits_data_dir,
                                  "--out", os.fspath(tmp_path)])
    assert code == train.EXIT_USAGE
    line = one_line_on_stderr(capfd)
    # The flag, then the layer's own message: its argument and the value received.
    assert line.startswith(f"error: --bn-momentum {float(momentum)}: ")
    assert "`momentum`" in line and f"momentum={float(momentum)}" in line
    assert not (tmp_path / train.CHECKPOINT_NAME).exists()


def test_without_the_train_extra_one_line_names_it(tmp_path):
    # TensorBoard missing used to end in a TBNotInstalledError traceback from fit.
    program = ("import runpy, sys; sys.modules['tensorboard'] = None; "
               "sys.argv = ['training.train', '--no-xla', '--out', sys.argv[1]]; "
               "runpy.run_module('training.train', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", program, os.fspath(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_SECONDS)
    assert done.returncode == train.EXIT_USAGE, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: tensorboard is not installed; training.train needs the train extra: "
        "pip install -e '.[train]'"]
    assert done.stdout == ""


def test_names_that_moved_out_of_train_are_still_found_there():
    from training import callbacks

    assert train.training_stream is data.training_stream
    assert train.pass_seed is data.pass_seed
    assert train.TrainingInterrupted is callbacks.TrainingInterrupted
    with pytest.raises(AttributeError, match="no_such_name"):
        train.no_such_name  # noqa: B018


def test_xla_with_cpu_replicas_is_refused_once_tensorflow_runs(digits_data_dir, tmp_path,
                                                                capfd):
    # TensorFlow runs in this process, without auto-clustering: it can no longer be had.
    code = train.run(RUN_FLAGS + ["--replicas", "4", "--xla", "--data-dir", digits_data_dir,
                                  "--out", os.fspath(tmp_path)])
    assert code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fresh process" in err[0] and "TF_XLA_FLAGS" in err[0]


# ------------------------------------------------------------------ population statistics


def test_the_default_run_serves_population_statistics_above_the_target(
        digits_data_dir, tmp_path, capfd):
    # The program's defaults (the ResNet, momentum 0.99), 2 epochs: 46 updates leave the
    # moving averages 37% of the way to the data's statistics, and the test accuracy
    # with them was 0.10; the pass before the final evaluation makes it >= 0.95.
    results = train.main(TARGET_FLAGS + ["--data-dir", digits_data_dir,
                                         "--out", os.fspath(tmp_path)])
    out = capfd.readouterr().out
    print(out[-3000:])
    assert results["statistics"] == "population"
    assert results["test_accuracy"] >= TARGET_ACCURACY
    assert 0.0 <= results["test_accuracy_moving_averages"] <= 1.0
    summary = results["population_statistics"]
    assert (summary.batches, summary.examples, len(summary)) == (23, 1437, 9)
    final = final_line(out)
    assert final.test_accuracy == pytest.approx(results["test_accuracy"], abs=5e-5)
    assert final.test_accuracy_moving_averages == pytest.approx(
        results["test_accuracy_moving_averages"], abs=5e-5)


def test_the_moving_average_accuracy_is_that_of_a_run_without_the_pass(
        in_process, digits_data_dir):
    with_pass = one_device_plain(in_process)
    without = one_device_without_the_pass(in_process)
    assert (with_pass["statistics"], without["statistics"]) == ("population",
                                                                "moving_averages")
    assert without["population_statistics"] is None
    assert without["test_accuracy_moving_averages"] == without["test_accuracy"]
    # The same training: the moving-average evaluation of the one is the other's.
    assert with_pass["test_correct_moving_averages"] == without["test_correct"]
    assert with_pass["test_loss_moving_averages"] == pytest.approx(without["test_loss"],
                                                                   rel=1e-5)
    served, moving = weights_of(with_pass["checkpoint"]), weights_of(without["checkpoint"])
    assert_statistics_moved(served)
    for path in served:
        if path.endswith(("/moving_mean", "/moving_variance")):
            assert not np.allclose(served[path], moving[path], rtol=1e-3), path
        else:
            np.testing.assert_allclose(served[path], moving[path], rtol=0, atol=1e-6,
                                       err_msg=path)

    # The checkpoint holds what recompute_statistics gives the trained model over the
    # pass's batches: the program recomputes over the data it says it does.
    model = keras.models.load_model(without["checkpoint"])
    train_split, _, info = data.load("digits", data_dir=digits_data_dir)
    args = train.parse_args(RUN_FLAGS)
    batches = data.population_batches(train_split, args.batch_size, args.seed,
                                      args.epochs)
    kerasbn.recompute_statistics(model, batches, verbose=0)
    recomputed = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    for path in served:
        np.testing.assert_allclose(recomputed[path], served[path], rtol=1e-5, atol=1e-6,
                                   err_msg=path)


def test_the_pass_is_skipped_without_batch_norm(in_process, capfd):
    capfd.readouterr()
    results = in_process("no_batch_norm", "--no-xla", "--bn", "none")
    out = capfd.readouterr().out
    assert results["statistics"] == "none" and results["population_statistics"] is None
    assert results["test_accuracy_moving_averages"] == results["test_accuracy"]
    assert "population statistics: skipped (--bn none)" in out
    assert final_line(out).statistics == "none"


def test_renorm_layers_keep_their_statistics_and_the_run_says_so(in_process, capfd):
    # Renorm layers are trained on their own moving statistics (r and d), which serve
    # them better than population statistics (kerasbn.recompute_statistics).
    capfd.readouterr()
    results = in_process("keras_renorm", "--no-xla", "--bn", "keras", "--renorm",
                         "--population-batches", "5")
    out = capfd.readouterr().out
    summary = results["population_statistics"]
    assert len(summary) == 0 and summary.renorm_kept == BATCH_NORM_LAYERS
    assert "renorm, kept (recompute_renorm=True recomputes them): " in out
    assert results["statistics"] == "moving_averages"
    assert final_line(out).statistics == "moving_averages"
    assert results["test_accuracy"] == results["test_accuracy_moving_averages"]
    model = keras.models.load_model(results["checkpoint"])
    for name in BATCH_NORM_LAYERS:
        layer = model.get_layer(name)
        assert type(layer) is keras.layers.BatchNormalization and layer.renorm
        moving_variance = keras.ops.convert_to_numpy(layer.moving_variance)
        assert np.max(np.abs(moving_variance - 1.0)) > 0.05, name  # trained, not reset


# ------------------------------------------------------------------ batch-norm options


def test_ghost_batches_warmup_and_renorm_train_with_kerasbn(in_process, capfd):
    capfd.readouterr()
    results = in_process("kerasbn_options", "--no-xla", "--virtual-batch-size", "16",
                         "--bn-momentum-warmup", "--renorm")
    out = capfd.readouterr().out
    assert ("model: mlp, batch norm: kerasbn (synchronized), momentum_warmup=True, "
            "virtual_batch_size=16, renorm=True, mixed precision: off") in out
    # Renorm layers keep their statistics: the pass recomputed nothing.
    assert results["statistics"] == "moving_averages"
    assert 0.0 <= results["test_accuracy"] <= 1.0
    model = keras.models.load_model(results["checkpoint"])
    for name in BATCH_NORM_LAYERS:
        layer = model.get_layer(name)
        assert type(layer) is kerasbn.BatchNormalization
        assert (layer.virtual_batch_size, layer.momentum_warmup, layer.renorm) == (
            16, True, True)
        # 4 training updates counted.
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.update_count), 4)


@pytest.mark.parametrize("flags, line", [
    (["--virtual-batch-size", "8", "--bn", "keras"],
     "error: --virtual-batch-size 8 needs --bn kerasbn (kerasbn.BatchNormalization): "
     "keras.layers.BatchNormalization (--bn keras) has no such option"),
    (["--virtual-batch-size", "8", "--bn", "none"],
     "error: --virtual-batch-size 8 needs --bn kerasbn (kerasbn.BatchNormalization): "
     "--bn none has no batch norm"),
    (["--bn-momentum-warmup", "--bn", "keras"],
     "error: --bn-momentum-warmup needs --bn kerasbn (kerasbn.BatchNormalization): "
     "keras.layers.BatchNormalization (--bn keras) has no such option"),
    (["--renorm", "--bn", "none"],
     "error: --renorm needs --bn kerasbn (kerasbn.BatchNormalization) or --bn keras "
     "(keras.layers.BatchNormalization): --bn none has no batch norm"),
], ids=["ghost-keras", "ghost-none", "warmup-keras", "renorm-none"])
def test_an_option_the_batch_norm_does_not_have_is_one_line_naming_the_flag(
        flags, line, tmp_path, capfd):
    assert train.run(flags + ["--no-xla", "--out", os.fspath(tmp_path / "run")]) == \
        train.EXIT_USAGE
    assert one_line_on_stderr(capfd) == line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_virtual_batch_size_the_layer_refuses_is_one_line_naming_the_flag(
        size, digits_data_dir, tmp_path, capfd):
    code = train.run(RUN_FLAGS + ["--virtual-batch-size", size, "--no-xla",
                                  "--data-dir", digits_data_dir,
                                  "--out", os.fspath(tmp_path)])
    assert code == train.EXIT_USAGE
    line = one_line_on_stderr(capfd)
    # The flag, then the layer's own message: its argument and the value received.
    assert line.startswith(f"error: --virtual-batch-size {size}: BatchNormalization ")
    assert "`virtual_batch_size`" in line and f"virtual_batch_size={size}" in line
    assert not (tmp_path / train.CHECKPOINT_NAME).exists()


# ------------------------------------------------------------------ replicas, resumption


def test_four_synchronized_replicas_reach_the_weights_of_one_device(in_process):
    one = weights_of(one_device_plain(in_process)["checkpoint"])
    four = replicas_plain(in_process)
    assert four["replicas"] == 4
    replicated = weights_of(four["checkpoint"])
    assert_statistics_moved(one)
    assert_same_weights(one, replicated, REPLICA_TOLERANCE)


def test_an_interrupted_run_resumes_from_its_backup(in_process, digits_data_dir, tmp_path,
                                                    capfd):
    flags = RUN_FLAGS + ["--no-xla", "--replicas", "4", "--sync-bn",
                         "--data-dir", digits_data_dir,
                         "--out", os.fspath(tmp_path)]
    assert train.run(flags + ["--interrupt-after-epoch", "1"]) == train.EXIT_INTERRUPTED
    assert "stopped after epoch 1" in capfd.readouterr().err
    backup = tmp_path / train.BACKUP_DIR
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1
    assert not (tmp_path / train.CHECKPOINT_NAME).exists()
    # The backup holds the moving statistics of epoch 1, not the initial ones.
    model = keras.models.load_model(replicas_plain(in_process)["checkpoint"])
    model.load_weights(backup / "latest.weights.h5")
    moving_mean = keras.ops.convert_to_numpy(model.get_layer("hidden1_bn").moving_mean)
    assert np.max(np.abs(moving_mean)) > 0.05

    resumed = train.main(flags)
    assert (resumed["initial_epoch"], resumed["epochs_run"]) == (1, 1)
    assert len(resumed["history"]["loss"]) == 1
    assert "resuming from the backup" in capfd.readouterr().out
    assert not backup.exists()  # BackupAndRestore removes it once training is done
    # Weights, optimizer state and moving statistics all came back: the resumed run ends
    # exactly where the uninterrupted one did.
    assert_same_weights(weights_of(replicas_plain(in_process)["checkpoint"]),
                        weights_of(resumed["checkpoint"]), 1e-6)


# ------------------------------------------------------------------ end to end, XLA


def test_command_line_run_trains_saves_and_logs(processes, digits_data_dir):
    process = processes["one_device_xla"].finished()
    assert process.popen.returncode == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert "Epoch 2/2" in process.stdout  # Keras's progress bar, per epoch
    final = final_line(process.stdout)
    accuracy, checkpoint = final.test_accuracy, final.checkpoint
    assert final.examples_per_second > 0
    assert checkpoint == os.path.join(process.out, train.CHECKPOINT_NAME)
    assert f"checkpoint: {checkpoint}" in process.stdout

    # The checkpoint reloads and its test accuracy is the one printed.
    model = keras.models.load_model(checkpoint)
    _, test, _ = data.load("digits", data_dir=digits_data_dir)
    images, labels = next(iter(data.batched(test, 1000, shuffle=False)))
    predicted = np.argmax(model.predict(images, verbose=0), axis=-1)
    assert np.mean(predicted == labels.numpy()) == pytest.approx(accuracy, abs=5e-5)
    assert accuracy > 0.2  # 4 steps: well above chance (0.1), far from trained

    # The population pass ran, printed its table, and both accuracies were reported.
    assert final.statistics == "population"
    assert "population statistics: recomputing every batch norm's moving mean and " \
           "variance over one pass of the training data (batches of 64)" in process.stdout
    assert "Population statistics over 23 batches (1437 examples, 0 skipped" in process.stdout
    for layer in BATCH_NORM_LAYERS:
        assert re.search(rf"^  {layer} +1437 ", process.stdout, re.MULTILINE), layer
    assert (f"test accuracy: {accuracy:.4f} with the population statistics (what "
            f"model.keras serves), {final.test_accuracy_moving_averages:.4f} with the "
            "moving averages") in process.stdout

    # TensorBoard: Keras's epoch metrics; each batch norm's moving averages per epoch,
    # and at the last epoch its population statistics, equal to the checkpoint's.
    logs = os.path.join(process.out, train.LOGS_DIR)
    keras_logs = summaries(os.path.join(logs, "train"))
    assert [step for step, _ in keras_logs["epoch_loss"]] == [0, 1]
    statistics = summaries(os.path.join(logs, train.BATCH_NORM_LOGS))
    weights = weights_of(checkpoint)
    moved = []
    for layer in BATCH_NORM_LAYERS:
        for key, population in (("moving_mean", "population_mean"),
                                ("moving_variance", "population_variance")):
            assert [step for step, _ in statistics[f"{layer}/{key}"]] == [0, 1]
            assert [step for step, _ in statistics[f"{layer}/{key}_channel_mean"]] == [0, 1]
            assert [step for step, _ in statistics[f"{layer}/{population}"]] == [1]
            (_, written), = statistics[f"{layer}/{population}_channel_mean"]
            served = float(np.mean(weights[f"{layer}/{key}"]))
            assert float(written) == pytest.approx(served, rel=1e-5, abs=1e-6)
            last_moving = float(statistics[f"{layer}/{key}_channel_mean"][-1][1])
            moved.append(abs(last_moving - served) > 1e-3 * (1 + abs(served)))
    assert any(moved)  # the pass changed the statistics that training left


def test_xla_compiles_the_whole_step_on_one_device(processes):
    process = processes["one_device_xla"].finished()
    assert process.popen.returncode == 0, process.stderr[-3000:]
    assert "xla: one device: the whole training step is compiled" in process.stdout
    # One XLA module holds the forward pass, the backward pass and the SGD update.
    steps = [text for text in hlo_modules(process.dump, r"one_step_on_data").values()
             if "gradient_tape" in text]
    assert steps, os.listdir(process.dump)[:20]
    for text in steps:
        names = op_names([text])
        for needed in (r"(^|/)hidden1(_\d+)?/MatMul$", r"gradient_tape/.*/hidden1(_\d+)?/MatMul",
                       r"/hidden1_bn(_\d+)?/", r"gradient_tape/.*/hidden1_bn",
                       r"(^|/)sgd/", r"sparse_categorical_crossentropy"):
            assert any(re.search(needed, name) for name in names), needed
    assert not hlo_modules(process.dump, r"\.cluster_\d+__")  # no auto-clustering here


def test_xla_compiles_clusters_on_every_replica_of_four(processes):
    process = processes["replicas_xla"].finished()
    assert process.popen.returncode == 0, process.stderr[-3000:]
    assert "with XLA auto-clustering" in process.stdout  # the fallback's line
    clusters = hlo_modules(process.dump, r"\.cluster_\d+__")
    assert len(clusters) >= 8, sorted(clusters)
    names = op_names(clusters.values())
    # The training step ran as XLA clusters on all 4 replicas (replica 0's ops carry no
    # replica_<i> prefix): forward and backward matmuls, the kerasbn layers' math.
    for replica in ("", "replica_1/", "replica_2/", "replica_3/"):
        prefix = r"(^|/)" + re.escape(replica) + r"mlp_kerasbn(_\d+)?/"
        grad = r"gradient_tape/" + re.escape(replica) + r"mlp_kerasbn(_\d+)?/"
        for needed in (prefix + r"hidden1(_\d+)?/MatMul",
                       grad + r"hidden2(_\d+)?/MatMul",
                       prefix + r"hidden3_bn(_\d+)?/"):
            assert any(re.search(needed, name) for name in names), needed
    # The optimizer of the model compiled again after the refusal is "sgd_1".
    assert any(re.search(r"(^|/)sgd(_\d+)?/", name) for name in names)


def test_a_refused_whole_step_falls_back_in_one_line(processes):
    # TensorFlow refuses the whole compiled step on CPU replicas, as it may on GPUs.
    process = processes["replicas_xla"].finished()
    assert process.popen.returncode == 0, process.stderr[-3000:]
    lines = process.stdout.splitlines()
    assert "xla: 4 CPU replicas: the whole training step is compiled" in process.stdout
    refused = [line for line in lines if line.startswith("xla: TensorFlow refused")]
    assert len(refused) == 1, lines[:30]
    assert "fell back to the kerasbn layers' own XLA programs" in refused[0]
    assert "Traceback" not in process.stderr
    assert final_line(process.stdout).statistics == "population"


@pytest.mark.parametrize("compiled_run, plain_run", [
    ("one_device_xla", one_device_plain), ("replicas_xla", replicas_plain)],
    ids=["one-device", "four-replicas-after-the-refused-whole-step"])
def test_xla_and_no_xla_reach_the_same_weights(processes, in_process, compiled_run,
                                               plain_run):
    process = processes[compiled_run].finished()
    assert process.popen.returncode == 0, process.stderr[-3000:]
    compiled = weights_of(final_line(process.stdout).checkpoint)
    plain = weights_of(plain_run(in_process)["checkpoint"])
    assert_statistics_moved(plain)
    assert_same_weights(compiled, plain, XLA_TOLERANCE)


# ------------------------------------------------------------------ multi-worker


def test_two_workers_reach_the_weights_of_one_device(digits_data_dir, tmp_path, in_process):
    # With --xla: auto-clustering on each worker, the collectives outside the clusters.
    out = os.fspath(tmp_path / "run")
    command = [sys.executable, "-m", "training.train", *RUN_FLAGS, "--multi-worker",
               "--xla", "--data-dir", digits_data_dir, "--out", out]
    logs = workers.run_workers([command, command], os.fspath(tmp_path),
                               SUBPROCESS_TIMEOUT_SECONDS, cwd=REPO)
    outputs = [open(log).read() for log in logs]
    assert "MultiWorkerMirroredStrategy, 2 workers" in outputs[0]
    checkpoint = os.path.join(out, train.CHECKPOINT_NAME)
    # Its final line names the run's checkpoint (gRPC may log after it).
    finals = [line for line in outputs[1].splitlines() if line.startswith("final:")]
    assert final_line(finals[-1]).checkpoint == checkpoint
    assert not os.path.exists(os.path.join(out, "workers"))
    assert_same_weights(weights_of(checkpoint),
                        weights_of(one_device_plain(in_process)["checkpoint"]), XLA_TOLERANCE)
