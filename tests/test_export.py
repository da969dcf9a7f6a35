"""kerasbn.export and training.export: versioned SavedModels for serving.

SavedModels are loaded back in fresh processes (the verification of
`export_saved_model`, `saved_model_cli`, and a script of our own) and compared with the
model's inference outputs; folding itself is tested in test_fold.py.
"""

import json
import os
import re
import subprocess
import sys
import types
import zipfile
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import export
from test_fold import _batch_norm, _inference, _randomize_batch_norms
from training import export as export_cli

BATCH_STATISTICS_OPS = {"Mean", "Variance", "SquaredDifference", "FusedBatchNorm",
                        "FusedBatchNormV2", "FusedBatchNormV3"}
TOLERANCE = 1e-5  # relative, float32
SUBPROCESS_TIMEOUT = 180


# ------------------------------------------------------------------------ SavedModel

def _serving_model(rng):
    inputs = keras.Input((6, 6, 3), name="pixels")
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = _batch_norm("kerasbn", name="conv_bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = _batch_norm("keras", name="relu_bn")(x)  # cannot fold: frozen
    features = keras.layers.Flatten(name="features")(x)
    x = keras.layers.Dense(5, name="dense")(features)
    x = _batch_norm("keras", renorm=True, name="dense_bn")(x)
    probabilities = keras.layers.Softmax(name="probabilities")(x)
    model = keras.Model(inputs, [probabilities, features], name="tiny")
    _randomize_batch_norms(model, rng)
    return model


_LOAD_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
signature = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
outputs = signature(pixels=tf.constant(np.load(sys.argv[2])))
np.savez(sys.argv[3], **{name: value.numpy() for name, value in outputs.items()})
print(json.dumps(sorted(signature.structured_input_signature[1])))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One model, exported once with verification (itself a fresh-process load).

    Right after, two fresh processes start on the export in the background (TensorFlow
    takes seconds to import), for the tests at the end of this file:
    `saved_model_cli show`, and a script of ours that loads the export with
    `tf.saved_model.load` and runs it on a batch `x`.
    """
    seed = int(os.environ.get("KERASBN_TEST_SEED") or
               np.random.SeedSequence().entropy % (2**32))
    print(f"rng seed of the exported model: {seed} (replay: KERASBN_TEST_SEED={seed})")
    rng = np.random.default_rng(seed)
    model = _serving_model(rng)
    scratch = tmp_path_factory.mktemp("export")
    base = scratch / "saved_models" / "tiny"
    path = export.export_saved_model(model, base)
    x = rng.normal(0.0, 1.0, (7, 6, 6, 3)).astype("float32")
    np.save(scratch / "x.npy", x)
    run = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    processes = {
        "saved_model_cli": subprocess.Popen(
            [cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def",
             "serving_default"], **run),
        "load": subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCRIPT, path, scratch / "x.npy",
             scratch / "served.npz"], **run),
    }
    yield types.SimpleNamespace(model=model, base=base, path=path, x=x,
                                served=scratch / "served.npz", processes=processes)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _stdout_of(process):
    out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, err[-2000:]
    return out


def _op_types(path):
    """Op types of the serving signature's graph and of every function it calls."""
    graph_def = tf.saved_model.load(path).signatures["serving_default"].graph.as_graph_def()
    types = Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


def test_export_writes_version_1_and_nothing_else(exported):
    base, path = exported.base, exported.path
    assert path == os.path.join(base, "1")
    assert os.listdir(base) == ["1"]
    assert {"saved_model.pb", "variables"} <= set(os.listdir(path))
    # Readable as its parent is (a server may run as another user), not mkdtemp's 0700.
    assert os.stat(path).st_mode & 0o777 == os.stat(base).st_mode & 0o777


def test_signature_has_the_model_names(exported):
    path = exported.path
    assert export.describe_signature(path) == {
        "inputs": {"pixels": ("float32", (None, 6, 6, 3))},
        "outputs": {"features": ("float32", (None, 64)),
                    "probabilities": ("float32", (None, 5))},
    }


def test_graph_has_no_batch_statistics_and_folding_removes_ops(exported, tmp_path):
    model, path = exported.model, exported.path
    folded = _op_types(path)
    unfolded = _op_types(export.export_saved_model(model, tmp_path / "tiny", fold=False,
                                                   verify=False))
    for types in (folded, unfolded):
        assert not BATCH_STATISTICS_OPS & set(types), types
        assert "Rsqrt" not in types and "Sqrt" not in types  # statistics precomputed
        assert types["Conv2D"] == 1 and types["MatMul"] == 1
    assert sum(folded.values()) < sum(unfolded.values())
    # Folded: only the norm after the ReLU is left, one Mul and one AddV2.
    assert folded["Mul"] < unfolded["Mul"]


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_converts_the_export(exported, rng):
    model, path = exported.model, exported.path
    interpreter = tf.lite.Interpreter(
        model_content=tf.lite.TFLiteConverter.from_saved_model(path).convert())
    runner = interpreter.get_signature_runner("serving_default")
    x = rng.normal(0.0, 1.0, (1, 6, 6, 3)).astype("float32")
    served = runner(pixels=x)
    probabilities, features = _inference(model, x)
    assert reference.relative_error(served["probabilities"], probabilities) < 1e-4
    assert reference.relative_error(served["features"], features) < 1e-4


def test_versions_next_free_refused_and_overwritten(exported, tmp_path):
    model = exported.model
    base = tmp_path / "tiny"

    def save(**kwargs):
        return export.export_saved_model(model, base, verify=False, **kwargs)

    assert save() == os.path.join(base, "1")
    assert save() == os.path.join(base, "2")
    assert save(version=7, output_names=["p", "f"]) == os.path.join(base, "7")
    assert save() == os.path.join(base, "8")
    with pytest.raises(FileExistsError, match=re.escape(os.path.join(base, "7"))):
        save(version=7)
    version_7 = os.path.join(base, "7")
    assert export.describe_signature(version_7)["outputs"].keys() == {"p", "f"}
    assert save(version=7, overwrite=True) == version_7
    assert export.describe_signature(version_7)["outputs"].keys() == {"probabilities",
                                                                      "features"}
    assert sorted(os.listdir(base)) == ["1", "2", "7", "8"]  # no temporary left


def test_failure_mid_export_leaves_nothing(exported, tmp_path, monkeypatch):
    model = exported.model
    base = tmp_path / "tiny"

    def fail_verification(*args):
        raise RuntimeError("injected verification failure")

    monkeypatch.setattr(export, "_verify", fail_verification)
    with pytest.raises(RuntimeError, match="injected verification failure"):
        export.export_saved_model(model, base)
    assert os.listdir(base) == []
    monkeypatch.undo()

    real_save = tf.saved_model.save

    def save_then_fail(obj, path, **kwargs):
        real_save(obj, path, **kwargs)  # a complete SavedModel, then the failure
        raise OSError("injected: disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(model, base, version=3)
    assert os.listdir(base) == []


def test_verification_in_a_fresh_process_catches_a_wrong_export(exported, tmp_path,
                                                                 monkeypatch):
    model = exported.model
    base = tmp_path / "tiny"
    real_fold = export.fold_batch_norms

    def wrong_fold(model, **kwargs):
        folded, report = real_fold(model, return_report=True)
        bias = folded.get_layer("conv").bias
        bias.assign(bias.numpy() + 0.5)  # a folding bug: every output moves
        return (folded, report) if kwargs.get("return_report") else folded

    monkeypatch.setattr(export, "fold_batch_norms", wrong_fold)
    # Which outputs move beyond the tolerance depends on the random weights; each is named.
    with pytest.raises(export.ExportVerificationError,
                       match=r"'(features|probabilities)': max abs error [0-9.e-]+, "
                             r"max rel error"):
        export.export_saved_model(model, base)
    assert os.listdir(base) == []


@pytest.mark.parametrize("arguments,message", [
    ({"version": 0}, r"`version` must be None or an int >= 1; received version=0"),
    ({"version": "2"}, r"`version` must be None or an int >= 1; received version='2'"),
    ({"version": True}, r"received version=True"),
    ({"input_name": "two words"}, r"`input_name` must be a name .* input_name='two words'"),
    ({"output_names": ["p"]}, r"`output_names` must hold one distinct name per output"),
    ({"output_names": ["p", "p"]}, r"one distinct name per output of the model \(2\)"),
    ({"output_names": ["p", "f.x"]}, r"`output_names` must be a name .*='f.x'"),
    ({"input_name": ""}, r"`input_name` must be a name"),
])
def test_export_argument_errors(exported, tmp_path, arguments, message):
    model = exported.model
    with pytest.raises(ValueError, match=message):
        export.export_saved_model(model, tmp_path / "tiny", **arguments)
    assert not (tmp_path / "tiny").exists() or os.listdir(tmp_path / "tiny") == []


def test_export_dir_that_is_or_lies_under_a_file_is_refused(exported, tmp_path):
    model = exported.model
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`export_dir` must be a directory .*, a file\."):
        export.export_saved_model(model, tmp_path / "file")
    under = tmp_path / "file" / "tiny"
    with pytest.raises(ValueError, match=r"`export_dir` must be a directory .*received "
                                         rf"export_dir={re.escape(repr(str(under)))}, under "
                                         rf"the file {re.escape(repr(str(tmp_path / 'file')))}"):
        export.export_saved_model(model, under)


def test_return_report_is_the_report_of_the_model_written(exported, tmp_path):
    model = exported.model
    path, report = export.export_saved_model(model, tmp_path / "tiny", verify=False,
                                             return_report=True)
    assert path == os.path.join(tmp_path / "tiny", "1")
    assert report.folded == [("conv_bn", "conv"), ("dense_bn", "dense")]
    assert report.frozen == [("relu_bn", "it follows 'relu' (ReLU), not a Conv/Dense")]
    _, report = export.export_saved_model(model, tmp_path / "tiny", fold=False, verify=False,
                                          return_report=True)
    assert report.folded == [] and [reason for _, reason in report.frozen] == [
        "folding disabled"] * 3


def _load_signature(path):
    return tf.saved_model.load(os.fspath(path)).signatures["serving_default"]


def test_unnamed_input_is_served_as_inputs_whatever_the_process_built_before(tmp_path, rng):
    for _ in range(3):  # Keras numbers unnamed inputs and tensors across the process
        first = keras.Input((2,))
        keras.Model(first, keras.layers.Dense(1)(first))
    inputs = keras.Input((6, 6, 3))
    x = _batch_norm("keras")(keras.layers.Conv2D(4, 3, use_bias=False)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    _randomize_batch_norms(model, rng)
    converted = kerasbn.convert_to_kerasbn(model, synchronized=False)

    for candidate, base in ((model, tmp_path / "stock"), (converted, tmp_path / "converted")):
        path = export.export_saved_model(candidate, base, verify=False)
        assert export.describe_signature(path) == {
            "inputs": {export.DEFAULT_INPUT_NAME: ("float32", (None, 6, 6, 3))},
            "outputs": {"dense": ("float32", (None, 2))}}
    assert export.DEFAULT_INPUT_NAME == "inputs"
    path = export.export_saved_model(converted, tmp_path / "named", input_name="pixels",
                                     output_names=["logits"], verify=False)
    served = _load_signature(path)
    x = rng.normal(0.0, 1.0, (3, 6, 6, 3)).astype("float32")
    assert reference.relative_error(served(pixels=tf.constant(x))["logits"],
                                    _inference(model, x)) < TOLERANCE


def test_default_output_names_dict_keys_and_generated_names(tmp_path):
    inputs = keras.Input((4,), name="features")
    first, second = keras.layers.Dense(2)(inputs), keras.layers.Dense(3)(inputs)
    as_list = keras.Model(inputs, [first, second])
    as_dict = keras.Model(inputs, {"scores": first, "embedding": second})
    path = export.export_saved_model(as_list, tmp_path / "list", verify=False)
    assert export.describe_signature(path)["outputs"] == {
        "dense_0": ("float32", (None, 2)), "dense_1": ("float32", (None, 3))}
    path = export.export_saved_model(as_dict, tmp_path / "dict", verify=False)
    assert export.describe_signature(path) == {
        "inputs": {"features": ("float32", (None, 4))},
        "outputs": {"embedding": ("float32", (None, 3)), "scores": ("float32", (None, 2))}}


def _embedding_model(with_batch_norm):
    """Keras records the mask of Embedding(mask_zero=True) as an operation, not a layer."""
    inputs = keras.Input((6,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    x = keras.layers.Dense(5, name="dense")(x)
    if with_batch_norm:
        x = _batch_norm("keras", name="bn")(x)
    x = keras.layers.GlobalAveragePooling1D()(keras.ops.tanh(x) + 1.0)
    return keras.Model(inputs, keras.layers.Dense(3, name="scores")(x))


@pytest.mark.parametrize("with_batch_norm", [True, False], ids=["bn", "no-bn"])
def test_models_with_operations_that_are_not_layers_export(with_batch_norm, tmp_path, rng):
    model = _embedding_model(with_batch_norm)
    _randomize_batch_norms(model, rng)
    path, report = export.export_saved_model(model, tmp_path / "text", verify=False,
                                             return_report=True)
    assert report.folded == ([("bn", "dense")] if with_batch_norm else [])
    assert report.frozen == []
    tokens = rng.integers(0, 20, (5, 6)).astype("int32")
    tokens[:, 4:] = 0
    served = _load_signature(path)(tokens=tf.constant(tokens))["scores"]
    assert reference.relative_error(served, _inference(model, tokens)) < TOLERANCE


# ------------------------------------------------------------------------ command line

def test_command_line_exports_a_checkpoint(exported, tmp_path, capsys, monkeypatch):
    model = exported.model
    checkpoint = tmp_path / "tiny.keras"
    model.save(checkpoint)
    out_dir = tmp_path / "saved_models"
    argv = ["--checkpoint", str(checkpoint), "--name", "tiny", "--out-dir", str(out_dir),
            "--no-verify"]
    folds = []  # the report printed is that of the model exported: one fold, not two
    real_fold = export.fold_batch_norms
    monkeypatch.setattr(export, "fold_batch_norms",
                        lambda *args, **kwargs: folds.append(1) or real_fold(*args, **kwargs))
    assert export_cli.main(argv) == 0
    assert len(folds) == 1
    printed = capsys.readouterr().out
    assert f"to {os.path.join(out_dir, 'tiny', '1')}" in printed
    assert "input  pixels: float32 (None, 6, 6, 3)" in printed
    assert "output probabilities: float32 (None, 5)" in printed
    assert "batch norms: 2 folded into the layer before them, 1 frozen" in printed
    assert "frozen relu_bn: it follows 'relu' (ReLU)" in printed

    assert export_cli.main(argv + ["--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_cli.main(argv + ["--no-fold"]) == 0
    assert "0 folded into the layer before them, 3 frozen" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir / "tiny")) == ["1", "2"]


def _one_line_error(capsys, *phrases):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    return err


def test_command_line_errors_and_help(tmp_path, capsys):
    missing = str(tmp_path / "missing.keras")
    assert export_cli.main(["--checkpoint", missing, "--name", "m"]) == 2
    _one_line_error(capsys, "--checkpoint: no such file", missing)
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["--checkpoint", missing, "--name", ".hidden"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--checkpoint", "--name", "--version", "--no-fold", "--no-verify",
                 "--out-dir"):
        assert flag in help_text


def test_command_line_checkpoint_that_is_not_a_keras_file(tmp_path, capsys):
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip file")
    assert export_cli.main(["--checkpoint", str(junk), "--name", "m"]) == 2
    err = _one_line_error(capsys, f"--checkpoint: {str(junk)!r} is not a Keras file")
    assert "not found" not in err and "no such file" not in err
    assert export_cli.main(["--checkpoint", str(tmp_path), "--name", "m"]) == 2
    _one_line_error(capsys, f"--checkpoint: {str(tmp_path)!r} is a directory")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip, but not a Keras file")
    assert export_cli.main(["--checkpoint", str(tmp_path / "other.keras"), "--name", "m"]) == 2
    _one_line_error(capsys, "--checkpoint: cannot load", "config.json")


def test_command_line_out_dir_that_is_a_file(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(checkpoint)
    a_file = tmp_path / "saved_models"
    a_file.write_text("")
    for out_dir in (a_file, a_file / "deeper"):
        argv = ["--checkpoint", str(checkpoint), "--name", "m", "--out-dir", str(out_dir)]
        assert export_cli.main(argv) == 2
        _one_line_error(capsys, f"--out-dir: {str(a_file)!r} is a file, not a directory")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").write_text("")
    argv = ["--checkpoint", str(checkpoint), "--name", "m", "--out-dir",
            str(tmp_path / "models")]
    assert export_cli.main(argv) == 2
    _one_line_error(capsys, "--name: ", "is a file, not a directory")
    assert a_file.read_text() == "" and (tmp_path / "models" / "m").read_text() == ""


# ------------------------------------------------------------------------ --recompute-statistics

@pytest.fixture(scope="module")
def stale_checkpoint(tmp_path_factory, digits_data_dir):
    """The digits MLP trained for one epoch (23 steps) at Keras's momentum 0.99, saved.

    Its moving averages have moved only 1 − 0.99²³ ≈ 21 % of the way from their initial
    values (mean 0, variance 1) to the data's: served as they are, the model guesses.
    """
    from training import data, models

    seed = int(os.environ.get("KERASBN_TEST_SEED") or
               np.random.SeedSequence().entropy % (2**31))
    print(f"seed of the stale checkpoint: {seed} (replay: KERASBN_TEST_SEED={seed})")
    train, test, info = data.load("digits", data_dir=digits_data_dir)
    keras.utils.set_random_seed(seed)
    model = models.build_model("mlp", info.image_shape, info.num_classes, "kerasbn",
                               bn_momentum=0.99, bn_jit_compile=False)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  "sparse_categorical_crossentropy")
    model.fit(data.batched(train, 64, shuffle=True, seed=seed), epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("stale") / "mlp.keras"
    model.save(path)
    images, labels = zip(*test.as_numpy_iterator())
    return types.SimpleNamespace(path=str(path), train=train, images=np.stack(images),
                                 labels=np.asarray(labels))


def _served_accuracy(path, images, labels):
    signature = _load_signature(path)
    (name, _), = signature.structured_input_signature[1].items()
    outputs = signature(**{name: tf.constant(images)})
    (probabilities,) = outputs.values()
    return float(np.mean(np.argmax(probabilities.numpy(), axis=-1) == labels))


def _dense_population(model, images, dense, bn):
    """float64 mean and variance of the batch norm `bn`'s input over all `images`: the
    output of the Dense layer `dense` on the flattened images (the MLP's first one)."""
    kernel = np.asarray(model.get_layer(dense).kernel, np.float64)
    inputs = images.reshape(len(images), -1).astype(np.float64) @ kernel
    return inputs.mean(axis=0), inputs.var(axis=0)


def test_command_line_recomputes_statistics_before_export(stale_checkpoint, digits_data_dir,
                                                          tmp_path, capsys, monkeypatch):
    from training import train as train_program

    recomputed = []  # the model the command line recomputed, and what it returned
    real_recompute = kerasbn.recompute_statistics

    def recording(model, *args, **kwargs):
        recomputed.append(model)
        return real_recompute(model, *args, **kwargs)

    monkeypatch.setattr(kerasbn, "recompute_statistics", recording)
    argv = ["--checkpoint", stale_checkpoint.path, "--name", "mlp", "--out-dir",
            str(tmp_path), "--no-verify"]
    assert export_cli.main(argv) == 0
    assert not recomputed
    assert export_cli.main(argv + ["--recompute-statistics", "--data-dir",
                                   digits_data_dir]) == 0
    printed = capsys.readouterr().out
    assert ("population statistics: recomputing over one pass of the training split of "
            "'digits' (batches of 64)") in printed
    assert "Population statistics over 23 batches (1437 examples, 0 skipped" in printed
    assert "hidden1_bn" in printed and "hidden3_bn" in printed
    assert printed.index("Population statistics") < printed.index(
        f"to {os.path.join(tmp_path, 'mlp', '2')}")

    images, labels = stale_checkpoint.images, stale_checkpoint.labels
    moving = _served_accuracy(tmp_path / "mlp" / "1", images, labels)
    population = _served_accuracy(tmp_path / "mlp" / "2", images, labels)
    print(f"served test accuracy: {moving:.3f} moving averages, {population:.3f} "
          "population statistics")
    assert population >= 0.8 and population >= moving + 0.3, (moving, population)

    # What was exported is what a direct recompute over the same batches gives, bit for
    # bit, and the first batch norm's is its input's float64 population.
    (model,) = recomputed
    direct = keras.saving.load_model(stale_checkpoint.path, compile=False)
    real_recompute(direct, train_program.population_batches(
        stale_checkpoint.train, 64, export_cli.DEFAULT_SEED, epochs=0), verbose=0)
    for name in ("hidden1_bn", "hidden2_bn", "hidden3_bn"):
        for statistic in ("moving_mean", "moving_variance"):
            np.testing.assert_array_equal(
                getattr(model.get_layer(name), statistic).numpy(),
                getattr(direct.get_layer(name), statistic).numpy(), err_msg=name)
    train_images = np.stack([image for image, _ in stale_checkpoint.train.as_numpy_iterator()])
    mean, variance = _dense_population(model, train_images, "hidden1", "hidden1_bn")
    bn = model.get_layer("hidden1_bn")
    assert reference.relative_error(bn.moving_mean.numpy(), mean) < TOLERANCE
    assert reference.relative_error(bn.moving_variance.numpy(), variance) < TOLERANCE
    served = _load_signature(tmp_path / "mlp" / "2")
    (name, _), = served.structured_input_signature[1].items()
    (probabilities,) = served(**{name: tf.constant(images)}).values()
    assert reference.relative_error(probabilities, _inference(model, images)) < TOLERANCE


def test_command_line_population_batches(stale_checkpoint, digits_data_dir, tmp_path,
                                         capsys):
    argv = ["--checkpoint", stale_checkpoint.path, "--name", "mlp", "--out-dir",
            str(tmp_path), "--no-verify", "--recompute-statistics", "--data-dir",
            digits_data_dir, "--population-batches", "3", "--batch-size", "32",
            "--seed", "5"]
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "recomputing over 3 batches of the training split of 'digits' (batches of 32)" \
        in printed
    assert "Population statistics over 3 batches (96 examples" in printed
    assert re.search(r"^  hidden1_bn +96 ", printed, re.MULTILINE), printed


@pytest.mark.parametrize("flags, phrases", [
    (["--population-batches", "3"],
     ["--population-batches is an option of the population pass: it needs "
      "--recompute-statistics"]),
    (["--seed", "1"], ["--seed is an option of the population pass"]),
    (["--recompute-statistics", "--dataset", "no_such_dataset"],
     ["--dataset: dataset 'no_such_dataset' is not a tensorflow-datasets name"]),
], ids=["batches-alone", "seed-alone", "unknown-dataset"])
def test_command_line_recompute_flag_errors(stale_checkpoint, tmp_path, capsys, flags,
                                            phrases):
    argv = ["--checkpoint", stale_checkpoint.path, "--name", "mlp", "--out-dir",
            str(tmp_path)]
    assert export_cli.main(argv + flags) == 2
    _one_line_error(capsys, *phrases)
    assert not (tmp_path / "mlp").exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_command_line_population_batches_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["--checkpoint", "m.keras", "--name", "m", "--recompute-statistics",
                         "--population-batches", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (f"argument --population-batches: expected a positive integer, got {value!r}"
            in err)


def test_command_line_recompute_on_data_that_does_not_fit(exported, digits_data_dir,
                                                         tmp_path, capsys):
    """The 6×6×3 model of this file on the 8×8×1 digits; and a model with no batch norm."""
    checkpoint = tmp_path / "tiny.keras"
    exported.model.save(checkpoint)
    argv = ["--checkpoint", str(checkpoint), "--name", "tiny", "--out-dir", str(tmp_path),
            "--recompute-statistics", "--data-dir", digits_data_dir,
            "--population-batches", "1"]
    assert export_cli.main(argv) == 2
    _one_line_error(capsys, "--recompute-statistics with --dataset digits: "
                            "recompute_statistics: argument `data` must be batches that "
                            "fit the inputs of model 'tiny'")
    plain = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(10)]).save(plain)
    argv[1] = str(plain)
    assert export_cli.main(argv) == 2
    _one_line_error(capsys, f"--recompute-statistics with --checkpoint {plain}: "
                            "recompute_statistics: argument `model` must be a model "
                            "holding at least one BatchNormalization layer")
    assert not (tmp_path / "tiny").exists()


# ------------------------------------------------------------------------ fresh processes
# (started by the `exported` fixture; placed last so they had time to finish)

def test_saved_model_cli_lists_the_names(exported):
    shown = _stdout_of(exported.processes["saved_model_cli"])
    assert "inputs['pixels']" in shown
    assert "outputs['probabilities']" in shown and "outputs['features']" in shown
    assert shown.count("inputs[") == 1 and shown.count("outputs[") == 2
    assert "keras_tensor" not in shown and "output_0" not in shown


def test_fresh_process_loads_it_with_tf_saved_model_load(exported):
    printed = _stdout_of(exported.processes["load"])
    assert json.loads(printed.strip().splitlines()[-1]) == ["pixels"]  # no training flag
    probabilities, features = _inference(exported.model, exported.x)
    with np.load(exported.served) as served:
        assert sorted(served.files) == ["features", "probabilities"]
        assert reference.relative_error(served["probabilities"], probabilities) < TOLERANCE
        assert reference.relative_error(served["features"], features) < TOLERANCE
