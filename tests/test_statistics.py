"""kerasbn.recompute_statistics: population statistics against a float64 reference.

The reference runs a copy of the model batch by batch in training mode, captures the
input of every batch norm with a sub-model (or by calling the layers of a subclassed
model one by one), and computes the mean and variance of all of it in float64 NumPy.
The same checks run on 4 MirroredStrategy replicas (the `mirrored_strategy` fixture)
and on 2 worker processes with MultiWorkerMirroredStrategy (tests/statistics_worker.py).
"""

import gc
import os
import sys
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
import workers
from kerasbn import _population_parts
from kerasbn import statistics

RTOL = 1e-5
MOVING = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def kerasbn_bn(**kwargs):
    kwargs.setdefault("jit_compile", False)  # the tests' models are small: skip compiling
    return kerasbn.BatchNormalization(**kwargs)


BATCH_NORMS = {"kerasbn": kerasbn_bn, "keras": keras.layers.BatchNormalization}


# ------------------------------------------------------------------ models and data


def build_model(bn, scale=1.0, **bn_kwargs):
    """Two inputs, three batch norms: after a Conv, after a Dense, and a masked one.

    Every Dense/Conv before a batch norm adds a bias of `scale`, so that at 1e4 the
    batch norms' inputs have mean/std about 1e4.
    """
    bias = keras.initializers.Constant(scale)
    image = keras.Input((6, 6, 3), name="image")
    sequence = keras.Input((5, 4), name="sequence")
    h = keras.layers.Conv2D(4, 3, bias_initializer=bias, name="conv")(image)
    h = bn(name="bn_conv", **bn_kwargs)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(6, bias_initializer=bias, name="dense")(h)
    h = bn(name="bn_dense", **bn_kwargs)(h)
    s = keras.layers.Masking(0.0)(sequence)
    s = keras.layers.Dense(3, bias_initializer=bias, name="step_dense")(s)
    s = bn(name="bn_masked", **bn_kwargs)(s)
    s = keras.layers.GlobalAveragePooling1D()(s)
    out = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([h, s]))
    return keras.Model({"image": image, "sequence": sequence}, out)


BN_NAMES = ("bn_conv", "bn_dense", "bn_masked")


def make_data(rng, count):
    """Images and sequences (random lengths 1..5, zero-padded: the masked steps)."""
    image = rng.standard_normal((count, 6, 6, 3)).astype(np.float32)
    sequence = rng.standard_normal((count, 5, 4)).astype(np.float32)
    lengths = rng.integers(1, 6, count)
    sequence[np.arange(5)[None, :] >= lengths[:, None]] = 0.0
    return {"image": image, "sequence": sequence}


def batches_of(data, batch_size):
    count = len(next(iter(data.values())))
    return [{k: v[i:i + batch_size] for k, v in data.items()}
            for i in range(0, count, batch_size)]


def dataset_of(data, batch_size, labels=True):
    count = len(next(iter(data.values())))
    if labels:
        return tf.data.Dataset.from_tensor_slices((data, np.zeros(count, np.float32))).batch(
            batch_size)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)


def randomize_statistics(model, rng):
    """Moving statistics far from the data's, so that a recompute has to move them."""
    for layer in model._flatten_layers():
        if statistics.is_batch_norm(layer):
            for name in MOVING:
                if hasattr(layer, name):
                    variable = getattr(layer, name)
                    value = rng.uniform(0.5, 2.0, variable.shape)
                    variable.assign(value.astype(np.float32))


# ------------------------------------------------------------------ the reference


def captured_inputs(model, names, batches):
    """Each named batch norm's inputs over `batches`, captured from a training-mode copy.

    The copy's momenta are set to 1, so that renorm corrections, which read the
    moving statistics, stay fixed, as in the pass.
    """
    clone = keras.models.clone_model(model)
    for layer in model.layers:  # by name: a clone may order its layers otherwise
        if layer.weights:
            clone.get_layer(layer.name).set_weights(layer.get_weights())
    for layer in clone._flatten_layers():
        if statistics.is_batch_norm(layer):
            layer.momentum = 1.0
            if getattr(layer, "renorm", False):
                layer.renorm_momentum = 1.0
    probe = keras.Model(clone.input, [layer_input(clone.get_layer(name)) for name in names])
    captured = {name: [] for name in names}
    for batch in batches:
        for name, value in zip(names, probe(batch, training=True)):
            captured[name].append(np.asarray(value, np.float64))
    return {name: np.concatenate(values) for name, values in captured.items()}


def layer_input(layer):
    """A layer's symbolic input (Keras lists the mask with it when one was passed)."""
    value = layer.input
    return value[0] if isinstance(value, (list, tuple)) else value


def sequence_mask(sequence):
    """The Masking layer's mask, shaped to broadcast against (N, T, C)."""
    return np.any(sequence != 0.0, axis=-1, keepdims=True)


def expected_moments(inputs, mask=None, bessel=False):
    count, mean, variance = reference.moments(inputs, -1, mask)
    if bessel:
        variance = variance * count / (count - 1)
    return count, mean, variance


def assert_statistics(layer, inputs, mask=None, bessel=False, rtol=RTOL):
    """moving_mean/variance equal the float64 population of `inputs` to rtol."""
    _, mean, variance = expected_moments(inputs, mask, bessel)
    got_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    got_variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    # A channel mean near 0 is judged against the channel's spread.
    mean_error = np.abs(got_mean - mean) / (np.abs(mean) + np.sqrt(variance))
    variance_error = np.abs(got_variance - variance) / variance
    assert mean_error.max() < rtol, (layer.name, got_mean, mean)
    assert variance_error.max() < rtol, (layer.name, got_variance, variance)


def assert_model_statistics(model, data, batch_size, names=BN_NAMES, rtol=RTOL):
    inputs = captured_inputs(model, names, batches_of(data, batch_size))
    mask = sequence_mask(data["sequence"])
    for name in names:
        assert_statistics(model.get_layer(name), inputs[name],
                          mask if name == "bn_masked" else None, rtol=rtol)


def moving_values(model):
    """Every moving statistic of every batch norm, per component (replica copy)."""
    values = {}
    for layer in model._flatten_layers():
        if statistics.is_batch_norm(layer):
            for variable in layer.non_trainable_variables:
                values[variable.path] = [c.numpy() for c in _population_parts.components(variable)]
    return values


def assert_same_values(before, after):
    assert before.keys() == after.keys()
    for key in before:
        for a, b in zip(before[key], after[key]):
            np.testing.assert_array_equal(a, b, err_msg=key)


# ------------------------------------------------------------------ one device


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("bn", sorted(BATCH_NORMS))
def test_statistics_equal_the_float64_population(bn, scale, rng):
    """Conv, Dense and masked batch norms; a partial last batch; mean/std up to 1e4."""
    model = build_model(BATCH_NORMS[bn], scale)
    randomize_statistics(model, rng)
    batch_size = 8
    data = make_data(rng, 5 * batch_size + 3)
    summary = kerasbn.recompute_statistics(model, dataset_of(data, batch_size), verbose=0)
    assert_model_statistics(model, data, batch_size)
    assert summary.batches == 6 and summary.examples == 43 and summary.skipped_batches == 0
    assert sorted(layer.name for layer in summary) == sorted(BN_NAMES)
    assert summary["bn_dense"].count == 43
    assert summary["bn_conv"].count == 43 * 16
    assert summary["bn_masked"].count == int(sequence_mask(data["sequence"]).sum())
    assert all(layer.mean_change > 0 and layer.variance_change > 0 for layer in summary)


def test_compiled_kerasbn_layers_give_the_same_statistics(rng):
    """kerasbn's default jit_compile=True: the pass computes its moments compiled too."""
    model = build_model(kerasbn.BatchNormalization, 1e4)
    data = make_data(rng, 27)
    kerasbn.recompute_statistics(model, dataset_of(data, 8), verbose=0)
    assert_model_statistics(model, data, 8)


def test_arrays_dicts_tensors_generators_and_py_datasets_give_the_same_statistics(rng):
    model = build_model(kerasbn_bn)
    data = make_data(rng, 21)
    kerasbn.recompute_statistics(model, dataset_of(data, 5), verbose=0)
    expected = moving_values(model)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()

        def __len__(self):
            return 5

        def __getitem__(self, index):
            return {k: v[index * 5:(index + 1) * 5] for k, v in data.items()}

    def generator():  # Keras's rule for generators: tuples (x,), (x, y) or (x, y, w)
        for batch in batches_of(data, 5):
            yield (batch,)

    for source, kwargs in [
        (data, {"batch_size": 5}),  # a dict of arrays, batched like predict
        ({k: tf.constant(v) for k, v in data.items()}, {"batch_size": 5}),
        (Batches(), {}),
        (generator(), {}),
        (dataset_of(data, 5, labels=False), {}),
    ]:
        randomize_statistics(model, rng)
        summary = kerasbn.recompute_statistics(model, source, verbose=0, **kwargs)
        assert summary.examples == 21 and summary.batches == 5, type(source)
        assert_same_values(expected, moving_values(model))


def test_arrays_are_batched_by_32_by_default(rng):
    model = keras.Sequential([keras.Input((3,)), kerasbn_bn(name="bn")])
    summary = kerasbn.recompute_statistics(model, rng.standard_normal((70, 3)), verbose=0)
    assert summary.batches == 3 and summary.examples == 70


def test_steps_limits_the_batches(rng):
    model = build_model(kerasbn_bn)
    data = make_data(rng, 40)
    summary = kerasbn.recompute_statistics(model, dataset_of(data, 8).repeat(), steps=2,
                                           verbose=0)
    assert summary.batches == 2 and summary.examples == 16
    first = {k: v[:16] for k, v in data.items()}
    assert_model_statistics(model, first, 8)


def test_renorm_bessel_and_ghost_layers_get_consistent_statistics(rng):
    """Bessel: n/(n-1)·σ². Renorm, with recompute_renorm=True: moving_stddev =
    renorm_stddev = sqrt(σ²+ε), renorm_mean = μ, moving_variance = relu(moving_stddev²
    − ε); the renorm corrections stay fixed in the pass."""
    kinds = {
        "renorm": lambda name: kerasbn_bn(name=name, renorm=True, epsilon=0.01,
                                          renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
        "keras_renorm": lambda name: keras.layers.BatchNormalization(name=name, renorm=True,
                                                                     epsilon=0.01),
        "bessel": lambda name: kerasbn_bn(name=name, bessel_correction=True),
        "renorm_bessel": lambda name: kerasbn_bn(name=name, renorm=True,
                                                 bessel_correction=True),
        # Ghost batch norm: groups of 4 normalized apart in training; the population is
        # still every value the layer saw.
        "ghost": lambda name: kerasbn_bn(name=name, virtual_batch_size=4),
    }
    inputs = keras.Input((4,))
    outputs = []
    for kind, make in kinds.items():
        h = keras.layers.Dense(3, name=f"dense_{kind}")(inputs)
        h = make(kind)(h)
        h = keras.layers.Dense(2, name=f"after_{kind}")(h)  # fed by the renorm outputs
        outputs.append(keras.layers.BatchNormalization(name=f"next_{kind}")(h))
    model = keras.Model(inputs, outputs)
    randomize_statistics(model, rng)
    x = (rng.standard_normal((37, 4)) * 3 + 2).astype(np.float32)
    names = [name for kind in kinds for name in (kind, f"next_{kind}")]
    batches = [x[i:i + 10] for i in range(0, 37, 10)]
    captured = captured_inputs(model, names, batches)  # with the renorm statistics before
    summary = kerasbn.recompute_statistics(model, x, batch_size=10, verbose=0,
                                           recompute_renorm=True)
    assert summary.renorm_kept == () and len(summary) == 2 * len(kinds)
    for kind in kinds:
        layer = model.get_layer(kind)
        bessel = "bessel" in kind
        _, mean, variance = expected_moments(captured[kind], bessel=bessel)
        if "renorm" not in kind:
            assert_statistics(layer, captured[kind], bessel=bessel)
        else:
            stddev = np.sqrt(variance + layer.epsilon)
            for name, expected in [("moving_stddev", stddev), ("renorm_stddev", stddev),
                                   ("renorm_mean", mean), ("moving_mean", mean)]:
                got = getattr(layer, name).numpy()
                assert reference.relative_error(got, expected) < RTOL, (kind, name)
            moving_stddev = layer.moving_stddev.numpy()
            np.testing.assert_array_equal(
                layer.moving_variance.numpy(),
                np.maximum(moving_stddev * moving_stddev - np.float32(layer.epsilon), 0))
            assert reference.relative_error(layer.moving_variance.numpy(), variance) < RTOL
        # The layer after: its population is that of a pass with fixed renorm statistics.
        assert_statistics(model.get_layer(f"next_{kind}"), captured[f"next_{kind}"])


def renorm_model(make_renorm):
    """Dense → renorm layer → Dense → plain batch norm, and a plain branch beside it."""
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name="dense")(inputs)
    h = make_renorm(name="renorm")(h)
    h = keras.layers.Dense(2, name="after")(h)  # fed by the renorm layer's training output
    after = kerasbn_bn(name="next")(h)
    plain = kerasbn_bn(name="plain")(keras.layers.Dense(3, name="side")(inputs))
    return keras.Model(inputs, [after, plain])


@pytest.mark.parametrize("make_renorm", [
    lambda name: kerasbn_bn(name=name, renorm=True, epsilon=0.01,
                            renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
    lambda name: keras.layers.BatchNormalization(name=name, renorm=True),
], ids=["kerasbn", "keras"])
def test_renorm_layers_keep_their_statistics_by_default(rng, make_renorm):
    """Renorm layers are trained to serve their moving statistics: kept bit for bit, the
    layer after measured with the renorm layer in training mode (its corrections from
    the kept statistics, as in training); every other batch norm recomputed."""
    model = renorm_model(make_renorm)
    randomize_statistics(model, rng)
    renorm = model.get_layer("renorm")
    before = {name: getattr(renorm, name).numpy().copy() for name in MOVING}
    x = (rng.standard_normal((29, 4)) * 3 + 2).astype(np.float32)
    captured = captured_inputs(model, ["next", "plain"], [x[i:i + 8] for i in range(0, 29, 8)])
    summary = kerasbn.recompute_statistics(model, x, batch_size=8, verbose=0)
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(renorm, name).numpy(), value, err_msg=name)
    assert summary.renorm_kept == ("renorm",)
    assert [layer.name for layer in summary] == ["next", "plain"]
    assert "renorm, kept (recompute_renorm=True recomputes them): renorm" in str(summary)
    for name in ("next", "plain"):
        assert_statistics(model.get_layer(name), captured[name])


def test_a_model_of_renorm_layers_only_reads_nothing_by_default(rng):
    inputs = keras.Input((4,))
    outputs = kerasbn_bn(name="renorm", renorm=True)(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, outputs)
    randomize_statistics(model, rng)
    before = [w.copy() for w in model.get_weights()]

    def never_read():
        raise AssertionError("the data was read")
        yield  # a generator

    summary = kerasbn.recompute_statistics(model, never_read(), verbose=0)
    assert (len(summary), summary.batches, summary.renorm_kept) == (0, 0, ("renorm",))
    for got, expected in zip(model.get_weights(), before):
        np.testing.assert_array_equal(got, expected)
    x = rng.standard_normal((12, 4)).astype(np.float32)
    summary = kerasbn.recompute_statistics(model, x, verbose=0, recompute_renorm=True)
    assert [layer.name for layer in summary] == ["renorm"] and summary.examples == 12


class Block(keras.layers.Layer):
    """A plain layer holding a Dense and a batch norm (nested below a model)."""

    def __init__(self, bn, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.bn = bn()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class Subclassed(keras.Model):
    """A subclassed model: a batch norm of its own, one in a Block, one in a Sequential."""

    def __init__(self, bn, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(5)
        self.bn = bn()
        self.block = Block(bn)
        self.nested = keras.Sequential([keras.layers.Dense(3), bn()])
        self.dropout = keras.layers.Dropout(0.5)

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn(self.dense(x), training=training))
        h = self.dropout(h, training=training)
        h = keras.ops.relu(self.block(h, training=training))
        return self.nested(h, training=training)


@pytest.mark.parametrize("bn", sorted(BATCH_NORMS))
def test_subclassed_and_nested_models(bn, rng):
    make = BATCH_NORMS[bn]
    model = Subclassed(make)
    x = (rng.standard_normal((29, 6)) * 2 - 1).astype(np.float32)
    model(x[:2])
    randomize_statistics(model, rng)
    summary = kerasbn.recompute_statistics(model, x, batch_size=8, verbose=0)
    assert len(summary) == 3 and summary.examples == 29

    copy = Subclassed(make)  # the reference: the layers called one by one, training mode
    copy(x[:2])
    copy.set_weights(model.get_weights())
    captured = [[], [], []]
    for i in range(0, 29, 8):
        batch = x[i:i + 8]
        a = copy.dense(batch)  # dropout is off in the pass (inference mode)
        h = keras.ops.relu(copy.bn(a, training=True))
        b = copy.block.dense(h)
        h = keras.ops.relu(copy.block.bn(b, training=True))
        c = copy.nested.layers[0](h)
        for store, value in zip(captured, (a, b, c)):
            store.append(np.asarray(value, np.float64))
    for layer, values in zip((model.bn, model.block.bn, model.nested.layers[1]), captured):
        assert_statistics(layer, np.concatenate(values))

    # A functional model that nests a Sequential and a functional model.
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), make(name="inner_bn")])
    sub_in = keras.Input((4,))
    sub = keras.Model(sub_in, make(name="sub_bn")(keras.layers.Dense(3)(sub_in)))
    outer_in = keras.Input((6,))
    outer = keras.Model(outer_in, sub(inner(outer_in)))
    kerasbn.recompute_statistics(outer, x, batch_size=8, verbose=0)
    first = np.concatenate([inner.layers[0](x[i:i + 8]).numpy() for i in range(0, 29, 8)])
    assert_statistics(inner.layers[1], first)
    clone = keras.models.clone_model(inner)
    clone.set_weights(inner.get_weights())
    second = np.concatenate([sub.layers[1](clone(x[i:i + 8], training=True)).numpy()
                             for i in range(0, 29, 8)])
    assert_statistics(sub.get_layer("sub_bn"), second)


def test_frozen_batch_norms_are_left_as_they_are(rng):
    model = build_model(kerasbn_bn)
    model.get_layer("bn_dense").trainable = False
    randomize_statistics(model, rng)
    frozen = model.get_layer("bn_dense").moving_mean.numpy()
    data = make_data(rng, 20)
    summary = kerasbn.recompute_statistics(model, dataset_of(data, 8), verbose=0)
    assert summary.frozen == ("bn_dense",)
    assert [layer.name for layer in summary] == ["bn_conv", "bn_masked"]
    np.testing.assert_array_equal(model.get_layer("bn_dense").moving_mean.numpy(), frozen)
    assert_model_statistics(model, data, 8, names=("bn_conv", "bn_masked"))


def _state(model, optimizer):
    """Everything but the moving statistics: values, flags and plain attributes."""
    variables = {}
    for variable in list(model.variables) + list(optimizer.variables):
        if variable.path.split("/")[-1] not in MOVING:
            variables[variable.path] = [c.numpy() for c in _population_parts.components(variable)]
    attributes = {}
    for layer in model._flatten_layers():
        plain = {k: v for k, v in vars(layer).items()
                 if isinstance(v, (bool, int, float, str, type(None)))}
        attributes[layer.path if hasattr(layer, "path") else layer.name] = (
            plain, layer.trainable, "call" in vars(layer))
    return variables, attributes


def _warmup_kwargs():
    # momentum_warmup (an update counter weight) where the layer has it.
    import inspect

    parameters = inspect.signature(kerasbn.BatchNormalization.__init__).parameters
    return {"momentum_warmup": True} if "momentum_warmup" in parameters else {}


def test_nothing_else_changes_bit_for_bit(rng):
    """Weights, optimizer state, counters, trainable flags, attributes; inference after."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5)(inputs)
    h = kerasbn_bn(name="warm", momentum=0.9, **_warmup_kwargs())(h)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(4)(h)
    h = kerasbn_bn(name="renorm", renorm=True, synchronized=True)(h)
    h = keras.layers.BatchNormalization(name="stock")(keras.layers.Dense(3)(h))
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=False)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    model.fit(x, rng.standard_normal((40, 1)), batch_size=8, epochs=1, verbose=0)
    before = _state(model, model.optimizer)
    stats_before = moving_values(model)

    kerasbn.recompute_statistics(model, x, batch_size=8, verbose=0)

    after = _state(model, model.optimizer)
    assert before[1] == after[1]
    assert_same_values(before[0], after[0])
    changed = moving_values(model)
    assert any(not np.array_equal(stats_before[k][0], changed[k][0]) for k in changed)
    # The model is left in inference mode by default: calling it moves nothing.
    np.testing.assert_array_equal(model(x[:8]), model(x[:8], training=False))
    assert_same_values(changed, moving_values(model))


# ------------------------------------------------------------------ bad input


def _small_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                             kerasbn_bn(name="bn"), keras.layers.Dense(2),
                             keras.layers.BatchNormalization(name="stock")])


def _bad_inputs(rng):
    x = rng.standard_normal((20, 3)).astype(np.float32)
    nan = x.copy()
    nan[:] = np.nan
    return {
        "empty dataset": (dict(data=tf.data.Dataset.from_tensor_slices(x[:0]).batch(4)),
                          "`data`.*at least one batch"),
        "steps 0": (dict(data=x, steps=0), "`steps`.*steps=0"),
        "steps -1": (dict(data=x, steps=-1), "`steps`.*steps=-1"),
        "steps 1.5": (dict(data=x, steps=1.5), "`steps`.*steps=1.5"),
        "steps True": (dict(data=x, steps=True), "`steps`.*steps=True"),
        "every batch not finite": (dict(data=nan, batch_size=5), "`data`.*finite"),
        "wrong feature size": (dict(data=rng.standard_normal((20, 4)).astype(np.float32)),
                               "`data`.*fit the inputs"),
        "wrong rank": (dict(data=rng.standard_normal((20, 3, 2)).astype(np.float32)),
                       "`data`.*fit the inputs"),
        "not data": (dict(data="images/"), "`data`.*tf.data.Dataset"),
        "infinite": (dict(data=tf.data.Dataset.from_tensor_slices(x).batch(4).repeat()),
                     "`steps`.*infinite"),
        "verbose": (dict(data=x, verbose="loud"), "`verbose`.*'loud'"),
        "batch size 0": (dict(data=x, batch_size=0), "`batch_size`.*batch_size=0"),
        "batch size of a dataset": (
            dict(data=tf.data.Dataset.from_tensor_slices(x).batch(4), batch_size=4),
            "`batch_size`.*None when `data` is a tf.data.Dataset"),
    }


BAD_INPUT_NAMES = list(_bad_inputs(np.random.default_rng(0)))


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_is_a_clear_error_and_changes_nothing(case, rng):
    model = _small_model()
    randomize_statistics(model, rng)
    before = moving_values(model)
    weights = [w.numpy() for w in model.weights]
    kwargs, message = _bad_inputs(rng)[case]
    kwargs.setdefault("verbose", 0)
    with pytest.raises(ValueError, match=message):
        kerasbn.recompute_statistics(model, **kwargs)
    assert_same_values(before, moving_values(model))
    for a, b in zip(weights, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert all("call" not in vars(layer) for layer in model._flatten_layers())


def test_data_missing_an_input_is_named_in_the_error(rng):
    model = build_model(kerasbn_bn)
    before = moving_values(model)
    data = make_data(rng, 10)
    with pytest.raises(ValueError, match=r"`data`.*sequence: \(None, 5, 4\).*received "
                                         r"data=\{image: ndarray\(shape=\(10, 6, 6, 3\)"):
        kerasbn.recompute_statistics(model, {"image": data["image"]}, batch_size=4, verbose=0)
    assert_same_values(before, moving_values(model))


def test_a_model_without_batch_norms_or_only_frozen_ones_is_refused(rng):
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`model`.*holding at least one BatchNormalization"):
        kerasbn.recompute_statistics(plain, rng.standard_normal((4, 3)), verbose=0)
    frozen = _small_model()
    frozen.trainable = False
    with pytest.raises(ValueError, match="`model`.*trainable batch norm.*frozen"):
        kerasbn.recompute_statistics(frozen, rng.standard_normal((4, 3)), verbose=0)
    unbuilt = keras.Sequential([keras.layers.Dense(2), kerasbn_bn()])
    with pytest.raises(ValueError, match="`model`.*built"):
        kerasbn.recompute_statistics(unbuilt, rng.standard_normal((4, 3)), verbose=0)


def test_every_value_masked_is_an_error(rng):
    model = keras.Sequential([keras.Input((4, 2)), keras.layers.Masking(0.0),
                              kerasbn_bn(name="bn")])
    before = moving_values(model)
    with pytest.raises(ValueError, match="`data`.*No value reached any batch norm"):
        kerasbn.recompute_statistics(model, np.zeros((6, 4, 2), np.float32), verbose=0)
    assert_same_values(before, moving_values(model))


def test_non_finite_batches_are_skipped_and_counted(rng):
    model = _small_model()
    x = rng.standard_normal((25, 3)).astype(np.float32)
    x[12] = np.inf  # in the third batch of 5
    with pytest.warns(RuntimeWarning, match="1 batch"):
        summary = kerasbn.recompute_statistics(model, x, batch_size=5, verbose=0)
    assert summary.skipped_batches == 1 and summary.examples == 20
    kept = np.concatenate([x[:10], x[15:]])
    dense = model.layers[0]
    assert_statistics(model.get_layer("bn"), np.asarray(dense(kept), np.float64))
    for variable in model.non_trainable_variables:
        assert np.all(np.isfinite(variable.numpy()))


def test_an_error_in_the_middle_of_the_pass_restores_everything(rng):
    """A stock Keras layer's moving statistics turn NaN on a NaN batch even at momentum 1;
    an error afterwards must leave the statistics exactly as before the pass."""
    model = _small_model()
    randomize_statistics(model, rng)
    before = moving_values(model)
    x = rng.standard_normal((15, 3)).astype(np.float32)
    x[5:10] = np.nan

    def fail_third(index, batch):
        tf.debugging.assert_less(index, tf.constant(2, tf.int64), message="broken reader")
        return batch

    data = tf.data.Dataset.from_tensor_slices(x).batch(5).enumerate().map(fail_third)
    with pytest.raises(tf.errors.InvalidArgumentError, match="broken reader"):
        kerasbn.recompute_statistics(model, data, verbose=0)
    assert_same_values(before, moving_values(model))
    assert all("call" not in vars(layer) for layer in model._flatten_layers())
    assert model.get_layer("bn").momentum == 0.99


# ------------------------------------------------------------------ output


@pytest.mark.parametrize("verbose", [0, 1, 2, "auto"])
def test_verbose_follows_keras(verbose, rng, capsys):
    model = _small_model()
    summary = kerasbn.recompute_statistics(model, rng.standard_normal((20, 3)), batch_size=5,
                                           verbose=verbose)
    out = capsys.readouterr().out
    if verbose == 0:
        assert out == ""
    elif verbose == 2:
        assert out.count("\n") == 1 and "4/4" in out
    else:
        assert "4/4" in out and "━" in out
    text = str(summary)
    assert "bn" in text and "stock" in text and "4 batches (20 examples" in text


# ------------------------------------------------------------------ replicas


# EMPTY REPLICAS: stock Keras layers get data that leaves no replica an empty batch
# (4 replicas take ceil(batch / 4) examples each, in order: a last batch of 3 or 6
# leaves the fourth empty). On an empty batch TensorFlow's oneDNN Conv2D returns its
# input, (0, 6, 6, 3) for (0, 4, 4, 4); stock Keras's batch norm then has 3 channel
# moments against 4 ("Incompatible shapes: [4] vs. [3]", or, synchronized, "Shape
# mismatch in the collective instance"), in `fit` as in the pass. oneDNN is on by
# default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX
# (TF_ENABLE_ONEDNN_OPTS overrides it), so this fails on some machines only. A
# TensorFlow defect: kerasbn's own layer, which views its input as [-1, channels], is
# unaffected, and its tests keep the empty replica.


def _distributed_model(strategy, make, scale, rng):
    single = build_model(make, scale)
    randomize_statistics(single, rng)
    with strategy.scope():
        model = build_model(make, scale)
    model.set_weights(single.get_weights())
    return single, model


@pytest.mark.parametrize("bn, scale, data_kind, count", [
    ("kerasbn", 1.0, "plain", 43),
    ("kerasbn", 1e4, "distributed", 43),
    ("keras", 1.0, "plain", 44),  # a last batch of 4: see EMPTY REPLICAS
])
def test_four_replicas_give_the_population_of_the_global_batches(bn, scale, data_kind, count,
                                                                 mirrored_strategy, rng):
    """Synchronized layers, global batch 10 (not divisible by 4), last batch 3 (an empty
    replica; 4 for stock Keras: see EMPTY REPLICAS); every replica's copy identical;
    nothing else changed."""
    strategy = mirrored_strategy
    make = BATCH_NORMS[bn]
    make_synchronized = lambda **kw: make(synchronized=True, **kw)  # noqa: E731
    _, model = _distributed_model(strategy, make_synchronized, scale, rng)
    data = make_data(rng, count)
    dataset = dataset_of(data, 10)
    if data_kind == "distributed":
        dataset = strategy.experimental_distribute_dataset(dataset)
    others = {v.path: [c.numpy() for c in _population_parts.components(v)]
              for v in model.variables if v.path.split("/")[-1] not in MOVING}

    with strategy.scope():
        summary = kerasbn.recompute_statistics(model, dataset, verbose=0)

    assert summary.examples == count and summary.batches == 5
    # The single-device reference, batches of 10. bn_dense's inputs come after a
    # synchronized batch norm, whose float32 outputs on 4 replicas may round otherwise
    # than on one device: at a mean of 1e4 a value's last place is 1e-3, about 1 % of
    # the channel's spread, and its statistics can match only to that resolution (seed
    # 4117403299: one value a place apart, the variance 4e-4 off). The layers whose
    # inputs nothing synchronized computes match to RTOL.
    assert_model_statistics(model, data, 10, names=("bn_conv", "bn_masked"))
    dense_inputs = captured_inputs(model, BN_NAMES, batches_of(data, 10))["bn_dense"]
    _, mean, variance = expected_moments(dense_inputs)
    resolution = np.max(np.spacing(np.abs(mean).astype(np.float32)) / np.sqrt(variance))
    assert_statistics(model.get_layer("bn_dense"), dense_inputs, rtol=max(RTOL, resolution))
    for path, copies in moving_values(model).items():
        assert len(copies) == 4
        for copy in copies[1:]:
            np.testing.assert_array_equal(copies[0], copy, err_msg=path)
    for variable in model.variables:
        if variable.path in others:
            for a, b in zip(others[variable.path], _population_parts.components(variable)):
                np.testing.assert_array_equal(a, b.numpy())


def test_replicas_normalize_with_their_own_batches_when_not_synchronized(mirrored_strategy,
                                                                         rng):
    """Unsynchronized layers: a batch norm whose input no other batch norm shapes sees
    the same population as on one device; one exchange merges the replicas' parts."""
    strategy = mirrored_strategy
    _, model = _distributed_model(strategy, keras.layers.BatchNormalization, 1.0, rng)
    data = make_data(rng, 31)  # a last batch of 7: see EMPTY REPLICAS
    summary = kerasbn.recompute_statistics(model, dataset_of(data, 8), verbose=0)
    assert summary.examples == 31
    assert_model_statistics(model, data, 8, names=("bn_conv", "bn_masked"))


def test_the_pass_exchanges_once_for_all_layers(mirrored_strategy, rng):
    """The per-batch step has no cross-replica exchange of the pass's own (only the
    layers': none for unsynchronized kerasbn layers but their moving-average update);
    the end of the pass is one gather of every layer's accumulators and one sum."""
    strategy = mirrored_strategy
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                  kerasbn_bn(synchronized=True), keras.layers.Dense(2),
                                  kerasbn_bn(synchronized=True)])
    population_pass = statistics.PopulationPass(model)
    counts = []
    original = tf.distribute.ReplicaContext.all_reduce

    def counting(self, *args, **kwargs):
        counts.append(1)
        return original(self, *args, **kwargs)

    tf.distribute.ReplicaContext.all_reduce = counting
    try:
        with strategy.scope():
            population_pass._finish.get_concrete_function()
    finally:
        tf.distribute.ReplicaContext.all_reduce = original
    assert len(counts) == 2 * 4  # traced once per replica: the gather+merge and the tallies


def test_the_pass_step_is_kept_out_of_xla_auto_clustering(mirrored_strategy):
    """Every op the step traces, on every replica, is marked _XlaCompile=False: under
    TF_XLA_FLAGS auto-clustering a pass that runs once would spend most of its time
    compiling (on 4 CPU replicas, 67 s of CPU against 29 s for the demo's pass)."""
    with mirrored_strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                  kerasbn_bn(synchronized=True)])
        population_pass = statistics.PopulationPass(model)
        dataset = mirrored_strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(np.zeros((8, 4), np.float32)).batch(8))
        graph = population_pass._step.get_concrete_function(dataset.element_spec).graph

    def marked(op):
        try:
            return op.get_attr("_XlaCompile") is False
        except ValueError:
            return False

    unmarked = [op.type for op in graph.get_operations()
                if not marked(op) and op.type != "Placeholder"]
    assert not unmarked
    devices = {op.device for op in graph.get_operations() if op.type == "AddV2"}
    assert len(devices) == 4  # the replicas' ops, traced in their own threads


# ------------------------------------------------------------------ several workers


WORKER = os.path.join(os.path.dirname(__file__), "statistics_worker.py")
WORKER_TIMEOUT = 180  # seconds, for each worker process


def test_two_workers_get_identical_population_statistics(rng, tmp_path):
    """MultiWorkerMirroredStrategy over 2 processes: a plain dataset (auto-sharded) and a
    distributed one (each worker reads its own shard); identical bits on both workers,
    equal to the single-process float64 population."""
    from statistics_worker import BATCH, build_model

    model = build_model()
    weights = model.get_weights()
    x = (rng.standard_normal((BATCH * 4 + 3, 6)) * 3 + 2).astype(np.float32)
    inputs = {"x": x, "num_weights": len(weights),
              **{f"weight_{i}": w for i, w in enumerate(weights)}}
    input_path = str(tmp_path / "input.npz")
    np.savez(input_path, **inputs)
    outputs = [str(tmp_path / f"output_{i}.npz") for i in range(2)]
    workers.run_workers([[sys.executable, WORKER, input_path, output] for output in outputs],
                        str(tmp_path), WORKER_TIMEOUT)
    results = [dict(np.load(path)) for path in outputs]

    names = [layer.name for layer in model.layers if statistics.is_batch_norm(layer)]
    batches = [x[i:i + BATCH] for i in range(0, len(x), BATCH)]
    clone = keras.models.clone_model(model)
    clone.set_weights(weights)
    probe = keras.Model(clone.inputs[0],
                        [layer_input(clone.get_layer(name)) for name in names])
    captured = [np.concatenate(values) for values in
                zip(*[[np.asarray(v, np.float64) for v in probe(b, training=True)]
                      for b in batches])]
    for kind in ("plain", "distributed"):
        assert int(results[0][f"{kind}_examples"]) == len(x)
        for name, values in zip(names, captured):
            for key in ("moving_mean", "moving_variance"):
                field = f"{kind}_{name}_{key}"
                np.testing.assert_array_equal(results[0][field], results[1][field])
            _, mean, variance = expected_moments(values)
            got_mean = results[0][f"{kind}_{name}_moving_mean"]
            got_variance = results[0][f"{kind}_{name}_moving_variance"]
            assert np.all(np.abs(got_mean - mean) < RTOL * (np.abs(mean) + np.sqrt(variance)))
            assert np.all(np.abs(got_variance - variance) < RTOL * variance), (kind, name)
    assert int(results[0]["finish_collectives"]) == 2


# ------------------------------------------------------------------ population vs update_bn


def test_population_variance_against_averaged_batch_variances_on_digits(capsys):
    """The number README quotes: on the digits (sklearn's 1797 8×8 images, pixels / 16)
    through a Dense(32) with a fixed seed, at batch 64 (the training program's), the
    variance of the batch means σ²_between as a fraction of the population variance, and
    how far `torch.optim.swa_utils.update_bn`'s estimate (the plain average of the
    batches' unbiased variances) is from the population's unbiased variance.

        pytest tests/test_statistics.py -k digits -s
    """
    from sklearn.datasets import load_digits

    pixels = (load_digits().data / 16.0).astype(np.float32)
    keras.utils.set_random_seed(13)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="dense"),
                              kerasbn_bn(name="bn", bessel_correction=True)])
    lines = []
    for order in ("shipped", "shuffled"):
        x = pixels if order == "shipped" else pixels[np.random.default_rng(0).permutation(
            len(pixels))]
        for batch_size in (64, 256):
            kerasbn.recompute_statistics(model, x, batch_size=batch_size, verbose=0)
            h = np.asarray(model.get_layer("dense")(x), np.float64)
            batches = [h[i:i + batch_size] for i in range(0, len(h), batch_size)]
            n = np.array([len(b) for b in batches], np.float64)[:, None]
            means = np.stack([b.mean(0) for b in batches])
            variances = np.stack([b.var(0) for b in batches])
            total = n.sum()
            population = h.var(0)
            within = (n * variances).sum(0) / total
            between = (n * (means - h.mean(0)) ** 2).sum(0) / total
            np.testing.assert_allclose(within + between, population, rtol=1e-12)
            unbiased = population * total / (total - 1)
            # recompute_statistics gives the population's (unbiased, bessel) variance
            assert reference.relative_error(
                model.get_layer("bn").moving_variance.numpy(), unbiased) < RTOL
            update_bn = np.mean(variances * n / (n - 1), axis=0)
            fraction = between / population
            gap = update_bn / unbiased - 1
            lines.append(
                f"{order:8s} batch {batch_size:3d} (last {int(n[-1, 0]):2d}): "
                f"σ²_between/σ² "
                f"median {np.median(fraction):.2%} (max {fraction.max():.2%}); update_bn vs "
                f"population: median {np.median(gap):+.2%} "
                f"(range {gap.min():+.2%} .. {gap.max():+.2%})")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_recomputing_many_models_logs_no_retracing_warning(rng, tensorflow_log):
    """One process recomputing several models (e.g. a sweep) is not warned of retracing."""
    x = rng.standard_normal((64, 5)).astype(np.float32)
    for _ in range(7):
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                                  kerasbn.BatchNormalization()])
        kerasbn.recompute_statistics(model, x, verbose=0)
    assert not [m for m in tensorflow_log if "retracing" in m]


def test_a_second_recompute_reuses_the_traced_pass_and_keeps_no_model_alive(rng):
    model = build_model(kerasbn_bn)
    data = make_data(rng, 50)
    kerasbn.recompute_statistics(model, data, batch_size=16, verbose=0)
    population_pass = statistics._PASSES[model][False]
    traces = population_pass._step.experimental_get_tracing_count()
    randomize_statistics(model, rng)
    kerasbn.recompute_statistics(model, data, batch_size=16, verbose=0)
    assert statistics._PASSES[model][False] is population_pass
    assert population_pass._step.experimental_get_tracing_count() == traces
    assert_model_statistics(model, data, 16)
    # A changed trainable flag is a different pass.
    model.get_layer(BN_NAMES[0]).trainable = False
    kerasbn.recompute_statistics(model, data, batch_size=16, verbose=0)
    assert statistics._PASSES[model][False] is not population_pass
    alive = weakref.ref(model)
    del model, population_pass
    gc.collect()
    assert alive() is None
