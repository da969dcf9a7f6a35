"""When and how a batch norm's training step runs on TensorFlow's fused kernels.

On a CPU where TensorFlow runs oneDNN (it prints "oneDNN custom operations are on"
at start-up; the default on recent x86 CPUs), `FusedBatchNormV3` and
`FusedBatchNormGradV3` are oneDNN's hand-written kernels, faster than anything XLA or
plain ops make of the same passes. The statistics they compute inside the forward
kernel are not what kerasbn promises: off by 0.08 standard deviations in the mean and
0.6 % in the variance for data whose mean is 10⁴ standard deviations (README,
Performance, the accuracy table). So kerasbn never lets them compute statistics. It
gives them its own exact batch mean and variance:

    y  = FusedBatchNormV3(x, γ, β, mean, variance, is_training=False)
    dx, dγ, dβ = FusedBatchNormGradV3(dy, x, γ, mean, variance, is_training=True)

The forward kernel in its inference form only normalizes with the statistics it is
given; the gradient kernel in its training form takes them as the batch's saved
mean and variance and adds the terms of their dependence on x, the closed form of
`normalization.normalize_for_training`'s gradient. A synchronized layer's dx needs the
sums of every replica: there the gradient kernel in its inference form gives
γ·dy/sqrt(var + ε) and this replica's Σdy and Σdy·x̂ (`gradient_parts`), and once the
sums are exchanged, the forward kernel adds the affine of x̂ that completes dx. On CPU
both kernels read `variance` as a variance; on GPU cuDNN reads the gradient's saved
variance as 1/sqrt(variance + ε) and runs its own workspace, which nothing here has
executed: the kernels are used only where TensorFlow sees no GPU.
"""

import functools

import tensorflow as tf

from kerasbn.programs import assumed_values, in_xla_program

# Where the kernels pay, measured on this 2-core CPU with oneDNN (one unsynchronized
# layer's training step in a `tf.function`, the kernels with kerasbn's statistics
# against kerasbn's own math): 64x256 values 1.21, 256x256 1.17, 32x8x8x64 (131K)
# 0.90, 32x16x16x16 (131K) 0.75, 128x1024 (131K) 0.92, 256x1024 0.76, 32x16x16x64
# 0.69, 64x32x32x64 (4M) 0.76. Below about 100K values the kernels' fixed cost per
# call is more than they save.
FUSED_FROM_VALUES = 1 << 17


@functools.lru_cache(maxsize=None)
def onednn_is_on():
    """Whether this TensorFlow runs oneDNN's kernels (`TF_ENABLE_ONEDNN_OPTS`, or the
    default for the CPU). TensorFlow (2.21) has no public way to ask; its own tests ask
    the private `_pywrap_util_port.IsMklEnabled`, which answers for this process.
    Without oneDNN, TensorFlow's CPU kernel for the fused gradient is slower than
    kerasbn's own math (13.1 against 9.8 ms on the NHWC 64x32x32x64 step)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def worth_fusing(shape):
    """Whether a training step on an input of `shape` is faster on the fused kernels:
    from `FUSED_FROM_VALUES` (131,072) values (see `programs.assumed_values` for an
    unknown batch size). When a dim after the batch is unknown the answer is False.

    Args:
        shape: the input's shape (a `tf.TensorShape` or a list).

    Returns:
        A bool.
    """
    values = assumed_values(shape)
    return values is not None and values >= FUSED_FROM_VALUES


def applies(jit_compile, shape, dtype, *, view_axes, masked):
    """Whether a layer with this `jit_compile` normalizes an input of `shape` and
    `dtype` in training on the fused kernels.

    Only under `jit_compile="auto"` (True and False ask for XLA programs or plain
    ops), for an unmasked float32 input whose channels are the last axis of the
    layer's view (`view_axes` (0,): NHWC, dense and any channels-last input), outside
    a function that XLA compiles as a whole, on a TensorFlow that runs oneDNN and sees
    no GPU, and where `worth_fusing`. Synchronized or not: a synchronized layer takes
    the local sums of its backward pass from the gradient kernel (`gradient_parts`).

    Args:
        jit_compile: the layer's `jit_compile` (True, False or "auto").
        shape: the input's shape.
        dtype: the input's dtype.
        view_axes: the reduction axes of the layer's view of the input.
        masked: whether a mask keeps values out of the statistics.

    Returns:
        A bool.
    """
    return (
        jit_compile == "auto"
        and not masked
        and tuple(view_axes) == (0,)
        and tf.as_dtype(dtype) == tf.float32
        and worth_fusing(shape)
        and not in_xla_program()
        and onednn_is_on()
        and not tf.config.list_logical_devices("GPU")
    )


def forward(image, mean, variance, gamma, beta, *, epsilon):
    """y = γ·(x - mean)/sqrt(var + ε) + β by `FusedBatchNormV3` in its inference form:
    the statistics are given, the kernel computes none.

    Args:
        image: float32 input in NHWC, channels last.
        mean, variance: the batch statistics, shape [channels], float32.
        gamma, beta: scale and offset, shape [channels], float32.
        epsilon: the variance floor ε.

    Returns:
        y, of the image's shape.
    """
    return tf.raw_ops.FusedBatchNormV3(
        x=image, scale=gamma, offset=beta, mean=mean, variance=variance,
        epsilon=epsilon, is_training=False)[0]


def gradient(dy, image, mean, variance, gamma, *, epsilon):
    """dx, dγ, dβ of `forward` with the statistics the batch's own, by
    `FusedBatchNormGradV3` in its training form (mean and variance as the saved batch
    statistics; on CPU the kernel reads the variance as a variance).

    Args:
        dy: the upstream gradient, of the image's shape.
        image, mean, variance, gamma, epsilon: as given to `forward`.

    Returns:
        `(dx, dgamma, dbeta)`.
    """
    return tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy, x=image, scale=gamma, reserve_space_1=mean,
        reserve_space_2=variance, reserve_space_3=tf.zeros([0]), epsilon=epsilon,
        is_training=True)[:3]


def _as_image(t):
    """A [rows, channels] view as the NHWC the kernels take: each row a one-pixel image."""
    return tf.reshape(t, [-1, 1, 1, t.shape[-1]])


def forward_rows(x, mean, variance, gamma, beta, *, epsilon):
    """`forward` of a [rows, channels] view, y of x's shape."""
    return tf.reshape(forward(_as_image(x), mean, variance, gamma, beta, epsilon=epsilon),
                      tf.shape(x))


def gradient_parts(dy, x, mean, variance, gamma, *, epsilon):
    """The parts of a synchronized batch norm's backward pass that need no other replica,
    for a [rows, channels] view, by `FusedBatchNormGradV3` in its inference form:
    γ·dy/sqrt(var + ε), Σ dy and Σ dy·x̂ per channel, x̂ = (x - mean)/sqrt(var + ε).
    dx adds an affine of x̂ to the first, from the two sums over every replica (see
    `normalization.normalize_for_training`).

    Args:
        dy: the upstream gradient, of x's shape.
        x: float32 input of shape [rows, channels].
        mean, variance, gamma, epsilon: as given to `forward`.

    Returns:
        `(scaled_dy, sum_dy, sum_dy_x_hat)`: the first of x's shape, the sums of shape
        [channels].
    """
    scaled_dy, sum_dy_x_hat, sum_dy = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=_as_image(dy), x=_as_image(x), scale=gamma, reserve_space_1=mean,
        reserve_space_2=variance, reserve_space_3=tf.zeros([0]), epsilon=epsilon,
        is_training=False)[:3]
    return tf.reshape(scaled_dy, tf.shape(x)), sum_dy, sum_dy_x_hat


def normalize(x, mean, variance, gamma, beta, *, epsilon, backward_scope):
    """y = γ·(x - mean)/sqrt(var + ε) + β on the fused kernels (`forward`, `gradient`),
    with the batch's own statistics given, and the gradient of
    `normalization.normalize_for_training`.

    Args:
        x: float32 input of shape [rows, channels] (a layer's view).
        mean, variance: the batch statistics of x, shape [channels], float32.
        gamma, beta: scale and offset, shape [channels], float32.
        epsilon: the variance floor ε.
        backward_scope: the name scope of the backward's ops.

    Returns:
        y, of x's shape.
    """
    @tf.custom_gradient
    def _normalize(x, gamma, beta):
        def grad(dy):
            with tf.name_scope(backward_scope):
                dx, dgamma, dbeta = gradient(_as_image(dy), _as_image(x), mean, variance,
                                             gamma, epsilon=epsilon)
                return tf.reshape(dx, tf.shape(x)), dgamma, dbeta

        return forward_rows(x, mean, variance, gamma, beta, epsilon=epsilon), grad

    return _normalize(x, gamma, beta)
