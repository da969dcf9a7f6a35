"""What the benchmark times: each function builds something and returns a callable that
runs it once and fetches a result to Python (on CPU: the work is done); and, untimed,
the statistics each layer records for one batch (the accuracy section).

Layer calls of kerasbn, Keras 3 (with and without XLA), tf_keras and PyTorch, with and
without virtual batches; copies of x (the bandwidth floor); a synchronized SGD step on
replicas; a ResNet train step; population-statistics passes and training-mode forward
passes; a SavedModel's serving signature. (The first_step section's fresh processes are
`first_step.py`'s.)
"""

import os

import keras
import numpy as np
import tensorflow as tf

import kerasbn
from kerasbn import fused_kernel
from kerasbn.export import export_saved_model
from kerasbn.statistics import PopulationPass
from training.benchmark.config import (COPIES, EPSILON, LEAST_EXACT_TRAINING, LEAST_INFERENCE,
                                      MOMENTUM, NUM_CLASSES)
from training.benchmark.harness import OURS, REFERENCE, THEIRS, Contender
from training.benchmark.optional import tf_keras, torch
from training.models import build_model

# ------------------------------------------------------------------ accuracy


def one_batch_statistics(x_np):
    """What each layer records for one batch: its moving mean and variance after one
    training call on `x_np` (NHWC, float32) with a momentum that keeps only the batch
    (0; PyTorch's 1), in float64, the variance biased (tf_keras's fused layer and
    PyTorch record it times n/(n - 1), which is undone).

    Returns:
        A list of (name, role, mean, variance): kerasbn, Keras 3, and tf_keras (fused)
        and PyTorch (channels-last) when they are installed.
    """
    x = tf.constant(x_np)
    n = x_np.size // x_np.shape[-1]
    unbiased = n / (n - 1)
    layers = [("kerasbn", OURS, kerasbn.BatchNormalization, 1.0),
              ("keras", THEIRS, keras.layers.BatchNormalization, 1.0)]
    if tf_keras is not None:
        def fused(**options):
            return tf_keras.layers.BatchNormalization(fused=True, **options)

        layers.append(("tf_keras", THEIRS, fused, unbiased))
    recorded = []
    for name, role, make, factor in layers:
        layer = make(momentum=0.0, epsilon=EPSILON)
        layer(x, training=True)
        recorded.append((name, role, layer.moving_mean.numpy().astype(np.float64),
                         layer.moving_variance.numpy().astype(np.float64) / factor))
    if torch is not None:
        bn = torch.nn.BatchNorm2d(x_np.shape[-1], eps=EPSILON, momentum=1.0).train()
        with torch.no_grad():
            bn(torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(
                memory_format=torch.channels_last))
        recorded.append(("torch channels-last", THEIRS, bn.running_mean.double().numpy(),
                         bn.running_var.double().numpy() / unbiased))
    return recorded


# ------------------------------------------------------------------ one layer


def tf_layer_call(layer, x, dy, training, xla):
    """One training step or inference call of a TensorFlow-backed layer.

    The training step is the forward pass in training mode (moving statistics
    updated) and the gradients of x, gamma and beta for the upstream gradient `dy`.

    Args:
        layer: a batch-norm layer with `gamma` and `beta` (Keras 3 or tf_keras).
        x, dy: the input and the upstream gradient, `tf.Tensor`s.
        training: a training step if True, else an inference call.
        xla: whether the `tf.function` is compiled whole (`jit_compile`).

    Returns:
        A callable that runs the step once and fetches a small result.
    """
    layer(x, training=False)  # builds the weights outside the traced function
    if training:
        @tf.function(jit_compile=xla)
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            dx, dgamma, dbeta = tape.gradient(
                y, [x, layer.gamma, layer.beta], output_gradients=dy)
            return y, dx, dgamma, dbeta

        return lambda: step(x, dy)[2].numpy()

    @tf.function(jit_compile=xla)
    def infer(x):
        y = layer(x, training=False)
        return y, y[(0,) * len(x.shape)]

    return lambda: infer(x)[1].numpy()


def torch_layer_call(x_np, dy_np, axis, training, memory_format, threads):
    """The same with `torch.nn.BatchNorm1d/2d` on `threads` threads.

    NHWC data (4-D, `axis` the last) is seen as N, C, H, W in the given memory
    format (channels-last is NHWC's own layout).

    Returns:
        A callable that runs the step once and fetches a small result.
    """

    def tensor(array):
        t = torch.from_numpy(array)
        if array.ndim == 4 and axis % 4 == 3:
            t = t.permute(0, 3, 1, 2)
        return t.to(memory_format=memory_format, copy=True)

    x, dy = tensor(x_np), tensor(dy_np)
    layer_class = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d
    bn = layer_class(x.shape[1], eps=EPSILON, momentum=1.0 - MOMENTUM).train(training)
    if training:
        x.requires_grad_(True)

        def run():
            y = bn(x)
            _, dgamma, _ = torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)
            return dgamma[0].item()
    else:
        def run():
            with torch.inference_mode():
                return bn(x)[(0,) * x.dim()].item()

    def call():
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(default)

    return call


def torch_contenders(x_np, dy_np, axis, training):
    """PyTorch's layer in each memory format, on all threads and on one (none if
    PyTorch is not installed)."""
    if torch is None:
        return []
    formats = ([("torch NCHW", torch.contiguous_format),
                ("torch channels-last", torch.channels_last)] if x_np.ndim == 4
               else [("torch", torch.contiguous_format)])
    threads = torch.get_num_threads()
    contenders = []
    for name, memory_format in formats:
        for n in dict.fromkeys([threads, 1]):
            contenders.append(Contender(
                name + ("" if n == threads else " 1 thread"), THEIRS,
                lambda f=memory_format, n=n: torch_layer_call(
                    x_np, dy_np, axis, training, f, n)))
    return contenders


def layer_contenders(x_np, dy_np, axis, training):
    """Every contender of the layer section for one input and mode.

    kerasbn as it comes (jit_compile="auto"), compiled whole, and with jit_compile
    True and False; Keras 3 with and without XLA; tf_keras and PyTorch when they are
    installed.
    """
    x, dy = tf.constant(x_np), tf.constant(dy_np)
    options = {"axis": axis, "epsilon": EPSILON, "momentum": MOMENTUM}

    def tf_layer(make_layer, xla=False):
        return lambda: tf_layer_call(make_layer(), x, dy, training, xla)

    contenders = [
        Contender("kerasbn", OURS, tf_layer(lambda: kerasbn.BatchNormalization(**options))),
        Contender("kerasbn XLA", OURS,
                  tf_layer(lambda: kerasbn.BatchNormalization(**options), xla=True)),
        Contender("kerasbn jit_compile=True", OURS, tf_layer(
            lambda: kerasbn.BatchNormalization(jit_compile=True, **options))),
        Contender("kerasbn jit_compile=False", OURS, tf_layer(
            lambda: kerasbn.BatchNormalization(jit_compile=False, **options))),
        Contender("keras", THEIRS, tf_layer(lambda: keras.layers.BatchNormalization(**options))),
        Contender("keras XLA", THEIRS,
                  tf_layer(lambda: keras.layers.BatchNormalization(**options), xla=True)),
    ]
    if tf_keras is not None:
        fused = True if x_np.ndim == 4 else None  # None: tf_keras's own choice
        contenders.append(Contender("tf_keras", THEIRS, tf_layer(
            lambda: tf_keras.layers.BatchNormalization(fused=fused, **options))))
    return contenders + torch_contenders(x_np, dy_np, axis, training)


def ghost_contenders(x_np, dy_np, virtual_batch_size):
    """The ghost section's training steps on an NHWC input: kerasbn with virtual
    batches of `virtual_batch_size` and without, and tf_keras's layer with the same
    virtual batches when tf_keras is installed."""
    x, dy = tf.constant(x_np), tf.constant(dy_np)
    options = {"epsilon": EPSILON, "momentum": MOMENTUM}

    def step(make_layer):
        return lambda: tf_layer_call(make_layer(), x, dy, training=True, xla=False)

    contenders = [
        Contender(f"kerasbn vbs={virtual_batch_size}", OURS, step(
            lambda: kerasbn.BatchNormalization(virtual_batch_size=virtual_batch_size,
                                               **options))),
        Contender("kerasbn", OURS, step(lambda: kerasbn.BatchNormalization(**options)))]
    if tf_keras is not None:
        contenders.append(Contender(f"tf_keras vbs={virtual_batch_size}", THEIRS, step(
            lambda: tf_keras.layers.BatchNormalization(
                virtual_batch_size=virtual_batch_size, **options))))
    return contenders


def copy_contenders(x_np):
    """Copies of an array the size of x (references): the bandwidth floor."""

    def numpy_copy():
        out = np.empty_like(x_np)
        return lambda: np.copyto(out, x_np)

    def tf_copy():
        x = tf.constant(x_np)
        copy = tf.function(lambda a: tf.raw_ops.DeepCopy(x=a)[(0,) * a.shape.rank])
        return lambda: copy(x).numpy()

    return [Contender(name, REFERENCE, make) for name, make in zip(COPIES, (numpy_copy, tf_copy))]


def least_inference_contenders(x_np, axis):
    """The least a batch norm called as it comes (an ordinary `tf.function`, not
    compiled whole) can cost at inference (references): y = a·x + b, with a and b
    computed in the call from four per-channel variables (moving mean and variance, γ,
    β), as plain TensorFlow ops, and with y as one XLA program (what kerasbn does from
    1M values)."""
    x = tf.constant(x_np)
    channels = x_np.shape[axis]
    shape = [1] * x_np.ndim
    shape[axis] = channels

    def make(y_in_xla):
        rng = np.random.default_rng(0)
        mean, variance, gamma, beta = (
            tf.Variable(rng.uniform(0.5, 1.5, channels).astype(np.float32))
            for _ in range(4))
        affine = tf.function(lambda x, a, b: x * a + b, jit_compile=True)

        @tf.function
        def infer(x):
            a = tf.math.rsqrt(variance + EPSILON) * gamma
            a, b = tf.reshape(a, shape), tf.reshape(beta - mean * a, shape)
            y = affine(x, a, b) if y_in_xla else x * a + b
            return y, y[(0,) * x.shape.rank]  # y an output, as in `tf_layer_call`

        return lambda: infer(x)[1].numpy()

    return [Contender(name, REFERENCE, lambda y_in_xla=y_in_xla: make(y_in_xla))
            for name, y_in_xla in zip(LEAST_INFERENCE, (False, True))]


def least_exact_training(x_np, dy_np, axis):
    """The least a training step with exact statistics costs on TensorFlow's fused
    kernels (a reference, channels-last inputs only; none otherwise): the batch's mean
    and variance given for free, computed before timing in float64, then what
    kerasbn's fused path runs (`kerasbn.fused_kernel.forward` and `gradient`:
    `FusedBatchNormV3` in its inference form, `FusedBatchNormGradV3` in its training
    form), no moving statistics updated. A layer that computes its statistics exactly
    costs at least this; tf_keras's fused layer computes them inside the kernel."""
    if axis not in (-1, x_np.ndim - 1):
        return []
    channels = x_np.shape[-1]
    image = tf.constant(x_np.reshape(-1, 1, 1, channels) if x_np.ndim != 4 else x_np)
    dy = tf.reshape(tf.constant(dy_np), image.shape)
    rows = x_np.reshape(-1, channels).astype(np.float64)
    mean, variance = (tf.constant(t.astype(np.float32)) for t in (rows.mean(0), rows.var(0)))
    gamma, beta = tf.Variable(tf.ones(channels)), tf.Variable(tf.zeros(channels))

    def make():
        @tf.function
        def step(x, dy):
            y = fused_kernel.forward(x, mean, variance, gamma, beta, epsilon=EPSILON)
            dx, dgamma, dbeta = fused_kernel.gradient(dy, x, mean, variance, gamma,
                                                      epsilon=EPSILON)
            return y, dx, dgamma, dbeta

        return lambda: step(image, dy)[2].numpy()

    return [Contender(LEAST_EXACT_TRAINING, REFERENCE, make)]


# ------------------------------------------------------------------ models


def conv_net(image_shape, blocks, make_bn):
    """`blocks` times conv -> batch norm -> ReLU (pooling between), then a classifier."""
    layers = [keras.Input(image_shape)]
    for block in range(blocks):
        if block:
            layers.append(keras.layers.MaxPooling2D())
        layers += [keras.layers.Conv2D(32, 3, padding="same", use_bias=False), make_bn(),
                   keras.layers.ReLU()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(NUM_CLASSES)]
    return keras.Sequential(layers)


def distributed_step(strategy, model, x_np, y_np):
    """A callable running one custom-loop SGD step of `model` under `strategy`, the
    global batch split evenly over the replicas, and fetching the loss."""
    with strategy.scope():
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)
    per_replica = len(x_np) // strategy.num_replicas_in_sync

    def shard(array):
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(array[
                context.replica_id_in_sync_group * per_replica:
                (context.replica_id_in_sync_group + 1) * per_replica]))

    x, y = shard(x_np), shard(y_np)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / len(x_np)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    return lambda: step(x, y).numpy()


class UnsynchronizedWithExchanges(kerasbn.BatchNormalization):
    """The unsynchronized layer plus the two exchanges of a synchronized one and nothing
    else: in training, an all-reduce of [replicas, 4, channels] (the moments' gather)
    after the forward pass and one of [2, channels] (the backward's two sums) in the
    backward pass, each tied to the data by a control dependency. What synchronization
    costs a step at least, over the unsynchronized layer, with the replicas' exchanges
    as TensorFlow runs them here (a reference of the sync section)."""

    def call(self, inputs, training=None, mask=None):
        outputs = super().call(inputs, training=training, mask=mask)
        context = tf.distribute.get_replica_context()
        if not training or context is None or context.num_replicas_in_sync == 1:
            return outputs
        channels, replicas = inputs.shape[-1], context.num_replicas_in_sync

        def exchange(shape, after):
            value = tf.zeros(shape) + tf.reshape(after, [-1])[0]  # waits for `after`
            with tf.control_dependencies([context.all_reduce("SUM", value)]):
                return tf.identity(after)

        @tf.custom_gradient
        def exchanged(y):
            return (exchange([replicas, 4, channels], y),
                    lambda dy: exchange([2, channels], dy))

        return exchanged(outputs)


def sync_step(strategy, layer_class, synchronized, image, blocks, x_np, y_np):
    """A `make` for the sync section: `conv_net` with `layer_class` batch norms,
    built under `strategy`, stepped by `distributed_step`."""
    def make():
        with strategy.scope():
            model = conv_net(image, blocks, lambda: layer_class(
                synchronized=synchronized, epsilon=EPSILON, momentum=MOMENTUM))
        return distributed_step(strategy, model, x_np, y_np)
    return make


def resnet_step(bn, xla, image, weights, x, y):
    """A `make` for the resnet section: training.models' ResNet with batch norm `bn`
    ("kerasbn" or "keras") and the given weights, compiled (XLA if `xla`), one
    `train_on_batch` a call."""
    def make():
        model = build_model("resnet", image, NUM_CLASSES, bn=bn)
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss="sparse_categorical_crossentropy", jit_compile=xla)
        return lambda: model.train_on_batch(x, y)
    return make


def statistics_contenders(image, weights, x_np, batch):
    """The statistics section's passes over `x_np` in batches of `batch`, each on its
    own copy of the ResNet (bn="kerasbn", the given weights).

    `kerasbn.recompute_statistics` as a user calls it (a new `PopulationPass` a
    call), one `PopulationPass` run again and again (as `kerasbn.callbacks` does),
    and a `tf.function` calling the model in training mode on every batch (moving
    statistics updated, as in a training step's forward pass).
    """
    dataset = tf.data.Dataset.from_tensor_slices(x_np).batch(batch)
    batches = len(x_np) // batch

    def model():
        built = build_model("resnet", image, NUM_CLASSES, bn="kerasbn")
        built.set_weights(weights)
        return built

    def recompute():
        resnet = model()
        return lambda: kerasbn.recompute_statistics(resnet, dataset, batches, verbose=0)

    def reused_pass():
        population_pass = PopulationPass(model())
        return lambda: population_pass.run(dataset, batches, verbose=0)

    def forward():
        resnet = model()
        step = tf.function(lambda x: resnet(x, training=True))

        def run():
            for x in dataset:
                y = step(x)
            return y[0, 0].numpy()
        return run

    return [Contender("recompute_statistics", OURS, recompute),
            Contender("PopulationPass reused", OURS, reused_pass),
            Contender("training forward", THEIRS, forward)]


# ------------------------------------------------------------------ exports


def serving_call(path):
    """A callable x -> output (fetched) of the SavedModel's serving signature."""
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1]

    def call(x):
        return next(iter(signature(**{input_name: x}).values())).numpy()

    call.loaded = loaded  # keeps the restored objects alive
    return call


def kerasbn_export(model, directory, fold):
    """A callable that exports `model` with `kerasbn.export.export_saved_model` into
    `directory` (unverified) and returns its `serving_call`."""
    return lambda: serving_call(export_saved_model(model, directory, fold=fold,
                                                   verify=False))


def keras_export(model, directory):
    """A callable that exports `model` with Keras's `model.export` into `directory`
    and returns its `serving_call`."""
    def export():
        model.export(directory, verbose=False)
        return serving_call(directory)
    return export


def export_contenders(model, image, workdir, export_all):
    """(name, role, export) triples for the export section: `export()` writes a
    SavedModel under `workdir` and returns its `serving_call`.

    Our folded export of `model` against Keras's export of it; with `export_all`,
    also Keras's export of a stock-BN twin (same weights), our unfolded export and
    the model without batch norm (references).
    """
    exports = [
        ("kerasbn export folded", OURS,
         kerasbn_export(model, os.path.join(workdir, "folded"), True)),
        ("keras export", THEIRS, keras_export(model, os.path.join(workdir, "keras")))]
    if export_all:
        twin = build_model("resnet", image, NUM_CLASSES, bn="keras")
        twin.set_weights(model.get_weights())
        no_bn = build_model("resnet", image, NUM_CLASSES, bn="none")
        exports += [
            ("keras export, stock BN", THEIRS,
             keras_export(twin, os.path.join(workdir, "keras_stock_bn"))),
            ("kerasbn export unfolded", REFERENCE,
             kerasbn_export(model, os.path.join(workdir, "unfolded"), False)),
            ("no BN, kerasbn export", REFERENCE,
             kerasbn_export(no_bn, os.path.join(workdir, "no_bn"), True))]
    return exports
