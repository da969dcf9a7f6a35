"""kerasbn.moving_statistics: the moving average and the finiteness checks."""

import numpy as np
import pytest
import tensorflow as tf

from kerasbn import moving_statistics


def test_moving_average_weights_the_old_value_by_momentum():
    assert float(moving_statistics.moving_average(tf.constant(2.0), tf.constant(4.0), 0.75)) == 2.5


def test_all_finite_detects_nan_and_inf():
    assert bool(moving_statistics.all_finite(tf.ones(3), tf.ones(2)))
    assert not bool(moving_statistics.all_finite(tf.ones(3), tf.constant([1.0, np.nan])))
    assert not bool(moving_statistics.all_finite(tf.constant([np.inf])))
    assert bool(moving_statistics.all_finite(tf.ones([2, 3])))  # one tensor: one check, no stack


@pytest.mark.parametrize("stacked", [False, True], ids=["tensors", "stacked"])
@pytest.mark.parametrize("channel_shape", [(5,), (2, 3)], ids=str)
def test_finite_channels_marks_each_channel_with_a_nan_or_inf(rng, stacked, channel_shape):
    statistics = rng.standard_normal((2,) + channel_shape)
    flat = statistics.reshape(2, -1)
    flat[0, 1], flat[1, 2], flat[1, 0] = np.nan, np.inf, -np.inf
    expected = np.ones(flat.shape[1], bool)
    expected[[0, 1, 2]] = False
    given = tf.constant(statistics) if stacked else [tf.constant(s) for s in statistics]
    result = moving_statistics.finite_channels(given, stacked=stacked)
    np.testing.assert_array_equal(result.numpy(), expected.reshape(channel_shape))


def _moved_reference(averages, statistics, count, momentum, updates):
    """The step in float64 NumPy: per channel, usable = count > 0 and all finite."""
    usable = (count > 0) & np.all(np.isfinite(statistics), axis=0)
    if updates is not None:
        momentum = np.minimum(momentum, updates / (updates + 1.0))
        updates = np.where(usable, updates + 1.0, updates)
    moved = averages * momentum + np.where(usable, statistics, 0.0) * (1.0 - momentum)
    return np.where(usable, moved, averages), updates


@pytest.mark.parametrize("form", ["eager", "graph", "compiled whole"])
@pytest.mark.parametrize("warmup", [False, True], ids=["no warm-up", "warm-up"])
def test_moved_steps_each_usable_channel_and_keeps_the_others_bit_for_bit(rng, form, warmup):
    channels = 6
    averages = rng.standard_normal((2, channels))
    statistics = rng.standard_normal((2, channels)) * 3.0 + 1.0
    statistics[0, 1], statistics[1, 2] = np.nan, np.inf  # channels 1, 2: not finite
    count = rng.integers(1, 50, channels).astype(np.float64)
    count[4] = 0.0  # channel 4: no values
    updates = rng.integers(0, 5, channels).astype(np.float64) if warmup else None
    momentum = 0.9

    def step(averages, statistics, count, updates):
        return moving_statistics.moved(tf.unstack(averages), tf.unstack(statistics),
                                       count, momentum, updates)

    if form != "eager":
        step = tf.function(step, jit_compile=form == "compiled whole")
    new, new_updates = step(tf.constant(averages), tf.constant(statistics),
                            tf.constant(count), None if updates is None else tf.constant(updates))
    expected, expected_updates = _moved_reference(averages, statistics, count, momentum, updates)
    # A weighted sum whose terms may nearly cancel: its rounding error is relative to
    # the terms (and XLA may fuse it into a multiply-add), not to the sum.
    terms = np.abs(averages) + np.abs(np.where(np.isfinite(statistics), statistics, 0.0))
    np.testing.assert_allclose(np.stack([t.numpy() for t in new]), expected, rtol=1e-14,
                               atol=1e-14 * terms.max())
    kept = [1, 2, 4]
    np.testing.assert_array_equal(np.stack([t.numpy() for t in new])[:, kept], averages[:, kept])
    if warmup:
        np.testing.assert_array_equal(new_updates.numpy(), expected_updates)
    else:
        assert new_updates is None
