"""The models of the training programs, each with kerasbn, stock Keras or no batch norm.

    model = build_model("resnet", (8, 8, 1), 10, bn="kerasbn", synchronized=True)
    ghost = build_model("mlp", (8, 8, 1), 10, bn="kerasbn", virtual_batch_size=8)

- "resnet": a small residual network for small images. A stem (3×3 convolution → BN →
  ReLU), then stages of basic residual blocks (conv → BN → ReLU → conv → BN, added to
  the shortcut, → ReLU), each stage after the first halving the resolution with a
  strided convolution and a 1×1 projection (conv → BN) on the shortcut; global average
  pooling and a dense softmax. With the default widths (16, 32, 64), one block a stage,
  it has 78,426 weights for 8×8×1 inputs and 10 classes.
- "mlp": the network of the first experiment of Ioffe & Szegedy (2015, §4.1): three
  fully-connected hidden layers of 100 sigmoid units, batch norm before each
  nonlinearity, and a dense softmax.

Every model is functional, with named layers ("stem_conv", "stem_bn",
"stage2_block1_2_bn", "hidden1_bn", ..., "predictions"). Layers in front of a batch norm
have no bias (the norm's β is the bias); without batch norm ("none") they have one. The
"kerasbn" and "keras" variants of a model have the same layers and the same weights in
the same order, so `set_weights` copies one into the other; "none" has the same layers
less the batch norms. The softmax layer computes in float32 under mixed precision.

Importing this module does not import Keras or TensorFlow (the training program reads
`MODELS` and `BATCH_NORMS` before TensorFlow may start); building a model does.
"""

import numbers

MODELS = ("resnet", "mlp")
BATCH_NORMS = ("kerasbn", "keras", "none")

RESNET_WIDTHS = (16, 32, 64)
RESNET_BLOCKS_PER_STAGE = 1
MLP_UNITS = (100, 100, 100)


def build_model(name, input_shape, num_classes, bn, synchronized=False, *,
                bn_momentum=0.99, bn_jit_compile="auto", **bn_options):
    """Builds one of the models (see the module docstring).

    Args:
        name: "resnet" or "mlp".
        input_shape: the shape of one example, e.g. (8, 8, 1) (height, width,
            channels for the ResNet; any shape for the MLP, which flattens it).
        num_classes: the number of classes of the softmax.
        bn: "kerasbn" (`kerasbn.BatchNormalization`), "keras"
            (`keras.layers.BatchNormalization`) or "none" (no batch norm).
        synchronized: whether the batch norms compute their statistics over the
            global batch of all replicas (both "kerasbn" and "keras").
        bn_momentum: the batch norms' `momentum` (Keras's convention: the weight of
            the old value in the moving averages), checked by the layer.
        bn_jit_compile: the `jit_compile` argument of the kerasbn layers (whether
            they run their math as XLA programs); ignored for "keras" and "none".
        **bn_options: further keyword arguments of every batch-norm layer, checked
            by the layer: for "kerasbn" any of `kerasbn.BatchNormalization`'s (e.g.
            `virtual_batch_size=8`, `renorm=True`, `momentum_warmup=True`); for
            "keras" those `keras.layers.BatchNormalization` takes (e.g.
            `renorm=True`); none for "none".

    Returns:
        A functional `keras.Model` named after `name` and `bn`, e.g.
        "resnet_kerasbn", outputting class probabilities.

    Raises:
        ValueError: if `name`, `bn`, `input_shape` or `num_classes` is not allowed, an
            option in `bn_options` is not one of the `bn` layer's, or the layer
            refuses `bn_momentum` or an option (kerasbn's message names the argument,
            e.g. `momentum` or `virtual_batch_size`).
    """
    import keras

    if name not in MODELS:
        raise ValueError(f"build_model: argument `name` must be one of {list(MODELS)}; "
                         f"received name={name!r}.")
    if bn not in BATCH_NORMS:
        raise ValueError(f"build_model: argument `bn` must be one of "
                         f"{list(BATCH_NORMS)}; received bn={bn!r}.")
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        raise ValueError("build_model: argument `input_shape` must be a tuple of "
                         f"positive ints; received input_shape={input_shape!r}.") from None
    if not input_shape or not all(_is_int(d) and d > 0 for d in input_shape):
        raise ValueError("build_model: argument `input_shape` must be a tuple of "
                         f"positive ints; received input_shape={input_shape!r}.")
    if name == "resnet" and len(input_shape) != 3:
        raise ValueError("build_model: argument `input_shape` must be (height, width, "
                         f"channels) for the ResNet; received input_shape={input_shape!r}.")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError("build_model: argument `num_classes` must be an int >= 2; "
                         f"received num_classes={num_classes!r}.")
    _check_bn_options(bn, bn_options)
    norm = _batch_norm_factory(bn, bool(synchronized), bn_momentum, bn_jit_compile,
                               bn_options)
    builder = _resnet if name == "resnet" else _mlp
    inputs = keras.Input(tuple(int(d) for d in input_shape), name="images")
    outputs = builder(inputs, int(num_classes), norm)
    return keras.Model(inputs, outputs, name=f"{name}_{bn}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bn_options(bn, bn_options):
    """Refuses options the `bn` layer has no argument for (its own checks come later)."""
    import inspect

    import keras

    if not bn_options:
        return
    if bn == "none":
        raise ValueError(f"build_model: batch-norm options {sorted(bn_options)} need a "
                         f"batch norm; received bn='none' with {bn_options!r}.")
    if bn == "keras":
        accepted = {*inspect.signature(keras.layers.BatchNormalization.__init__).parameters,
                    *inspect.signature(keras.layers.Layer.__init__).parameters}
        unknown = sorted(set(bn_options) - accepted)
        if unknown:
            raise ValueError(
                f"build_model: {unknown} are not arguments of "
                "keras.layers.BatchNormalization (bn='keras'); use bn='kerasbn' for "
                f"kerasbn's options; received {bn_options!r}.")


def _batch_norm_factory(bn, synchronized, momentum, jit_compile, options):
    """A function name -> batch-norm layer, or None for "none"."""
    import keras

    import kerasbn

    if bn == "none":
        return None
    if bn == "keras":
        return lambda name: keras.layers.BatchNormalization(
            momentum=momentum, synchronized=synchronized, name=name, **options)
    return lambda name: kerasbn.BatchNormalization(
        momentum=momentum, synchronized=synchronized, jit_compile=jit_compile, name=name,
        **options)


def _conv_bn(x, filters, kernel_size, strides, norm, name, relu=True):
    import keras

    x = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=norm is None,
        kernel_initializer="he_normal", name=f"{name}_conv",
    )(x)
    if norm is not None:
        x = norm(f"{name}_bn")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _residual_block(x, filters, strides, norm, name):
    import keras

    shortcut = x
    y = _conv_bn(x, filters, 3, strides, norm, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, norm, f"{name}_2", relu=False)
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = _conv_bn(shortcut, filters, 1, strides, norm, f"{name}_shortcut",
                            relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _resnet(inputs, num_classes, norm):
    import keras

    x = _conv_bn(inputs, RESNET_WIDTHS[0], 3, 1, norm, "stem")
    for stage, filters in enumerate(RESNET_WIDTHS, start=1):
        for block in range(1, RESNET_BLOCKS_PER_STAGE + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _residual_block(x, filters, strides, norm, f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return _classifier(x, num_classes)


def _mlp(inputs, num_classes, norm):
    import keras

    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(MLP_UNITS, start=1):
        x = keras.layers.Dense(units, use_bias=norm is None, name=f"hidden{i}")(x)
        if norm is not None:
            x = norm(f"hidden{i}_bn")(x)
        x = keras.layers.Activation("sigmoid", name=f"hidden{i}_sigmoid")(x)
    return _classifier(x, num_classes)


def _classifier(x, num_classes):
    import keras

    # float32 under mixed precision: the softmax and the loss need the range.
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                              name="predictions")(x)
