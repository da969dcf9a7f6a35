"""kerasbn.sums: per-channel sums of elementwise terms, plain or, compiled, in blocks.

The blocked form (compiled, from `sums.MIN_BLOCKED_VALUES` values) must give the sums
of the plain one to float32 rounding, against float64 NumPy, and their gradient.
"""

import numpy as np
import pytest
import tensorflow as tf

import reference
from kerasbn import sums

# (shape, reduction axes): past MIN_BLOCKED_VALUES with a last block shorter than the
# others; the second keeps axis 0 (a ghost batch norm's groups), summed group by group;
# the third keeps a middle axis (a channels-first view), which is not summed in wide rows.
BLOCKED = [((131, 64, 128), [0, 1]), ((4, 2053, 128), [1]), ((16, 64, 1031), [0, 2])]
SMALL = [((16, 8, 32), [0, 1]), ((4, 9, 32), [1])]
for _shape, _ in BLOCKED:
    assert np.prod(_shape) >= sums.MIN_BLOCKED_VALUES
for _shape, _ in SMALL:
    assert np.prod(_shape) < sums.MIN_BLOCKED_VALUES


def _deviation_terms(x, shift):
    deviations = x - shift
    return deviations, tf.square(deviations)


def _inputs(rng, shape, axes):
    """x far from 0 (mean 100, spread 1 a channel) and a shift near its means."""
    kept = [1 if a in axes else n for a, n in enumerate(shape)]
    shift = 100.0 + rng.standard_normal(kept)
    x = shift + rng.standard_normal(shape)
    return x.astype(np.float32), shift.astype(np.float32)


def _sums(x, shift, axes, compiled):
    if not compiled:
        return sums.channel_sums(_deviation_terms, [x], [shift], axes, False)
    program = tf.function(
        lambda x, shift: sums.channel_sums(_deviation_terms, [x], [shift], axes, True),
        jit_compile=True)
    return program(x, shift)


@pytest.mark.parametrize("compiled", [False, True], ids=["ops", "xla"])
@pytest.mark.parametrize("shape,axes", BLOCKED + SMALL,
                         ids=["blocked", "blocked-groups", "blocked-middle", "small",
                              "small-groups"])
def test_sums_equal_float64_sums(rng, shape, axes, compiled):
    x, shift = _inputs(rng, shape, axes)
    deviations = x.astype(np.float64) - shift.astype(np.float64)
    sum_d, sum_d2 = _sums(tf.constant(x), tf.constant(shift), axes, compiled)
    expected = [deviations.sum(axis=tuple(axes)), np.square(deviations).sum(axis=tuple(axes))]
    channels = tuple(n for a, n in enumerate(shape) if a not in axes)
    for actual, exact in zip((sum_d, sum_d2), expected):
        assert tuple(actual.shape) == channels
        # Σd is a sum of terms of either sign: its error is against Σ|d|.
        scale = np.abs(deviations).sum(axis=tuple(axes)).max()
        assert np.max(np.abs(actual.numpy() - exact)) < 1e-5 * scale


@pytest.mark.parametrize("shape,axes,loops", [(*BLOCKED[0], True), (*BLOCKED[1], True),
                                              (*BLOCKED[2], True), (*SMALL[0], False)],
                         ids=["blocked", "blocked-groups", "blocked-middle", "small"])
def test_compiled_sums_loop_over_blocks_from_a_million_values(shape, axes, loops):
    program = tf.function(
        lambda x, shift: sums.channel_sums(_deviation_terms, [x], [shift], axes, True))
    kept = [1 if a in axes else n for a, n in enumerate(shape)]
    graph = program.get_concrete_function(tf.TensorSpec(shape, tf.float32),
                                          tf.TensorSpec(kept, tf.float32)).graph
    types = {op.type for op in graph.get_operations()}
    assert bool(types & {"While", "StatelessWhile"}) == loops


@pytest.mark.parametrize("shape,axes,width", [
    ((65536, 64), [0], 32),            # a [pixels, channels] view: 32 pixels a row
    ((16384, 256), [0], 8),
    ((131, 64, 128), [0, 1], 16),
    ((4, 2053, 128), [1], 16),         # groups, summed one after the other
    ((512, 4096), [0], 1),             # rows already past WIDE_ROW_VALUES: cut flat
    ((16, 64, 1031), [0, 2], None),    # the kept axis in the middle: blocks as they are
])
def test_full_blocks_are_summed_in_rows_of_about_two_thousand_values(shape, axes, width):
    kept = [1 if a in axes else n for a, n in enumerate(shape)]
    blocks = sums._Blocks(tf.TensorShape(shape), axes, [tf.TensorShape(kept)])
    assert blocks.width == width
    if width:
        assert blocks.width * blocks.kept <= max(sums.WIDE_ROW_VALUES, blocks.kept)


def test_a_parameter_varying_along_a_reduced_axis_keeps_blocks_as_they_are():
    blocks = sums._Blocks(tf.TensorShape([4096, 256]), [0], [tf.TensorShape([4096, 1])])
    assert blocks.width is None


@pytest.mark.parametrize("shape,axes", BLOCKED, ids=["blocked", "blocked-groups",
                                                    "blocked-middle"])
def test_blocked_sums_have_the_gradient_of_the_plain_sums(rng, shape, axes):
    x, shift = _inputs(rng, shape, axes)
    channels = [n for a, n in enumerate(shape) if a not in axes]
    weights = [tf.constant(rng.standard_normal(channels), tf.float32) for _ in range(2)]

    def gradient(compiled):
        def loss_gradient(x, shift):
            with tf.GradientTape() as tape:
                tape.watch([x, shift])
                totals = sums.channel_sums(_deviation_terms, [x], [shift], axes, compiled)
                loss = sum(tf.reduce_sum(t * w) for t, w in zip(totals, weights))
            return tape.gradient(loss, [x, shift])
        return tf.function(loss_gradient, jit_compile=compiled)(tf.constant(x),
                                                                 tf.constant(shift))

    for blocked, plain in zip(gradient(True), gradient(False)):
        assert reference.relative_error(blocked, plain) < 1e-5
