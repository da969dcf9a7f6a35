"""kerasbn.convert_to_kerasbn: every Keras batch norm swapped, weights and behavior kept."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import _graph

# Keras's arguments, all away from their defaults, that the converted layer must keep.
KERAS_ARGUMENTS = {
    "momentum": 0.9,
    "epsilon": 1e-4,
    "beta_initializer": "random_normal",
    "gamma_initializer": "random_uniform",
    "moving_mean_initializer": "ones",
    "moving_variance_initializer": "zeros",
    "beta_regularizer": "l2",
    "gamma_regularizer": "l1",
    "beta_constraint": "non_neg",
    "gamma_constraint": "unit_norm",
}


def _batch_norms(model, kind):
    return [layer for layer in _graph.nested_layers(model) if type(layer) is kind]


def _randomize_batch_norms(model, rng):
    """Random, non-trivial weights in every batch norm (moving statistics included)."""
    for layer in _graph.nested_layers(model):
        if _graph.is_batch_norm(layer):
            for weight in layer.weights:
                shape = tuple(weight.shape)
                if "mean" in weight.name or weight.name == "beta":
                    weight.assign(0.3 * rng.standard_normal(shape))
                else:
                    weight.assign(rng.uniform(0.5, 1.5, shape))


def _snapshot(model):
    return [(w.path, w.numpy()) for w in model.weights]


def _assert_unchanged(model, snapshot):
    assert len(model.weights) == len(snapshot)
    for (path, value), weight in zip(snapshot, model.weights):
        assert weight.path == path
        np.testing.assert_array_equal(weight.numpy(), value)


def _assert_same_outputs(original, converted, x, training, tolerance):
    expected = np.asarray(original(x, training=training))
    actual = np.asarray(converted(x, training=training))
    assert actual.shape == expected.shape
    assert reference.relative_error(actual, expected) < tolerance


def _nested_model():
    """Functional, with a nested Sequential, a nested functional model, a shared layer,
    channels-first and channels-last batch norms, and a kerasbn layer already there."""
    inner_sequential = keras.Sequential([
        keras.Input((6, 6, 4)),
        keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(**KERAS_ARGUMENTS),
        keras.layers.ReLU(),
    ], name="inner_sequential")
    inner_input = keras.Input((4, 6, 6))
    inner_functional = keras.Model(
        inner_input,
        keras.layers.BatchNormalization(axis=1, center=False)(inner_input),
        name="inner_functional",
    )
    inputs = keras.Input((6, 6, 4))
    shared = keras.layers.BatchNormalization(name="shared")
    x = shared(inputs)
    x = inner_sequential(x)
    x = shared(x)  # the same layer, called twice
    y = keras.layers.Permute((3, 1, 2))(x)
    y = inner_functional(y)
    y = keras.layers.Permute((2, 3, 1))(y)
    x = keras.layers.Add()([x, y])
    x = kerasbn.BatchNormalization(momentum=0.8, bessel_correction=True,
                                   name="already_kerasbn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    return keras.Model(inputs, outputs, name="outer")


def test_sequential_model_keeps_arguments_weights_and_outputs(rng):
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4),
        keras.layers.BatchNormalization(**KERAS_ARGUMENTS),
        keras.layers.Dense(3),
        keras.layers.BatchNormalization(scale=False, trainable=False),
    ])
    _randomize_batch_norms(model, rng)
    before = _snapshot(model)
    converted = kerasbn.convert_to_kerasbn(model)

    assert isinstance(converted, keras.Sequential)
    assert not _batch_norms(converted, keras.layers.BatchNormalization)
    for old, new in zip(_batch_norms(model, keras.layers.BatchNormalization),
                        _batch_norms(converted, kerasbn.BatchNormalization)):
        assert new.synchronized
        assert new.name == old.name and new.trainable == old.trainable
        old_config, new_config = old.get_config(), new.get_config()
        for key, value in old_config.items():
            if key not in ("synchronized", "renorm_clipping"):
                assert new_config[key] == value, key
        for a, b in zip(old.weights, new.weights):
            assert a.name == b.name
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The original is unchanged: its own layers, its own weights.
    assert _batch_norms(model, kerasbn.BatchNormalization) == []
    _assert_unchanged(model, before)
    x = (rng.standard_normal((16, 5)) * 2 + 1).astype(np.float32)
    _assert_same_outputs(model, converted, x, training=False, tolerance=1e-6)
    _assert_same_outputs(model, converted, x, training=True, tolerance=1e-5)


def test_nested_functional_model_with_shared_and_existing_layers(rng):
    model = _nested_model()
    _randomize_batch_norms(model, rng)
    model.get_layer("already_kerasbn").moving_variance.assign(rng.uniform(1, 2, 4))
    before = _snapshot(model)
    converted = kerasbn.convert_to_kerasbn(model, synchronized=True)

    assert not _batch_norms(converted, keras.layers.BatchNormalization)
    converted_bns = _batch_norms(converted, kerasbn.BatchNormalization)
    assert len(converted_bns) == 4  # shared (once), inner sequential, inner functional, ours
    assert all(layer.synchronized for layer in converted_bns)
    already = converted.get_layer("already_kerasbn")
    assert already.bessel_correction and already.momentum == 0.8
    assert converted.get_layer("inner_functional").layers[-1].axis == 1
    assert not converted.get_layer("inner_functional").layers[-1].center
    _assert_unchanged(model, before)
    x = (rng.standard_normal((8, 6, 6, 4)) * 2 + 1).astype(np.float32)
    _assert_same_outputs(model, converted, x, training=False, tolerance=1e-6)
    _assert_same_outputs(model, converted, x, training=True, tolerance=1e-5)


def test_kerasbn_layers_keep_their_config_but_synchronized():
    model = keras.Sequential([
        keras.Input((4,)),
        kerasbn.BatchNormalization(synchronized=True, sync_group_size=2, momentum=0.5,
                                   renorm=True, jit_compile=False),
    ])
    unsynced = kerasbn.convert_to_kerasbn(model, synchronized=False).layers[0]
    assert not unsynced.synchronized and unsynced.sync_group_size is None
    config = unsynced.get_config()
    expected = model.layers[0].get_config()
    for key in ("synchronized", "sync_group_size"):
        del config[key], expected[key]
    assert config == expected
    resynced = kerasbn.convert_to_kerasbn(model, synchronized=True).layers[0]
    assert resynced.synchronized and resynced.sync_group_size == 2


def test_renorm_settings_and_weights_carry_over(rng):
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.5}
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping,
                                        renorm_momentum=0.9),
    ])
    _randomize_batch_norms(model, rng)
    converted = kerasbn.convert_to_kerasbn(model)
    old, new = model.layers[0], converted.layers[0]
    assert new.renorm and new.renorm_momentum == 0.9 and new.renorm_clipping == clipping
    assert sorted(w.name for w in new.weights) == sorted(w.name for w in old.weights)
    values = {w.name: w.numpy() for w in old.weights}
    for weight in new.weights:
        np.testing.assert_array_equal(weight.numpy(), values[weight.name])
    x = (rng.standard_normal((10, 3)) + 1).astype(np.float32)
    _assert_same_outputs(model, converted, x, training=False, tolerance=1e-6)


def test_keras_applications_network(rng):
    # Built in float64 so that training mode, whose 50-odd batch norms in series see
    # only 4 values a channel at the 1x1 end, compares the two layers' math and not
    # their float32 rounding.
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                               alpha=0.35, classes=5)
    finally:
        keras.config.set_dtype_policy(policy)
    assert model.output.dtype == "float64"
    _randomize_batch_norms(model, rng)
    count = len(_batch_norms(model, keras.layers.BatchNormalization))
    converted = kerasbn.convert_to_kerasbn(model)
    assert len(_batch_norms(converted, kerasbn.BatchNormalization)) == count > 40
    assert not _batch_norms(converted, keras.layers.BatchNormalization)
    assert len(converted.weights) == len(model.weights)
    x = rng.uniform(-1, 1, (4, 32, 32, 3))
    _assert_same_outputs(model, converted, x, training=False, tolerance=1e-12)
    _assert_same_outputs(model, converted, x, training=True, tolerance=1e-10)


def test_converted_under_a_strategy_gets_distributed_variables(mirrored_strategy, rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    _randomize_batch_norms(model, rng)
    with mirrored_strategy.scope():
        converted = kerasbn.convert_to_kerasbn(model)
    layer = converted.layers[0]
    assert isinstance(layer.moving_mean.value, tf.distribute.DistributedValues)
    np.testing.assert_array_equal(layer.moving_mean.numpy(),
                                  model.layers[0].moving_mean.numpy())


@pytest.mark.parametrize("value", [None, "model", keras.layers.Dense(2)],
                         ids=["None", "str", "layer"])
def test_non_models_are_a_type_error_naming_model(value):
    with pytest.raises(TypeError, match="`model`"):
        kerasbn.convert_to_kerasbn(value)


def test_subclassed_models_are_refused_with_a_clear_error():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def call(self, x):
            return self.norm(x)

    with pytest.raises(ValueError, match="subclassed"):
        kerasbn.convert_to_kerasbn(Subclassed())


# ------------------------------------------------------------ graphs holding operations

def _hard_swish_model():
    """The issue's model: Keras records `+ 3.0` as an operation, not a layer."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x) + 3.0
    x = keras.ops.relu6(x) * keras.ops.sigmoid(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def _masked_text_model():
    """Embedding(mask_zero=True): Keras hands the batch norm a mask made by an operation."""
    inputs = keras.Input((7,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(30, 6, mask_zero=True)(inputs)
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(5)(x))
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="scores")(x), name="text")


@pytest.mark.parametrize("build", [_hard_swish_model, _masked_text_model],
                         ids=["hard-swish", "embedding-mask"])
def test_models_with_operations_that_are_not_layers(build, rng):
    model = build()
    _randomize_batch_norms(model, rng)
    converted = kerasbn.convert_to_kerasbn(model, synchronized=False)

    assert len(_batch_norms(converted, kerasbn.BatchNormalization)) == 1
    assert not _batch_norms(converted, keras.layers.BatchNormalization)
    # Names kept: the input layer's (Keras's generated one too), every layer's, outputs'.
    assert _graph.input_layer_names(converted) == _graph.input_layer_names(model)
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    assert converted.output_names == model.output_names and converted.name == model.name
    if build is _masked_text_model:
        x = rng.integers(1, 30, (16, 7)).astype("int32")
        x[:8, 4:] = 0  # masked steps: left out of the statistics in training mode
    else:
        x = (rng.standard_normal((16, 8, 8, 3)) * 2 + 1).astype(np.float32)
    _assert_same_outputs(model, converted, x, training=False, tolerance=1e-6)
    _assert_same_outputs(model, converted, x, training=True, tolerance=1e-5)


def test_model_without_batch_norm_converts_unchanged(rng):
    inputs = keras.Input((5,), name="features")
    x = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(keras.ops.square(x) - 1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = kerasbn.convert_to_kerasbn(model, bessel_correction=True)
    assert not [w for w in caught if "convert_to_kerasbn" in str(w.message)]
    assert [type(layer) for layer in converted.layers] == [type(layer) for layer in model.layers]
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    assert _graph.input_layer_names(converted) == ["features"]
    x = rng.standard_normal((6, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(converted(x)), np.asarray(model(x)))


# ------------------------------------------------------------------------ layer options

def test_layer_options_reach_every_batch_norm(rng):
    model = _nested_model()
    converted = kerasbn.convert_to_kerasbn(model, synchronized=False, bessel_correction=True,
                                           jit_compile=False)
    layers = _batch_norms(converted, kerasbn.BatchNormalization)
    assert len(layers) == 4  # three converted, and the kerasbn layer already there
    assert all(layer.bessel_correction and not layer.jit_compile for layer in layers)

    # The option acts: the moving variance moves toward the unbiased variance m/(m-1)·var.
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(3, name="dense")
    small = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9, name="bn")(
        dense(inputs)))
    converted = kerasbn.convert_to_kerasbn(small, synchronized=False, bessel_correction=True)
    x = (rng.standard_normal((5, 3)) * 3 + 2).astype(np.float32)
    converted(x, training=True)
    z = np.asarray(dense(x), np.float64)
    count, _, variance = reference.moments(z, -1)
    expected = reference.moving_average(np.ones(3), variance * count / (count - 1), 0.9)
    np.testing.assert_allclose(converted.get_layer("bn").moving_variance.numpy(), expected,
                               rtol=1e-5)


def test_virtual_batch_size_makes_ghost_layers_that_normalize_each_group(rng):
    k = 4
    inputs = keras.Input((5, 5, 3))
    conv = keras.layers.Conv2D(6, 3, name="conv")
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(conv(inputs)))
    _randomize_batch_norms(model, rng)
    converted = kerasbn.convert_to_kerasbn(model, synchronized=False, virtual_batch_size=k)
    bn = converted.get_layer("bn")
    assert type(bn) is kerasbn.BatchNormalization and bn.virtual_batch_size == k

    x = rng.normal(1.0, 2.0, (10, 5, 5, 3)).astype(np.float32)  # groups of 4, 4 and 2
    y = np.asarray(converted(x, training=True))
    z = np.asarray(conv(x), np.float64)
    gamma, beta = model.get_layer("bn").gamma.numpy(), model.get_layer("bn").beta.numpy()
    groups = [reference.train_forward(z[start:start + k], -1, gamma, beta, bn.epsilon)[0]
              for start in range(0, len(z), k)]
    assert reference.relative_error(y, np.concatenate(groups)) < 1e-5
    whole, *_ = reference.train_forward(z, -1, gamma, beta, bn.epsilon)
    assert reference.relative_error(y, whole) > 1e-2  # not the whole batch's statistics


@pytest.mark.parametrize("options,error,message", [
    ({"virtual_batch_sise": 8}, ValueError, r"virtual_batch_sise"),
    ({"momentum": 0.5}, ValueError, r"received momentum=0.5, an argument of "
                                    r"keras.layers.BatchNormalization"),
    ({"name": "bn"}, ValueError, r"received name='bn', an argument of keras"),
    ({"sync_group_size": 0}, ValueError, r"`sync_group_size` must be None or an int >= 1; "
                                         r"received sync_group_size=0"),
], ids=["unknown", "keras-argument", "name", "bad-value"])
@pytest.mark.parametrize("with_batch_norm", [True, False], ids=["bn", "no-bn"])
def test_layer_option_errors_name_the_option(options, error, message, with_batch_norm):
    layers = [keras.Input((3,)), keras.layers.Dense(2)]
    if with_batch_norm:
        layers.append(keras.layers.BatchNormalization())
    with pytest.raises(error, match=r"convert_to_kerasbn: .*" + message):
        kerasbn.convert_to_kerasbn(keras.Sequential(layers), **options)
