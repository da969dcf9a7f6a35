"""The inputs the tests of kerasbn's math (tests/test_ops.py, tests/test_normalization.py)
share: the layouts with a batch of 16, their reduction axes and shapes, the sizes that
compiled code sums in blocks, and random inputs whose channels differ."""

import numpy as np

import grids
import reference
from kerasbn import ops
from kerasbn import sums

# (input shape, channel axes) of the shared grid, with a batch of 16.
LAYOUTS = [((16,) + shape, reference.channel_axes(len(shape) + 1, axis))
           for shape, axis in grids.LAYOUTS]


def views(shape, channel_axes):
    """(reduction axes, channel shape, broadcast shape) of an input of `shape`."""
    rank = len(shape)
    axes = ops.reduction_axes(rank, channel_axes)
    channel_shape = [shape[a] for a in channel_axes]
    return axes, channel_shape, ops.broadcast_shape(rank, channel_axes, channel_shape)


# Large enough that compiled code sums it in blocks (sums.channel_sums), with a short last block.
BLOCKED_SHAPE = (131, 64, 128)
assert np.prod(BLOCKED_SHAPE) >= sums.MIN_BLOCKED_VALUES
assert BLOCKED_SHAPE[0] % (sums.BLOCK_VALUES // (64 * 128)) != 0

# The same with axis 0 kept (a ghost batch norm's view, [groups, rows, channels]): summed
# in blocks group after group, each group with a short last block.
GROUPED_BLOCKED_SHAPE = (4, 2053, 128)
assert np.prod(GROUPED_BLOCKED_SHAPE) >= sums.MIN_BLOCKED_VALUES
assert GROUPED_BLOCKED_SHAPE[1] % (sums.BLOCK_VALUES // 128) != 0


def random_input(rng, shape, loc=0.0, scale=1.0):
    """loc + scale·(standard normal), each channel (last axis) offset by its own amount."""
    channel_offsets = rng.standard_normal(shape[-1])  # channels that differ from each other
    return loc + scale * (rng.standard_normal(shape) + channel_offsets)
