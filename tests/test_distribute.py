"""Synchronized batch norm across replicas: kerasbn.distribute and the layer under strategies.

The multi-replica checks run MirroredStrategy over the 4 logical CPU devices of conftest
and compare with a single-device float64 reference on the concatenated global batch:
statistics, outputs, gradients, moving statistics, replica groups, the number of
cross-replica exchanges, saving and restoring, `fit` and a custom loop. The last test
runs MultiWorkerMirroredStrategy over 2 worker processes (tests/multiworker_worker.py).
"""

import collections
import os
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import distribute_lib

import grids
import kerasbn
import reference
import workers
from kerasbn import distribute, fused_kernel
from training import runtime

NUM_REPLICAS = 4
# Per-replica batch sizes of a last partial batch: one replica gets no example at all.
UNEVEN = [5, 0, 3, 8]


# ------------------------------------------------------------------ helpers


def _split(array, sizes, axis=0):
    """`array` cut along `axis` into consecutive pieces of the given sizes."""
    return np.split(array, np.cumsum(sizes)[:-1], axis=axis)


def _per_replica(strategy, arrays, dtype=None):
    """Distributed values: replica i gets arrays[i] (shapes may differ)."""
    def value(context):
        array = arrays[context.replica_id_in_sync_group]
        return tf.constant(array, dtype=dtype or tf.as_dtype(array.dtype))

    return strategy.experimental_distribute_values_from_function(value)


def _local(strategy, values):
    """Per-replica results as a list of NumPy structures, one per replica."""
    return [tf.nest.map_structure(lambda t: np.asarray(t, np.float64), v)
            for v in zip(*[strategy.experimental_local_results(t)
                           for t in tf.nest.flatten(values)])]


def _randomize(layer, rng, momentum_init=True):
    shape = tuple(layer.moving_mean.shape)
    if layer.scale:
        layer.gamma.assign(rng.uniform(0.5, 2.0, shape))
    if layer.center:
        layer.beta.assign(rng.standard_normal(shape))
    if momentum_init:
        layer.moving_mean.assign(rng.standard_normal(shape))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))


def _replica_step(strategy, layer, x_parts, cot_parts, mask_parts=None, dtype=None):
    """One synchronized training step of `layer` on every replica's part.

    Returns per replica (y, dx, dgamma, dbeta) with loss Σ y·cotangent on each replica.
    """
    x = _per_replica(strategy, x_parts, dtype)
    cot = _per_replica(strategy, cot_parts, tf.float32)
    mask = None if mask_parts is None else _per_replica(strategy, mask_parts, tf.bool)

    def replica_fn(x, cot, mask=None):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * cot)
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return y, dx, dgamma, dbeta

    @tf.function
    def step(x, cot, mask):
        return strategy.run(replica_fn, args=(x, cot) + (() if mask is None else (mask,)))

    return _local(strategy, step(x, cot, mask))


def _copies(variable):
    """The per-replica copies of a (Keras) variable under a strategy, as NumPy arrays."""
    value = variable.value
    return [np.asarray(v) for v in getattr(value, "values", [value])]


def _assert_step_matches_reference(results, reference_step, layer, old_statistics,
                                   momentum=0.5, tolerance=1e-5):
    """Outputs, dx, summed dγ/dβ and the moving statistics equal the float64 reference
    (y, dx, dγ and dβ within `tolerance`, relative)."""
    ref_y, ref_dx, ref_dgamma, ref_dbeta, _, mean, var = reference_step
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert reference.relative_error(y, ref_y) < tolerance
    assert reference.relative_error(dx, ref_dx) < tolerance
    # dγ and dβ are local sums; the optimizer's all-reduce adds them up.
    assert reference.relative_error(sum(r[2] for r in results), ref_dgamma) < tolerance
    assert reference.relative_error(sum(r[3] for r in results), ref_dbeta) < tolerance
    # Moving statistics move once, from the global statistics, identically everywhere.
    old_mean, old_var = old_statistics
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               reference.moving_average(old_mean, mean, momentum),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               reference.moving_average(old_var, var, momentum), rtol=1e-5)
    for variable in (layer.moving_mean, layer.moving_variance):
        copies = _copies(variable)
        assert len(copies) == NUM_REPLICAS
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0])


# ------------------------------------------------------------------ the global batch

@pytest.mark.parametrize("shape,axis", grids.LAYOUTS, ids=grids.LAYOUT_IDS)
def test_forward_backward_and_moving_statistics_are_those_of_the_global_batch(
        mirrored_strategy, rng, shape, axis):
    strategy = mirrored_strategy
    full = (sum(UNEVEN),) + shape
    channel_axes = reference.channel_axes(len(full), axis)
    x = (3.0 + 2.0 * rng.standard_normal(full)).astype(np.float32)
    cot = rng.standard_normal(full).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(axis=axis, momentum=0.5, synchronized=True,
                                           jit_compile=True)
        layer.build((None,) + shape)
        _randomize(layer, rng)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()

    results = _replica_step(strategy, layer, _split(x, UNEVEN), _split(cot, UNEVEN))

    reference_step = reference.train_step(x, None, channel_axes, gamma, beta, cot,
                                     layer.epsilon)
    _assert_step_matches_reference(results, reference_step, layer, (old_mean, old_var))


@pytest.mark.skipif(not fused_kernel.onednn_is_on(), reason="TensorFlow runs without oneDNN")
@pytest.mark.parametrize("loc", [3.0, 1e3])
def test_a_synchronized_step_on_the_fused_kernels_is_that_of_the_global_batch(
        mirrored_strategy, rng, loc):
    """From 131,072 values (the batch unknown, counted as 32), a synchronized float32
    layer normalizes on TensorFlow's fused kernels, given the global statistics, and
    sums the gradient kernel's local Σdy and Σdy·x̂ over the replicas."""
    strategy = mirrored_strategy
    shape, sizes = (16, 16, 16), [40, 0, 33, 64]  # 33 x 4,096 values: just past the floor
    for size in sizes:  # the empty replica's share keeps kerasbn's own math
        assert fused_kernel.applies("auto", (size,) + shape, tf.float32, view_axes=(0,),
                                    masked=False) == (size > 0)
    full = (sum(sizes),) + shape
    x = (loc + 2.0 * rng.standard_normal(full)).astype(np.float32)
    cot = rng.standard_normal(full).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.5, synchronized=True)
        layer.build((None,) + shape)
        _randomize(layer, rng)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()

    results = _replica_step(strategy, layer, _split(x, sizes), _split(cot, sizes))

    reference_step = reference.train_step(x, None, [3], gamma, beta, cot, layer.epsilon)
    # float32 rounds the mean itself: x - mean at 1e3 standard deviations is off by
    # up to half a unit in the last place of 1e3, 1.5e-5 of a standard deviation of 2
    tolerance = 1e-5 if loc < 10 else 1e-4
    _assert_step_matches_reference(results, reference_step, layer, (old_mean, old_var),
                                   tolerance=tolerance)


def _global_gradient_penalty(x, weights, gamma, beta, epsilon):
    """float64 reference: the gradient over (x, γ, β) of ||dL/dx||² for Algorithm 1 on
    the whole (channels-last) batch, L = Σ sin(y)·weights."""
    axes = list(range(x.ndim - 1))

    def batch_norm(x, gamma, beta):
        mean, variance = tf.nn.moments(x, axes)
        return gamma * (x - mean) / tf.sqrt(variance + epsilon) + beta

    return [t.numpy() for t in reference.gradient_penalty(
        batch_norm, *(tf.constant(t, tf.float64) for t in (x, gamma, beta)),
        tf.constant(weights, tf.float64))]


@pytest.mark.parametrize("jit_compile,shape,sizes", [
    (True, (4, 3), UNEVEN), (False, (4, 3), UNEVEN),
    ("auto", (16, 16, 16), [40, 33, 0, 35]),  # on the fused kernels, but the empty share
], ids=["xla", "ops", "fused-kernels"])
def test_a_gradient_penalty_through_synchronized_statistics_is_that_of_the_global_batch(
        mirrored_strategy, rng, jit_compile, shape, sizes):
    """The gradient of ||dL/dx||² (a gradient penalty) differentiates through the
    synchronized backward pass, its two exchanges included: the sum over replicas is
    that of the whole batch on one device."""
    strategy = mirrored_strategy
    full = (sum(sizes),) + shape
    x = (3.0 + 2.0 * rng.standard_normal(full)).astype(np.float32)
    weights = rng.standard_normal(full).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(synchronized=True, jit_compile=jit_compile)
        layer.build((None,) + shape)
        _randomize(layer, rng)

    def replica_penalty(x, weights):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x, training=True)) * weights)
            dx = inner.gradient(loss, x)
            norm = tf.reduce_sum(dx * dx)
        return outer.gradient(norm, [x, layer.gamma, layer.beta])

    @tf.function
    def step(x, weights):
        return strategy.run(replica_penalty, args=(x, weights))

    results = _local(strategy, step(_per_replica(strategy, _split(x, sizes)),
                                    _per_replica(strategy, _split(weights, sizes))))
    want_dx, want_dgamma, want_dbeta = _global_gradient_penalty(
        x, weights, layer.gamma.numpy(), layer.beta.numpy(), layer.epsilon)
    assert reference.relative_error(np.concatenate([r[0] for r in results]), want_dx) < 1e-4
    assert reference.relative_error(sum(r[1] for r in results), want_dgamma) < 1e-4
    assert reference.relative_error(sum(r[2] for r in results), want_dbeta) < 1e-4


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "ops"])
@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((4, 6), 1)],
                         ids=["channels_last", "channels_first"])
def test_statistics_exact_at_mean_over_std_1e4(mirrored_strategy, rng, shape, axis,
                                               jit_compile):
    """Relative variance error <= 1e-5 where E[x²] - E[x]² would lose everything."""
    strategy = mirrored_strategy
    sizes = [7, 4, 0, 9]
    full = (sum(sizes),) + shape
    channel_axes = reference.channel_axes(len(full), axis)
    channels = [full[a] for a in channel_axes]
    # Every replica's data around 1e4, the replicas' means apart by a few std.
    x = (1e4 + rng.standard_normal(full)).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(axis=axis, momentum=0.0, synchronized=True,
                                           jit_compile=jit_compile)
        layer.build((None,) + shape)
    results = _replica_step(strategy, layer, _split(x, sizes),
                            _split(np.ones(full, np.float32), sizes))
    _, mean, var = reference.moments(x, channel_axes)
    assert reference.relative_error(layer.moving_variance.numpy(), var) < 1e-5
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=2e-7)
    y = np.concatenate([r[0] for r in results])
    ref_y, *_ = reference.train_forward(x, channel_axes, np.ones(channels),
                                        np.zeros(channels), layer.epsilon)
    assert np.max(np.abs(y - ref_y)) < 2e-3  # float32 inputs at 1e4 carry 1e-3 rounding


MASKED_LAYOUTS = [layout for layout in grids.LAYOUTS
                  if layout in (((6, 5, 4), -1), ((5, 5), 1), ((6, 5, 4), [1, 3]),
                                ((4, 4, 4), [1, 2]))]


@pytest.mark.parametrize("kind", grids.MASK_KINDS)
@pytest.mark.parametrize("shape,axis", MASKED_LAYOUTS,
                         ids=[grids.layout_id(layout) for layout in MASKED_LAYOUTS])
def test_masked_values_stay_out_of_the_global_statistics(mirrored_strategy, rng, shape,
                                                         axis, kind):
    """Keras's masks under synchronization: the statistics of the global unmasked values.

    (Keras's own layer falls back to per-replica statistics when given a mask.)
    """
    strategy = mirrored_strategy
    full = (sum(UNEVEN),) + shape
    x = (1.0 + 2.0 * rng.standard_normal(full)).astype(np.float32)
    cot = rng.standard_normal(full).astype(np.float32)
    mask = grids.random_mask(rng, full, kind)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(axis=axis, momentum=0.5, synchronized=True,
                                           jit_compile=True)
        layer.build((None,) + shape)
        _randomize(layer, rng)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    results = _replica_step(strategy, layer, _split(x, UNEVEN), _split(cot, UNEVEN),
                            _split(mask, UNEVEN))
    reference_step = reference.train_step(
        x, reference.keras_mask_weights(mask, full), reference.channel_axes(len(full), axis),
        gamma, beta, cot, layer.epsilon)
    _assert_step_matches_reference(results, reference_step, layer, (old_mean, old_var))


@pytest.mark.parametrize("dtype,tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_inputs_keep_float32_statistics(mirrored_strategy, rng, dtype,
                                                       tolerance):
    strategy = mirrored_strategy
    full = (sum(UNEVEN), 4, 5)
    x = (50.0 + rng.standard_normal(full)).astype(np.float32)
    x = tf.cast(tf.cast(x, dtype), tf.float32).numpy()  # the values the layer sees
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.0, synchronized=True,
                                           dtype=f"mixed_{dtype}")
        layer.build((None,) + full[1:])
    results = _replica_step(strategy, layer, _split(x, UNEVEN),
                            _split(np.ones(full, np.float32), UNEVEN), dtype=dtype)
    _, mean, var = reference.moments(x, [2])
    assert layer.moving_mean.dtype == "float32"
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    assert reference.relative_error(layer.moving_variance.numpy(), var) < 1e-5
    y = np.concatenate([r[0] for r in results])
    ref_y, *_ = reference.train_forward(x, [2], np.ones(5), np.zeros(5), layer.epsilon)
    assert np.all(np.isfinite(y))
    assert reference.relative_error(y, ref_y) < tolerance


def test_replicas_without_examples_change_nothing(mirrored_strategy, rng):
    """Only empty replicas: no NaN anywhere, moving statistics keep their values."""
    strategy = mirrored_strategy
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.5, synchronized=True)
        layer.build((None, 3))
        _randomize(layer, rng)
    before = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    empty = [np.zeros((0, 3), np.float32)] * NUM_REPLICAS
    results = _replica_step(strategy, layer, empty, empty)
    for part in results:
        for value in part:
            assert np.all(np.isfinite(value))
        np.testing.assert_array_equal(part[2], 0.0)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), before[1])


def test_replica_groups_normalize_within_each_group(mirrored_strategy, rng):
    strategy = mirrored_strategy
    sizes = [3, 5, 0, 4]
    full = (sum(sizes), 5)
    x = (1.0 + 2.0 * rng.standard_normal(full)).astype(np.float32)
    cot = rng.standard_normal(full).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.5, synchronized=True,
                                           sync_group_size=2)
        layer.build((None, 5))
        _randomize(layer, rng)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    results = _replica_step(strategy, layer, _split(x, sizes), _split(cot, sizes))
    group_sizes = [sizes[0] + sizes[1], sizes[2] + sizes[3]]
    group_means, group_vars = [], []
    for g, (xg, cg) in enumerate(zip(_split(x, group_sizes), _split(cot, group_sizes))):
        ref_y, ref_dx, ref_dgamma, ref_dbeta, _, mean, var = reference.train_step(
            xg, None, [1], gamma, beta, cg, layer.epsilon)
        parts = results[2 * g:2 * g + 2]
        assert reference.relative_error(np.concatenate([p[0] for p in parts]), ref_y) < 1e-5
        assert reference.relative_error(np.concatenate([p[1] for p in parts]), ref_dx) < 1e-5
        assert reference.relative_error(sum(p[2] for p in parts), ref_dgamma) < 1e-5
        assert reference.relative_error(sum(p[3] for p in parts), ref_dbeta) < 1e-5
        group_means.append(mean)
        group_vars.append(var)
    # Each group keeps its own moving statistics; reading (and saving) averages them.
    copies = _copies(layer.moving_mean)
    for g in range(2):
        np.testing.assert_array_equal(copies[2 * g], copies[2 * g + 1])
        np.testing.assert_allclose(
            copies[2 * g], reference.moving_average(old_mean, group_means[g], 0.5),
            rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        reference.moving_average(old_var, np.mean(group_vars, axis=0), 0.5), rtol=1e-5)


def test_group_size_must_divide_the_replicas(mirrored_strategy):
    with mirrored_strategy.scope():
        layer = kerasbn.BatchNormalization(synchronized=True, sync_group_size=3)
        layer.build((None, 2))
    x = _per_replica(mirrored_strategy, [np.ones((2, 2), np.float32)] * NUM_REPLICAS)
    with pytest.raises(ValueError, match="sync_group_size=3"):
        mirrored_strategy.run(tf.function(lambda x: layer(x, training=True)), args=(x,))


# ------------------------------------------------------------------ nothing to synchronize


def _twin_layers(rng, strategy=None, **config):
    """A synchronized and an unsynchronized layer with the same random weights."""
    scope = strategy.scope() if strategy else keras.name_scope("twins")
    with scope:
        layers = [kerasbn.BatchNormalization(momentum=0.7, synchronized=s, **config)
                  for s in (True, False)]
        for layer in layers:
            layer.build((None, 4, 3))
    _randomize(layers[0], rng)
    layers[1].set_weights(layers[0].get_weights())
    return layers


def _train_step(layer, x, cot):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * cot)
    return [y] + tape.gradient(loss, [x] + layer.trainable_variables)


@pytest.mark.parametrize("where", ["no_strategy", "one_replica"])
def test_synchronized_is_unsynchronized_without_other_replicas(rng, where):
    strategy = runtime.mirrored_strategy(["/cpu:0"]) if where == "one_replica" else None
    synced, plain = _twin_layers(rng, strategy)
    x = tf.constant(rng.standard_normal((6, 4, 3)) * 3 + 2, tf.float32)
    cot = tf.constant(rng.standard_normal((6, 4, 3)), tf.float32)
    outputs = []
    for layer in (synced, plain):
        step = tf.function(lambda x, cot, layer=layer: _train_step(layer, x, cot))
        if strategy is None:
            result = step(x, cot)
        else:
            result = strategy.experimental_local_results(strategy.run(step, args=(x, cot)))
        outputs.append([np.asarray(t) for t in tf.nest.flatten(result)])
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(synced.weights, plain.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_replica_group_is_none_where_there_is_nothing_to_sync(mirrored_strategy):
    assert distribute.replica_group() is None
    with mirrored_strategy.scope():
        assert distribute.replica_group() is None  # cross-replica context
    groups = mirrored_strategy.run(lambda: distribute.replica_group(2) is not None)
    assert all(mirrored_strategy.experimental_local_results(groups))


# ------------------------------------------------------------------ the cost


class _CollectiveCounter:
    """Counts cross-replica exchanges requested through the ReplicaContext API.

    Wraps ReplicaContext.all_reduce, all_gather and merge_call (a merge_call is how a
    variable's ON_WRITE update or any other cross-replica reduction enters the cross-
    replica context) with a wrapper that calls the real function. Nested calls (an
    all_reduce implemented by a merge_call) count once.
    """

    NAMES = ("all_reduce", "all_gather", "merge_call")

    def __init__(self):
        self.counts = collections.Counter()
        self._local = threading.local()
        self._originals = {}

    def _wrap(self, name, real):
        def wrapper(context, *args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self.counts[name] += 1
            self._local.depth = depth + 1
            try:
                return real(context, *args, **kwargs)
            finally:
                self._local.depth = depth

        return wrapper

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(distribute_lib.ReplicaContext, name)
            self._originals[name] = real
            setattr(distribute_lib.ReplicaContext, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        for name, real in self._originals.items():
            setattr(distribute_lib.ReplicaContext, name, real)


def _count_exchanges_per_layer(strategy, make_layer, num_layers=2):
    """Exchanges per replica and per layer in a traced forward + backward step."""
    with strategy.scope():
        layers = [make_layer() for _ in range(num_layers)]
        for layer in layers:
            layer.build((None, 4))

    def replica_fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for layer in layers:
                y = layer(y, training=True)
            loss = tf.reduce_sum(y * tf.range(4, dtype=y.dtype))
        return tape.gradient(loss, [x] + [w for l in layers for w in l.trainable_weights])

    step = tf.function(lambda x: strategy.run(replica_fn, args=(x,)))
    x = _per_replica(strategy, [np.random.default_rng(i).standard_normal((3, 4)).astype(
        np.float32) for i in range(NUM_REPLICAS)])
    with _CollectiveCounter() as counter:
        step.get_concrete_function(x)
    per_layer = {name: counter.counts[name] / NUM_REPLICAS / num_layers
                 for name in _CollectiveCounter.NAMES}
    return per_layer, step(x)


def test_one_collective_per_pass_and_no_traffic_for_moving_statistics(mirrored_strategy):
    ours, _ = _count_exchanges_per_layer(
        mirrored_strategy, lambda: kerasbn.BatchNormalization(synchronized=True))
    keras_counts, _ = _count_exchanges_per_layer(
        mirrored_strategy, lambda: keras.layers.BatchNormalization(synchronized=True))
    grouped, _ = _count_exchanges_per_layer(
        mirrored_strategy,
        lambda: kerasbn.BatchNormalization(synchronized=True, sync_group_size=2))
    print(f"cross-replica exchanges per layer per step: kerasbn {ours}, "
          f"grouped {grouped}, keras {keras_counts}")
    # One in the forward pass (the moments), one in the backward pass (Σdy, Σdy·x̂);
    # the moving-statistics update adds no merge_call (no broadcast, no reduction).
    assert ours == {"all_reduce": 2, "all_gather": 0, "merge_call": 0}
    assert grouped == {"all_reduce": 2, "all_gather": 0, "merge_call": 0}
    assert sum(keras_counts.values()) > 2  # 5 with Keras 3.15: 3 forward, 2 backward


def test_unsynchronized_moving_statistics_cost_no_exchange(mirrored_strategy):
    counts, _ = _count_exchanges_per_layer(mirrored_strategy, kerasbn.BatchNormalization)
    assert counts == {"all_reduce": 0, "all_gather": 0, "merge_call": 0}


@pytest.mark.parametrize("bessel_correction", [False, True])
def test_unsynchronized_replicas_keep_their_own_statistics_and_read_as_their_average(
        mirrored_strategy, rng, bessel_correction):
    strategy, momentum, steps = mirrored_strategy, 0.6, 3
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=momentum,
                                           bessel_correction=bessel_correction)
        layer.build((None, 3))
    _randomize(layer, rng)
    copies = [[np.asarray(layer.moving_mean.numpy(), np.float64),
               np.asarray(layer.moving_variance.numpy(), np.float64)]] * NUM_REPLICAS

    @tf.function
    def step(x):
        return strategy.run(lambda x: layer(x, training=True), args=(x,))

    for _ in range(steps):
        # Each replica's batch has a mean and spread of its own.
        parts = [(rng.standard_normal((6, 3)) * rng.uniform(0.5, 3.0)
                  + rng.uniform(-5.0, 5.0)).astype(np.float32) for _ in range(NUM_REPLICAS)]
        step(_per_replica(strategy, parts))
        new_copies = []
        for (old_mean, old_var), part in zip(copies, parts):
            _, mean, var = reference.moments(part, [1])
            if bessel_correction:
                var = var * len(part) / (len(part) - 1)
            new_copies.append([reference.moving_average(old_mean, mean, momentum),
                               reference.moving_average(old_var, var, momentum)])
        copies = new_copies
    for k, variable in enumerate((layer.moving_mean, layer.moving_variance)):
        for copy, expected in zip(_copies(variable), copies):
            np.testing.assert_allclose(copy, expected[k], rtol=1e-5, atol=1e-6)
        # Read, saved and served outside the replicas: the average of the copies, the
        # moving average of the replicas' average statistics.
        np.testing.assert_allclose(variable.numpy(),
                                   np.mean([c[k] for c in copies], axis=0),
                                   rtol=1e-5, atol=1e-6)
    assert not np.allclose(_copies(layer.moving_mean)[0], _copies(layer.moving_mean)[1])


# ------------------------------------------------------------------ saving and restoring


def _small_model(synchronized=True, input_shape=(5, 5, 3)):
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(4, 3, use_bias=False),
        kerasbn.BatchNormalization(synchronized=synchronized, momentum=0.8),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, use_bias=False),  # a bias before batch norm has no gradient
        kerasbn.BatchNormalization(synchronized=synchronized, momentum=0.8),
    ])


def _batches(rng, steps, batch, input_shape=(5, 5, 3), outputs=2):
    x = (rng.standard_normal((steps * batch,) + input_shape) * 2 + 1).astype(np.float32)
    y = rng.standard_normal((steps * batch, outputs)).astype(np.float32)
    return x, y


def _moving_statistics(model):
    return [w.numpy() for layer in model.layers
            if isinstance(layer, kerasbn.BatchNormalization)
            for w in (layer.moving_mean, layer.moving_variance)]


def _assert_copies_equal(model):
    for layer in model.layers:
        if isinstance(layer, kerasbn.BatchNormalization):
            for variable in (layer.moving_mean, layer.moving_variance):
                for copy in _copies(variable)[1:]:
                    np.testing.assert_array_equal(copy, _copies(variable)[0])


@pytest.mark.parametrize("synchronized", [True, False],
                         ids=["synchronized", "unsynchronized"])
def test_moving_statistics_save_and_restore_under_the_strategy(mirrored_strategy, rng,
                                                               tmp_path, synchronized):
    strategy = mirrored_strategy
    x, y = _batches(rng, 2, 8)
    with strategy.scope():
        model = _small_model(synchronized=synchronized)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    stats = _moving_statistics(model)  # unsynchronized: the average of the copies
    assert not np.allclose(stats[0], 0.0)  # the moving statistics did move
    # Unsynchronized, each replica predicts with its own copy until the model is
    # restored with their average on every replica.
    expected = model.predict(x, batch_size=8, verbose=0) if synchronized else None

    path = str(tmp_path / "model.keras")
    model.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path)
    _assert_copies_equal(loaded)
    for a, b in zip(_moving_statistics(loaded), stats):
        np.testing.assert_array_equal(a, b)
    if expected is None:
        expected = loaded.predict(x, batch_size=8, verbose=0)
    np.testing.assert_array_equal(loaded.predict(x, batch_size=8, verbose=0), expected)

    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    with strategy.scope():
        restored = _small_model(synchronized=synchronized)
    tf.train.Checkpoint(model=restored).restore(checkpoint).expect_partial(
    ).assert_existing_objects_matched()
    _assert_copies_equal(restored)
    for a, b in zip(_moving_statistics(restored), stats):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored.predict(x, batch_size=8, verbose=0), expected)


# ------------------------------------------------------------------ training


def _assert_same_model(actual, expected, tolerance):
    for a, b in zip(actual.weights, expected.weights):
        assert a.name == b.name
        error = reference.relative_error(a.numpy(), b.numpy())
        assert error < tolerance, f"{a.path}: relative error {error}"


def test_virtual_batches_are_formed_per_replica_and_move_toward_the_global_batch(
        mirrored_strategy, rng):
    """Ghost batches with synchronized=True: each replica's groups from its own examples."""
    strategy = mirrored_strategy
    k, sizes = 3, [7, 0, 3, 5]
    full = (sum(sizes), 4, 3)
    x = (1.0 + 2.0 * rng.standard_normal(full)).astype(np.float32)
    cot = rng.standard_normal(full).astype(np.float32)
    with strategy.scope():
        layer = kerasbn.BatchNormalization(momentum=0.5, synchronized=True,
                                           virtual_batch_size=k)
        layer.build((None,) + full[1:])
        _randomize(layer, rng)
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    results = _replica_step(strategy, layer, _split(x, sizes), _split(cot, sizes))
    for replica, (x_part, cot_part) in enumerate(zip(_split(x, sizes), _split(cot, sizes))):
        for start in range(0, len(x_part), k):
            group = slice(start, start + k)
            ref_y, ref_dx, *_ = reference.train_step(x_part[group], None, [2], gamma, beta,
                                                     cot_part[group], layer.epsilon)
            assert reference.relative_error(results[replica][0][group], ref_y) < 1e-5
            assert reference.relative_error(results[replica][1][group], ref_dx) < 1e-5
    _, mean, var = reference.moments(x, [2])
    for variable, old, new in ((layer.moving_mean, old_mean, mean),
                               (layer.moving_variance, old_var, var)):
        for copy in _copies(variable):
            np.testing.assert_allclose(copy, reference.moving_average(old, new, 0.5),
                                       rtol=1e-5, atol=1e-6)


def test_warm_up_counts_are_identical_on_every_replica_and_restored(mirrored_strategy, rng,
                                                                     tmp_path):
    strategy = mirrored_strategy
    x, y = _batches(rng, 3, 8, input_shape=(4,), outputs=3)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(3),
            kerasbn.BatchNormalization(synchronized=True, momentum_warmup=True)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    bn = model.layers[1]
    copies = _copies(bn.update_count)
    assert len(copies) == NUM_REPLICAS
    for copy in copies:
        np.testing.assert_array_equal(copy, np.full(3, 3.0))
    path = str(tmp_path / "warm.keras")
    model.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path)
    for copy in _copies(loaded.layers[1].update_count):
        np.testing.assert_array_equal(copy, np.full(3, 3.0))
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    bn.update_count.assign(np.zeros(3))
    tf.train.Checkpoint(model=model).restore(checkpoint).assert_consumed()
    for copy in _copies(bn.update_count):
        np.testing.assert_array_equal(copy, np.full(3, 3.0))


def test_fit_on_replicas_is_fit_on_one_device_with_the_global_batch(mirrored_strategy, rng):
    strategy = mirrored_strategy
    steps, batch = 3, 16
    x, y = _batches(rng, steps, batch)
    single = _small_model(synchronized=False)
    single.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    with strategy.scope():
        replicated = _small_model()
        replicated.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                           jit_compile=False)
    replicated.set_weights(single.get_weights())
    for model in (single, replicated):
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    _assert_same_model(replicated, single, 1e-5)


def test_custom_loop_with_strategy_run_and_a_partial_last_batch(mirrored_strategy, rng):
    """strategy.run with an optimizer; the last batch leaves a replica without examples."""
    strategy = mirrored_strategy
    batches = [[4, 4, 4, 4], UNEVEN]
    x, y = _batches(rng, 1, sum(map(sum, batches)))
    single = _small_model(synchronized=False)
    with strategy.scope():
        replicated = _small_model()
        optimizer = keras.optimizers.SGD(0.1)
    replicated.set_weights(single.get_weights())
    single_optimizer = keras.optimizers.SGD(0.1)

    def loss_fn(model, x, y, global_batch):
        return tf.reduce_sum(tf.square(model(x, training=True) - y)) / global_batch

    def replica_step(model, optimizer, x, y, global_batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x, y, global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def distributed_step(x, y, global_batch):
        strategy.run(replica_step, args=(replicated, optimizer, x, y, global_batch))

    @tf.function
    def single_step(x, y, global_batch):
        replica_step(single, single_optimizer, x, y, global_batch)

    start = 0
    for sizes in batches:
        xb, yb = x[start:start + sum(sizes)], y[start:start + sum(sizes)]
        start += sum(sizes)
        distributed_step(_per_replica(strategy, _split(xb, sizes)),
                         _per_replica(strategy, _split(yb, sizes)), float(sum(sizes)))
        single_step(xb, yb, float(sum(sizes)))
    _assert_same_model(replicated, single, 1e-5)


# ------------------------------------------------------------------ several workers


WORKER = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
WORKER_TIMEOUT = 120  # seconds, for each worker process


def test_multi_worker_training_matches_one_device(rng, tmp_path):
    """2 worker processes (MultiWorkerMirroredStrategy): custom loop and fit vs one device,
    in float64."""
    from multiworker_worker import build_model

    initial = build_model(synchronized=False).get_weights()
    inputs = {"num_weights": len(initial), **{f"weight_{i}": w for i, w in enumerate(initial)}}
    # Custom loop: per-worker batch sizes; in the second step worker 1 has no example.
    custom_sizes = [(4, 4), (3, 0), (2, 5)]
    custom_batches = []
    for step, sizes in enumerate(custom_sizes):
        x, y = _batches(rng, 1, sum(sizes), input_shape=(6,), outputs=3)
        custom_batches.append((x, y))
        for task, (xs, ys) in enumerate(zip(_split(x, sizes), _split(y, sizes))):
            inputs[f"custom_x_{task}_{step}"], inputs[f"custom_y_{task}_{step}"] = xs, ys
        inputs[f"custom_global_{step}"] = float(sum(sizes))
    inputs["custom_steps"] = len(custom_sizes)
    # fit: 2 steps of 4 examples on each worker; the global batch s is both shards' s.
    fit_steps, fit_batch = 2, 4
    fit_x, fit_y = _batches(rng, fit_steps, 2 * fit_batch, input_shape=(6,), outputs=3)
    order = np.arange(len(fit_x)).reshape(fit_steps, 2, fit_batch)
    for task in range(2):
        inputs[f"fit_x_{task}"] = fit_x[order[:, task].ravel()]
        inputs[f"fit_y_{task}"] = fit_y[order[:, task].ravel()]
    inputs.update(fit_steps=fit_steps, fit_global_batch=2 * fit_batch)
    inputs["eval_x"] = _batches(rng, 1, 10, input_shape=(6,), outputs=3)[0]
    input_path = str(tmp_path / "input.npz")
    np.savez(input_path, **inputs)

    outputs = [str(tmp_path / f"output_{i}.npz") for i in range(2)]
    workers.run_workers([[sys.executable, WORKER, input_path, output] for output in outputs],
                        str(tmp_path), WORKER_TIMEOUT)
    results = [dict(np.load(path)) for path in outputs]

    # The reference: the same steps on the concatenated global batches, on one device,
    # in float64 (two float32 runs that sum in different orders can each be 5e-6 from
    # it and 1.1e-5 from each other: seed 2118609739).
    def float64_reference():
        model = build_model(synchronized=False, dtype="float64")
        model.set_weights([w.astype(np.float64) for w in initial])
        return model

    custom_reference = float64_reference()
    optimizer = keras.optimizers.SGD(0.1)
    for x, y in custom_batches:
        x, y = x.astype(np.float64), y.astype(np.float64)
        with tf.GradientTape() as tape:
            prediction = custom_reference(x, training=True)
            loss = tf.reduce_sum(tf.square(prediction - y)) / len(x)
        grads = tape.gradient(loss, custom_reference.trainable_variables)
        optimizer.apply_gradients(zip(grads, custom_reference.trainable_variables))
    custom_expected = [w.numpy() for w in custom_reference.weights]
    custom_outputs = custom_reference.predict(inputs["eval_x"].astype(np.float64), verbose=0)
    fit_reference = float64_reference()
    fit_reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    fit_reference.fit(fit_x.astype(np.float64), fit_y.astype(np.float64),
                      batch_size=2 * fit_batch, shuffle=False, verbose=0)
    fit_expected = [w.numpy() for w in fit_reference.weights]

    for result in results:
        assert result["fit_iterations"] == fit_steps
        for i, expected in enumerate(custom_expected):
            assert reference.relative_error(result[f"custom_{i}"], expected) < 1e-5, i
        assert reference.relative_error(result["custom_outputs"], custom_outputs) < 1e-5
        for i, expected in enumerate(fit_expected):
            assert reference.relative_error(result[f"fit_{i}"], expected) < 1e-5, i
    for i in range(len(custom_expected)):  # one value of the moving statistics everywhere
        np.testing.assert_array_equal(results[0][f"custom_{i}"], results[1][f"custom_{i}"])

    ops = {key[len("ops_"):]: int(value) for key, value in results[0].items()
           if key.startswith("ops_")}
    print(f"collective ops in the traced multi-worker steps (2 layers): {ops}")
    # Per layer, one CollectiveReduceV2 in the forward and one in the backward pass,
    # nothing else: no gather, no broadcast for the moving statistics.
    bn_ops = {k: v for k, v in ops.items() if k.startswith("forward_backward_")}
    assert bn_ops == {"forward_backward_CollectiveReduceV2": 2 * 2}
    # The custom step adds only the optimizer's all-reduce of the gradients.
    assert ops["train_step_CollectiveReduceV2"] > 2 * 2
    assert not any("Bcast" in k or "Gather" in k for k in ops)
