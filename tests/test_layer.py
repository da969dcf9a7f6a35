"""kerasbn.BatchNormalization: the Keras layer, against float64 references and Keras."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import grids
import kerasbn
import reference
from kerasbn import ops
from kerasbn import programs
from layer_contract import run_layer_contract

LAYOUTS = grids.LAYOUTS


def _channel_axes(shape, axis):
    return reference.channel_axes(len(shape), axis)


def _randomized_layer(rng, axis, full_shape, **config):
    """A built layer whose four weights are random and non-trivial."""
    layer = kerasbn.BatchNormalization(axis=axis, **config)
    layer.build(full_shape)
    channel_shape = [full_shape[a] for a in _channel_axes(full_shape, axis)]
    layer.gamma.assign(rng.uniform(0.5, 2.0, channel_shape))
    layer.beta.assign(rng.standard_normal(channel_shape))
    layer.moving_mean.assign(rng.standard_normal(channel_shape))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channel_shape))
    return layer


def _batch(rng, shape, loc=1.0, scale=2.0):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------ the contract

CONTRACT_CONFIGS = [
    ({}, (6,)),
    ({"momentum_warmup": True, "axis": 1}, (3, 4)),
    ({"momentum": 1.0}, (4,)),
    ({"jit_compile": False}, (4, 4, 3)),
    ({"jit_compile": True}, (4, 4, 3)),
    ({"jit_compile": True, "axis": [1, 3]}, (3, 4, 2)),
    ({"axis": 1}, (3, 4, 4)),
    ({"axis": [1, 3]}, (3, 4, 2)),
    ({"axis": [2, 3]}, (3, 4, 2)),
    ({"center": False, "scale": False}, (4, 5)),
    ({"momentum": 0.5, "epsilon": 1e-5, "bessel_correction": True}, (4, 4, 3)),
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}}, (5,)),
    ({"synchronized": True, "sync_group_size": 2}, (4, 3)),
    ({"gamma_regularizer": "l2", "beta_constraint": "non_neg"}, (5,)),
    # from 131,072 values a step (the batch unknown, counted as 32) on oneDNN's kernels
    ({}, (16, 16, 16)),
    ({"momentum_warmup": True, "epsilon": 1e-5}, (64, 64)),
]


@pytest.mark.parametrize("config,input_shape", CONTRACT_CONFIGS,
                         ids=[str(c) for c, _ in CONTRACT_CONFIGS])
def test_every_configuration_keeps_the_layer_contract(config, input_shape, rng, tmp_path):
    run_layer_contract(config, input_shape, rng, tmp_path)


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("shape,axis", [((8,) + s, a) for s, a in LAYOUTS])
def test_training_forward_is_algorithm_1(rng, shape, axis):
    layer = _randomized_layer(rng, axis, shape)
    x = _batch(rng, shape)
    y = layer(x, training=True)
    channel_axes = _channel_axes(shape, axis)
    ref_y, *_ = reference.train_forward(x, channel_axes, layer.gamma.numpy(),
                                        layer.beta.numpy(), layer.epsilon)
    assert reference.relative_error(y, ref_y) < 1e-5


@pytest.mark.parametrize("shape,axis", [((8,) + s, a) for s, a in LAYOUTS])
def test_inference_forward_is_algorithm_2(rng, shape, axis):
    layer = _randomized_layer(rng, axis, shape)
    x = _batch(rng, shape)
    ref_y = reference.inference_forward(
        x, _channel_axes(shape, axis), *[w.numpy() for w in layer.weights], layer.epsilon)
    assert reference.relative_error(layer(x, training=False), ref_y) < 1e-5
    assert reference.relative_error(layer(x), ref_y) < 1e-5, "training=None is inference"


def test_trainable_false_means_inference_mode(rng):
    layer = _randomized_layer(rng, -1, (16, 4))
    x = _batch(rng, (16, 4))
    frozen = [w.numpy() for w in layer.weights]
    layer.trainable = False
    np.testing.assert_array_equal(layer(x, training=True), layer(x, training=False))
    for before, after in zip(frozen, layer.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_training_none_follows_the_outer_call(rng):
    """Inside a model, training=None takes the mode the model was called in."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, kerasbn.BatchNormalization()(inputs))
    x = _batch(rng, (32, 4), loc=5.0)
    train = model(x, training=True).numpy()
    assert np.abs(train.mean(axis=0)).max() < 1e-4
    assert np.abs(model(x).numpy().mean(axis=0) - 5.0).max() < 2.0


# ------------------------------------------------------------------ against Keras


@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((8, 4, 6, 3), -1), ((8, 3, 4, 6), 1)])
@pytest.mark.parametrize("config", [{}, {"momentum": 0.6, "center": False},
                                    {"renorm": True, "renorm_momentum": 0.7,
                                     "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}}],
                         ids=["default", "no-center", "renorm"])
def test_step_by_step_equal_to_keras(rng, shape, axis, config):
    ours = kerasbn.BatchNormalization(axis=axis, **config)
    stock = keras.layers.BatchNormalization(axis=axis, **config)
    ours.build(shape)
    stock.build(shape)
    stock.set_weights([rng.uniform(0.5, 2.0, w.shape) if "gamma" in w.name
                       else rng.standard_normal(w.shape) if w.name in ("beta", "moving_mean")
                       else rng.uniform(0.5, 2.0, w.shape) for w in stock.weights])
    ours.set_weights(stock.get_weights())
    for _ in range(4):
        x = _batch(rng, shape, loc=rng.uniform(-3, 3), scale=rng.uniform(0.5, 3))
        with tf.GradientTape(persistent=True) as tape:
            y_ours = ours(x, training=True)
            y_stock = stock(x, training=True)
            upstream = tf.constant(rng.standard_normal(shape), tf.float32)
            loss_ours = tf.reduce_sum(y_ours * upstream)
            loss_stock = tf.reduce_sum(y_stock * upstream)
        assert reference.relative_error(y_ours, y_stock) < 1e-5
        for g_ours, g_stock in zip(tape.gradient(loss_ours, ours.trainable_weights),
                                   tape.gradient(loss_stock, stock.trainable_weights)):
            assert reference.relative_error(g_ours, g_stock) < 1e-4
        for w_ours, w_stock in zip(ours.weights, stock.weights):
            assert w_ours.name == w_stock.name
            # Every channel's moving mean can be near 0 at once: errors are measured
            # against the data's scale too.
            np.testing.assert_allclose(w_ours.numpy(), w_stock.numpy(), rtol=1e-5,
                                       atol=1e-5 * np.abs(np.asarray(x)).mean())
    assert reference.relative_error(ours(x), stock(x)) < 1e-5


# ------------------------------------------------------------------ renormalization


@pytest.mark.parametrize("clipping", [{}, {"rmax": 1.2, "rmin": 0.9, "dmax": 0.2}])
def test_renorm_steps_follow_the_paper(rng, clipping):
    shape = (32, 4)
    layer = kerasbn.BatchNormalization(renorm=True, renorm_clipping=clipping,
                                       momentum=0.8, renorm_momentum=0.7, dtype="float64")
    layer.build(shape)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    state = {k: getattr(layer, k).numpy() for k in
             ("renorm_mean", "renorm_stddev", "moving_mean", "moving_stddev")}
    for _ in range(3):
        x = _batch(rng, shape, loc=rng.uniform(-2, 2), scale=rng.uniform(0.3, 3)).astype(
            np.float64)
        ref_y, r, d, state = reference.renorm_step(
            x, [1], gamma, beta, state, epsilon=layer.epsilon, momentum=0.8,
            renorm_momentum=0.7, **clipping)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
        upstream = rng.standard_normal(shape)
        dx = tape.gradient(y, xt, output_gradients=tf.constant(upstream))
        assert reference.relative_error(y, ref_y) < 1e-12
        # Backward with r and d held constant: plain BN with scale γ·r.
        plain = kerasbn.BatchNormalization(dtype="float64", center=False)
        plain.build(shape)
        plain.gamma.assign(gamma * r)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y_plain = plain(xt, training=True)
        dx_plain = tape.gradient(y_plain, xt, output_gradients=tf.constant(upstream))
        assert reference.relative_error(dx, dx_plain) < 1e-12
        for name, value in state.items():
            assert reference.relative_error(getattr(layer, name).numpy(), value) < 1e-12, name
    if clipping:
        assert np.all(r <= 1.2) and np.all(r >= 0.9) and np.all(np.abs(d) <= 0.2)


def test_renorm_with_identity_clipping_is_plain_batch_norm(rng):
    shape = (16, 6)
    renorm = kerasbn.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 1.0, "rmin": 1.0, "dmax": 0.0})
    plain = kerasbn.BatchNormalization()
    for layer in (renorm, plain):
        layer.build(shape)
    for _ in range(3):
        x = tf.constant(_batch(rng, shape, loc=rng.uniform(-3, 3)))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y_renorm, y_plain = renorm(x, training=True), plain(x, training=True)
        np.testing.assert_array_equal(y_renorm, y_plain)
        np.testing.assert_array_equal(tape.gradient(y_renorm, x), tape.gradient(y_plain, x))


# ------------------------------------------------------------------ moving statistics


def test_bessel_correction_keeps_the_unbiased_variance(rng):
    layer = kerasbn.BatchNormalization(bessel_correction=True, momentum=0.0)
    x = _batch(rng, (10, 3))
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               x.astype(np.float64).var(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.astype(np.float64).mean(axis=0),
                               rtol=0, atol=1e-5 * x.std(axis=0).min())


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_channel_never_reaches_the_moving_statistics(rng, bad, jit_compile):
    """The channel with a non-finite value keeps its statistics bit for bit; the other
    channels move with their own batch statistics, as a float64 reference does."""
    momentum = 0.9
    layer = _randomized_layer(rng, -1, (8, 3), momentum=momentum)
    step = tf.function(lambda x: layer(x, training=True), jit_compile=jit_compile)
    step(tf.constant(_batch(rng, (8, 3))))
    kept = [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
    x = _batch(rng, (8, 3))
    x[2, 1] = bad
    step(tf.constant(x))
    _, mean, variance = reference.moments(x, [1])
    for weight, before, batch in zip((layer.moving_mean, layer.moving_variance), kept,
                                     (mean, variance)):
        assert np.all(np.isfinite(weight.numpy())), weight.name
        np.testing.assert_array_equal(weight.numpy()[1], before[1], err_msg=weight.name)
        np.testing.assert_allclose(weight.numpy()[[0, 2]],
                                   reference.moving_average(before, batch, momentum)[[0, 2]],
                                   rtol=1e-5, err_msg=weight.name)
    step(tf.constant(_batch(rng, (8, 3))))
    assert layer.moving_mean.numpy()[1] != kept[0][1], "later batches count"


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"momentum_warmup": True},
                                     {"bessel_correction": True}],
                         ids=["plain", "renorm", "warmup", "bessel"])
def test_inside_a_step_compiled_whole_the_statistics_move_as_in_a_graph(rng, options):
    """A graph moves the statistics as one stacked tensor, an XLA program one by one
    (`_update_moving_statistics`): the same numbers in float64, masked or not, and a
    channel with a non-finite value moves nothing."""
    shape = (12, 4, 3)
    layers = []
    for _ in range(2):
        layer = _randomized_layer(np.random.default_rng(7), -1, shape, momentum=0.7,
                                  dtype="float64", **options)
        layers.append(layer)
    steps = [tf.function(lambda x, mask, layer=layer: layer(x, training=True, mask=mask),
                         jit_compile=whole) for layer, whole in zip(layers, (False, True))]
    initial = [w.numpy() for w in layers[1].non_trainable_weights]
    mask = np.ones(shape[:-1], bool)
    mask[:, 1] = False  # the last step keeps position 1 out of every channel's statistics
    for i in range(4):
        x = _batch(rng, shape, loc=rng.uniform(-3, 3), scale=rng.uniform(0.5, 2)).astype(
            np.float64)
        if i == 2:
            x[5, 2, 1] = np.nan
        before = [w.numpy() for w in layers[1].non_trainable_weights]
        for step in steps:
            step(tf.constant(x), tf.constant(mask if i == 3 else np.ones_like(mask)))
        for graph, compiled in zip(layers[0].non_trainable_weights,
                                   layers[1].non_trainable_weights):
            np.testing.assert_allclose(compiled.numpy(), graph.numpy(), rtol=1e-12, atol=0,
                                       err_msg=graph.name)
        if i == 2:  # channel 1 non-finite: its statistics kept, bit for bit
            for kept, weight in zip(before, layers[1].non_trainable_weights):
                np.testing.assert_array_equal(weight.numpy()[1], kept[1],
                                              err_msg=weight.name)
                assert not np.array_equal(weight.numpy()[[0, 2]], kept[[0, 2]]), (
                    f"{weight.name}: the finite channels move")
    for start, weight in zip(initial, layers[1].non_trainable_weights):
        assert not np.array_equal(weight.numpy(), start), f"{weight.name} moved"


def test_a_batch_of_fully_masked_steps_leaves_the_moving_statistics(rng):
    layer = _randomized_layer(rng, -1, (4, 5, 3))
    kept = layer.moving_mean.numpy()
    y = layer(_batch(rng, (4, 5, 3)), training=True, mask=tf.zeros((4, 5), tf.bool))
    assert np.all(np.isfinite(y.numpy()))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), kept)


# ------------------------------------------------------------------ masks


def test_masked_steps_are_left_out_of_the_statistics(rng):
    tokens = rng.integers(1, 20, (6, 9))
    tokens[:, 6:] = 0  # padding
    model = keras.Sequential([keras.layers.Embedding(20, 4, mask_zero=True),
                              kerasbn.BatchNormalization(momentum=0.0)])
    model(tokens)
    embedded = model.layers[0](tokens).numpy()
    model(tokens, training=True)
    valid = embedded[:, :6].reshape(-1, 4).astype(np.float64)
    bn = model.layers[1]
    # A channel's mean can be near 0: its error is measured against the channel's spread.
    np.testing.assert_allclose(bn.moving_mean.numpy(), valid.mean(axis=0), rtol=0,
                               atol=1e-5 * valid.std(axis=0).min())
    np.testing.assert_allclose(bn.moving_variance.numpy(), valid.var(axis=0), rtol=1e-4)


@pytest.mark.parametrize("kind", grids.MASK_KINDS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=grids.LAYOUT_IDS)
def test_masked_values_stay_out_of_the_statistics_forward_and_backward(rng, shape, axis,
                                                                          kind):
    """Keras's masks (the input's shape without its last axis, or broadcastable to it)."""
    full = (8,) + shape
    layer = _randomized_layer(rng, axis, full, momentum=0.5)
    old_mean, old_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    x = _batch(rng, full)
    mask = grids.random_mask(rng, full, kind)
    cotangent = rng.standard_normal(full)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, mask=tf.constant(mask))
    dx, dgamma, dbeta = tape.gradient(y, [xt, layer.gamma, layer.beta],
                                      output_gradients=tf.constant(cotangent, tf.float32))
    ref_y, ref_dx, ref_dgamma, ref_dbeta, _, mean, var = reference.train_step(
        x, reference.keras_mask_weights(mask, full), _channel_axes(full, axis),
        layer.gamma.numpy(), layer.beta.numpy(), cotangent, layer.epsilon)
    for actual, expected in ((y, ref_y), (dx, ref_dx), (dgamma, ref_dgamma),
                             (dbeta, ref_dbeta)):
        assert reference.relative_error(actual, expected) < 2e-5
    expected_mean = reference.moving_average(old_mean, mean, 0.5)
    # A channel's mean can be near 0, so the error is measured against the channel's spread,
    # or against the values where a mask leaves one example (spread 0) and float32's rounding.
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=0,
                               atol=1e-5 * max(np.sqrt(var).max(), np.abs(expected_mean).max()))
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               reference.moving_average(old_var, var, 0.5), rtol=1e-5)


@pytest.mark.parametrize("shape", [(5, 2, 3), (4, 5, 5), (4, 6, 5)])
def test_masking_layer_with_axis_1_computes_what_keras_computes(rng, shape):
    """The issue's reproductions: Masking's mask is (N, T) whatever the batch norm's axis."""
    x = rng.normal(5, 10, shape).astype(np.float32)
    x[:, 1, :] = 0  # masked by Masking: a whole timestep
    masked = keras.layers.Masking()(x)
    ours = kerasbn.BatchNormalization(axis=1, momentum=0.5)
    stock = keras.layers.BatchNormalization(axis=1, momentum=0.5)
    y_ours, y_stock = ours(masked, training=True), stock(masked, training=True)
    valid = np.delete(x, 1, axis=1).astype(np.float64)
    expected_mean = 0.5 * valid.mean(axis=(0, 2))
    counted = [c for c in range(shape[1]) if c != 1]
    np.testing.assert_allclose(ours.moving_mean.numpy()[counted], expected_mean,
                               rtol=1e-5, atol=1e-5)
    # Where a channel has values, as Keras; the channel with none keeps its statistics
    # (Keras moves it toward mean 0 and variance 0).
    np.testing.assert_allclose(ours.moving_mean.numpy()[counted],
                               stock.moving_mean.numpy()[counted], rtol=1e-5, atol=1e-5)
    assert ours.moving_mean.numpy()[1] == 0.0 and ours.moving_variance.numpy()[1] == 1.0
    np.testing.assert_allclose(np.delete(y_ours.numpy(), 1, axis=1),
                               np.delete(y_stock.numpy(), 1, axis=1), rtol=1e-4, atol=1e-4)


def test_a_broadcastable_mask_is_taken_as_keras_takes_it():
    """The issue's reproduction: a (1, 2, 1) mask for an input of shape (1, 2, 3, 4)."""
    layer = kerasbn.BatchNormalization(momentum=0.0)
    y = layer(keras.ops.ones((1, 2, 3, 4)), training=True, mask=keras.ops.ones((1, 2, 1)))
    np.testing.assert_array_equal(y.numpy(), np.zeros((1, 2, 3, 4)))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.ones(4))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.zeros(4))


def test_a_channel_with_every_value_masked_keeps_its_moving_statistics(rng):
    layer = _randomized_layer(rng, 1, (6, 4, 5), momentum=0.5)
    kept_mean, kept_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    mask = np.ones((6, 4), bool)
    mask[:, 2] = False
    x = _batch(rng, (6, 4, 5))
    y = layer(x, training=True, mask=mask)
    assert np.all(np.isfinite(y.numpy()))
    assert layer.moving_mean.numpy()[2] == kept_mean[2]
    assert layer.moving_variance.numpy()[2] == kept_var[2]
    others = [0, 1, 3]
    _, mean, _ = reference.moments(x[:, others], [1])
    np.testing.assert_allclose(layer.moving_mean.numpy()[others],
                               reference.moving_average(kept_mean[others], mean, 0.5),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ momentum 1 and warm-up


def test_momentum_one_keeps_the_moving_statistics_while_gamma_and_beta_train(rng):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5),
                              kerasbn.BatchNormalization(momentum=1.0), keras.layers.Dense(1)])
    bn = model.layers[1]
    bn.moving_mean.assign(rng.standard_normal(5))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 5))
    before = [w.numpy() for w in bn.weights]
    model.compile("sgd", "mse")
    x = _batch(rng, (64, 6), loc=3.0)
    model.fit(x, x[:, :1] ** 2, epochs=2, batch_size=16, verbose=0)
    names = [w.name for w in bn.weights]
    after = dict(zip(names, (w.numpy() for w in bn.weights)))
    for name, value in zip(names, before):
        if name in ("moving_mean", "moving_variance"):
            np.testing.assert_array_equal(after[name], value)
        else:
            assert np.abs(after[name] - value).max() > 1e-4, f"{name} did not train"


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_warmed_up_averages_are_the_mean_of_the_batches_seen(rng, momentum):
    layer = kerasbn.BatchNormalization(momentum=momentum, momentum_warmup=True, axis=1)
    layer.build((None, 3, 4))
    means, variances = [], []
    updates = int(momentum / (1 - momentum))  # below: t/(t+1) < momentum for t < this
    for t in range(updates + 3):
        x = _batch(rng, (8, 3, 4), loc=rng.uniform(-5, 5), scale=rng.uniform(0.5, 3))
        layer(x, training=True)
        _, mean, var = reference.moments(x, [1])
        means.append(mean)
        variances.append(var)
        np.testing.assert_array_equal(layer.update_count.numpy(), np.full(3, t + 1.0))
        if t < updates:
            np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(means, axis=0),
                                       rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(layer.moving_variance.numpy(),
                                       np.mean(variances, axis=0), rtol=1e-5)
    # Then the layer's momentum: one ordinary exponential step.
    previous = layer.moving_mean.numpy()
    x = _batch(rng, (8, 3, 4))
    layer(x, training=True)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(),
        reference.moving_average(previous, reference.moments(x, [1])[1], momentum),
        rtol=1e-5, atol=1e-6)


def test_warm_up_counts_only_the_batches_that_reach_the_statistics(rng):
    layer = kerasbn.BatchNormalization(momentum_warmup=True, axis=1)
    x = _batch(rng, (4, 3, 5))
    layer(x, training=True)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    layer(bad, training=True)  # channel 0 non-finite: only 1 and 2 count
    mask = np.ones((4, 3), bool)
    mask[:, 1] = False
    layer(x, training=True, mask=mask)  # channel 1 has no value: only 0 and 2 count
    np.testing.assert_array_equal(layer.update_count.numpy(), [2.0, 2.0, 3.0])


def test_warm_up_count_survives_a_keras_file_round_trip(rng, tmp_path):
    model = keras.Sequential([keras.Input((4,)),
                              kerasbn.BatchNormalization(momentum_warmup=True)])
    for _ in range(3):
        model(_batch(rng, (8, 4)), training=True)
    path = str(tmp_path / "warm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    bn = loaded.layers[0]
    assert bn.momentum_warmup is True
    np.testing.assert_array_equal(bn.update_count.numpy(), np.full(4, 3.0))
    for ours, theirs in zip(model.layers[0].weights, bn.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_eager_calls_on_new_shapes_log_no_retracing_warning(rng, tensorflow_log):
    layer = kerasbn.BatchNormalization()
    for batch in range(1, 9):
        layer(_batch(rng, (batch, 3)), training=True)
        layer(_batch(rng, (batch, 3)), training=False)
    assert not [m for m in tensorflow_log if "retracing" in m]


# ------------------------------------------------------------------ its own XLA programs


def _xla_programs(layer, shape, jit_compile_step=False):
    """The layer's own XLA programs in a traced training step on inputs of `shape`
    (None: an unknown batch size)."""
    @tf.function(jit_compile=jit_compile_step)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    graph = step.get_concrete_function(tf.TensorSpec(shape)).graph
    return [op for op in graph.get_operations()
            if op.type in ("PartitionedCall", "StatefulPartitionedCall")
            and "_XlaMustCompile" in op.node_def.attr and op.get_attr("_XlaMustCompile")]


@pytest.mark.parametrize("shape,compiled", [
    ((256, 1024), False),            # 262,144 values: plain ops
    ((64, 16, 16, 64), True),        # 1,048,576: programs of its own
    ((None, 16, 16, 128), True),     # an unknown batch counts as 32
    ((None, 16, 16, 64), False),
    ((1024, 1024), True),
])
def test_auto_compiles_the_math_from_1048576_values(shape, compiled):
    layer = kerasbn.BatchNormalization()
    assert layer.jit_compile == "auto"
    assert bool(_xla_programs(layer, shape)) == compiled
    assert programs.worth_compiling(tf.TensorShape(shape)) == compiled


@pytest.mark.parametrize("jit_compile", [True, False])
def test_true_and_false_compile_the_math_or_not_whatever_the_size(jit_compile):
    for shape in [(4, 3), (32, 8, 8, 64)]:
        layer = kerasbn.BatchNormalization(jit_compile=jit_compile)
        assert bool(_xla_programs(layer, shape)) == jit_compile


def test_inside_a_step_compiled_as_a_whole_the_math_is_part_of_that_program():
    layer = kerasbn.BatchNormalization(jit_compile=True)
    assert not _xla_programs(layer, (32, 8, 8, 64), jit_compile_step=True)


@pytest.mark.parametrize("jit_compile", [False, "auto", True])
def test_layers_of_one_rank_share_their_math_in_a_traced_step(rng, jit_compile):
    """Three layers on inputs of one rank and three shapes (at most 1,024 values: no
    program of their own with "auto"): the statistics, the forward, the backward and
    the moving statistics' step are four functions, each traced once, for any dims,
    and called three times (see `programs.compilable`). With `jit_compile=True` the
    first three are XLA programs, one for each shape."""
    shapes = [(16, 4, 4, 8), (8, 2, 2, 12), (4, 1, 3, 5)]
    layers = [kerasbn.BatchNormalization(jit_compile=jit_compile) for _ in shapes]

    @tf.function
    def step(*xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            ys = [layer(x, training=True) for layer, x in zip(layers, xs)]
        return ys, tape.gradient(ys, xs)

    graph = step.get_concrete_function(*[tf.TensorSpec(s) for s in shapes]).graph
    functions = [op.get_attr("f").name for op in graph.get_operations()
                 if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    assert len(functions) == 12
    assert len(set(functions)) == (3 * len(shapes) + 1 if jit_compile is True else 4)
    # "__inference_moments_115": the piece's name, then TensorFlow's number
    assert {name.split("_")[-2] for name in functions} == {
        "moments", "forward", "backward", "moved"}
    xs = [_batch(rng, shape) for shape in shapes]
    ys, dxs = step(*xs)
    for x, y, dx in zip(xs, ys, dxs):
        assert y.shape == dx.shape == x.shape
        exact = x.astype(np.float64)
        exact = (exact - exact.mean((0, 1, 2))) / np.sqrt(exact.var((0, 1, 2)) + 1e-3)
        np.testing.assert_allclose(y.numpy(), exact, atol=1e-4)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_after_a_convolution_keeps_the_channels(rng, training):
    """TensorFlow 2.21's conv2d returns an empty batch traced with an unknown size in the
    input's shape ([0, 5, 5, 3], not [0, 3, 3, 4]): what a replica without examples of a
    last partial batch gets. The layer still answers [0, 3, 3, 4] and leaves its moving
    statistics as they were (`ops.Layout`'s view absorbs the defect)."""
    kernel = tf.constant(rng.standard_normal((3, 3, 3, 4)), tf.float32)
    layer = kerasbn.BatchNormalization(momentum=0.5)
    layer.build((None, 3, 3, 4))
    before = [v.numpy() for v in layer.non_trainable_variables]

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 3])])
    def step(x):
        return tf.shape(layer(tf.nn.conv2d(x, kernel, 1, "VALID"), training=training))

    assert step(tf.zeros([0, 5, 5, 3])).numpy().tolist() == [0, 3, 3, 4]
    for old, variable in zip(before, layer.non_trainable_variables):
        np.testing.assert_array_equal(old, variable.numpy())


def test_mean_far_from_zero_keeps_the_variance(rng):
    layer = kerasbn.BatchNormalization(momentum=0.0)
    x = (1e4 + rng.standard_normal((512, 8))).astype(np.float32)
    layer(x, training=True)
    ref_var = x.astype(np.float64).var(axis=0)
    assert np.all(np.abs(layer.moving_variance.numpy() - ref_var) <= 1e-5 * ref_var)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_keep_their_dtype(rng, dtype):
    layer = kerasbn.BatchNormalization(dtype=keras.DTypePolicy(f"mixed_{dtype}"), momentum=0.0)
    x = tf.cast(_batch(rng, (64, 4), loc=30.0), dtype)
    y = layer(x, training=True)
    assert y.dtype == dtype and layer.moving_mean.dtype == "float32"
    exact = tf.cast(x, tf.float64).numpy()
    assert reference.relative_error(layer.moving_mean.numpy(), exact.mean(axis=0)) < 1e-6
    assert reference.relative_error(layer.moving_variance.numpy(), exact.var(axis=0)) < 1e-5


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,argument", [
    ({"momentum": 1.5}, "momentum"),
    ({"momentum": True}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": "high"}, "momentum"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": -1e-3}, "epsilon"),
    ({"axis": [1, 1]}, "axis"),
    ({"axis": 1.5}, "axis"),
    ({"axis": []}, "axis"),
    ({"renorm_momentum": 1.5}, "renorm_momentum"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 2.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"r_max": 2.0}}, "renorm_clipping"),
    ({"sync_group_size": 2}, "sync_group_size"),
    ({"synchronized": True, "sync_group_size": 0}, "sync_group_size"),
    ({"jit_compile": "always"}, "jit_compile"),
    ({"jit_compile": 1}, "jit_compile"),
])
def test_bad_arguments_name_the_argument_value_and_what_is_allowed(kwargs, argument):
    with pytest.raises(ValueError) as error:
        kerasbn.BatchNormalization(name="bn_under_test", **kwargs)
    message = str(error.value)
    assert "bn_under_test" in message and f"`{argument}`" in message
    assert f"{argument}=" in message and "must be" in message


@pytest.mark.parametrize("axis,shape", [(3, (None, 4, 5)), (-4, (None, 4, 5)),
                                        ([1, -2], (None, 4, 5)), ([0, 1, 2], (None, 4, 5))])
def test_axis_out_of_range_or_repeated_for_the_input(axis, shape):
    with pytest.raises(ValueError, match=r"`axis`.*received axis="):
        kerasbn.BatchNormalization(axis=axis, name="bn").build(shape)


def test_unknown_channel_dimension_is_refused():
    with pytest.raises(ValueError, match=r"channel dimension .* must be known"):
        kerasbn.BatchNormalization(name="bn").build((None, 4, None))


def test_input_of_another_rank_is_refused(rng):
    layer = kerasbn.BatchNormalization(name="bn")
    layer(_batch(rng, (4, 3, 5)))
    with pytest.raises(ValueError, match=r"'bn'.*`inputs` must have rank 3.*rank 2"):
        layer(_batch(rng, (4, 5)))


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_non_float_inputs_are_refused(dtype):
    with pytest.raises(TypeError, match=rf"'bn'.*floating-point.*dtype={dtype}"):
        kerasbn.BatchNormalization(name="bn")(tf.ones((4, 3), dtype))


def test_string_inputs_are_refused():
    with pytest.raises(TypeError, match=r"floating-point.*dtype=string"):
        kerasbn.BatchNormalization(name="bn")(tf.constant([["a", "b"]]))


@pytest.mark.parametrize("mask_shape", [(4, 5, 3), (4,), (4, 3), (2, 5), (4, 5, 1, 1)])
def test_a_mask_keras_would_not_pass_is_refused(rng, mask_shape):
    with pytest.raises(ValueError, match=(
            r"'bn'.*`mask` must have the input's shape without its last axis, \(4, 5\).*"
            rf"received mask shape {re.escape(str(mask_shape))} for input shape \(4, 5, 3\)")):
        kerasbn.BatchNormalization(name="bn")(
            _batch(rng, (4, 5, 3)), training=True, mask=tf.ones(mask_shape, tf.bool))
