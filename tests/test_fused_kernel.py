"""kerasbn.fused_kernel: a training step on TensorFlow's fused kernels, given kerasbn's
own exact statistics; when a layer takes that path; and that the path keeps the layer's
numbers (float64 references, autodiff of the textbook formula, statistics far from 0)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import fused_kernel, normalization, ops
from op_cases import random_input

needs_onednn = pytest.mark.skipif(
    not fused_kernel.onednn_is_on(), reason="TensorFlow runs without oneDNN here")

# From 131,072 values (an unknown batch counted as 32): the fused kernels' own floor.
LARGE = (16, 16, 16)  # 32 x 4,096 values with the batch unknown


# ------------------------------------------------------------------ when


@pytest.mark.parametrize("shape,expected", [
    ((None, 16, 16, 16), True), ((None, 8, 16, 16), False), ((128, 1024), True),
    ((127, 1024), False), ((32, 8, 8, 64), True), ((None, None, 64), False),
    ((0, 16, 16, 64), False),
])
def test_worth_fusing_from_131072_values_an_unknown_batch_counted_as_32(shape, expected):
    assert fused_kernel.worth_fusing(shape) is expected


@needs_onednn
@pytest.mark.parametrize("jit_compile,dtype,expected", [
    ("auto", tf.float32, True), (True, tf.float32, False), (False, tf.float32, False),
    ("auto", tf.float64, False), ("auto", tf.float16, False), ("auto", tf.bfloat16, False),
])
def test_only_auto_and_float32_take_the_fused_kernels(jit_compile, dtype, expected):
    assert fused_kernel.applies(jit_compile, (None,) + LARGE, dtype, view_axes=(0,),
                                masked=False) is expected


@needs_onednn
@pytest.mark.parametrize("view_axes,masked", [((0, 2), False), ((0,), True)],
                         ids=["channels-first-view", "masked"])
def test_masks_and_channels_first_keep_kerasbns_math(view_axes, masked):
    assert not fused_kernel.applies("auto", (None,) + LARGE, tf.float32,
                                    view_axes=view_axes, masked=masked)


@needs_onednn
def test_a_function_compiled_whole_keeps_the_math_in_its_program():
    seen = []

    @tf.function(jit_compile=True)
    def compiled(x):
        seen.append(fused_kernel.applies("auto", x.shape, x.dtype, view_axes=(0,),
                                         masked=False))
        return x

    compiled(tf.zeros((32,) + LARGE))
    assert seen == [False]


def test_without_onednn_the_layer_traces_no_fused_kernel():
    """TensorFlow's CPU kernel for the fused gradient without oneDNN is slower than
    kerasbn's own math: a process with oneDNN turned off never takes the path."""
    script = (
        "import tensorflow as tf, kerasbn\n"
        "from kerasbn import fused_kernel\n"
        "layer = kerasbn.BatchNormalization()\n"
        "step = tf.function(lambda x: layer(x, training=True))\n"
        "graph = step.get_concrete_function(tf.TensorSpec([None, 16, 16, 16])).graph\n"
        "print(fused_kernel.onednn_is_on(), sorted({op.type for op in graph.get_operations()"
        " if op.type.startswith('FusedBatchNorm')}))\n"
    )
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False []"


def _traced_kernels(layer, input_shape, mask=None):
    step = tf.function(lambda x: layer(x, training=True, mask=mask))
    graph = step.get_concrete_function(tf.TensorSpec((None,) + input_shape)).graph
    return sorted({op.type for op in graph.get_operations()
                   if op.type.startswith("FusedBatchNorm")})


@needs_onednn
@pytest.mark.parametrize("config,input_shape,expected", [
    ({}, LARGE, ["FusedBatchNormV3"]),
    ({}, (128, 1024), ["FusedBatchNormV3"]),
    ({"renorm": True}, LARGE, ["FusedBatchNormV3"]),
    ({"axis": 1}, LARGE, []),           # channels first: a [N, C, H·W] view
    ({}, (8, 16, 16), []),              # 16,384 values: below the kernels' floor
    ({"jit_compile": False}, LARGE, []),
    ({"virtual_batch_size": 8}, LARGE, []),
], ids=["nhwc", "dense-3d", "renorm", "channels-first", "small", "jit-false", "ghost"])
def test_which_layers_take_the_fused_kernels(config, input_shape, expected):
    layer = kerasbn.BatchNormalization(**config)
    assert _traced_kernels(layer, input_shape) == expected


@needs_onednn
def test_a_masked_layer_keeps_its_own_math():
    layer = kerasbn.BatchNormalization()
    mask = tf.constant(np.arange(128) < 100)[tf.newaxis, :] & tf.ones([32, 1], tf.bool)
    step = tf.function(lambda x: layer(x, training=True, mask=mask))
    graph = step.get_concrete_function(tf.TensorSpec([32, 128, 128])).graph
    assert not [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]


@needs_onednn
@pytest.mark.parametrize("synchronized", [True, False])
def test_under_a_strategy_synchronized_or_not_a_layer_takes_the_kernels(mirrored_strategy,
                                                                        synchronized):
    """Synchronized, the forward kernel normalizes with the global statistics and the
    gradient kernel in its inference form gives the local sums that are then summed
    over the replicas (`fused_kernel.gradient_parts`); unsynchronized, the gradient
    kernel in its training form gives dx."""
    with mirrored_strategy.scope():
        layer = kerasbn.BatchNormalization(synchronized=synchronized)
        layer.build((None,) + LARGE)

    def replica_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    @tf.function
    def step(x):
        return mirrored_strategy.run(replica_step, (x,))

    graph = step.get_concrete_function(tf.TensorSpec((None,) + LARGE)).graph
    kernels = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
    assert sorted({op.type for op in kernels}) == ["FusedBatchNormGradV3",
                                                   "FusedBatchNormV3"]
    gradients = [op for op in kernels if op.type == "FusedBatchNormGradV3"]
    assert {op.get_attr("is_training") for op in gradients} == {not synchronized}


def test_fused_with_a_mask_is_refused_by_name():
    x = tf.ones([4, 3])
    with pytest.raises(ValueError, match="argument `fused`.*mask=given"):
        normalization.normalize_for_training(
            x, tf.zeros(3), tf.ones(3), tf.ones(3), tf.zeros(3), epsilon=1e-3,
            axes=(0,), count=tf.fill([3], 4.0), mask=tf.ones([4, 1]), fused=True)


# ------------------------------------------------------------------ numbers


def _fused_forward(x, gamma, beta, epsilon):
    count, mean, variance = ops.moments(x, (0,), compiled=False)
    return normalization.normalize_for_training(
        x, mean, variance, gamma, beta, epsilon=epsilon, axes=(0,), count=count,
        fused=True)


@needs_onednn
@pytest.mark.parametrize("rows,channels", [(1, 3), (7, 5), (512, 64), (4096, 32)])
@pytest.mark.parametrize("loc", [0.0, 1e3])
def test_training_step_on_the_kernels_against_float64(rng, rows, channels, loc):
    x = random_input(rng, (rows, channels), loc=loc, scale=3.0).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    cotangent = rng.standard_normal((rows, channels)).astype(np.float32)
    tensors = [tf.constant(t) for t in (x, gamma, beta)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        y = _fused_forward(*tensors, 1e-3)
        loss = tf.reduce_sum(y * cotangent)
    dx, dgamma, dbeta = tape.gradient(loss, tensors)
    ref_y, ref_dx, ref_dgamma, ref_dbeta, *_ = reference.train_step(
        x, None, [1], gamma, beta, cotangent, 1e-3)
    # float32 rounds the mean itself: 1e3 standard deviations cost log2(1e3) bits
    tolerance = 1e-5 if loc == 0 else 2e-4
    assert y.dtype == tf.float32
    assert reference.relative_error(y, ref_y) < tolerance
    assert reference.relative_error(dx, ref_dx) < tolerance
    assert reference.relative_error(dgamma, ref_dgamma) < tolerance
    assert reference.relative_error(dbeta, ref_dbeta) < 1e-5


@needs_onednn
def test_gradient_of_gradient_on_the_kernels_equals_autodiff(rng):
    """A gradient penalty through the kernels: TensorFlow's gradient of the fused
    gradient recomputes the batch's statistics from x, which is the exact second
    derivative (its statistics' inputs get none of their own)."""
    shape = (256, 8)
    x64 = random_input(rng, shape, loc=1.0, scale=2.0)
    gamma64, beta64 = rng.uniform(0.5, 2, 8), rng.standard_normal(8)
    weights64 = rng.standard_normal(shape)

    def penalty(fn, dtype):
        tensors = (tf.constant(t, dtype) for t in (x64, gamma64, beta64, weights64))
        return reference.gradient_penalty(fn, *tensors)

    def textbook(x, gamma, beta):
        mean, variance = tf.nn.moments(x, [0])
        return gamma * (x - mean) / tf.sqrt(variance + 1e-3) + beta

    ours = penalty(lambda *a: _fused_forward(*a, 1e-3), tf.float32)
    exact = penalty(textbook, tf.float64)
    for name, got, want in zip(("x", "gamma", "beta"), ours, exact):
        assert reference.relative_error(got, want) < 1e-4, name


@needs_onednn
@pytest.mark.parametrize("loc", [0.0, 1e2, 1e4])
def test_the_kernels_never_compute_the_moving_statistics(rng, loc):
    """At 10⁴ standard deviations the kernels' own statistics are 0.08 standard
    deviations off (README, the accuracy table); the layer's stay within float32's
    rounding of the mean: the kernels are given kerasbn's."""
    layer = kerasbn.BatchNormalization(momentum=0.0)
    x = random_input(rng, (32,) + LARGE, loc=loc, scale=1.0).astype(np.float32)
    assert _traced_kernels(layer, LARGE) == ["FusedBatchNormV3"]
    tf.function(lambda x: layer(x, training=True))(tf.constant(x))
    _, mean, variance = reference.moments(x.astype(np.float64), [3])
    half_ulp = np.spacing(np.float32(max(abs(loc), 1.0))) / 2
    assert np.max(np.abs(layer.moving_mean.numpy() - mean)) <= half_ulp + 1e-6
    assert reference.relative_error(layer.moving_variance.numpy(), variance) < 1e-5


@needs_onednn
@pytest.mark.parametrize("config", [{}, {"renorm": True, "momentum": 0.5},
                                    {"center": False, "scale": False}],
                         ids=["default", "renorm", "no-center-no-scale"])
def test_a_layer_on_the_kernels_steps_as_with_its_own_math(rng, config):
    x = tf.constant(random_input(rng, (32,) + LARGE, loc=2.0, scale=3.0), tf.float32)
    cotangent = tf.constant(rng.standard_normal((32,) + LARGE), tf.float32)
    starts = {name: rng.uniform(0.5, 2.0, 16).astype(np.float32) for name in ("gamma", "beta")}
    results = []
    for jit_compile in ("auto", False):
        layer = kerasbn.BatchNormalization(jit_compile=jit_compile, **config)
        layer.build(x.shape)
        for weight in layer.trainable_weights:
            weight.assign(starts[weight.name])

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) * cotangent)
            return tape.gradient(loss, [x] + layer.trainable_weights)

        assert bool(_traced_kernels(layer, LARGE)) == (jit_compile == "auto")
        results.append([g.numpy() for g in step(x)]
                       + [w.numpy() for w in layer.non_trainable_weights])
    for got, want in zip(*results):
        assert reference.relative_error(got, want) < 1e-5


@needs_onednn
def test_an_empty_batch_on_the_kernels_changes_nothing(rng):
    """A replica's share of a last partial batch can be empty: no output, zero
    gradients of γ and β, the moving statistics as they were."""
    layer = kerasbn.BatchNormalization()
    layer.build((None,) + LARGE)
    assert _traced_kernels(layer, LARGE) == ["FusedBatchNormV3"]

    @tf.function(input_signature=[tf.TensorSpec((None,) + LARGE)])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    x = tf.constant(random_input(rng, (4,) + LARGE, loc=3.0, scale=2.0), tf.float32)
    step(x)
    before = [w.numpy() for w in layer.non_trainable_weights]
    y, (dx, dgamma, dbeta) = step(tf.zeros((0,) + LARGE))
    assert y.shape == dx.shape == (0,) + LARGE
    np.testing.assert_array_equal(dgamma, np.zeros(16))
    np.testing.assert_array_equal(dbeta, np.zeros(16))
    for saved, now in zip(before, layer.non_trainable_weights):
        np.testing.assert_array_equal(saved, now.numpy())
