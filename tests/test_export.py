"""kerasbn.export and training.export: folding, freezing, versioned SavedModels for serving.

Folding is checked against the float64 formula of Algorithm 2 applied to the float32
output of the layer before the norm; SavedModels are loaded back in fresh processes
(the verification of `export_saved_model`, `saved_model_cli`, and a script of our own).
"""

import json
import os
import re
import subprocess
import sys
import types
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import export
from training import export as export_cli

BATCH_STATISTICS_OPS = {"Mean", "Variance", "SquaredDifference", "FusedBatchNorm",
                        "FusedBatchNormV2", "FusedBatchNormV3"}
TOLERANCE = 1e-5  # relative, float32
SUBPROCESS_TIMEOUT = 180


def _batch_norm(impl, **kwargs):
    if impl == "kerasbn":
        return kerasbn.BatchNormalization(jit_compile=False, **kwargs)
    return keras.layers.BatchNormalization(**kwargs)


def _randomize_batch_norms(model, rng):
    """Non-trivial statistics, scales and offsets, so that folding has work to do."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, (kerasbn.BatchNormalization, keras.layers.BatchNormalization)):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 2.0, shape))
            layer.moving_variance.assign(rng.uniform(0.1, 3.0, shape))
            if layer.scale:
                layer.gamma.assign(rng.uniform(-2.0, 2.0, shape))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 1.0, shape))


def _layer_types(model):
    layers = model._flatten_layers(include_self=False)
    return Counter(type(layer).__name__ for layer in layers)


def _inference(model, x, compiled=False):
    if compiled:  # TF's CPU kernels of Conv1D/Conv2D refuse channels_first; XLA's don't
        return tf.function(lambda t: model(t, training=False), jit_compile=True)(x).numpy()
    outputs = model(x, training=False)
    if isinstance(outputs, (list, tuple)):
        return [keras.ops.convert_to_numpy(t) for t in outputs]
    return keras.ops.convert_to_numpy(outputs)


# ------------------------------------------------------------------------ folding

# (layer, input shape); filters 6 (depthwise: 4 channels × multiplier 2 = 8).
def _foldable(kind, use_bias, data_format):
    common = {"use_bias": use_bias, "bias_initializer": "random_normal"}
    if kind == "Dense":
        return keras.layers.Dense(6, **common), (3, 5)
    common["data_format"] = data_format
    last = data_format == "channels_last"
    spatial = {"Conv1D": (7,), "Conv3D": (4, 4, 4)}.get(kind, (6, 6))
    shape = spatial + (4,) if last else (4,) + spatial
    layer = {
        "Conv1D": lambda: keras.layers.Conv1D(6, 3, **common),
        "Conv2D": lambda: keras.layers.Conv2D(6, 3, groups=2, **common),
        "Conv3D": lambda: keras.layers.Conv3D(6, 2, **common),
        "DepthwiseConv2D": lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                                                **common),
        "SeparableConv2D": lambda: keras.layers.SeparableConv2D(6, 3, depth_multiplier=2,
                                                                **common),
    }[kind]()
    return layer, shape


KINDS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Dense")
FOLD_CASES = (
    [(kind, "kerasbn", False, "channels_last", {}) for kind in KINDS]
    + [(kind, "keras", True, "channels_last", {}) for kind in KINDS]
    + [(kind, impl, bias, "channels_first", {}) for kind, impl, bias in (
        ("Conv1D", "kerasbn", True), ("Conv2D", "keras", False), ("Conv3D", "keras", True),
        ("DepthwiseConv2D", "kerasbn", False), ("SeparableConv2D", "keras", True))]
    + [("Conv2D", "kerasbn", True, "channels_last", {"renorm": True}),
       ("Dense", "keras", False, "channels_last", {"renorm": True}),
       ("Conv2D", "kerasbn", False, "channels_last", {"axis": [-1], "center": False}),
       ("Dense", "keras", True, "channels_last", {"scale": False, "epsilon": 0.1})]
)


def _case_id(case):
    kind, impl, use_bias, data_format, bn_kwargs = case
    extra = "-".join(f"{k}={v}" for k, v in bn_kwargs.items())
    return "-".join(filter(None, (kind, impl, "bias" if use_bias else "nobias",
                                  data_format, extra)))


@pytest.mark.parametrize("kind,impl,use_bias,data_format,bn_kwargs", FOLD_CASES,
                         ids=[_case_id(case) for case in FOLD_CASES])
def test_fold_matches_algorithm_2_in_float64(kind, impl, use_bias, data_format, bn_kwargs,
                                              rng):
    layer, shape = _foldable(kind, use_bias, data_format)
    axis = 1 if data_format == "channels_first" else -1
    bn_kwargs = {"axis": axis, **bn_kwargs}
    inputs = keras.Input(shape)
    z = layer(inputs)
    model = keras.Model(inputs, _batch_norm(impl, name="bn", **bn_kwargs)(z))
    _randomize_batch_norms(model, rng)
    bn = model.get_layer("bn")

    folded, report = export.fold_batch_norms(model, return_report=True)

    assert report.folded == [("bn", layer.name)] and report.frozen == []
    assert _layer_types(folded) == Counter({"InputLayer": 1, type(layer).__name__: 1})
    assert folded.get_layer(layer.name).use_bias
    x = rng.normal(0.0, 1.0, (5,) + shape).astype("float32")
    compiled = data_format == "channels_first"
    mean = bn.moving_mean.numpy()
    expected = reference.inference_forward(
        _inference(keras.Model(inputs, z), x, compiled), bn.axis,
        bn.gamma.numpy() if bn.scale else np.ones_like(mean),
        bn.beta.numpy() if bn.center else np.zeros_like(mean),
        mean, bn.moving_variance.numpy(), bn.epsilon)
    assert reference.relative_error(_inference(folded, x, compiled), expected) < TOLERANCE
    assert reference.relative_error(_inference(model, x, compiled), expected) < TOLERANCE


def _unfoldable_model():
    """Every reason a batch norm cannot fold, and one that can, in one graph."""
    inputs = keras.Input((5, 5, 3), name="images")
    x = _batch_norm("keras", name="bn_input")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_relu")(x)
    x = _batch_norm("kerasbn", name="bn_after_activation")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = _batch_norm("keras", name="bn_after_relu")(x)
    shared = keras.layers.Conv2D(4, 1, name="conv_two_readers")(x)
    x = _batch_norm("kerasbn", name="bn_two_readers")(shared)
    x = keras.layers.Add(name="add")([x, shared])
    x = keras.layers.Conv2D(4, 1, use_bias=False, name="conv_folded")(x)
    x = _batch_norm("kerasbn", name="bn_folded")(x)
    x = keras.layers.Conv2D(4, 1, name="conv_wrong_axis")(x)
    x = _batch_norm("kerasbn", axis=[1, 3], name="bn_two_axes")(x)
    x = keras.layers.Dense(3, name="dense")(x)
    outputs = _batch_norm("keras", axis=1, renorm=True, name="bn_axis_1")(x)
    return keras.Model(inputs, outputs)


def test_batch_norms_that_cannot_fold_are_frozen_into_constants(rng):
    model = _unfoldable_model()
    _randomize_batch_norms(model, rng)

    folded, report = export.fold_batch_norms(model, return_report=True)

    assert report.folded == [("bn_folded", "conv_folded")]
    reasons = dict(report.frozen)
    assert list(reasons) == ["bn_input", "bn_after_activation", "bn_after_relu",
                             "bn_two_readers", "bn_two_axes", "bn_axis_1"]
    assert "model input" in reasons["bn_input"]
    assert "'relu'" in reasons["bn_after_activation"]
    assert "ReLU" in reasons["bn_after_relu"]
    assert "also read" in reasons["bn_two_readers"]
    assert "channel axis" in reasons["bn_two_axes"]
    assert "channel axis" in reasons["bn_axis_1"]
    types = _layer_types(folded)
    assert types["FrozenAffine"] == 6 and "BatchNormalization" not in types
    for name in reasons:
        frozen, bn = folded.get_layer(name), model.get_layer(name)
        assert not frozen.trainable_weights and not frozen.trainable
        scale = (bn.gamma.numpy() if bn.scale else 1.0) / np.sqrt(
            bn.moving_variance.numpy().astype(np.float64) + bn.epsilon)
        np.testing.assert_allclose(frozen.scale.numpy(), scale, rtol=1e-6)
        np.testing.assert_allclose(frozen.offset.numpy(),
                                   bn.beta.numpy() - scale * bn.moving_mean.numpy(),
                                   rtol=1e-5, atol=1e-6)
    x = rng.normal(0.0, 1.0, (4, 5, 5, 3)).astype("float32")
    assert reference.relative_error(_inference(folded, x), _inference(model, x)) < TOLERANCE


def test_freeze_batch_norms_folds_nothing(rng):
    model = _unfoldable_model()
    _randomize_batch_norms(model, rng)
    frozen, report = export.freeze_batch_norms(model, return_report=True)
    assert report.folded == [] and len(report.frozen) == 7
    assert _layer_types(frozen)["FrozenAffine"] == 7
    x = rng.normal(0.0, 1.0, (4, 5, 5, 3)).astype("float32")
    assert reference.relative_error(_inference(frozen, x), _inference(model, x)) < TOLERANCE


def test_nested_models_sequential_top_level_and_keras_file(rng, tmp_path):
    inner_sequential = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, name="inner_conv"),
        _batch_norm("kerasbn", name="inner_bn"),
        keras.layers.ReLU(),
    ], name="block")
    inner_inputs = keras.Input((48,))  # the block outputs 4×4×3
    head = keras.layers.Dense(4, name="head")(inner_inputs)
    inner_functional = keras.Model(inner_inputs, _batch_norm("keras", name="head_bn")(head),
                                   name="head_model")
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Flatten()(inner_sequential(inputs))
    x = _batch_norm("keras", name="outer_bn")(x)  # follows Flatten: frozen
    functional = keras.Model(inputs, inner_functional(x))
    sequential = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, name="d1"), _batch_norm("kerasbn", name="bn1"),
        keras.layers.Activation("tanh"),
        keras.layers.Dense(3, name="d2"), _batch_norm("keras", name="bn2"),
    ], name="chain")
    for model, shape in ((functional, (6, 6, 2)), (sequential, (5,))):
        _randomize_batch_norms(model, rng)
        folded, report = export.fold_batch_norms(model, return_report=True)
        assert "BatchNormalization" not in _layer_types(folded)
        assert type(folded) is type(model) and folded.name == model.name
        x = rng.normal(0.0, 1.0, (4,) + shape).astype("float32")
        expected = _inference(model, x)
        assert reference.relative_error(_inference(folded, x), expected) < TOLERANCE
        path = tmp_path / f"{model.name}.keras"
        folded.save(path)
        reloaded = keras.saving.load_model(path)
        assert reference.relative_error(_inference(reloaded, x), expected) < TOLERANCE
    assert report.folded == [("bn1", "d1"), ("bn2", "d2")]
    _, report = export.fold_batch_norms(functional, return_report=True)
    assert report.folded == [("block/inner_bn", "block/inner_conv"),
                             ("head_model/head_bn", "head_model/head")]
    assert [name for name, _ in report.frozen] == ["outer_bn"]


def test_model_without_batch_norm_is_copied(rng):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    folded, report = export.fold_batch_norms(model, return_report=True)
    assert report.folded == [] and report.frozen == []
    assert _layer_types(folded) == _layer_types(model)
    assert all(a is not b for a, b in zip(folded.weights, model.weights))
    x = rng.normal(0.0, 1.0, (3, 6)).astype("float32")
    np.testing.assert_array_equal(_inference(folded, x), _inference(model, x))


def test_fold_errors_name_the_argument():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="argument `model` must be a keras.Model"):
        export.fold_batch_norms("model.keras")
    with pytest.raises(ValueError, match="subclassed model"):
        export.fold_batch_norms(Subclassed())
    with pytest.raises(ValueError, match="must be built"):
        export.fold_batch_norms(keras.Sequential([keras.layers.Dense(2)]))


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
    seed = np.random.SeedSequence().entropy % (2**32)
    print(f"rng seed of the exported model: {seed}")
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

    def wrong_fold(model):
        folded = real_fold(model)
        bias = folded.get_layer("conv").bias
        bias.assign(bias.numpy() + 0.5)  # a folding bug: every output moves
        return folded

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


def test_export_dir_that_is_a_file_is_refused(exported, tmp_path):
    model = exported.model
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="`export_dir` must be a directory"):
        export.export_saved_model(model, tmp_path / "file")


# ------------------------------------------------------------------------ command line

def test_command_line_exports_a_checkpoint(exported, tmp_path, capsys):
    model = exported.model
    checkpoint = tmp_path / "tiny.keras"
    model.save(checkpoint)
    out_dir = tmp_path / "saved_models"
    argv = ["--checkpoint", str(checkpoint), "--name", "tiny", "--out-dir", str(out_dir),
            "--no-verify"]
    assert export_cli.main(argv) == 0
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


def test_command_line_errors_and_help(tmp_path, capsys):
    missing = str(tmp_path / "missing.keras")
    assert export_cli.main(["--checkpoint", missing, "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and missing in err
    (tmp_path / "junk.keras").write_text("not a zip file")
    junk = str(tmp_path / "junk.keras")
    assert export_cli.main(["--checkpoint", junk, "--name", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load" in err
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
