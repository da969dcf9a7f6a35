"""kerasbn._graph: model checks, the calls of a graph, and rebuilding models layer by layer.

A rebuilt model is compared with the original on fresh random inputs: bit for bit when
every layer is copied, against a float64 NumPy computation when layers are replaced.
"""

import keras
import numpy as np
import pytest

import kerasbn
import reference
from kerasbn import _graph


class _SubclassedBatchNorm(keras.layers.BatchNormalization):
    pass


@pytest.mark.parametrize("layer,expected", [
    (kerasbn.BatchNormalization(), True),
    (keras.layers.BatchNormalization(), True),
    (_SubclassedBatchNorm(), True),
    (keras.layers.LayerNormalization(), False),
    (keras.layers.Dense(2), False),
], ids=["kerasbn", "keras", "keras-subclass", "layer-norm", "dense"])
def test_is_batch_norm(layer, expected):
    assert _graph.is_batch_norm(layer) is expected


class _Subclassed(keras.Model):
    def call(self, x):
        return x


def test_check_model_errors_name_the_caller_argument_and_value():
    with pytest.raises(TypeError, match=r"^caller: argument `model` must be a keras.Model .*"
                                        r"received model='model.keras' of type str\.$"):
        _graph.check_model("model.keras", "caller")
    with pytest.raises(ValueError, match=r"^caller: argument `model` must be a Sequential or "
                                         r"functional model; received the subclassed model "
                                         r"'sub' of type _Subclassed, .* Build it otherwise\.$"):
        _graph.check_model(_Subclassed(name="sub"), "caller",
                           subclassed_hint="Build it otherwise.")
    unbuilt = keras.Sequential([keras.layers.Dense(2)], name="lazy")
    with pytest.raises(ValueError, match=r"^caller: argument `model` must be built .*"
                                         r"received the unbuilt model 'lazy'\.$"):
        _graph.check_model(unbuilt, "caller")
    _graph.check_model(unbuilt, "caller", built=False)  # no error
    assert not _graph.is_built(unbuilt)
    unbuilt(np.zeros((1, 3), "float32"))
    assert _graph.is_built(unbuilt)
    _graph.check_model(unbuilt, "caller")


def test_has_generated_name():
    unnamed, named = keras.Input((2,)), keras.Input((2,), name="images")
    assert _graph.has_generated_name(_graph.producer(unnamed))
    assert not _graph.has_generated_name(_graph.producer(named))
    assert _graph.has_generated_name(_graph.producer(unnamed + 3.0))
    assert _graph.has_generated_name(keras.layers.GlobalAveragePooling2D())
    assert not _graph.has_generated_name(keras.layers.Dense(2, name="logits"))
    assert not _graph.has_generated_name(keras.layers.Dense(2, name="dense_head"))


def test_calls_are_in_an_order_inputs_first_with_operations_and_nested_models():
    inputs = keras.Input((4,), name="features")
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")],
                             name="inner")
    x = keras.layers.Dense(4, name="first")(inputs) + 3.0
    outputs = keras.layers.Dense(2, name="last")(inner(x))
    model = keras.Model(inputs, outputs)

    calls = _graph.calls(model)

    names = [call.operation.name for call in calls]
    assert names[0] == "first" and names[2:] == ["inner", "last"]
    assert type(calls[1].operation).__name__ == "Add"
    assert calls[0].inputs == (inputs,) and calls[-1].outputs == (outputs,)
    assert [call.operation.name for call in _graph.calls(inner)] == ["inner_dense"]
    assert _graph.input_layer_names(model) == ["features"]


def _model_with_everything():
    """Operations that are not layers, a shared layer, nested Sequential and functional."""
    inner_sequential = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6)],
                                        name="inner_sequential")
    inner_inputs = keras.Input((6,))  # unnamed: its layer's name is Keras's
    inner_functional = keras.Model(inner_inputs, keras.ops.tanh(inner_inputs) * 2.0,
                                   name="inner_functional")
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, name="shared")
    x = shared(inputs) + 3.0
    x = shared(inner_sequential(x))
    x = keras.layers.Dense(6, activation="relu")(inner_functional(x))
    outputs = [keras.layers.Dense(2, name="head")(x), keras.ops.mean(x, axis=-1)]
    return keras.Model(inputs, outputs, name="everything")


def _outputs(model, x):
    return [keras.ops.convert_to_numpy(t) for t in model(x, training=False)]


def test_rebuild_copies_every_layer_and_operation_and_keeps_the_names(rng):
    model = _model_with_everything()
    weights_before = [w.numpy().copy() for w in model.weights]
    seen = []

    rebuilt = _graph.rebuild(model, lambda layer, path: seen.append((path, layer.name)),
                             "caller")

    assert type(rebuilt) is type(model) and rebuilt.name == model.name
    assert _graph.input_layer_names(rebuilt) == _graph.input_layer_names(model)
    assert _graph.input_layer_names(rebuilt)[0].startswith("input_layer")
    assert rebuilt.output_names == model.output_names
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in model.layers]
    for name in ("inner_sequential", "inner_functional"):
        original, copy = model.get_layer(name), rebuilt.get_layer(name)
        assert type(copy) is type(original) and copy is not original
        assert _graph.input_layer_names(copy) == _graph.input_layer_names(original)
    # Each layer once (the shared one too), operations never, nested ones with their path.
    assert len(seen) == 4 and seen.count(("", "shared")) == 1
    assert sorted(path for path, _ in seen) == ["", "", "", "inner_sequential/"]
    assert not {id(w) for w in rebuilt.weights} & {id(w) for w in model.weights}
    x = rng.normal(0.0, 1.0, (5, 6)).astype("float32")
    for actual, expected in zip(_outputs(rebuilt, x), _outputs(model, x)):
        np.testing.assert_array_equal(actual, expected)
    for weight, before in zip(model.weights, weights_before):
        np.testing.assert_array_equal(weight.numpy(), before)


def test_rebuild_replaces_and_removes_layers(rng):
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    hidden = keras.layers.Activation("tanh", name="tanh")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
    kernel, bias = (w.numpy().astype(np.float64) for w in model.get_layer("dense").weights)
    out_kernel, out_bias = (w.numpy().astype(np.float64) for w in model.get_layer("out").weights)

    def replace(layer, path):
        if layer.name == "tanh":
            return _graph.Replacement(None)
        if layer.name == "dense":
            return _graph.Replacement(keras.layers.Dense(4, name="dense"),
                                      {"kernel": 2.0 * kernel, "bias": bias - 1.0})
        return None

    for candidate in (model, keras.Sequential([keras.Input((3,), name="x"),
                                               *model.layers[1:]], name="chain")):
        rebuilt = _graph.rebuild(candidate, replace, "caller")
        assert "tanh" not in [layer.name for layer in rebuilt.layers]
        x = rng.normal(0.0, 1.0, (4, 3))
        expected = (x @ (2.0 * kernel) + bias - 1.0) @ out_kernel + out_bias
        actual = keras.ops.convert_to_numpy(rebuilt(x.astype("float32")))
        assert reference.relative_error(actual, expected) < 1e-6
        assert type(rebuilt) is type(candidate)


def test_rebuild_refuses_a_replacement_without_a_weight_of_the_original():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])

    def replace(layer, path):
        values = {"kernel": np.ones((3, 2)), "bias": np.zeros(2), "scale": np.ones(2)}
        return _graph.Replacement(keras.layers.Dense(2, name=layer.name), values)

    with pytest.raises(ValueError, match=r"^caller: layer 'dense' has weights \['scale'\] "
                                         r"that its replacement, a Dense, does not have\.$"):
        _graph.rebuild(model, replace, "caller")


def test_rebuild_keeps_compilation_and_an_unbuilt_sequential():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for candidate in (model, sequential):
        assert not _graph.rebuild(candidate, lambda layer, path: None, "caller").compiled
        candidate.compile(optimizer="sgd", loss="mse")
        rebuilt = _graph.rebuild(candidate, lambda layer, path: None, "caller")
        assert rebuilt.compiled and rebuilt.loss == "mse"
    unbuilt = keras.Sequential([keras.layers.Dense(2, name="a"), keras.layers.Dense(1)],
                               name="lazy")
    rebuilt = _graph.rebuild(unbuilt, lambda layer, path: None, "caller")
    assert not _graph.is_built(rebuilt) and rebuilt.name == "lazy"
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in unbuilt.layers]


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class _CountingInitializer(keras.initializers.Initializer):
    """Ones, counting its calls in `calls` (shared by every copy made from config)."""

    calls = 0

    def __call__(self, shape, dtype=None):
        type(self).calls += 1
        return keras.ops.ones(shape, dtype=dtype)


def _model_with_repeated_weight_names(rng):
    inputs = keras.Input((4, 6), name="x")
    hidden = keras.layers.Dense(6, kernel_initializer=_CountingInitializer(),
                                bias_initializer=_CountingInitializer(), name="dense")(inputs)
    # Its query, key, value and output sublayers each have a "kernel" and a "bias".
    attended = keras.layers.MultiHeadAttention(2, 3, name="attention")(hidden, hidden)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(attended))
    for weight in model.weights:  # values no initializer gives
        weight.assign(rng.normal(0.5, 1.0, weight.shape).astype(weight.dtype))
    return model


@pytest.mark.parametrize("replicas", [1, 4], ids=["one device", "4 replicas"])
def test_rebuilt_layers_are_created_with_the_originals_values(rng, replicas):
    """A copy's variables are made with the original's values (no initializer runs)
    where its weights' names are unique, and assigned after the build where they are
    not (the attention's sublayers); under a strategy every replica holds them."""
    import tensorflow as tf

    model = _model_with_repeated_weight_names(rng)
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
                if replicas > 1 else tf.distribute.get_strategy())
    before = _CountingInitializer.calls
    with strategy.scope():
        rebuilt = _graph.rebuild(model, lambda layer, path: None, "caller")
    assert _CountingInitializer.calls == before
    for copy, original in zip(rebuilt.weights, model.weights):
        assert copy.name == original.name and copy is not original
        replica_values = getattr(copy.value, "values", [copy.value])
        assert len(replica_values) == replicas
        for value in replica_values:
            np.testing.assert_array_equal(np.asarray(value), original.numpy())
    x = rng.normal(0.0, 1.0, (3, 4, 6)).astype("float32")
    for actual, expected in zip(_outputs(rebuilt, x), _outputs(model, x)):
        np.testing.assert_array_equal(actual, expected)
