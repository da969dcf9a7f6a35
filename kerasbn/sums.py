"""Per-channel sums of elementwise terms of a batch, for `ops`: as plain reductions,
or, compiled, in cache-sized blocks that never write anything the size of the input.
"""

import tensorflow as tf

# Under XLA on CPU a reduction runs as a library call that does not take in the
# elementwise work feeding it: Σ(x - K)² first writes (x - K)² out in full, and a
# fresh buffer the size of the input costs more than the sum itself (its memory is
# faulted in anew on each call). Compiled code therefore sums blocks of 16K values
# (64 KB in float32, well inside a core's cache) in a loop. Inputs under 1M values
# are summed in one piece: their buffers are reused from call to call, and the loop
# would cost more than it saves. When axis 0 is kept and the reduction starts at
# axis 1 (the groups of a ghost batch norm's view, [groups, rows, channels]), the
# blocks lie within one group, group after group: a block across every group reduces
# a short strided axis, which XLA's CPU code does about 1.5 times slower.
BLOCK_VALUES = 1 << 14
MIN_BLOCKED_VALUES = 1 << 20


def channel_sums(terms, tensors, params, axes, compiled):
    """Per-channel sums of each tensor `terms(*tensors, *params)` returns, in the
    channel shape (the reduction without kept dims).

    `tensors` have the input's shape, `params` its rank and broadcast against it.
    Compiled, large inputs are summed in blocks along the first reduction axis, so that
    nothing the size of the input is ever written; the blocks' partial sums then add
    up, which is at least as accurate as one long sum. The gradient is that of the
    direct sums (a gradient penalty differentiates through here).
    """
    def direct(*args, keepdims=False):
        return [tf.reduce_sum(t, axes, keepdims=keepdims) for t in terms(*args)]

    rank, size = tensors[0].shape.rank, tensors[0].shape.num_elements()
    if not compiled or rank is None or (size is not None and size < MIN_BLOCKED_VALUES):
        return direct(*tensors, *params)
    blocks = _Blocks(tensors[0].shape, axes[0])

    @tf.custom_gradient
    def blocked(*args):
        inputs, rest = args[:len(tensors)], list(args[len(tensors):])

        def block_sums(part, start, length):
            return direct(*[blocks.rows(t, part, start, length) for t in inputs],
                          *[blocks.rows(q, part) for q in rest], keepdims=True)

        def add_full_blocks(part, totals):
            def body(i, *totals):
                length, block = blocks.geometry(inputs[0])
                block = tf.minimum(block, length)
                return (i + 1, *(t + s for t, s in zip(totals, block_sums(part, i * block,
                                                                           block))))

            length, block = blocks.geometry(inputs[0])
            _, *totals = tf.while_loop(lambda i, *_: i < length // block, body,
                                       (tf.constant(0, tf.int64), *totals))
            return totals

        length, block = blocks.geometry(inputs[0])
        tail = (length // block) * block
        tails = block_sums(None, tail, length - tail)  # every part's last, short block
        totals = [_to_channel_shape(t, axes) for t in blocks.over_parts(add_full_blocks, tails)]

        def grad(*upstream):
            upstream = [tf.zeros_like(t) if g is None else g for g, t in zip(upstream, totals)]
            with tf.GradientTape() as tape:
                tape.watch(args)
                sums = direct(*args)
            return tape.gradient(sums, args, output_gradients=upstream)

        return totals, grad

    return blocked(*tensors, *params)


class _Blocks:
    """Where the blocks of `channel_sums` lie: rows along `axis`, spanning every other axis; or,
    when `axis` is 1 (axis 0 then is kept) and one index of axis 0 holds a block or more,
    within one such part at a time.

    Every size is computed from a tensor's shape inside the loops, so that XLA sees
    constants there.
    """

    def __init__(self, shape, axis):
        part_size = shape[1:].num_elements()
        self.rank, self.axis = shape.rank, axis
        self.per_part = axis == 1 and part_size is not None and part_size >= BLOCK_VALUES

    def geometry(self, t):
        """(length, block) of a part: block exceeds length when t is summed in one piece."""
        dims = tf.shape(t, out_type=tf.int64)
        parts = dims[0] if self.per_part else 1
        length, size = dims[self.axis], tf.reduce_prod(dims)
        row = size // tf.maximum(parts * length, 1)
        return length, tf.where(size < MIN_BLOCKED_VALUES, length + 1,
                                tf.maximum(BLOCK_VALUES // tf.maximum(row, 1), 1))

    def over_parts(self, add_full_blocks, tails):
        """The totals: `add_full_blocks(part, totals)` run from the tails' sums, on every
        part at once (part None) or part by part."""
        if not self.per_part:
            return add_full_blocks(None, tails)

        def body(part, *totals):
            done = add_full_blocks(part, [self.rows(t, part) for t in totals])
            return (part + 1, *(tf.tensor_scatter_nd_update(t, tf.reshape(part, [1, 1]), d)
                                for t, d in zip(totals, done)))

        parts = tf.shape(tails[0], out_type=tf.int64)[0]
        _, *totals = tf.while_loop(lambda part, *_: part < parts, body,
                                   (tf.constant(0, tf.int64), *tails))
        return totals

    def rows(self, t, part, start=None, length=None):
        """The block of t: its rows [start, start + length) along the axis (all of them
        when start is None), at index `part` of axis 0 unless part is None or t has one
        index there (a parameter shared by the parts)."""
        if (start is None and part is None) or t.shape.rank < self.rank:
            return t  # all of it, or a parameter that broadcasts against every part
        dims = tf.shape(t, out_type=tf.int64)
        begin, sizes = [0] * self.rank, [dims[a] for a in range(self.rank)]
        if start is not None:
            begin[self.axis], sizes[self.axis] = start, length
        if part is not None:
            begin[0], sizes[0] = tf.minimum(part, dims[0] - 1), 1
        return tf.slice(t, tf.stack(begin), tf.stack(sizes))


def _to_channel_shape(tensor, axes):
    """Squeezes a keepdims reduction down to the channel shape."""
    return tf.squeeze(tensor, axis=axes) if axes else tensor
