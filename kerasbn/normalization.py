"""Training-mode normalization with its hand-derived gradient, in pure TensorFlow.

    y = γ·(x - mean)/sqrt(var + ε) + β

with the batch's own statistics (from `ops.moments`, or merged across replicas), as
one `tf.custom_gradient` whose backward pass is closed-form (see
`normalize_for_training`). No Keras state and no `tf.distribute` here: a cross-replica
sum comes in as a `sum_across_replicas` callable.
"""

import tensorflow as tf

from kerasbn import fused_kernel, sums
from kerasbn.ops import broadcast_against, per_value
from kerasbn.programs import compilable


def normalize_for_training(
    x, mean, variance, gamma, beta, *, epsilon, axes, count,
    mask=None, sum_across_replicas=None, compiled=False, fused=False,
):
    """y = γ·(x - mean)/sqrt(var + ε) + β with the batch's own statistics.

    `mean` and `variance` are the batch statistics of `x` (from `moments`, or merged
    across replicas); their dependence on `x` is part of the hand-derived gradient:

        dβ = Σ dy        dγ = Σ dy·x̂
        dx = γ/sqrt(var+ε) · (dy - w·(Σ dy + x̂·Σ dy·x̂)/m)

    where w is the mask (1 without one) and m the number of values that entered the
    statistics. Under synchronization the two sums in dx span every replica of the
    group (`sum_across_replicas`), while dγ and dβ stay local: the optimizer's
    all-reduce of gradients adds them up.

    The backward pass recomputes x̂ from its inputs with differentiable ops, so a
    gradient of this gradient (a gradient penalty) is exact.

    Args:
        x: the input, any float dtype.
        mean, variance: batch statistics of the channel shape, statistics dtype.
        gamma, beta: scale and offset of the channel shape, statistics dtype.
        epsilon: the variance floor ε.
        axes: the reduction axes.
        count: number of values behind the statistics (m), channel shape.
        mask: optional 0/1 weights broadcastable to `x`.
        sum_across_replicas: optional callable summing a tensor of shape
            [2, *channel_shape] over the replicas that share statistics.
        compiled: run the forward pass and each part of the backward pass as XLA
            programs (the cross-replica sum stays outside them).
        fused: run the forward and backward passes on TensorFlow's fused kernels
            (`fused_kernel.normalize`, the same gradient); only for a float32 x of
            shape [rows, channels], unmasked (see `fused_kernel.applies`). With
            `sum_across_replicas`, the kernels normalize, give the backward's local
            parts (`fused_kernel.gradient_parts`) and, after the exchange, the rest of
            dx; the gradient of this gradient is that of the same math in plain ops.

    Returns:
        y, in the dtype of x.

    Raises:
        ValueError: `fused` with a mask or axes other than (0,).
    """
    # TensorFlow traces a custom gradient at the graph's root; the backward's ops go
    # where autodiff puts a layer's, "gradient_tape/<the layer's scope>/", for profiles.
    backward_scope = f"gradient_tape/{tf.get_current_name_scope()}/".replace("//", "/")
    if fused:
        if mask is not None or tuple(axes) != (0,):
            raise ValueError(
                "normalize_for_training: argument `fused` needs a [rows, channels] input "
                "(axes (0,)) and no mask; received "
                f"axes={tuple(axes)}, mask={'given' if mask is not None else None}.")
        if sum_across_replicas is None:
            return fused_kernel.normalize(x, mean, variance, gamma, beta, epsilon=epsilon,
                                          backward_scope=backward_scope)
    weights = None if mask is None else tf.cast(mask, mean.dtype)
    axes = tuple(axes)
    # Shaped to broadcast once: the forward and backward programs take them as they are.
    mean, variance = broadcast_against(mean, x, axes), broadcast_against(variance, x, axes)
    inv_std = tf.math.rsqrt(variance + epsilon)

    # mean, variance and inv_std come in from outside: their dependence on x is in the
    # gradient below, and an input of their own would only get a zero gradient traced.
    @tf.custom_gradient
    def _normalize(x, gamma, beta):
        if fused:
            y = fused_kernel.forward_rows(x, mean, variance, gamma, beta,
                                          epsilon=epsilon)
        else:
            y = _normalize_forward(x, mean, inv_std, gamma, beta, axes, compiled=compiled)

        def grad(dy):
            with tf.name_scope(backward_scope):
                return backward(dy)

        def global_means(sum_dy, sum_dy_x_hat):
            """[mean(dy), mean(dy·x̂)] over every replica: the one exchange of a backward."""
            global_sums = sum_across_replicas(tf.stack([sum_dy, sum_dy_x_hat]))
            return tf.unstack(per_value(global_sums, count))

        def synchronized_backward(dy):
            sum_dy, sum_dy_x_hat = _backward_sums(x, dy, mean, inv_std, axes,
                                                  compiled=compiled)
            dx = _backward_dx(x, dy, mean, inv_std, gamma,
                              global_means(sum_dy, sum_dy_x_hat), weights, axes,
                              compiled=compiled)
            return dx, sum_dy_x_hat, sum_dy

        def fused_synchronized_backward(dy):
            scaled_dy, sum_dy, sum_dy_x_hat = _fused_gradient_parts(
                dy, x, mean, variance, gamma, epsilon=epsilon)
            mean_dy, mean_dy_x_hat = global_means(sum_dy, sum_dy_x_hat)
            dx = _fused_synchronized_dx(scaled_dy, x, mean, variance, gamma, mean_dy,
                                        mean_dy_x_hat, epsilon=epsilon)
            return dx, sum_dy_x_hat, sum_dy

        def backward(dy):
            if sum_across_replicas is None:
                (sum_dy, sum_dy_x_hat), dx = _backward(
                    x, dy, mean, inv_std, gamma, count, weights, axes, compiled=compiled)
                return dx, sum_dy_x_hat, sum_dy
            if fused:
                return fused_synchronized_backward(dy)
            return synchronized_backward(dy)

        return y, grad

    return _normalize(x, gamma, beta)


def _exact_gradient(plain, inputs, upstream):
    """The gradient of `plain(*inputs)` (TensorFlow ops with gradients of their own) for
    the upstream gradients of its outputs: what a kernel that computes the same numbers
    is given as its gradient."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = plain(*inputs)
    return tape.gradient(outputs, inputs, output_gradients=list(upstream))


# A synchronized backward pass on the fused kernels is two pieces around the exchange
# of the two sums. TensorFlow gives the kernels no gradient for the statistics they are
# given, so each piece's own gradient (a gradient penalty's) is that of the same math in
# plain ops; the exchange between them stays one collective, differentiated as such.

def _fused_gradient_parts(dy, x, mean, variance, gamma, *, epsilon):
    """γ·inv_std·dy, Σ dy and Σ dy·x̂ of a [rows, channels] view, on the gradient kernel."""
    def plain(dy, x, mean, variance, gamma):
        inv_std = tf.math.rsqrt(variance + epsilon)
        dy, dy_x_hat = _backward_terms(dy, _normalized(x, mean, inv_std))
        return gamma * inv_std * dy, tf.reduce_sum(dy, 0), tf.reduce_sum(dy_x_hat, 0)

    @tf.custom_gradient
    def parts(*inputs):
        computed = fused_kernel.gradient_parts(*inputs, epsilon=epsilon)
        return computed, lambda *upstream: _exact_gradient(plain, list(inputs), upstream)

    return parts(dy, x, mean, variance, gamma)


def _fused_synchronized_dx(scaled_dy, x, mean, variance, gamma, mean_dy, mean_dy_x_hat, *,
                           epsilon):
    """dx = γ·inv_std·dy - γ·inv_std·(mean(dy) + x̂·mean(dy·x̂)) from the first term and the
    replicas' means: the second is an affine of x̂, computed by the forward kernel."""
    def plain(scaled_dy, x, mean, variance, gamma, mean_dy, mean_dy_x_hat):
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_hat = _normalized(x, mean, inv_std)
        return scaled_dy - gamma * inv_std * (mean_dy + x_hat * mean_dy_x_hat)

    @tf.custom_gradient
    def dx(scaled_dy, x, mean, variance, gamma, mean_dy, mean_dy_x_hat):
        step = -gamma * tf.math.rsqrt(variance + epsilon)
        computed = scaled_dy + fused_kernel.forward_rows(
            x, mean, variance, step * mean_dy_x_hat, step * mean_dy, epsilon=epsilon)
        inputs = [scaled_dy, x, mean, variance, gamma, mean_dy, mean_dy_x_hat]
        return computed, lambda upstream: _exact_gradient(plain, inputs, [upstream])

    return dx(scaled_dy, x, mean, variance, gamma, mean_dy, mean_dy_x_hat)


def _normalized(x, mean, inv_std):
    """x̂ = (x - mean)·inv_std in the statistics dtype, mean and inv_std broadcast to x."""
    return (tf.cast(x, mean.dtype) - mean) * inv_std


@compilable
def _normalize_forward(x, mean, inv_std, gamma, beta, axes, *, compiled):
    """y = (x - mean)·(γ·inv_std) + β, returned in x's dtype; mean and inv_std shaped
    to broadcast against x, γ and β per channel."""
    scale = broadcast_against(gamma, x, axes) * inv_std
    y = (tf.cast(x, mean.dtype) - mean) * scale + broadcast_against(beta, x, axes)
    return tf.cast(y, x.dtype)


def _backward_terms(dy, x_hat):
    """What the backward pass sums per channel: dy and dy·x̂ (dy in x̂'s dtype)."""
    dy = tf.cast(dy, x_hat.dtype)
    return dy, dy * x_hat


@compilable
def _backward_sums(x, dy, mean, inv_std, axes, *, compiled):
    """[Σ dy, Σ dy·x̂] per channel: the only reductions of the backward pass."""
    def terms(x, dy, mean, inv_std):
        return _backward_terms(dy, _normalized(x, mean, inv_std))

    return sums.channel_sums(terms, [x, dy], [mean, inv_std], axes, compiled)


@compilable
def _backward_dx(x, dy, mean, inv_std, gamma, mean_sums, weights, axes, *, compiled,
                 x_hat=None):
    """dx = γ·inv_std·(dy - w·(mean(dy) + x̂·mean(dy·x̂))), from the (global) sums / m
    (`mean_sums`, a pair); x̂ is recomputed unless given."""
    if x_hat is None:
        x_hat = _normalized(x, mean, inv_std)
    mean_dy, mean_dy_x_hat = (broadcast_against(s, x, axes) for s in mean_sums)
    correction = mean_dy + x_hat * mean_dy_x_hat
    if weights is not None:
        correction = weights * correction
    dx = broadcast_against(gamma, x, axes) * inv_std * (tf.cast(dy, mean.dtype) - correction)
    return tf.cast(dx, x.dtype)


@compilable
def _backward(x, dy, mean, inv_std, gamma, count, weights, axes, *, compiled):
    """The sums and dx of one replica's backward pass, as one program when compiled.

    Compiled, x̂ is recomputed where it is needed (XLA fuses it into each use, and the
    blocked sums never hold it whole); as plain ops it is computed once and shared.
    """
    if compiled:
        totals = _backward_sums.body(x, dy, mean, inv_std, axes, compiled=True)
        x_hat = None
    else:
        x_hat = _normalized(x, mean, inv_std)
        totals = [tf.reduce_sum(t, axes) for t in _backward_terms(dy, x_hat)]
    mean_sums = [per_value(total, count) for total in totals]
    dx = _backward_dx.body(x, dy, mean, inv_std, gamma, mean_sums, weights, axes,
                           compiled=compiled, x_hat=x_hat)
    return totals, dx
