"""kerasbn.BatchNormalization(virtual_batch_size=k): Ghost Batch Normalization.

Hoffer, Hubara & Soudry (2017): in training each group of k consecutive examples is
normalized with its own statistics; the moving statistics move toward the whole batch's;
inference ignores k. Checked against a float64 reference group by group.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import grids
import kerasbn
import reference
from layer_contract import run_layer_contract

BATCH = 10  # with k = 4: groups of 4, 4 and 2 (a last, smaller group)
K = 4


def _groups(size, k):
    return [slice(start, min(start + k, size)) for start in range(0, size, k)]


def _ghost_reference(x, weights, channel_axes, gamma, beta, cotangent, epsilon, k):
    """Per group: (y, dx) concatenated, dγ and dβ summed; whole-batch count/mean/var."""
    ys, dxs, dgamma, dbeta = [], [], 0.0, 0.0
    for group in _groups(x.shape[0], k):
        y, dx, dg, db, *_ = reference.train_step(
            x[group], None if weights is None else weights[group], channel_axes, gamma,
            beta, cotangent[group], epsilon)
        ys.append(y)
        dxs.append(dx)
        dgamma, dbeta = dgamma + dg, dbeta + db
    count, mean, var = reference.moments(x, channel_axes, weights)
    return np.concatenate(ys), np.concatenate(dxs), dgamma, dbeta, count, mean, var


def _layer(rng, axis, full_shape, dtype="float32", **config):
    layer = kerasbn.BatchNormalization(axis=axis, dtype=dtype, **config)
    layer.build(full_shape)
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape))
    layer.beta.assign(rng.standard_normal(layer.beta.shape))
    return layer


def _step(layer, x, cotangent, mask=None, batch_known=True):
    """y, dx, dγ, dβ of one training step, traced with the batch size unknown if asked."""
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
        grads = tape.gradient(y, [x, layer.gamma, layer.beta],
                              output_gradients=tf.constant(cotangent, y.dtype))
        return [y] + grads

    x = tf.constant(x)
    if batch_known:
        return step(x)
    spec = tf.TensorSpec([None] + list(x.shape[1:]), x.dtype)
    return tf.function(step, input_signature=[spec])(x)


# ------------------------------------------------------------------ the contract


@pytest.mark.parametrize("config,input_shape", [
    ({"virtual_batch_size": 3}, (5,)),
    ({"virtual_batch_size": 2, "axis": 1, "renorm": True}, (3, 4)),
    ({"virtual_batch_size": 4, "synchronized": True, "momentum_warmup": True}, (4, 4, 3)),
], ids=["dense", "channels-first-renorm", "nhwc-sync-warmup"])
def test_every_configuration_keeps_the_layer_contract(config, input_shape, rng, tmp_path):
    run_layer_contract(config, input_shape, rng, tmp_path)


# ------------------------------------------------------------------ training, per group


@pytest.mark.parametrize("batch_known", [True, False], ids=["static-batch", "traced-batch"])
@pytest.mark.parametrize("shape,axis", grids.LAYOUTS, ids=grids.LAYOUT_IDS)
def test_each_group_is_algorithm_1_forward_and_backward(rng, shape, axis, batch_known):
    full = (BATCH,) + shape
    layer = _layer(rng, axis, full, "float64", virtual_batch_size=K, momentum=0.0)
    x = 2.0 + 3.0 * rng.standard_normal(full)
    cotangent = rng.standard_normal(full)
    y, dx, dgamma, dbeta = _step(layer, x, cotangent, batch_known=batch_known)
    ref = _ghost_reference(x, None, reference.channel_axes(len(full), axis),
                           layer.gamma.numpy(), layer.beta.numpy(), cotangent,
                           layer.epsilon, K)
    for actual, expected in zip((y, dx, dgamma, dbeta), ref):
        assert reference.relative_error(actual, expected) < 1e-12
    # The moving statistics move toward the whole batch's, merged from the groups.
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref[5], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref[6], rtol=1e-12)


@pytest.mark.parametrize("size", [1, 3, 4, 9])
def test_batches_smaller_than_or_not_a_multiple_of_k_train(rng, size):
    layer = _layer(rng, -1, (size, 3), "float64", virtual_batch_size=K, momentum=0.0)
    x, cotangent = rng.standard_normal((size, 3)) * 2 + 1, rng.standard_normal((size, 3))
    y, dx, dgamma, dbeta = _step(layer, x, cotangent, batch_known=False)
    ref = _ghost_reference(x, None, [1], layer.gamma.numpy(), layer.beta.numpy(),
                           cotangent, layer.epsilon, K)
    for actual, expected in zip((y, dx, dgamma, dbeta), ref):
        assert reference.relative_error(actual, expected) < 1e-12


def test_a_group_of_one_example_is_a_batch_of_one(rng):
    ghost = _layer(rng, -1, (5, 3), virtual_batch_size=1)
    plain = kerasbn.BatchNormalization()
    plain.build((1, 3))
    plain.set_weights(ghost.get_weights())
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = ghost(x, training=True).numpy()
    for i in range(5):
        np.testing.assert_array_equal(y[i:i + 1], plain(x[i:i + 1], training=True).numpy())


def test_gradients_match_finite_differences_and_second_order_autodiff(rng):
    layer = _layer(rng, -1, (7, 3), "float64", virtual_batch_size=3)
    x = tf.constant(rng.standard_normal((7, 3)) * 2 + 1)
    weights = tf.constant(rng.standard_normal((7, 3)))
    # A small step: a group of 3 values with a small spread curves sharply (the default
    # step, 1/1024, failed 6 % of draws).
    theoretical, numerical = tf.test.compute_gradient(
        lambda t: tf.reduce_sum(layer(t, training=True) * weights), [x], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-5, atol=1e-6)

    def reference_output(t):  # plain ops per group: autodiff to any order
        groups = []
        for group in _groups(7, 3):
            part = t[group]
            mean = tf.reduce_mean(part, 0, keepdims=True)
            var = tf.reduce_mean(tf.square(part - mean), 0, keepdims=True)
            groups.append((part - mean) * tf.math.rsqrt(var + layer.epsilon)
                          * layer.gamma + layer.beta)
        return tf.concat(groups, 0)

    def gradient_penalty(fn):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(fn(x) * weights)
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
        return outer.gradient(penalty, x)

    assert reference.relative_error(
        gradient_penalty(lambda t: layer(t, training=True)),
        gradient_penalty(reference_output)) < 1e-9


@pytest.mark.parametrize("kind", grids.MASK_KINDS)
@pytest.mark.parametrize("shape,axis", [((6, 5, 4), -1), ((5, 5), 1), ((6, 5, 4), [1, 3])],
                         ids=["nhwc", "square-axis1", "axis-list"])
def test_masked_values_stay_out_of_each_group(rng, shape, axis, kind):
    full = (BATCH,) + shape
    layer = _layer(rng, axis, full, "float64", virtual_batch_size=K, momentum=0.0)
    x = 1.0 + 2.0 * rng.standard_normal(full)
    mask = grids.random_mask(rng, full, kind)
    for group in _groups(BATCH, K):  # every group counts something in every channel
        mask[group][0] = True
    cotangent = rng.standard_normal(full)
    y, dx, dgamma, dbeta = _step(layer, x, cotangent, mask=tf.constant(mask))
    ref = _ghost_reference(x, reference.keras_mask_weights(mask, full),
                           reference.channel_axes(len(full), axis), layer.gamma.numpy(),
                           layer.beta.numpy(), cotangent, layer.epsilon, K)
    for actual, expected in zip((y, dx, dgamma, dbeta), ref):
        assert reference.relative_error(actual, expected) < 1e-12
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref[5], rtol=1e-12, atol=1e-12)


def test_renorm_corrects_each_group_against_the_same_renorm_statistics(rng):
    layer = _layer(rng, -1, (BATCH, 3), "float64", virtual_batch_size=K, renorm=True,
                   renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5})
    state = {name: getattr(layer, name).numpy() for name in
             ("renorm_mean", "renorm_stddev", "moving_mean", "moving_stddev")}
    state["renorm_mean"] = rng.standard_normal(3)
    layer.renorm_mean.assign(state["renorm_mean"])
    x = 2.0 + 3.0 * rng.standard_normal((BATCH, 3))
    y = layer(x, training=True).numpy()
    for group in _groups(BATCH, K):
        expected, *_ = reference.renorm_step(
            x[group], [1], layer.gamma.numpy(), layer.beta.numpy(), state,
            epsilon=layer.epsilon, momentum=layer.momentum,
            renorm_momentum=layer.renorm_momentum, rmax=1.5, rmin=0.7, dmax=0.5)
        assert reference.relative_error(y[group], expected) < 1e-12


@pytest.mark.parametrize("dtype,tolerance", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_low_precision_inputs(rng, dtype, tolerance):
    layer = _layer(rng, -1, (BATCH, 4, 3), keras.DTypePolicy(f"mixed_{dtype}"),
                   virtual_batch_size=K, momentum=0.0)
    x = tf.cast(rng.standard_normal((BATCH, 4, 3)) * 2 + 5, dtype)
    y = layer(x, training=True)
    assert y.dtype == dtype and layer.moving_mean.dtype == "float32"
    exact = tf.cast(x, tf.float64).numpy()
    ref = _ghost_reference(exact, None, [2], layer.gamma.numpy(), layer.beta.numpy(),
                           np.zeros_like(exact), layer.epsilon, K)
    assert reference.relative_error(y, ref[0]) < tolerance
    assert reference.relative_error(layer.moving_variance.numpy(), ref[6]) < 1e-5


def test_compiled_and_uncompiled_agree_to_float32_rounding(rng):
    shape = (BATCH, 6, 5, 4)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    cotangent = rng.standard_normal(shape)
    results = []
    for jit_compile in (True, False):
        layer = kerasbn.BatchNormalization(virtual_batch_size=K, jit_compile=jit_compile)
        layer.build(shape)
        results.append(_step(layer, x, cotangent, batch_known=False))
    for compiled, plain in zip(*results):
        assert reference.relative_error(compiled, plain) < 1e-5


def test_fit_with_a_whole_step_compiled_by_xla(rng):
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
                              kerasbn.BatchNormalization(virtual_batch_size=4),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    model.compile("sgd", "mse", jit_compile=True)
    x = rng.standard_normal((30, 6, 6, 2)).astype(np.float32)
    history = model.fit(x, x.mean(axis=(1, 2, 3)), batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("size", [1, 5, 37])
def test_inference_ignores_k(rng, size):
    ghost = _layer(rng, -1, (size, 4, 3), virtual_batch_size=K)
    ghost.moving_mean.assign(rng.standard_normal(3))
    ghost.moving_variance.assign(rng.uniform(0.5, 2, 3))
    plain = kerasbn.BatchNormalization()
    plain.build((size, 4, 3))
    plain.set_weights(ghost.get_weights())
    x = rng.standard_normal((size, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(ghost(x, training=False), plain(x, training=False))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,argument", [
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"virtual_batch_size": -2}, "virtual_batch_size"),
    ({"virtual_batch_size": 2.5}, "virtual_batch_size"),
    ({"virtual_batch_size": True}, "virtual_batch_size"),
    ({"virtual_batch_size": "4"}, "virtual_batch_size"),
    ({"virtual_batch_size": 4, "axis": 0}, "axis"),
    ({"virtual_batch_size": 4, "axis": [0, -1]}, "axis"),
    ({"adjustment": lambda shape: (1.0, 0.0)}, "adjustment"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, argument):
    with pytest.raises(ValueError) as error:
        kerasbn.BatchNormalization(name="ghost", **kwargs)
    message = str(error.value)
    assert "'ghost'" in message and f"`{argument}`" in message and f"{argument}=" in message


def test_an_axis_that_is_the_batch_axis_for_the_input_is_refused_at_build():
    with pytest.raises(ValueError, match=r"`axis`.*batch axis 0.*virtual_batch_size=4"):
        kerasbn.BatchNormalization(axis=-3, virtual_batch_size=4).build((None, 4, 5))


# ------------------------------------------------------------------ serialization, tf-keras


def test_keras_file_round_trip_keeps_k(rng, tmp_path):
    model = keras.Sequential([keras.Input((4,)), kerasbn.BatchNormalization(virtual_batch_size=3)])
    model(rng.standard_normal((7, 4)).astype(np.float32), training=True)
    model.save(tmp_path / "ghost.keras")
    loaded = keras.models.load_model(tmp_path / "ghost.keras")
    assert loaded.layers[0].virtual_batch_size == 3
    x = rng.standard_normal((7, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x, training=True), model(x, training=True))


def test_fused_from_tf_keras_is_accepted_and_ignored():
    layer = kerasbn.BatchNormalization(fused=True)
    assert "fused" not in layer.get_config()


def test_layers_build_from_real_tf_keras_configs(rng):
    tf_keras = pytest.importorskip(
        "tf_keras", reason="tf_keras is in the bench extra: pip install -e '.[bench]'")
    layers = [
        tf_keras.layers.BatchNormalization(virtual_batch_size=4, fused=False, momentum=0.9),
        tf_keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0},
                                           renorm_momentum=0.8, epsilon=1e-5),
        tf_keras.layers.BatchNormalization(axis=1, center=False, gamma_regularizer="l2"),
    ]
    model = tf_keras.Sequential([tf_keras.Input((4, 4, 3)), tf_keras.layers.Conv2D(2, 3),
                                 tf_keras.layers.BatchNormalization(axis=-1)])
    from_json = [layer["config"] for layer in json.loads(model.to_json())["config"]["layers"]
                 if layer["class_name"] == "BatchNormalization"]
    configs = [layer.get_config() for layer in layers] + from_json
    assert len(configs) == 4
    for config in configs:
        ours = kerasbn.BatchNormalization.from_config(config)
        for key in ("momentum", "epsilon", "center", "scale", "renorm", "renorm_momentum"):
            if key in config:
                assert getattr(ours, key) == config[key], key
        assert ours.virtual_batch_size == config.get("virtual_batch_size")
    ghost = kerasbn.BatchNormalization.from_config(configs[0])
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = ghost(x, training=True).numpy()
    np.testing.assert_allclose(y[:4].mean(axis=0), 0.0, atol=1e-5)  # its own group's mean
