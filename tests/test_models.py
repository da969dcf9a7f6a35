"""Tests of training.models: every model with every batch norm, weight order, errors."""

import keras
import numpy as np
import pytest

import kerasbn
from training import models

INPUT_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
# stem, two per residual block (3 stages of one block), the projections of stages 2-3.
RESNET_BATCH_NORMS = 1 + 2 * 3 + 2
MLP_BATCH_NORMS = 3
BN_CLASSES = {"kerasbn": kerasbn.BatchNormalization,
              "keras": keras.layers.BatchNormalization}


def batch_norms(model):
    return [layer for layer in model.layers
            if isinstance(layer, (kerasbn.BatchNormalization,
                                  keras.layers.BatchNormalization))]


def images(rng, batch=16):
    """Digit-like inputs: values in [0, 1], never all zeros."""
    return rng.uniform(0.0, 1.0, (batch,) + INPUT_SHAPE).astype("float32")


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("bn", models.BATCH_NORMS)
def test_every_model_builds_with_every_batch_norm(name, bn, rng):
    model = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, bn)

    assert model.name == f"{name}_{bn}"
    assert model.input_shape == (None,) + INPUT_SHAPE
    norms = batch_norms(model)
    expected = {"resnet": RESNET_BATCH_NORMS, "mlp": MLP_BATCH_NORMS}[name]
    assert len(norms) == (0 if bn == "none" else expected)
    assert all(type(layer) is BN_CLASSES[bn] for layer in norms)
    # A layer in front of a batch norm has no bias (β is the bias); without one, it has.
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and \
                layer.name != "predictions":
            assert layer.use_bias == (bn == "none"), layer.name

    x = images(rng)
    for training in (False, True):
        probabilities = keras.ops.convert_to_numpy(model(x, training=training))
        assert probabilities.shape == (16, NUM_CLASSES)
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
        assert np.all(np.isfinite(probabilities))


@pytest.mark.parametrize("name", models.MODELS)
def test_kerasbn_and_keras_variants_copy_weights_one_to_one(name, rng):
    ours = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, "kerasbn")
    theirs = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, "keras")
    assert [(w.path.split("/", 1)[-1], w.shape) for w in ours.weights] == \
        [(w.path.split("/", 1)[-1], w.shape) for w in theirs.weights]

    # Non-trivial batch-norm weights, so that a swapped gamma/beta or mean/variance shows.
    weights = []
    for variable in theirs.weights:
        value = keras.ops.convert_to_numpy(variable)
        if "moving_variance" in variable.path:
            value = rng.uniform(0.5, 2.0, value.shape)
        elif any(key in variable.path for key in ("gamma", "beta", "moving_mean")):
            value = rng.normal(0.0, 0.5, value.shape)
        weights.append(value.astype("float32"))
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())

    x = images(rng)
    for training in (False, True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours(x, training=training)),
            keras.ops.convert_to_numpy(theirs(x, training=training)),
            rtol=1e-4, atol=1e-5, err_msg=f"training={training}")


def test_the_no_batch_norm_variant_keeps_the_other_layers_in_order():
    for name in models.MODELS:
        with_bn = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, "kerasbn")
        without = models.build_model(name, INPUT_SHAPE, NUM_CLASSES, "none")
        assert [layer.name for layer in with_bn.layers if layer not in batch_norms(with_bn)] \
            == [layer.name for layer in without.layers]


def test_batch_norm_options_reach_every_layer():
    model = models.build_model("resnet", INPUT_SHAPE, NUM_CLASSES, "kerasbn",
                               synchronized=True, bn_momentum=0.9, bn_jit_compile=False)
    for layer in batch_norms(model):
        assert (layer.synchronized, layer.momentum, layer.jit_compile) == (True, 0.9, False)
    model = models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, "keras",
                               synchronized=True, bn_momentum=0.5)
    for layer in batch_norms(model):
        assert (layer.synchronized, layer.momentum) == (True, 0.5)


def test_other_input_shapes_and_class_counts(rng):
    model = models.build_model("resnet", (32, 32, 3), 100, "kerasbn")
    x = rng.uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")
    assert tuple(model(x).shape) == (2, 100)
    model = models.build_model("mlp", (28, 28), 2, "keras")
    assert tuple(model(x[:, :28, :28, 0]).shape) == (2, 2)


def test_mixed_precision_computes_in_float16_and_outputs_float32(rng):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model("resnet", INPUT_SHAPE, NUM_CLASSES, "kerasbn")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    assert model.get_layer("stem_bn").moving_mean.dtype == "float32"
    probabilities = keras.ops.convert_to_numpy(model(images(rng), training=True))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-3)


def test_saved_model_reloads_with_identical_outputs(tmp_path, rng):
    model = models.build_model("resnet", INPUT_SHAPE, NUM_CLASSES, "kerasbn",
                               synchronized=True)
    x = images(rng)
    model(x, training=True)  # moves the moving statistics off their initial values
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in batch_norms(loaded)] == \
        [kerasbn.BatchNormalization] * RESNET_BATCH_NORMS
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize("kwargs, argument", [
    ({"name": "vgg"}, "name"),
    ({"bn": "batchnorm"}, "bn"),
    ({"bn": None}, "bn"),
    ({"input_shape": (8, 8)}, "input_shape"),       # the ResNet needs (h, w, c)
    ({"input_shape": (8, 0, 1)}, "input_shape"),
    ({"input_shape": ()}, "input_shape"),
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 2.0}, "num_classes"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, argument):
    arguments = {"name": "resnet", "input_shape": INPUT_SHAPE, "num_classes": NUM_CLASSES,
                 "bn": "kerasbn", **kwargs}
    with pytest.raises(ValueError, match=f"argument `{argument}`") as error:
        models.build_model(**arguments)
    message = str(error.value)
    assert "\n" not in message
    assert repr(arguments[argument]) in message


@pytest.mark.parametrize("momentum", [1.5, -0.1])
def test_a_momentum_out_of_range_is_refused_by_the_kerasbn_layer_itself(momentum):
    # build_model does not check it again: the layer is where its range is defined.
    with pytest.raises(ValueError) as error:
        models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, "kerasbn", bn_momentum=momentum)
    message = str(error.value)
    assert "BatchNormalization layer 'hidden1_bn'" in message
    assert "argument `momentum`" in message and f"momentum={momentum!r}" in message


def test_the_resnet_has_the_size_its_docstring_gives():
    model = models.build_model("resnet", INPUT_SHAPE, NUM_CLASSES, "kerasbn")
    assert model.count_params() == 78_426
    assert "78,426 weights" in models.__doc__


def test_numpy_integers_are_accepted_as_shapes_and_class_counts():
    model = models.build_model("mlp", tuple(np.array(INPUT_SHAPE)), np.int64(10), "none")
    assert model.output_shape == (None, 10)


def test_kerasbn_layer_options_reach_every_layer_and_train(rng):
    model = models.build_model("resnet", INPUT_SHAPE, NUM_CLASSES, "kerasbn",
                               virtual_batch_size=4, momentum_warmup=True, renorm=True)
    norms = batch_norms(model)
    assert len(norms) == RESNET_BATCH_NORMS
    for layer in norms:
        assert (layer.virtual_batch_size, layer.momentum_warmup, layer.renorm) == (
            4, True, True)
    # A batch of 10 trains in groups 4, 4, 2; the update counter counts one update.
    x = images(rng, batch=10)
    probabilities = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("stem_bn").update_count), 1)


def test_without_options_the_layers_are_the_ones_always_built():
    model = models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, "kerasbn")
    for layer in batch_norms(model):
        assert (layer.virtual_batch_size, layer.momentum_warmup, layer.renorm) == (
            None, False, False)


def test_keras_layers_take_the_options_keras_has(rng):
    model = models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, "keras", renorm=True)
    for layer in batch_norms(model):
        assert type(layer) is keras.layers.BatchNormalization and layer.renorm
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(model(images(rng),
                                                                training=True))))


@pytest.mark.parametrize("bn, options, expected", [
    ("keras", {"virtual_batch_size": 8},
     r"\['virtual_batch_size'\] are not arguments of keras.layers.BatchNormalization "
     r"\(bn='keras'\); use bn='kerasbn'"),
    ("none", {"renorm": True}, r"batch-norm options \['renorm'\] need a batch norm; "
                               r"received bn='none'"),
])
def test_options_the_batch_norm_does_not_have_are_refused(bn, options, expected):
    with pytest.raises(ValueError, match=expected) as error:
        models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, bn, **options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size", [0, -2, 2.5])
def test_a_virtual_batch_size_is_checked_by_the_kerasbn_layer_itself(size):
    with pytest.raises(ValueError) as error:
        models.build_model("mlp", INPUT_SHAPE, NUM_CLASSES, "kerasbn",
                           virtual_batch_size=size)
    message = str(error.value)
    assert "BatchNormalization layer 'hidden1_bn'" in message
    assert "argument `virtual_batch_size`" in message
    assert f"virtual_batch_size={size!r}" in message
