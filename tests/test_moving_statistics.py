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
