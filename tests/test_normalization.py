"""kerasbn.normalization: training-mode normalization and its hand-derived gradient,
against float64 references, TensorFlow's autodiff of the textbook formula and finite
differences."""

import numpy as np
import pytest
import tensorflow as tf

import reference
from kerasbn import normalization, ops
from op_cases import BLOCKED_SHAPE, GROUPED_BLOCKED_SHAPE, LAYOUTS, random_input, views


# ------------------------------------------------------------------ forward


def _train_forward(x, channel_axes, gamma, beta, epsilon, mask=None, compiled=False):
    axes, _, _ = views(x.shape, channel_axes)
    count, mean, var = ops.moments(x, axes, mask, compiled=compiled)
    return normalization.normalize_for_training(
        x, mean, var, gamma, beta, epsilon=epsilon, axes=axes,
        count=count, mask=mask, compiled=compiled,
    )


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ops", "xla"])
@pytest.mark.parametrize("shape,channel_axes", LAYOUTS)
def test_training_forward_is_algorithm_1(rng, shape, channel_axes, compiled):
    _, channel_shape, _ = views(shape, channel_axes)
    x = random_input(rng, shape, loc=-2.0, scale=3.0).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, channel_shape).astype(np.float32)
    beta = rng.standard_normal(channel_shape).astype(np.float32)
    y = _train_forward(tf.constant(x), channel_axes, gamma, beta, 1e-3, compiled=compiled)
    ref_y, *_ = reference.train_forward(x, channel_axes, gamma, beta, 1e-3)
    assert y.dtype == tf.float32
    assert reference.relative_error(y, ref_y) < 1e-5


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_output_keeps_input_dtype(rng, dtype):
    x = tf.cast(random_input(rng, (64, 6), loc=50.0, scale=4.0), dtype)
    gamma, beta = tf.ones(6), tf.zeros(6)
    y = _train_forward(x, [1], gamma, beta, 1e-3)
    assert y.dtype == dtype
    ref_y, *_ = reference.train_forward(tf.cast(x, tf.float64).numpy(), [1], np.ones(6),
                                        np.zeros(6), 1e-3)
    tolerance = 1e-2 if dtype == tf.bfloat16 else 2e-3
    assert reference.relative_error(tf.cast(y, tf.float64), ref_y) < tolerance


# ------------------------------------------------------------------ gradients


def _plain_batch_norm(x, gamma, beta, axes, epsilon, mask=None):
    """The textbook formula, differentiated by TensorFlow's autodiff."""
    if mask is None:
        mean, var = tf.nn.moments(x, axes, keepdims=True)
    else:
        count = tf.reduce_sum(tf.broadcast_to(mask, tf.shape(x)), axes, keepdims=True)
        mean = tf.reduce_sum(mask * x, axes, keepdims=True) / count
        var = tf.reduce_sum(mask * (x - mean) ** 2, axes, keepdims=True) / count
    shape = mean.shape
    return (tf.reshape(gamma, shape) * (x - mean) / tf.sqrt(var + epsilon)
            + tf.reshape(beta, shape))


def _gradients(fn, x, gamma, beta, upstream):
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        loss = tf.reduce_sum(fn(x, gamma, beta) * upstream)
    return tape.gradient(loss, [x, gamma, beta])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ops", "xla"])
@pytest.mark.parametrize("shape,channel_axes", LAYOUTS)
def test_hand_derived_gradient_equals_autodiff_in_float64(rng, shape, channel_axes,
                                                          compiled):
    _check_gradient_against_autodiff(rng, shape, channel_axes, compiled)


@pytest.mark.parametrize("shape,channel_axes", [(BLOCKED_SHAPE, [2]),
                                                (GROUPED_BLOCKED_SHAPE, [0, 2])],
                         ids=["blocks", "blocks-group-after-group"])
def test_hand_derived_gradient_summed_in_blocks_equals_autodiff(rng, shape, channel_axes):
    _check_gradient_against_autodiff(rng, shape, channel_axes, compiled=True)


def _check_gradient_against_autodiff(rng, shape, channel_axes, compiled):
    axes, channel_shape, _ = views(shape, channel_axes)
    x = tf.constant(random_input(rng, shape, loc=1.0, scale=2.0))
    gamma = tf.constant(rng.uniform(0.5, 2.0, channel_shape))
    beta = tf.constant(rng.standard_normal(channel_shape))
    upstream = tf.constant(rng.standard_normal(shape))
    ours = _gradients(
        lambda *a: _train_forward(a[0], channel_axes, a[1], a[2], 1e-3, compiled=compiled),
        x, gamma, beta, upstream)
    plain = _gradients(lambda *a: _plain_batch_norm(*a, axes, 1e-3), x, gamma, beta,
                       upstream)
    for name, got, want in zip(("x", "gamma", "beta"), ours, plain):
        assert reference.relative_error(got, want) <= 1e-10, name


def test_masked_gradient_equals_autodiff_in_float64(rng):
    x = tf.constant(random_input(rng, (5, 8, 3)))
    mask = tf.constant((rng.random((5, 8, 1)) < 0.7).astype(np.float64))
    gamma, beta = tf.constant(rng.uniform(0.5, 2, 3)), tf.constant(rng.standard_normal(3))
    upstream = tf.constant(rng.standard_normal((5, 8, 3)))
    ours = _gradients(lambda *a: _train_forward(a[0], [2], a[1], a[2], 1e-3, mask),
                      x, gamma, beta, upstream)
    plain = _gradients(lambda *a: _plain_batch_norm(*a, [0, 1], 1e-3, mask),
                       x, gamma, beta, upstream)
    for got, want in zip(ours, plain):
        assert reference.relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("shape,channel_axes", [((6, 4), [1]), ((3, 4, 2, 3), [3]),
                                                ((3, 2, 4, 3), [1])])
def test_gradient_matches_finite_differences(rng, shape, channel_axes):
    _, channel_shape, _ = views(shape, channel_axes)
    x = random_input(rng, shape)
    gamma = rng.uniform(0.5, 2.0, channel_shape)
    beta = rng.standard_normal(channel_shape)
    weights = tf.constant(rng.standard_normal(shape))  # makes the output a generic loss

    def loss(x, gamma, beta):
        y = _train_forward(x, channel_axes, gamma, beta, 1e-3)
        return tf.reduce_sum(tf.sin(y) * weights)

    theoretical, numerical = tf.test.compute_gradient(loss, [x, gamma, beta], delta=1e-6)
    for got, want in zip(theoretical, numerical):
        assert reference.relative_error(got, want) <= 1e-6


@pytest.mark.parametrize("compiled,shape", [(False, (6, 3, 4)), (True, (6, 3, 4)),
                                            (True, BLOCKED_SHAPE)],
                         ids=["eager-ops", "xla", "xla-blocked"])
def test_gradient_of_gradient_equals_autodiff(rng, compiled, shape):
    """A gradient penalty: d/dθ ||dL/dx||² through the custom gradient is exact."""
    channels = shape[-1]
    x = tf.constant(random_input(rng, shape))
    gamma = tf.constant(rng.uniform(0.5, 2, channels))
    beta = tf.constant(rng.standard_normal(channels))
    weights = tf.constant(rng.standard_normal(shape))

    ours = reference.gradient_penalty(
        lambda *a: _train_forward(a[0], [2], a[1], a[2], 1e-3, compiled=compiled),
        x, gamma, beta, weights)
    plain = reference.gradient_penalty(lambda *a: _plain_batch_norm(*a, [0, 1], 1e-3),
                                       x, gamma, beta, weights)
    for got, want in zip(ours, plain):
        assert reference.relative_error(got, want) <= 1e-9


def test_gradient_in_low_precision_keeps_dtype(rng):
    x = tf.cast(random_input(rng, (32, 4)), tf.float16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = _train_forward(x, [1], tf.ones(4), tf.zeros(4), 1e-3)
    dx = tape.gradient(y, x, output_gradients=tf.cast(rng.standard_normal((32, 4)), y.dtype))
    assert dx.dtype == tf.float16
    assert np.all(np.isfinite(dx.numpy()))
