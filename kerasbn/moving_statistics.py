"""The moving statistics' math: the exponential average and the finiteness checks.

Pure functions of tensors; the layer (`BatchNormalization._update_moving_statistics`)
and the population pass (`kerasbn.statistics`) hold the state.
"""

import functools

import tensorflow as tf


def moving_average(average, value, momentum):
    """Keras's exponential moving average: momentum is the weight of the old value."""
    return average * momentum + value * (1.0 - momentum)


def finite_channels(statistics, *, stacked):
    """Per channel, True where every statistic is finite (neither NaN nor infinite).

    Args:
        statistics: tensors of the channel shape, or (`stacked=True`) one tensor
            holding them stacked on a new first axis.
        stacked: whether `statistics` is one stacked tensor.

    Returns:
        A bool tensor of the channel shape.
    """
    if stacked:
        return tf.reduce_all(tf.math.is_finite(statistics), axis=0)
    return functools.reduce(tf.logical_and, [tf.math.is_finite(t) for t in statistics])


def all_finite(*tensors):
    """A scalar bool: True when no element of any tensor is NaN or infinite."""
    first = tensors[0]
    if len(tensors) == 1:
        return tf.reduce_all(tf.math.is_finite(first))
    if first.shape.is_fully_defined() and all(
            t.dtype == first.dtype and t.shape == first.shape for t in tensors):
        return tf.reduce_all(tf.math.is_finite(tf.stack(tensors)))  # one reduction
    return functools.reduce(tf.logical_and,
                            [tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
