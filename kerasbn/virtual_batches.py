"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): the math of virtual batches.

In training, the batch axis is cut into consecutive groups of k examples, and each group
is normalized with its own statistics. When the batch size is not a multiple of k (or is
not known while tracing), a last group holds the remaining examples (possibly none) and
is normalized with its own. The moments of the whole batch are merged exactly from the
groups' (`ops.merge_shifted_moments`), for the moving statistics.

Pure TensorFlow, as `ops`: no Keras state and no `tf.distribute`.
"""

import tensorflow as tf

from kerasbn import normalization, ops


def normalize(x, weights, group_size, channel_axes, scale_and_offset, *, epsilon,
              compiled):
    """Each group of `group_size` consecutive examples normalized with its own statistics.

    Args:
        x: the input, batch axis first.
        weights: None, or 0/1 weights of x's shape (a Keras mask).
        group_size: the virtual batch size k.
        channel_axes: the input's channel axes, non-negative, sorted, without 0.
        scale_and_offset: callable `(mean, variance) -> (gamma, beta)`, from the groups'
            statistics (shape [groups, *view channels]) to tensors that broadcast
            against them (the learned γ and β, with renorm's r and d folded in).
        epsilon: the variance floor ε.
        compiled: run the math as XLA programs.

    Returns:
        `(y, (count, shift, offset, variance))`: the output, of x's shape and dtype, and
        the whole batch's moments (the mean as shift + offset, as `ops.shifted_moments`
        returns it), in the view's channel shape.
    """
    size = tf.shape(x)[0]
    head = (size // group_size) * group_size
    parts = [(0, head, group_size)]
    if x.shape[0] is None or x.shape[0] % group_size or x.shape[0] == 0:
        parts.append((head, size - head, None))  # possibly empty: never no group
    outputs, moments = [], []
    for start, length, part_group_size in parts:
        y, part_moments = _normalize_groups(
            *(t if len(parts) == 1 or t is None else t[start:start + length]
              for t in (x, weights)),
            part_group_size, channel_axes, scale_and_offset, epsilon, compiled)
        outputs.append(y)
        moments.append(part_moments)
    batch = ops.merge_shifted_moments(*(tf.concat(m, axis=0) for m in zip(*moments)))
    return (outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)), batch


def _normalize_groups(x, weights, group_size, channel_axes, scale_and_offset, epsilon,
                      compiled):
    """Normalizes consecutive groups of `group_size` examples (None: one group).

    Returns the output and the groups' shifted moments, each [groups, *channels] in the
    view.
    """
    dims = tf.shape(x)
    if group_size is None:
        grouped_dims, static_groups = tf.concat([[1], dims], axis=0), 1
    else:
        grouped_dims = tf.concat([[dims[0] // group_size, group_size], dims[1:]], 0)
        static_groups = -1
    layout = ops.Layout([static_groups, group_size] + list(x.shape[1:]),
                        [0] + [axis + 1 for axis in channel_axes])
    grouped = layout.view(tf.reshape(x, grouped_dims))
    if weights is not None:
        weights = layout.view(tf.reshape(weights, grouped_dims))
    shifted = ops.shifted_moments(grouped, layout.axes, weights, compiled=compiled)
    count, mean, variance = shifted[0], shifted[1] + shifted[2], shifted[3]
    gamma, beta = (tf.broadcast_to(t, tf.shape(mean))
                   for t in scale_and_offset(mean, variance))
    outputs = normalization.normalize_for_training(
        grouped, mean, variance, gamma, beta,
        epsilon=epsilon, axes=layout.axes,
        count=count, mask=weights, compiled=compiled,
    )
    return tf.reshape(outputs, dims), shifted
