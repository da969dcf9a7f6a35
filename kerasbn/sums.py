"""Per-channel sums of elementwise terms of a batch, for `ops`: as plain reductions,
or, compiled, in cache-sized blocks that never write anything the size of the input.
"""

import math

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

# A block whose kept values are few a row (64 channels of a [pixels, channels] view)
# sums faster seen as wider rows: 32 pixels a row, 2048 values, each block 8 such rows
# summed into 2048 running totals, folded to the 64 channels after the loop. Our reading
# (not a profile): XLA's CPU code runs a reduction that keeps the minor axis one row at a
# time, and a row of 64 values leaves too little to do between rows. The moments' program
# (`ops.moments`, compiled) against the blocks as they were, in one process, alternating:
# a [65536, 64] view 1.31 -> 0.88 ms, [16384, 256] 1.03 -> 0.60 ms, a ghost view
# [4, 2053, 128] 0.45 -> 0.35 ms; Σd and Σd² alone of [65536, 64] take 0.54 ms, 31 GB/s.
# Rows of 4096 values were slower than of 2048 (0.89-1.11 against 0.78-1.07 ms).
WIDE_ROW_VALUES = 1 << 11


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
    blocks = _Blocks(tensors[0].shape, axes, [p.shape for p in params])

    @tf.custom_gradient
    def blocked(*args):
        inputs, rest = args[:len(tensors)], list(args[len(tensors):])

        def block_sums(part, start, length):
            return direct(*[blocks.rows(t, part, start, length) for t in inputs],
                          *[blocks.rows(q, part) for q in rest], keepdims=True)

        flat = [blocks.flat(t) for t in inputs] if blocks.width else None

        def add_full_blocks(part, totals):
            if blocks.width:  # made once, outside the loop
                wide_params = [blocks.wide_param(blocks.rows(q, part)) for q in rest]

            def full_block_sums(start, length):
                if not blocks.width:
                    return block_sums(part, start, length)
                wide = [blocks.wide_rows(f, t, part, start, length)
                        for f, t in zip(flat, inputs)]
                return [tf.reduce_sum(t, 0, keepdims=True) for t in terms(*wide, *wide_params)]

            def body(i, *running):
                length, block = blocks.geometry(inputs[0])
                block = tf.minimum(block, length)
                return (i + 1, *(t + s for t, s in zip(running,
                                                       full_block_sums(i * block, block))))

            length, block = blocks.geometry(inputs[0])
            start = [blocks.wide_zeros(t) for t in totals] if blocks.width else totals
            _, *running = tf.while_loop(lambda i, *_: i < length // block, body,
                                        (tf.constant(0, tf.int64), *start))
            if not blocks.width:
                return running
            return [t + blocks.fold(r, like=t) for t, r in zip(totals, running)]

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
    """Where the blocks of `channel_sums` lie: rows along the first reduction axis, spanning
    every other axis; or, when that axis is 1 (axis 0 then is kept) and one index of axis 0
    holds a block or more, within one such part at a time.

    A full block is summed as rows of `width` times the kept values (see
    `WIDE_ROW_VALUES`) when the kept axes are the last ones and known, and the parameters
    vary along them only; its length is then a multiple of the rows that fill `width`.
    Otherwise `width` is None and the block is summed as it is.

    Every size is computed from a tensor's shape inside the loops, so that XLA sees
    constants there.
    """

    def __init__(self, shape, axes, param_shapes):
        part_size = shape[1:].num_elements()
        self.rank, self.axis = shape.rank, axes[0]
        self.per_part = self.axis == 1 and part_size is not None and part_size >= BLOCK_VALUES
        first_kept = self.axis + len(axes)
        kept = shape[first_kept:].num_elements()
        trailing = list(axes) == list(range(self.axis, first_kept))
        spread = shape[self.axis + 1:first_kept].num_elements()  # reduced values a row holds
        part_axes = 1 if self.per_part else 0
        only_kept = all(_right_aligned(s, shape.rank)[part_axes:first_kept].num_elements() == 1
                        for s in param_shapes)
        self.kept, self.width, self.rows_per_width = kept, None, 1
        if trailing and only_kept and kept and spread and (self.axis == 0 or self.per_part):
            self.width = 1 << max(0, (WIDE_ROW_VALUES // kept).bit_length() - 1)
            self.rows_per_width = self.width // math.gcd(self.width, spread)

    def geometry(self, t):
        """(length, block) of a part: block exceeds length when t is summed in one piece."""
        dims = tf.shape(t, out_type=tf.int64)
        parts = dims[0] if self.per_part else 1
        length, size = dims[self.axis], tf.reduce_prod(dims)
        row = size // tf.maximum(parts * length, 1)
        step = self.rows_per_width
        return length, tf.where(size < MIN_BLOCKED_VALUES, length + 1,
                                tf.maximum(BLOCK_VALUES // tf.maximum(row * step, 1), 1) * step)

    def flat(self, t):
        """t as one row of values a part ([parts, values] when summed part by part, else
        [values]): full blocks are cut from this, outside the loop, a view of t."""
        return tf.reshape(t, [tf.shape(t)[0], -1] if self.per_part else [-1])

    def wide_rows(self, flat, t, part, start, length):
        """Rows [start, start + length) along the axis of `t` (`flat` its `flat`), as rows
        of `width` times the kept values. Cut from the flat values, not from t itself:
        XLA's CPU code indexes a reshaped slice of t through a division by the channels,
        at every value, which made the sums 2.5 times slower than those of a flat slice."""
        dims = tf.shape(t, out_type=tf.int64)
        row = tf.reduce_prod(dims[self.axis + 1:])  # the values of one row along the axis
        if self.per_part:
            block = tf.slice(flat, tf.stack([tf.minimum(part, dims[0] - 1), start * row]),
                             tf.stack([tf.constant(1, tf.int64), length * row]))
        else:
            block = tf.slice(flat, tf.reshape(start * row, [1]), tf.reshape(length * row, [1]))
        return tf.reshape(block, [-1, self.width * self.kept])

    def wide_param(self, param):
        """A parameter (its reduced dims 1) repeated across a wide row."""
        return tf.tile(tf.reshape(param, [1, self.kept]), [1, self.width])

    def wide_zeros(self, total):
        """Running totals of wide rows, for totals shaped like `total`."""
        return tf.zeros([1, self.width * self.kept], total.dtype)

    def fold(self, running, like):
        """Wide rows' running totals added up to the kept values, shaped `like`."""
        return tf.reshape(tf.reduce_sum(tf.reshape(running, [self.width, self.kept]), 0),
                          tf.shape(like))

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


def _right_aligned(shape, rank):
    """`shape` as it broadcasts against a tensor of `rank` (size-1 dims put in front)."""
    return tf.TensorShape([1] * (rank - shape.rank)).concatenate(shape)


def _to_channel_shape(tensor, axes):
    """Squeezes a keepdims reduction down to the channel shape."""
    return tf.squeeze(tensor, axis=axes) if axes else tensor
