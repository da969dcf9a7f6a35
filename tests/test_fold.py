"""kerasbn.fold: batch norms folded into Conv/Dense or frozen into FrozenAffine layers.

Folding is checked against the float64 formula of Algorithm 2 applied to the float32
output of the layer before the norm; a rebuilt model against the original's outputs.
The helpers `_batch_norm`, `_randomize_batch_norms` and `_inference` serve
test_export.py and test_applications.py too.
"""

import ast
import inspect
import re
import warnings
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import _graph
from kerasbn import export
from kerasbn import fold
from kerasbn import ops

TOLERANCE = 1e-5  # relative, float32


def _batch_norm(impl, **kwargs):
    if impl == "kerasbn":
        return kerasbn.BatchNormalization(jit_compile=False, **kwargs)
    return keras.layers.BatchNormalization(**kwargs)


def _randomize_batch_norms(model, rng):
    """Non-trivial statistics, scales and offsets, so that folding has work to do."""
    for layer in _graph.nested_layers(model):
        if _graph.is_batch_norm(layer):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 2.0, shape))
            layer.moving_variance.assign(rng.uniform(0.1, 3.0, shape))
            if layer.scale:
                layer.gamma.assign(rng.uniform(-2.0, 2.0, shape))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 1.0, shape))


def _layer_types(model):
    return Counter(type(layer).__name__ for layer in _graph.nested_layers(model))


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

    folded, report = fold.fold_batch_norms(model, return_report=True)

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

    folded, report = fold.fold_batch_norms(model, return_report=True)

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
    frozen, report = fold.freeze_batch_norms(model, return_report=True)
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
        folded, report = fold.fold_batch_norms(model, return_report=True)
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
    _, report = fold.fold_batch_norms(functional, return_report=True)
    assert report.folded == [("block/inner_bn", "block/inner_conv"),
                             ("head_model/head_bn", "head_model/head")]
    assert [name for name, _ in report.frozen] == ["outer_bn"]


def test_ghost_batch_norms_fold_and_freeze_like_any_other(rng):
    """virtual_batch_size only acts in training: at export a ghost layer is Algorithm 2."""
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
        _batch_norm("kerasbn", virtual_batch_size=4, momentum=0.5, name="ghost"),
        keras.layers.ReLU(),
        _batch_norm("kerasbn", virtual_batch_size=3, name="ghost_after_relu"),
    ])
    _randomize_batch_norms(model, rng)
    for _ in range(2):  # moving statistics merged from groups, a last one smaller
        model(rng.normal(1.0, 2.0, (10, 6, 6, 3)).astype("float32"), training=True)

    folded, report = export.fold_batch_norms(model, return_report=True)

    assert report.folded == [("ghost", "conv")]
    assert [name for name, _ in report.frozen] == ["ghost_after_relu"]
    assert _layer_types(folded) == Counter({"InputLayer": 1, "Conv2D": 1, "ReLU": 1,
                                            "FrozenAffine": 1})
    x = rng.normal(0.0, 1.0, (7, 6, 6, 3)).astype("float32")
    assert reference.relative_error(_inference(folded, x), _inference(model, x)) < TOLERANCE


@pytest.mark.parametrize("function", ["fold_batch_norms", "freeze_batch_norms"])
def test_model_without_batch_norm_is_copied(function, rng):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.ops.square(hidden) + 1.0))
    folded, report = getattr(fold, function)(model, return_report=True)
    assert report.folded == [] and report.frozen == []
    assert _layer_types(folded) == _layer_types(model)
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    assert all(a is not b for a, b in zip(folded.weights, model.weights))
    x = rng.normal(0.0, 1.0, (3, 6)).astype("float32")
    np.testing.assert_array_equal(_inference(folded, x), _inference(model, x))


def test_fold_errors_name_the_argument():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="argument `model` must be a keras.Model"):
        fold.fold_batch_norms("model.keras")
    with pytest.raises(ValueError, match="subclassed model"):
        fold.fold_batch_norms(Subclassed())
    with pytest.raises(ValueError, match="must be built"):
        fold.fold_batch_norms(keras.Sequential([keras.layers.Dense(2)]))




# ------------------------------------------------------------------------ FrozenAffine

@pytest.mark.parametrize("policy,tolerance", [("float32", 1e-6), ("mixed_float16", 2e-3),
                                              ("float64", 1e-12)])
@pytest.mark.parametrize("axis,shape", [(-1, (3, 5)), (1, (2, 4, 3, 3)), ([1, 3], (2, 3, 4, 5))],
                         ids=["axis-1", "axis1", "axes13"])
def test_frozen_affine_is_algorithm_2_of_the_batch_norm(axis, shape, policy, tolerance, rng):
    bn = kerasbn.BatchNormalization(axis=axis, jit_compile=False)
    bn.build(shape)
    _randomize_batch_norms(keras.Sequential([keras.Input(shape[1:]), bn]), rng)
    a, b = fold.inference_affine(bn)
    frozen = fold.FrozenAffine(axis=axis, dtype=policy)
    frozen.build(shape)
    frozen.scale.assign(a.astype(frozen.scale.dtype))
    frozen.offset.assign(b.astype(frozen.offset.dtype))
    x = rng.normal(1.0, 2.0, shape)

    y = frozen(keras.ops.cast(x, frozen.compute_dtype))

    assert y.dtype == frozen.compute_dtype
    expected = reference.inference_forward(
        keras.ops.cast(keras.ops.cast(x, frozen.compute_dtype), "float64"), axis,
        bn.gamma.numpy(), bn.beta.numpy(), bn.moving_mean.numpy(),
        bn.moving_variance.numpy(), bn.epsilon)
    assert reference.relative_error(keras.ops.convert_to_numpy(y), expected) < tolerance


@pytest.mark.parametrize("axis", [2, -3, [0, 1]], ids=["2", "-3", "all"])
def test_frozen_affine_axis_error_names_the_layer_argument_and_value(axis):
    layer = fold.FrozenAffine(axis=axis, name="frozen")
    with pytest.raises(ValueError, match=r"FrozenAffine layer 'frozen': argument `axis` "
                                         r"must be .*; received axis=" + re.escape(repr(axis))):
        layer(keras.ops.ones((2, 3)))


@pytest.mark.parametrize("impl", ["kerasbn", "keras"])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_inference_affine_is_the_float64_formula(impl, center, scale, rng):
    bn = _batch_norm(impl, center=center, scale=scale, epsilon=0.01)
    bn.build((None, 7))
    _randomize_batch_norms(keras.Sequential([keras.Input((7,)), bn]), rng)
    a, b = fold.inference_affine(bn)
    variance = bn.moving_variance.numpy().astype(np.float64)
    gamma = bn.gamma.numpy().astype(np.float64) if scale else 1.0
    beta = bn.beta.numpy().astype(np.float64) if center else 0.0
    expected_a = gamma / np.sqrt(variance + 0.01)
    assert a.dtype == b.dtype == np.float64
    np.testing.assert_allclose(a, expected_a, rtol=1e-14)
    # b = β - a·mean is a difference whose terms may nearly cancel: its rounding error
    # is relative to the terms, not to b (seed 4080459978: b = -0.0183 from terms ~1,
    # 1 ulp of the terms apart).
    shifted = expected_a * bn.moving_mean.numpy().astype(np.float64)
    np.testing.assert_allclose(b, beta - shifted, rtol=1e-14,
                               atol=1e-14 * np.max(np.abs(beta) + np.abs(shifted)))


def test_import_kerasbn_registers_frozen_affine_and_export_reexports_fold():
    assert keras.saving.get_registered_object("kerasbn>FrozenAffine") is fold.FrozenAffine
    for name in ("fold_batch_norms", "freeze_batch_norms", "FoldReport", "FrozenAffine"):
        assert getattr(export, name) is getattr(fold, name), name


def test_fold_does_not_import_the_savedmodel_writer():
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(fold))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert imported >= {"kerasbn.ops", "kerasbn._graph"}
    assert not {"kerasbn.export", "subprocess", "tempfile"} & imported, imported


# ------------------------------------------------------------ graphs holding operations

def _model_with_operations():
    """Keras records `+ 3.0`, `keras.ops` calls and `*` as operations, not layers."""
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.Conv2D(6, 3, use_bias=False, name="conv")(inputs)
    x = _batch_norm("keras", name="bn_folded")(x) + 3.0
    x = keras.ops.relu(x) * (1.0 / 6.0)  # MobileNetV3's hard-swish pattern
    x = keras.layers.Conv2D(6, 1, name="conv_times_2")(x) * 2.0
    x = _batch_norm("kerasbn", name="bn_after_multiply")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(4, name="dense")(x)
    outputs = _batch_norm("keras", name="bn_dense")(x)
    return keras.Model(inputs, keras.ops.tanh(outputs), name="with_operations")


@pytest.mark.parametrize("function", ["fold_batch_norms", "freeze_batch_norms"])
def test_models_with_operations_that_are_not_layers(function, rng):
    model = _model_with_operations()
    _randomize_batch_norms(model, rng)

    rebuilt, report = getattr(fold, function)(model, return_report=True)

    if function == "fold_batch_norms":
        assert report.folded == [("bn_folded", "conv"), ("bn_dense", "dense")]
        (name, reason), = report.frozen  # Keras numbers the operation's name
        assert name == "bn_after_multiply"
        assert re.fullmatch(r"it follows 'multiply(_[0-9]+)?' \(Multiply\), not a Conv/Dense",
                            reason), reason
    else:
        assert len(report.frozen) == 3 and not report.folded
    assert "BatchNormalization" not in _layer_types(rebuilt)
    assert [layer.name for layer in rebuilt.layers[:2]] == ["images", "conv"]
    assert rebuilt.output_names == model.output_names
    x = rng.normal(0.0, 1.0, (3, 8, 8, 3)).astype("float32")
    assert reference.relative_error(_inference(rebuilt, x), _inference(model, x)) < TOLERANCE


def test_embedding_mask_zero_model_folds_and_keeps_the_mask(rng):
    inputs = keras.Input((6,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(20, 8, mask_zero=True, name="embedding")(inputs)
    x = keras.layers.Dense(5, name="dense")(x)
    x = _batch_norm("kerasbn", name="bn")(x)  # Keras hands it the mask: a `not_equal` op
    outputs = keras.layers.GlobalAveragePooling1D(name="pool")(x)  # averages unmasked steps
    model = keras.Model(inputs, outputs)
    _randomize_batch_norms(model, rng)

    folded, report = fold.fold_batch_norms(model, return_report=True)

    assert report.folded == [("bn", "dense")]
    tokens = rng.integers(1, 20, (4, 6))
    tokens[:, 3:] = 0  # masked: the average runs over the first 3 steps only
    a, b = fold.inference_affine(model.get_layer("bn"))
    embedded = model.get_layer("embedding")(tokens)[:, :3]
    dense = keras.ops.convert_to_numpy(model.get_layer("dense")(embedded)).astype(np.float64)
    expected = (dense * a + b).mean(axis=1)
    assert reference.relative_error(_inference(folded, tokens), expected) < TOLERANCE
    assert reference.relative_error(_inference(model, tokens), expected) < TOLERANCE


class _Block(keras.layers.Layer):
    """A custom layer with a batch norm inside, which fold cannot see."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(name="hidden_bn")

    def call(self, x):
        return self.norm(x)


def test_batch_norms_inside_custom_layers_are_named_in_a_warning(rng):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, _Block(name="block")(keras.layers.Dense(4)(inputs)))
    _randomize_batch_norms(model, rng)
    with pytest.warns(UserWarning, match=r"fold_batch_norms: the batch norms \['hidden_bn'\]"
                                         r" sit inside custom layers"):
        folded = fold.fold_batch_norms(model)
    x = rng.normal(0.0, 1.0, (3, 4)).astype("float32")
    np.testing.assert_array_equal(_inference(folded, x), _inference(model, x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold.fold_batch_norms(_model_with_operations())  # nothing hidden: no warning
    assert not [w for w in caught if "inside custom layers" in str(w.message)]
