"""Tests of training.callbacks: the training program's callbacks and their helpers.

Their work inside a real run (TensorBoard summaries, interruption and resumption) is
tested end to end in test_train.py; here each piece is checked on its own.
"""

import keras
import numpy as np
import pytest

import kerasbn
from training import callbacks


def test_batch_norm_layers_are_found_in_nested_models_in_order(rng):
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense"),
                              kerasbn.BatchNormalization(name="inner_bn")], name="inner")
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="first_bn")(inputs)
    x = inner(x)
    outputs = kerasbn.BatchNormalization(name="last_bn")(x)
    model = keras.Model(inputs, outputs)
    model(rng.normal(3.0, 2.0, (8, 4)).astype("float32"), training=True)

    assert [layer.name for layer in callbacks.batch_norm_layers(model)] == [
        "first_bn", "inner_bn", "last_bn"]
    statistics = callbacks.batch_norm_statistics(model)
    assert list(statistics) == ["first_bn", "inner_bn", "last_bn"]
    for name, stats in statistics.items():
        layer = model.get_layer(name) if name != "inner_bn" else inner.get_layer(name)
        np.testing.assert_array_equal(stats["moving_mean"],
                                      keras.ops.convert_to_numpy(layer.moving_mean))
        np.testing.assert_array_equal(stats["moving_variance"],
                                      keras.ops.convert_to_numpy(layer.moving_variance))
    # The update moved them: the comparison above compares something.
    assert np.max(np.abs(statistics["first_bn"]["moving_mean"])) > 0.0


def test_epoch_timer_times_the_training_steps_only(monkeypatch):
    clock = iter([10.0, 11.0, 12.5, 20.0, 21.0, 24.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    timer = callbacks.EpochTimer()
    for epoch in range(2):
        timer.on_epoch_begin(epoch)          # 10.0, then 20.0
        timer.on_train_batch_end(0)          # 11.0, then 21.0
        timer.on_train_batch_end(1)          # 12.5, then 24.0
        timer.on_epoch_end(epoch)            # evaluation and saving are not counted
    assert timer.seconds == [2.5, 4.0]


def test_interrupt_after_epoch_stops_at_that_epoch_only():
    callback = callbacks.InterruptAfterEpoch(2)
    callback.on_epoch_end(0)
    with pytest.raises(callbacks.TrainingInterrupted, match="stopped after epoch 2"):
        callback.on_epoch_end(1)
    callback.on_epoch_end(2)


def test_batch_norm_statistics_without_a_log_dir_writes_nothing(tmp_path, rng):
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization()])
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(0.0, 1.0, (16, 3)).astype("float32")
    callback = callbacks.BatchNormStatistics(None)
    model.fit(x, x, epochs=1, verbose=0, callbacks=[callback])
    assert callback._writer is None

    written = callbacks.BatchNormStatistics(str(tmp_path / "bn"))
    model.fit(x, x, epochs=1, verbose=0, callbacks=[written])
    assert list((tmp_path / "bn").glob("events.out.tfevents.*"))


def test_examples_per_second_uses_the_median_epoch_after_the_first():
    assert callbacks.examples_per_second(100, [60.0, 40.0, 1.0, 2.0]) == pytest.approx(50.0)
    assert callbacks.examples_per_second(100, [60.0, 2.0]) == pytest.approx(50.0)
    assert callbacks.examples_per_second(100, [4.0]) == pytest.approx(25.0)
    assert np.isnan(callbacks.examples_per_second(100, []))


def summaries(log_dir):
    """{tag: [(step, value as array)]} of every tf.summary event file under log_dir."""
    import tensorflow as tf

    found = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, tf.make_ndarray(value.tensor)))
    return found


def test_population_statistics_are_written_beside_the_moving_averages(tmp_path, rng):
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNormalization(name="bn")])
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(2.0, 3.0, (32, 3)).astype("float32")
    model.fit(x, x, epochs=2, verbose=0,
              callbacks=[callbacks.BatchNormStatistics(str(tmp_path))])
    kerasbn.recompute_statistics(model, x, verbose=0)
    callbacks.write_population_statistics(str(tmp_path), model, step=1)

    found = summaries(tmp_path)
    layer = model.get_layer("bn")
    for key, tag in (("moving_mean", "population_mean"),
                     ("moving_variance", "population_variance")):
        assert [step for step, _ in found[f"bn/{key}"]] == [0, 1]
        (step, histogram), = found[f"bn/{tag}"]
        assert step == 1 and histogram.size > 0
        (step, channel_mean), = found[f"bn/{tag}_channel_mean"]
        served = keras.ops.convert_to_numpy(getattr(layer, key))
        assert step == 1
        assert float(channel_mean) == pytest.approx(float(served.mean()), rel=1e-6)
    # The population mean is the data's (the moving average after 2 updates is not).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean),
                               x.astype(np.float64).mean(axis=0), rtol=1e-5,
                               atol=1e-5 * x.std(axis=0).min())
