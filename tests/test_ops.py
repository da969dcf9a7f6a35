"""kerasbn.ops: moments, their merge, the inference affine, renorm, against float64 references."""

import numpy as np
import pytest
import tensorflow as tf

import reference
from kerasbn import ops
from op_cases import BLOCKED_SHAPE, GROUPED_BLOCKED_SHAPE, LAYOUTS, random_input, views


# ------------------------------------------------------------------ moments


@pytest.mark.parametrize("shape,channel_axes", LAYOUTS)
def test_moments_match_float64(rng, shape, channel_axes):
    x = random_input(rng, shape, loc=3.0, scale=2.0).astype(np.float32)
    axes, _, _ = views(shape, channel_axes)
    count, mean, var = ops.moments(tf.constant(x), axes)
    ref_count, ref_mean, ref_var = reference.moments(x, channel_axes)
    assert count.dtype == mean.dtype == var.dtype == tf.float32
    np.testing.assert_array_equal(count.numpy(), ref_count)
    assert reference.relative_error(mean, ref_mean) < 1e-6
    # float32 sums of ~1000 squared deviations: over 3,000 draws of the (5, 3, 4, 3)
    # layout the error reached 1.6e-6 (4 % of draws above 1e-6, once a failed run).
    assert reference.relative_error(var, ref_var) < 4e-6


@pytest.mark.parametrize("compiled,shape", [(False, (256, 16, 8)), (True, (256, 16, 8)),
                                            (True, BLOCKED_SHAPE)],
                         ids=["eager-ops", "xla", "xla-blocked"])
@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e6])
def test_variance_is_accurate_for_any_mean_to_std_ratio(rng, ratio, compiled, shape):
    x = (ratio + rng.standard_normal(shape)).astype(np.float32)
    _, mean, var = ops.moments(tf.constant(x), (0, 1), compiled=compiled)
    _, ref_mean, ref_var = reference.moments(x, [2])
    assert np.all(np.abs(var.numpy() - ref_var) <= 1e-5 * ref_var)
    assert reference.relative_error(mean, ref_mean) < 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ops", "xla"])
def test_moments_of_groups_summed_in_blocks_match_float64(rng, compiled):
    """Axis 0 kept: every group has its own statistics, far apart, none mixed up."""
    group_means = 1e3 * rng.standard_normal((GROUPED_BLOCKED_SHAPE[0], 1, 1))
    x = (group_means + random_input(rng, GROUPED_BLOCKED_SHAPE)).astype(np.float32)
    count, mean, var = ops.moments(tf.constant(x), (1,), compiled=compiled)
    ref_count, ref_mean, ref_var = reference.moments(x, [0, 2])
    np.testing.assert_array_equal(count.numpy(), ref_count)
    assert reference.relative_error(mean, ref_mean) < 1e-6
    assert np.all(np.abs(var.numpy() - ref_var) <= 1e-5 * ref_var)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ops", "xla"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(rng, dtype, compiled):
    x = tf.cast(random_input(rng, (128, 8, 8, 4), loc=4.0), dtype)
    _, mean, var = ops.moments(x, (0, 1, 2), compiled=compiled)
    assert mean.dtype == var.dtype == tf.float32
    exact = tf.cast(x, tf.float64).numpy()
    _, ref_mean, ref_var = reference.moments(exact, [3])
    # TensorFlow's own reductions add 8192 terms one after another (error up to
    # n·eps/2 = 5e-4 in the worst case); XLA's add in a tree. On bfloat16's coarse grid
    # the rounding errors are correlated (3e-5 compiled, 1.3e-4 as ops, seen in 5000
    # draws); summing in bfloat16 or float16 would be off by 1e-2 or more.
    tolerance = 1e-4 if compiled else 5e-4
    assert reference.relative_error(mean, ref_mean) < tolerance
    assert reference.relative_error(var, ref_var) < tolerance


def test_float64_inputs_keep_float64_statistics(rng):
    x = random_input(rng, (32, 5))
    _, mean, var = ops.moments(tf.constant(x), [0])
    _, ref_mean, ref_var = reference.moments(x, [1])
    assert mean.dtype == tf.float64
    assert reference.relative_error(var, ref_var) < 1e-14


@pytest.mark.parametrize("shape,channel_axes", [((6, 10, 5), [2]), ((6, 5, 10), [1])])
def test_masked_moments_ignore_masked_steps(rng, shape, channel_axes):
    x = random_input(rng, shape).astype(np.float32)
    mask = rng.random((shape[0], 10)) < 0.6
    mask[0, 0] = True
    expanded = np.expand_dims(mask, channel_axes[0]).astype(np.float32)
    axes, _, _ = views(shape, channel_axes)
    count, mean, var = ops.moments(tf.constant(x), axes, tf.constant(expanded))
    ref_count, ref_mean, ref_var = reference.moments(x, channel_axes, expanded)
    np.testing.assert_array_equal(count.numpy(), ref_count)
    assert reference.relative_error(mean, ref_mean) < 1e-6
    assert reference.relative_error(var, ref_var) < 1e-6


def test_empty_batch_gives_zero_count_not_nan():
    count, mean, var = ops.moments(tf.zeros((0, 4, 3)), [0, 1])
    for t in (count, mean, var):
        np.testing.assert_array_equal(t.numpy(), np.zeros(3))


# ------------------------------------------------------------------ merge


@pytest.mark.parametrize("sizes", [[5, 0, 3, 8], [1, 1], [0, 7], [4, 4, 4, 4]])
@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_merged_moments_equal_those_of_the_whole(rng, sizes, loc):
    x = (loc + rng.standard_normal((sum(sizes), 6))).astype(np.float32)
    parts = np.split(x, np.cumsum(sizes)[:-1])
    stats = [ops.shifted_moments(tf.constant(p), [0]) for p in parts]
    count, mean, var = ops.merge_moments(*[tf.stack(s) for s in zip(*stats)])
    ref_count, ref_mean, ref_var = reference.moments(x, [1])
    np.testing.assert_array_equal(count.numpy(), ref_count)
    assert reference.relative_error(mean, ref_mean) < 1e-6
    assert np.all(np.abs(var.numpy() - ref_var) <= 1e-5 * ref_var)


def test_merge_of_nothing_is_empty_not_nan():
    zeros = tf.zeros((3, 4))
    for t in ops.merge_moments(zeros, zeros, zeros, zeros):
        np.testing.assert_array_equal(t.numpy(), np.zeros(4))


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("shape,channel_axes", LAYOUTS)
def test_inference_is_one_affine_algorithm_2(rng, shape, channel_axes):
    _, channel_shape, bshape = views(shape, channel_axes)
    x = random_input(rng, shape).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(channel_shape).astype(np.float32)
                         for _ in range(3))
    var = rng.uniform(0.1, 3.0, channel_shape).astype(np.float32)
    a, b = ops.inference_coefficients(mean, var, gamma, beta, 1e-3)
    y = ops.affine(tf.constant(x), a, b, bshape)
    ref_y = reference.inference_forward(x, channel_axes, gamma, beta, mean, var, 1e-3)
    assert reference.relative_error(y, ref_y) < 1e-5


# ------------------------------------------------------------------ renorm and misc


@pytest.mark.parametrize("clipping", [{}, {"rmin": 0.8, "rmax": 1.25, "dmax": 0.3}])
def test_renorm_correction_matches_the_paper(rng, clipping):
    x = random_input(rng, (64, 5), loc=1.0, scale=1.5)
    state = {"renorm_mean": rng.standard_normal(5), "renorm_stddev": rng.uniform(0.5, 2, 5),
             "moving_mean": np.zeros(5), "moving_stddev": np.ones(5)}
    _, r_ref, d_ref, _ = reference.renorm_step(
        x, [1], np.ones(5), np.zeros(5), state, epsilon=1e-3, momentum=0.9,
        renorm_momentum=0.9, **clipping)
    _, mean, var = ops.moments(tf.constant(x), [0])
    r, d = ops.renorm_correction(mean, var, state["renorm_mean"], state["renorm_stddev"],
                                 epsilon=1e-3, **clipping)
    assert reference.relative_error(r, r_ref) < 1e-12
    assert reference.relative_error(d, d_ref) < 1e-12
    if clipping:
        assert np.all(r.numpy() >= 0.8) and np.all(r.numpy() <= 1.25)
        assert np.all(np.abs(d.numpy()) <= 0.3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count_kind", ["float", "int", "tensor with zeros"])
def test_per_value_divides_by_the_count_and_gives_zero_where_nothing_was_counted(
        rng, dtype, count_kind):
    total = (1e3 * rng.standard_normal(6)).astype(dtype)
    if count_kind == "tensor with zeros":
        count = rng.integers(0, 5, 6).astype(dtype)
        count[rng.integers(0, 6)] = 0.0
        argument = tf.constant(count)
    else:
        count = np.full(6, float(rng.integers(1, 5000)))
        argument = float(count[0]) if count_kind == "float" else int(count[0])
    result = ops.per_value(tf.constant(total), argument)
    assert result.dtype == tf.as_dtype(dtype)
    expected = np.where(count > 0, total.astype(np.float64) / np.maximum(count, 1.0), 0.0)
    tolerance = np.finfo(dtype).eps * np.abs(expected)
    assert np.all(np.abs(result.numpy() - expected) <= tolerance)
    assert np.all(result.numpy()[count == 0] == 0.0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-ops", "xla"])
def test_variance_survives_outliers_where_the_shift_is_sampled(rng, compiled):
    """The shift comes from the first values; outliers there must not cost accuracy.

    The outliers move the shift by a fraction of the spread they add, so the shift
    costs nothing here; what remains is the float32 sum. TensorFlow's op-by-op
    reduction sums a column in sequence, and with the outliers first every later term
    is rounded at their magnitude: off by up to 9e-6 of the variance in 300 seeds and
    1.04e-5 at seed 870221624 (a two-pass variance with TensorFlow's ops, around the
    mean itself, up to 1.4e-5); XLA's sum stays within 1.1e-6. A shift of 0 would be
    off by 4e-3 to 0.66.
    """
    x = (1e3 + rng.standard_normal((4096, 4))).astype(np.float32)
    x[:3] += 500.0 * rng.standard_normal((3, 4)).astype(np.float32)
    _, mean, var = ops.moments(tf.constant(x), (0,), compiled=compiled)
    _, ref_mean, ref_var = reference.moments(x, [1])
    tolerance = 5e-6 if compiled else 3e-5
    assert np.all(np.abs(var.numpy() - ref_var) <= tolerance * ref_var)
    assert reference.relative_error(mean, ref_mean) < 1e-6
