"""One contract every configuration of kerasbn.BatchNormalization must keep.

In the spirit of Keras's own `run_layer_test`: build, weights, serialization, a `.keras`
round trip, training with `fit`, and mixed precision, checked the same way for every
configuration the tests pass in.
"""

import os

import keras
import numpy as np

import kerasbn
import reference


def _random_batch(rng, input_shape, batch=8):
    return (rng.standard_normal((batch,) + tuple(input_shape)) * 2 + 1).astype("float32")


def check_build_and_weights(config, input_shape):
    layer = kerasbn.BatchNormalization(**config)
    layer.build((None,) + tuple(input_shape))
    full_shape = (None,) + tuple(input_shape)
    channel_shape = tuple(full_shape[a] for a in reference.channel_axes(
        len(full_shape), config.get("axis", -1)))
    trainable = ["gamma"] * config.get("scale", True) + ["beta"] * config.get("center", True)
    expected = trainable + ["moving_mean", "moving_variance"]
    if config.get("renorm"):
        expected += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    if config.get("momentum_warmup"):
        expected += ["update_count"]
    assert [w.name for w in layer.weights] == expected
    assert [w.name for w in layer.trainable_weights] == trainable
    for weight in layer.weights:
        assert tuple(weight.shape) == channel_shape
        assert weight.dtype == "float32"


def check_config_round_trip(config, input_shape, rng):
    layer = kerasbn.BatchNormalization(**config)
    x = _random_batch(rng, input_shape)
    layer(x, training=True)
    clone = kerasbn.BatchNormalization.from_config(layer.get_config())
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone(x, training=False), layer(x, training=False))
    np.testing.assert_array_equal(clone(x, training=True), layer(x, training=True))


def _model(config, input_shape):
    return keras.Sequential([
        keras.Input(input_shape),
        kerasbn.BatchNormalization(**config),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def check_fit_and_keras_file(config, input_shape, rng, tmp_path):
    model = _model(config, input_shape)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _random_batch(rng, input_shape, 32), rng.standard_normal((32, 3))
    bn = model.layers[0]
    before = bn.moving_mean.numpy().copy()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    if config.get("momentum") == 1.0 and not config.get("momentum_warmup"):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), before)  # kept, bit for bit
    else:
        assert not np.array_equal(bn.moving_mean.numpy(), before), "moving statistics moved"
    path = os.path.join(str(tmp_path), "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[0]) is kerasbn.BatchNormalization
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for saved, restored in zip(bn.weights, loaded.layers[0].weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def check_mixed_precision(config, input_shape, rng, policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = _model(config, input_shape)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        x, y = _random_batch(rng, input_shape, 16), rng.standard_normal((16, 3))
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        bn = model.layers[0]
        assert all(w.dtype == "float32" for w in bn.weights)
        out = bn(keras.ops.cast(x, bn.compute_dtype), training=True)
        assert out.dtype == bn.compute_dtype == policy.split("_")[1]
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(
            keras.ops.cast(out, "float32"))))
    finally:
        keras.config.set_dtype_policy(previous)


def run_layer_contract(config, input_shape, rng, tmp_path):
    """Checks every part of the contract for one configuration."""
    check_build_and_weights(config, input_shape)
    check_config_round_trip(config, input_shape, rng)
    check_fit_and_keras_file(config, input_shape, rng, tmp_path)
    for policy in ("mixed_float16", "mixed_bfloat16"):
        check_mixed_precision(config, input_shape, rng, policy)
