"""Swap the stock Keras BatchNormalization layers of a model for kerasbn's."""

import warnings

import keras

from kerasbn.layer import BatchNormalization

# Keras's layer and ours share these weights by name; ours may add none that Keras lacks.
_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev",
                 "renorm_mean", "renorm_stddev")


def convert_to_kerasbn(model, synchronized=True):
    """Returns a copy of `model` whose batch norms are `kerasbn.BatchNormalization` layers.

    Every `keras.layers.BatchNormalization` (and every subclass of it) becomes a
    `kerasbn.BatchNormalization` with the same arguments (axis, momentum, epsilon,
    center, scale, initializers, regularizers, constraints, renorm settings, name,
    dtype policy, trainable) and the same weights, with `synchronized` set as asked.
    kerasbn layers already in the model keep their configuration and weights, except
    `synchronized` (and `sync_group_size`, dropped when `synchronized=False`). Every
    other layer is copied with its weights, so the copy computes exactly what the
    original does, in inference and in training mode. This is Keras's counterpart of
    PyTorch's `torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Sequential and functional models are converted, with the Sequential and
    functional models nested in them. The copy is a new, uncompiled model; the
    original is left unchanged. To train the copy under a `tf.distribute` strategy,
    call this function inside `strategy.scope()` so that the new variables are
    created as distributed ones, then compile the copy.

    Args:
        model: a `keras.Model` built with the Sequential or functional API.
        synchronized: the `synchronized` argument of every batch norm of the copy:
            True to compute statistics over the global batch of all replicas.

    Returns:
        A new `keras.Model`.

    Raises:
        TypeError: when `model` is not a `keras.Model`.
        ValueError: when `model` is a subclassed model, whose layers cannot be
            replaced from outside.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy()
    >>> base = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))
    >>> with strategy.scope():
    ...     model = kerasbn.convert_to_kerasbn(base, synchronized=True)
    ...     model.compile(optimizer="sgd", loss="categorical_crossentropy")
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "convert_to_kerasbn: argument `model` must be a keras.Model (Sequential or "
            f"functional); received model={model!r} of type {type(model).__name__}."
        )
    if not _is_graph_model(model):
        raise ValueError(
            "convert_to_kerasbn: argument `model` must be a Sequential or functional "
            f"model; received the subclassed model {model.name!r} of type "
            f"{type(model).__name__}, whose layers cannot be replaced from outside. "
            "Build its batch norms with kerasbn.BatchNormalization(synchronized=...) "
            "instead."
        )
    synchronized = bool(synchronized)
    pairs = []  # (original layer, its copy): the weights to carry over

    def clone_layer(layer):
        copy = _converted(layer, synchronized)
        pairs.append((layer, copy))
        return copy

    converted = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    for original, copy in pairs:
        _copy_weights(original, copy)
    missed = [
        layer.name for layer in converted._flatten_layers(include_self=False)
        if _is_keras_batch_norm(layer)
    ]
    if missed:
        warnings.warn(
            f"convert_to_kerasbn: the batch norms {missed} sit inside custom layers or "
            "subclassed models, whose structure is not visible from outside; they were "
            "copied unchanged.",
            stacklevel=2,
        )
    return converted


def _is_graph_model(model):
    """True for Sequential and functional models (the ones `clone_model` can rebuild)."""
    return isinstance(model, keras.Sequential) or (
        hasattr(model, "_operations") and hasattr(model, "_nodes_by_depth")
    )


def _is_keras_batch_norm(layer):
    return (isinstance(layer, keras.layers.BatchNormalization)
            and not isinstance(layer, BatchNormalization))


def _converted(layer, synchronized):
    """The copy of one layer: a kerasbn batch norm for a batch norm, else a clone."""
    if _is_keras_batch_norm(layer):
        config = layer.get_config()
        config["synchronized"] = synchronized
        return BatchNormalization.from_config(config)
    if isinstance(layer, BatchNormalization):
        config = layer.get_config()
        config["synchronized"] = synchronized
        if not synchronized:
            config["sync_group_size"] = None
        return BatchNormalization.from_config(config)
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(original, copy):
    if not original.weights:
        return
    if isinstance(copy, BatchNormalization):
        values = {w.name: w.numpy() for w in original.weights}
        unknown = set(values) - set(_WEIGHT_NAMES)
        if unknown:
            raise ValueError(
                f"convert_to_kerasbn: layer {original.name!r} has weights "
                f"{sorted(unknown)} that kerasbn.BatchNormalization does not have."
            )
        for weight in copy.weights:
            weight.assign(values[weight.name])
        return
    copy.set_weights(original.get_weights())
