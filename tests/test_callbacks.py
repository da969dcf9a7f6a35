"""kerasbn.callbacks.PopulationStatistics in `fit`: validation, checkpoints and the
returned model see population statistics; one device and 4 MirroredStrategy replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import _population_parts
from kerasbn import statistics

STATISTICS = ("moving_mean", "moving_variance")


def build_model(synchronized=False):
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, name="dense"),
        kerasbn.BatchNormalization(name="bn", jit_compile=False, synchronized=synchronized),
        keras.layers.ReLU(),
        keras.layers.Dense(4, name="dense_2"),
        keras.layers.BatchNormalization(name="stock", synchronized=synchronized),
        keras.layers.Dense(1, name="head"),
    ])


def make_data(rng, count):
    x = (rng.standard_normal((count, 6)) * 2 + 3).astype(np.float32)
    y = (x[:, :1] * 0.5 - x[:, 1:2] + rng.standard_normal((count, 1)) * 0.1).astype(np.float32)
    return x, y


def batch_norm_values(model):
    return {f"{layer.name}/{name}": getattr(layer, name).numpy()
            for layer in model.layers if statistics.is_batch_norm(layer)
            for name in STATISTICS}


class Recorder(keras.callbacks.Callback):
    """Every weight at each validation inside fit, as this callback's turn comes."""

    def __init__(self):
        super().__init__()
        self.weights = []
        self.in_fit = False

    def on_train_begin(self, logs=None):
        self.in_fit = True

    def on_test_begin(self, logs=None):
        if self.in_fit:
            self.weights.append([w.numpy() for w in self.model.weights])


def copy_of(model, weights):
    copy = build_model()
    copy.compile(loss="mse", jit_compile=False)
    copy.set_weights(weights)
    return copy


def test_validation_and_checkpoints_see_population_statistics(rng, tmp_path):
    model = build_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)
    x, y = make_data(rng, 100)  # a last batch of 4
    val_x, val_y = make_data(rng, 40)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    before, after = Recorder(), Recorder()
    callback = kerasbn.callbacks.PopulationStatistics(train)
    checkpoint = str(tmp_path / "epoch.weights.h5")
    history = model.fit(
        train, validation_data=(val_x, val_y), epochs=2, verbose=0, shuffle=False,
        callbacks=[before, callback, after,
                   keras.callbacks.ModelCheckpoint(checkpoint, save_weights_only=True)])

    assert len(before.weights) == len(after.weights) == 2
    for epoch, (moving, population) in enumerate(zip(before.weights, after.weights)):
        # What the callback set is what a recompute from the moving averages gives ...
        expected = copy_of(model, moving)
        kerasbn.recompute_statistics(expected, train, verbose=0)
        for a, b in zip(expected.weights, population):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=0, err_msg=a.path)
        moved = batch_norm_values(copy_of(model, moving))
        assert all(not np.array_equal(value, moved[key])
                   for key, value in batch_norm_values(expected).items())
        # ... and the validation loss of that epoch was computed with it, not with the
        # moving averages, whose loss is 10 times the comparison's tolerance away or more.
        population_loss = copy_of(model, population).evaluate(val_x, val_y, verbose=0)
        moving_loss = copy_of(model, moving).evaluate(val_x, val_y, verbose=0)
        assert history.history["val_loss"][epoch] == pytest.approx(population_loss, rel=1e-6)
        assert abs(moving_loss - population_loss) > 1e-5 * population_loss

    # The checkpoint after the last validation, and the model fit returns.
    saved = build_model()
    saved.load_weights(checkpoint)
    for a, b in zip(saved.weights, after.weights[-1]):
        np.testing.assert_array_equal(a.numpy(), b)
    for a, b in zip(model.weights, after.weights[-1]):  # weights unchanged since: same pass
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=0)
    assert callback.summary is not None and callback.summary.examples == 100
    # One trace of the pass for the whole of fit (2 validations and the end), the last
    # partial batch included.
    assert callback._pass._step.experimental_get_tracing_count() == 1

    # evaluate outside fit leaves the statistics alone.
    last = callback.summary
    model.evaluate(val_x, val_y, verbose=0, callbacks=[callback])
    assert callback.summary is last


def test_under_four_replicas(mirrored_strategy, rng):
    """Synchronized layers: the statistics after fit are those of a one-device recompute
    of the final weights, identical on every replica; validation saw them."""
    strategy = mirrored_strategy
    with strategy.scope():
        model = build_model(synchronized=True)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)
    x, y = make_data(rng, 84)
    # Whole validation batches of a multiple of 4: Keras 3.15's evaluate under
    # MirroredStrategy fails on a partial one (AddN of [8, 6] and [6, 6]), callback or not.
    val_x, val_y = make_data(rng, 32)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    callback = kerasbn.callbacks.PopulationStatistics(train)
    history = model.fit(train, validation_data=(val_x, val_y), validation_batch_size=16,
                        epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    assert callback.summary.examples == 84

    single = copy_of(model, [w.numpy() for w in model.weights])
    kerasbn.recompute_statistics(single, train, verbose=0)
    for layer in model.layers:
        if statistics.is_batch_norm(layer):
            for name in STATISTICS:
                copies = [c.numpy() for c in _population_parts.components(getattr(layer, name))]
                assert len(copies) == 4
                for copy in copies[1:]:
                    np.testing.assert_array_equal(copies[0], copy)
                expected = getattr(single.get_layer(layer.name), name).numpy()
                assert reference.relative_error(copies[0], expected) < 1e-5, (layer.name, name)
    loss = copy_of(model, [w.numpy() for w in model.weights]).evaluate(val_x, val_y,
                                                                         verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(loss, rel=1e-5)


def test_bad_arguments_are_refused_when_the_callback_is_made(rng):
    def batches():
        yield rng.standard_normal((4, 6))

    with pytest.raises(ValueError, match="`data`.*generator"):
        kerasbn.callbacks.PopulationStatistics(batches())
    with pytest.raises(ValueError, match="`steps`.*steps=0"):
        kerasbn.callbacks.PopulationStatistics(rng.standard_normal((4, 6)), steps=0)
    with pytest.raises(ValueError, match="`verbose`"):
        kerasbn.callbacks.PopulationStatistics(rng.standard_normal((4, 6)), verbose="yes")
