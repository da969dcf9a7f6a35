"""The math of batch normalization, in pure TensorFlow.

No Keras state and no `tf.distribute` here: every function maps tensors to tensors.
The training-mode normalization and its hand-derived gradient are `normalization`'s; the
per-channel sums under both are `sums`'.

Notation (per channel, over the m values of every non-channel axis):

    mean  = (1/m) Σ x
    var   = (1/m) Σ (x - mean)²
    x̂     = (x - mean) / sqrt(var + ε)
    y     = γ x̂ + β

Statistics are float32 for float16, bfloat16 and float32 inputs, and float64 for
float64 inputs (`statistics_dtype`).
"""

import tensorflow as tf

from kerasbn import sums
from kerasbn.programs import compilable


def statistics_dtype(dtype):
    """The dtype statistics accumulate in for inputs of `dtype`: float32 or float64."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


class AxisError(ValueError):
    """`axis` names no valid set of channel axes for an input's rank.

    Attributes:
        allowed: what `axis` must be, as a phrase ("within [-4, 4) for inputs of rank 4").
    """

    def __init__(self, axis, allowed):
        super().__init__(f"axis must be {allowed}; received axis={axis!r}.")
        self.allowed = allowed


def channel_axes(axis, rank):
    """The channel axes that `axis` names in inputs of `rank`: non-negative, sorted.

    The one place where a batch norm's `axis` (an int or a list of ints, negative
    counting from the end) is resolved against an input's rank.

    Args:
        axis: an int or a list/tuple of ints.
        rank: the input's rank.

    Returns:
        A sorted list of distinct ints in [0, rank).

    Raises:
        AxisError: when an axis is outside [-rank, rank), two name the same axis, or no
            axis is left to compute statistics over.
    """
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    if any(not -rank <= a < rank for a in axes):
        raise AxisError(axis, f"within [-{rank}, {rank}) for inputs of rank {rank}")
    positive = sorted(a % rank for a in axes)
    if len(set(positive)) != len(positive):
        raise AxisError(axis, f"distinct axes for inputs of rank {rank}")
    if len(positive) == rank:
        raise AxisError(axis, "leaving at least one axis to compute statistics over")
    return positive


def reduction_axes(rank, channel_axes):
    """The axes statistics are reduced over: every axis that is not a channel axis.

    Args:
        rank: the input's rank.
        channel_axes: non-negative channel axes.

    Returns:
        A sorted list of ints.
    """
    return [axis for axis in range(rank) if axis not in channel_axes]


def broadcast_shape(rank, channel_axes, channel_shape):
    """The shape that makes a per-channel tensor broadcast against the input.

    For an NHWC input with channel axis 3 and 64 channels this is [1, 1, 1, 64].
    """
    shape = [1] * rank
    for axis, size in zip(sorted(channel_axes), channel_shape):
        shape[axis] = size
    return shape


def mask_weights(mask, inputs, dtype):
    """A Keras mask as weights of the input's shape: 1 where a value counts, 0 where not.

    Keras hands a layer the mask of its input, shaped like the input without its last
    axis, whatever the batch norm's channel axes are (what `Masking` and
    `Embedding(mask_zero=True)` produce). As in `keras.layers.BatchNormalization`, a
    trailing axis is added and the result broadcast to the input, so any mask that
    broadcasts that way is taken (for example (N, T, 1) for an (N, T, H, C) input).

    Args:
        mask: a bool or numeric tensor of rank `inputs.shape.rank - 1`.
        inputs: the layer's input.
        dtype: the dtype of the weights.

    Returns:
        A tensor of `inputs`'s shape and `dtype`.
    """
    weights = tf.cast(tf.cast(tf.expand_dims(mask, -1), tf.bool), dtype)
    return tf.broadcast_to(weights, tf.shape(inputs))


class Layout:
    """How an input is viewed for the math: runs of adjacent axes of one kind merged.

    Reshaping is free, and reductions run much faster over few long axes than over
    many short ones: NHWC is viewed as [N·H·W, C], NCHW as [N, C, H·W], a dense
    [B, C] input as it is. Statistics are computed in the view and handed back in the
    channel shape.

    The view also absorbs a defect of TensorFlow (2.21): `tf.nn.conv2d` on an empty
    batch traced with an unknown batch size returns a tensor of the *input's* shape
    ([0, 5, 5, 3] where [0, 3, 3, 4] is due), so per-channel math on it as it is would
    fail or give statistics of the wrong channel count (a replica with no examples of
    a last partial batch hits it); reshaped to the view and back, an empty tensor takes
    the shape it should have. `tests/test_layer.py` checks it.

    Args:
        input_shape: the full input shape (the channel dims must be known).
        channel_axes: sorted non-negative channel axes.
    """

    def __init__(self, input_shape, channel_axes):
        self.rank = len(input_shape)
        self.channel_axes = list(channel_axes)
        self.channel_shape = [input_shape[a] for a in self.channel_axes]
        self.groups = []
        for axis in range(self.rank):
            is_channel = axis in self.channel_axes
            if self.groups and self.groups[-1][0] == is_channel:
                self.groups[-1][1].append(axis)
            else:
                self.groups.append((is_channel, [axis]))
        view_channels = [i for i, (is_channel, _) in enumerate(self.groups) if is_channel]
        self.view_channel_shape = [
            _product(input_shape[a] for a in axes)
            for is_channel, axes in self.groups if is_channel
        ]
        self.axes = tuple(reduction_axes(len(self.groups), view_channels))
        self.shape = tuple(
            broadcast_shape(len(self.groups), view_channels, self.view_channel_shape)
        )

    def view(self, x):
        """x reshaped to one axis per group."""
        static = [_static_product(x.shape, axes) for _, axes in self.groups]
        if static.count(None) <= 1:  # the usual case: only the batch size is unknown
            return _reshaped(x, [-1 if size is None else size for size in static])
        dims = tf.shape(x)
        return tf.reshape(x, [
            tf.reduce_prod(tf.gather(dims, axes)) if len(axes) > 1 else dims[axes[0]]
            for _, axes in self.groups
        ])

    def unview(self, y, like):
        """y, a view, back in the shape of `like` (the input it was viewed from)."""
        dims = like.shape.as_list()
        if dims.count(None) <= 1:
            return _reshaped(y, [-1 if size is None else size for size in dims])
        return tf.reshape(y, tf.shape(like))

    def to_view_channels(self, value):
        """A per-channel tensor of the channel shape, reshaped for the view."""
        return _reshaped(value, self.view_channel_shape)

    def to_channels(self, value):
        """A per-channel tensor of the view back in the channel shape."""
        return _reshaped(value, self.channel_shape)


def _reshaped(x, shape):
    """`tf.reshape(x, shape)` for a static `shape` (one -1 allowed); `x` itself when it
    has that shape already, so that the traced graph holds no reshape that does nothing."""
    if x.shape.rank == len(shape) and all(
            want == -1 or have == want for have, want in zip(x.shape.as_list(), shape)):
        return x  # the dims that are given match, so the -1 one does too
    return tf.reshape(x, shape)


def _static_product(shape, axes):
    """The product of `shape`'s dims along `axes`, or None when one is unknown."""
    dims = [shape[a] for a in axes]
    return None if None in dims else _product(dims)


def _product(values):
    result = 1
    for value in values:
        result *= value
    return result


def broadcast_against(value, x, axes):
    """A per-channel `value` (x reduced over `axes`, without kept dims) shaped to
    broadcast against x: as it is when every reduction axis comes before every
    channel axis (NumPy's right-aligned broadcasting does it), else with size-1 axes
    put back after the first channel axis."""
    kept = [a for a in range(x.shape.rank) if a not in axes]
    for axis in sorted(axes):
        if axis > kept[0]:
            value = tf.expand_dims(value, axis - kept[0])
    return value


@compilable
def moments(x, axes, mask=None, *, compiled):
    """Per-channel count, mean and variance, accumulated in float32 (float64 for float64).

    See `shifted_moments` for the algorithm.

    Args:
        x: the input, any float dtype.
        axes: the reduction axes (see `reduction_axes`).
        mask: optional 0/1 weights broadcastable to `x`.
        compiled: run as one XLA program.

    Returns:
        `(count, mean, variance)`, tensors of the channel shape in the statistics dtype.
    """
    count, shift, offset, variance = shifted_moments.body(x, axes, mask, compiled=compiled)
    return count, shift + offset, variance


_SHIFT_SAMPLE_SIZE = 256


def _leading_sample(x, axes):
    """The first values along the first reduction axis: about 256 values per channel.

    Returns:
        `(sample, most)`: the sample, and how many values per channel it holds at most
        (it holds fewer when x has fewer), or None when x's shape does not tell.
    """
    per_row = _static_product(x.shape, axes[1:])
    if per_row is not None:  # a strided slice clamps its end to the axis' length
        rows = max(1, -(-_SHIFT_SAMPLE_SIZE // max(per_row, 1)))
        if x.shape[axes[0]] is not None and rows >= x.shape[axes[0]]:
            return x, None
        return x[(slice(None),) * axes[0] + (slice(0, rows),)], float(rows * per_row)
    dims = tf.shape(x)
    per_row = tf.reduce_prod(tf.gather(dims, axes[1:])) if len(axes) > 1 else 1
    rows = tf.minimum(dims[axes[0]], tf.maximum(1, -(-_SHIFT_SAMPLE_SIZE // per_row)))
    sizes = tf.where(tf.range(tf.size(dims)) == axes[0], rows, dims)
    return tf.slice(x, tf.zeros_like(dims), sizes), None


@compilable
def shifted_moments(x, axes, mask=None, *, compiled):
    """Per-channel count, mean (as shift + offset) and variance, in one pass over x.

    The shift K is the mean of a small leading sample of the batch (about 256 values
    per channel), so the deviations d = x - K are of the order of the standard
    deviation; one pass then sums d and d²:

        mean = K + Σd/m        var = (Σd² - (Σd)²/m) / m

    Because K lies within a fraction of a standard deviation of the mean, the
    subtraction loses nothing (its error is ε·((mean - K)/σ)², with ε float32's
    rounding), and the variance is accurate to float32 rounding for any ratio of mean
    to standard deviation -- where E[x²] - E[x]² (K = 0) loses everything at 10⁴.
    The mean is returned as the pair (shift = K, offset = Σd/m), which carries it
    beyond float32 precision: what `merge_moments` needs to stay exact when replicas'
    means are far from zero.

    An empty batch (no values, or every value masked) gives count 0 and zeros rather
    than NaN, so that it merges as "no data".

    Args:
        x: the input, any float dtype.
        axes: the reduction axes (see `reduction_axes`).
        mask: optional weights broadcastable to `x`, 1 where a value counts and 0 where
            it does not (a Keras mask with channel dims of size 1).
        compiled: run as one XLA program.

    Returns:
        `(count, shift, offset, variance)`, tensors of the channel shape in the
        statistics dtype; the mean is shift + offset.
    """
    dtype = statistics_dtype(x.dtype)
    axes = list(axes)
    sample, sample_most = _leading_sample(tf.cast(x, dtype), axes)
    if mask is None:
        m = _values_per_channel(x, axes, dtype)  # a number when x's shape tells
        if sample_most is None:
            sample_count = _values_per_channel(sample, axes, dtype)
        else:  # the sample holds min(m, most) values
            sample_count = _smaller(m, sample_most)
        # K only has to be near the mean; the moments do not depend on it, so neither
        # do their gradients.
        shift = tf.stop_gradient(per_value(tf.reduce_sum(sample, axes), sample_count))

        def deviation_terms(x, shift):
            deviations = tf.cast(x, dtype) - shift
            return deviations, tf.square(deviations)

        sum_d, sum_d2 = sums.channel_sums(deviation_terms, [x],
                                          [broadcast_against(shift, x, axes)], axes, compiled)
        count = _filled(shift, m)
    else:
        x = tf.cast(x, dtype)
        weights = tf.broadcast_to(tf.cast(mask, dtype), tf.shape(x))
        sample_weights, _ = _leading_sample(weights, axes)
        shift = tf.math.divide_no_nan(tf.reduce_sum(sample * sample_weights, axes),
                                      tf.reduce_sum(sample_weights, axes))
        deviations = x - broadcast_against(shift, x, axes)
        weighted = weights * deviations
        sum_d = tf.reduce_sum(weighted, axes)
        sum_d2 = tf.reduce_sum(weighted * deviations, axes)
        m = count = tf.reduce_sum(weights, axes)
    offset = per_value(sum_d, m)
    variance = per_value(tf.maximum(sum_d2 - sum_d * offset, 0.0), m)
    return count, shift, offset, variance


def _values_per_channel(x, axes, dtype):
    """How many values of x each channel has: a number when x's shape tells, else a
    scalar tensor."""
    static = _static_product(x.shape, axes)
    if static is not None:
        return float(static)
    per_row = _static_product(x.shape, axes[1:])
    if per_row is None:
        return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), dtype)
    rows = tf.cast(tf.shape(x)[axes[0]], dtype)
    return rows if per_row == 1 else rows * per_row


def per_value(total, count):
    """total / count, and 0 where count is 0 (no values: "no data", never NaN).

    Args:
        total: a tensor.
        count: a number, or a tensor that broadcasts against `total`.

    Returns:
        A tensor of `total`'s dtype.
    """
    if isinstance(count, (int, float)):
        return total / max(float(count), 1.0)
    return tf.math.divide_no_nan(total, tf.cast(count, total.dtype))


def _smaller(a, b):
    """min(a, b), for numbers or a tensor and a number."""
    return min(a, b) if isinstance(a, float) else tf.minimum(a, b)


def _filled(like, value):
    """A tensor of `like`'s shape and dtype, every element `value` (a number or a scalar)."""
    if isinstance(value, float) and like.shape.is_fully_defined():
        return tf.constant(value, like.dtype, shape=like.shape)
    return tf.fill(tf.shape(like), tf.cast(value, like.dtype))


def merge_moments(counts, shifts, offsets, variances):
    """Merges the moments of disjoint parts of a batch: `(count, mean, variance)`.

    See `merge_shifted_moments`, of which this returns the mean as one number.

    Args:
        counts, shifts, offsets, variances: tensors of shape [parts, *channel_shape].

    Returns:
        `(count, mean, variance)` of shape channel_shape.
    """
    count, shift, offset, variance = merge_shifted_moments(counts, shifts, offsets, variances)
    return count, shift + offset, variance


def merge_shifted_moments(counts, shifts, offsets, variances):
    """Merges the moments of disjoint parts of a batch into those of the whole.

    The parts run along axis 0, each as `shifted_moments` returns them. The merge is
    exact in exact arithmetic and stable in floating point (Chan, Golub & LeVeque):
    with K the shift of the largest part and δᵢ = (shiftᵢ - K) + offsetᵢ,

        n = Σ nᵢ     δ = Σ nᵢ·δᵢ / n     mean = K + δ
        var = (Σ nᵢ·varᵢ + Σ nᵢ·(δᵢ - δ)²) / n

    The differences of means are taken before any large value is added back, so the
    variance keeps float32 accuracy even when means are 10⁴ standard deviations from 0.
    Parts with nᵢ = 0 contribute nothing; if every part is empty the result is
    count 0, mean 0, variance 0. Every replica that merges the same parts gets the
    same bits.

    The result keeps the mean as shift + offset (the shift of the largest part, and
    the offset from it), so it can be merged again without losing precision: a running
    accumulator over many batches merges `[accumulator, batch]` at each step.

    Args:
        counts, shifts, offsets, variances: tensors of shape [parts, *channel_shape].

    Returns:
        `(count, shift, offset, variance)` of shape channel_shape; the mean is
        shift + offset.
    """
    largest = tf.one_hot(tf.argmax(counts, axis=0), tf.shape(counts)[0], axis=0,
                         dtype=shifts.dtype)
    reference_shift = tf.reduce_sum(largest * shifts, axis=0)
    deltas = (shifts - reference_shift) + offsets
    count = tf.reduce_sum(counts, axis=0)
    delta = per_value(tf.reduce_sum(counts * deltas, axis=0), count)
    within = tf.reduce_sum(counts * variances, axis=0)
    between = tf.reduce_sum(counts * tf.math.squared_difference(deltas, delta), axis=0)
    return count, reference_shift, delta, per_value(within + between, count)


def inference_coefficients(mean, variance, gamma, beta, epsilon):
    """The affine y = a·x + b that batch norm is at inference (Algorithm 2).

        a = γ / sqrt(var + ε)        b = β - a·mean

    Args:
        mean, variance: float32 per-channel statistics.
        gamma, beta: per-channel scale and offset, or None for 1 and 0.
        epsilon: the variance floor ε.

    Returns:
        `(a, b)`, float32 tensors of the channel shape.
    """
    a = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * tf.cast(gamma, a.dtype)
    if beta is None:
        return a, -(mean * a)
    return a, tf.cast(beta, a.dtype) - mean * a


@compilable
def affine(x, a, b, shape, *, compiled):
    """y = a·x + b with per-channel a and b, computed in a's dtype, returned in x's.

    Args:
        x: the input.
        a, b: per-channel tensors in the statistics dtype, of the channel shape.
        shape: the broadcast shape of a and b (see `broadcast_shape`).
        compiled: run as one XLA program.
    """
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:  # NumPy's broadcasting adds leading 1s
        shape.pop(0)
    y = tf.cast(x, a.dtype) * _reshaped(a, shape) + _reshaped(b, shape)
    return tf.cast(y, x.dtype)


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, *, epsilon,
                      rmin=None, rmax=None, dmax=None):
    """The r and d of Batch Renormalization (Ioffe 2017), held constant in backprop.

        σ_B = sqrt(var + ε)      σ = max(renorm_stddev, sqrt(ε))
        r = clip(σ_B / σ, rmin, rmax)      d = clip((mean - renorm_mean) / σ, -dmax, dmax)

    The normalized batch is then x̂·r + d. A bound given as None is not applied.

    Returns:
        `(r, d)`, tensors of the channel shape, with stopped gradients.
    """
    batch_stddev = tf.sqrt(variance + epsilon)
    stddev = tf.maximum(renorm_stddev, tf.sqrt(tf.constant(epsilon, mean.dtype)))
    r = batch_stddev / stddev
    d = (mean - renorm_mean) / stddev
    if rmin is not None:
        r = tf.maximum(r, rmin)
    if rmax is not None:
        r = tf.minimum(r, rmax)
    if dmax is not None:
        d = tf.clip_by_value(d, -dmax, dmax)
    return tf.stop_gradient(r), tf.stop_gradient(d)
