"""Float64 NumPy references of the papers' algorithms, the yardstick of the tests.

Batch Normalization (Ioffe & Szegedy 2015), Algorithms 1 and 2, and Batch
Renormalization (Ioffe 2017), Algorithm 1, written as plainly as possible.
"""

import numpy as np
import tensorflow as tf


def channel_axes(rank, axis):
    """The channel axes an `axis` (int or list, negative from the end) names: sorted, >= 0."""
    return sorted(int(a) % rank for a in np.atleast_1d(axis))


def keras_mask_weights(mask, shape):
    """Keras's mask rule in float64: a trailing axis added, broadcast to the input's shape."""
    return np.broadcast_to(np.expand_dims(np.asarray(mask, bool), -1), shape).astype(np.float64)


def channel_shape_and_axes(shape, channel_axes_):
    """(reduction axes, broadcast shape) for an input shape and its channel axes."""
    rank = len(shape)
    channel_axes_ = channel_axes(rank, channel_axes_)
    reduce = tuple(a for a in range(rank) if a not in channel_axes_)
    broadcast = [shape[a] if a in channel_axes_ else 1 for a in range(rank)]
    return reduce, broadcast


def moments(x, channel_axes, mask=None):
    """Count, mean and biased variance per channel, in float64."""
    x = np.asarray(x, np.float64)
    reduce, _ = channel_shape_and_axes(x.shape, channel_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    count = w.sum(axis=reduce)
    mean = (w * x).sum(axis=reduce) / count
    mean_b = np.expand_dims(mean, reduce)
    var = (w * (x - mean_b) ** 2).sum(axis=reduce) / count
    return count, mean, var


def train_forward(x, channel_axes, gamma, beta, epsilon, mask=None):
    """Algorithm 1: y = γ·(x - mean_B)/sqrt(var_B + ε) + β. Returns (y, mean, var, count)."""
    x = np.asarray(x, np.float64)
    reduce, broadcast = channel_shape_and_axes(x.shape, channel_axes)
    count, mean, var = moments(x, channel_axes, mask)
    x_hat = (x - mean.reshape(broadcast)) / np.sqrt(var.reshape(broadcast) + epsilon)
    y = np.asarray(gamma, np.float64).reshape(broadcast) * x_hat + np.asarray(
        beta, np.float64).reshape(broadcast)
    return y, mean, var, count


def inference_forward(x, channel_axes, gamma, beta, moving_mean, moving_var, epsilon):
    """Algorithm 2: y = γ·(x - moving_mean)/sqrt(moving_var + ε) + β."""
    x = np.asarray(x, np.float64)
    _, broadcast = channel_shape_and_axes(x.shape, channel_axes)
    r = lambda v: np.asarray(v, np.float64).reshape(broadcast)  # noqa: E731
    return r(gamma) * (x - r(moving_mean)) / np.sqrt(r(moving_var) + epsilon) + r(beta)


def moving_average(average, value, momentum):
    """Keras's convention: momentum is the weight of the old value."""
    return momentum * np.asarray(average, np.float64) + (1 - momentum) * np.asarray(value)


def renorm_step(x, channel_axes, gamma, beta, state, *, epsilon, momentum,
                renorm_momentum, rmin=None, rmax=None, dmax=None):
    """One training step of Batch Renormalization (Ioffe 2017, Algorithm 1), float64.

    `state` holds renorm_mean, renorm_stddev, moving_mean, moving_stddev; returns
    (y, r, d, new_state) where new_state also has moving_variance.
    """
    x = np.asarray(x, np.float64)
    _, broadcast = channel_shape_and_axes(x.shape, channel_axes)
    _, mean, var = moments(x, channel_axes)
    sigma_b = np.sqrt(var + epsilon)
    sigma = np.maximum(state["renorm_stddev"], np.sqrt(epsilon))
    r = sigma_b / sigma
    d = (mean - state["renorm_mean"]) / sigma
    if rmin is not None:
        r = np.maximum(r, rmin)
    if rmax is not None:
        r = np.minimum(r, rmax)
    if dmax is not None:
        d = np.clip(d, -dmax, dmax)
    x_hat = (x - mean.reshape(broadcast)) / sigma_b.reshape(broadcast)
    y = np.reshape(gamma, broadcast) * (x_hat * r.reshape(broadcast) + d.reshape(
        broadcast)) + np.reshape(beta, broadcast)
    new = {
        "renorm_mean": moving_average(state["renorm_mean"], mean, renorm_momentum),
        "renorm_stddev": moving_average(state["renorm_stddev"], sigma_b, renorm_momentum),
        "moving_mean": moving_average(state["moving_mean"], mean, momentum),
        "moving_stddev": moving_average(state["moving_stddev"], sigma_b, momentum),
    }
    new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - epsilon, 0.0)
    return y, r, d, new


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def train_step(x, weights, channel_axes_, gamma, beta, cotangent, epsilon):
    """Algorithm 1 on the whole batch in float64, its gradient by tf.GradientTape.

    The math is written with plain ops (no custom gradient), loss = Σ y·cotangent;
    `weights` (None, or 0/1 of x's shape) keep masked values out of the statistics.
    Returns (y, dx, dgamma, dbeta, count, mean, variance).
    """
    x = tf.constant(x, tf.float64)
    reduce, broadcast = channel_shape_and_axes(x.shape, channel_axes_)
    w = tf.ones_like(x) if weights is None else tf.broadcast_to(
        tf.constant(weights, tf.float64), x.shape)
    gamma = tf.constant(gamma, tf.float64)
    beta = tf.constant(beta, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        count = tf.reduce_sum(w, reduce, keepdims=True)
        mean = tf.reduce_sum(w * x, reduce, keepdims=True) / count
        var = tf.reduce_sum(w * tf.square(x - mean), reduce, keepdims=True) / count
        y = ((x - mean) * tf.math.rsqrt(var + epsilon) * tf.reshape(gamma, broadcast)
             + tf.reshape(beta, broadcast))
        loss = tf.reduce_sum(y * tf.constant(cotangent, tf.float64))
    dx, dgamma, dbeta = tape.gradient(loss, [x, gamma, beta])
    squeeze = lambda t: tf.squeeze(t, reduce).numpy()  # noqa: E731
    return (y.numpy(), dx.numpy(), dgamma.numpy(), dbeta.numpy(), squeeze(count),
            squeeze(mean), squeeze(var))


def gradient_penalty(fn, x, gamma, beta, weights):
    """The gradient over (x, γ, β) of ||dL/dx||², L = Σ sin(fn(x, γ, β))·weights: a
    gradient penalty, differentiated through fn's own gradient."""
    with tf.GradientTape() as outer:
        outer.watch([x, gamma, beta])
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(tf.sin(fn(x, gamma, beta)) * weights)
        dx = inner.gradient(loss, x)
        norm = tf.reduce_sum(dx * dx)
    return outer.gradient(norm, [x, gamma, beta])
