"""Swap the stock Keras BatchNormalization layers of a model for kerasbn's."""

import inspect

import keras

from kerasbn import _graph
from kerasbn.layer import BatchNormalization


def convert_to_kerasbn(model, synchronized=True, **layer_options):
    """Returns a copy of `model` whose batch norms are `kerasbn.BatchNormalization` layers.

    Every `keras.layers.BatchNormalization` (and every subclass of it) becomes a
    `kerasbn.BatchNormalization` with the same arguments (axis, momentum, epsilon,
    center, scale, initializers, regularizers, constraints, renorm settings, name,
    dtype policy, trainable) and the same weights, with `synchronized` and
    `layer_options` set as asked. kerasbn layers already in the model keep their
    configuration and weights, except `synchronized` (and `sync_group_size`, dropped
    when `synchronized=False`) and `layer_options`. Every other layer is copied with
    its weights, so the copy computes exactly what the original does, in inference and
    in training mode. This is Keras's counterpart of PyTorch's
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Sequential and functional models are converted, with the Sequential and
    functional models nested in them and the operations Keras records that are not
    layers (`x + 3.0`, `keras.ops` calls, masks). The copy keeps the model's input,
    layer and output names; it is compiled as the original was (as with
    `keras.models.clone_model`), and the original is left unchanged. To train the copy
    under a `tf.distribute` strategy, call this function inside `strategy.scope()` so
    that the new variables are created as distributed ones, then compile the copy.

    Args:
        model: a `keras.Model` built with the Sequential or functional API.
        synchronized: the `synchronized` argument of every batch norm of the copy:
            True to compute statistics over the global batch of all replicas.
        **layer_options: further arguments of `kerasbn.BatchNormalization` that
            `keras.layers.BatchNormalization` does not have (for example
            `bessel_correction=True` or `jit_compile=False`), given to every batch
            norm of the copy. The layer's constructor checks them.

    Returns:
        A new `keras.Model`.

    Raises:
        TypeError: when `model` is not a `keras.Model`.
        ValueError: when `model` is a subclassed model, whose layers cannot be
            replaced from outside; when a layer option is an argument of
            `keras.layers.BatchNormalization` (which each layer keeps), is unknown to
            `kerasbn.BatchNormalization`, or has a value it refuses.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy()
    >>> base = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))
    >>> with strategy.scope():
    ...     model = kerasbn.convert_to_kerasbn(base, synchronized=True)
    ...     model.compile(optimizer="sgd", loss="categorical_crossentropy")
    """
    _graph.check_model(
        model, "convert_to_kerasbn", built=False,
        subclassed_hint="Build its batch norms with "
                        "kerasbn.BatchNormalization(synchronized=...) instead.")
    synchronized = bool(synchronized)
    _check_layer_options(synchronized, layer_options)

    def replace(layer, path):
        if not _graph.is_batch_norm(layer):
            return None
        config = layer.get_config()
        config["synchronized"] = synchronized
        if isinstance(layer, BatchNormalization) and not synchronized:
            config["sync_group_size"] = None
        config.update(layer_options)
        return _graph.Replacement(BatchNormalization.from_config(config),
                                  {weight.name: weight.numpy() for weight in layer.weights})

    converted = _graph.rebuild(model, replace, "convert_to_kerasbn")
    _graph.warn_hidden_batch_norms(
        converted, "convert_to_kerasbn", "batch norms", "they were copied unchanged.",
        predicate=_is_keras_batch_norm)
    return converted


def _is_keras_batch_norm(layer):
    return (isinstance(layer, keras.layers.BatchNormalization)
            and not isinstance(layer, BatchNormalization))


def _keras_arguments():
    """The arguments of keras.layers.BatchNormalization and of every Keras layer."""
    parameters = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    return set(parameters) - {"self", "kwargs"} | {"name", "dtype", "trainable", "autocast"}


def _check_layer_options(synchronized, layer_options):
    """Refuses Keras's own arguments; the constructor of a layer checks the rest."""
    kept = sorted(set(layer_options) & _keras_arguments())
    if kept:
        name = kept[0]
        raise ValueError(
            "convert_to_kerasbn: layer options must be arguments that only "
            f"kerasbn.BatchNormalization has; received {name}={layer_options[name]!r}, "
            "an argument of keras.layers.BatchNormalization, which every converted layer "
            "keeps from the layer it replaces.")
    if not layer_options:
        return
    try:  # refused here even when the model has no batch norm
        BatchNormalization(synchronized=synchronized, name="convert_to_kerasbn_options",
                           **layer_options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"convert_to_kerasbn: layer options {layer_options!r}: "
                          f"{error}") from None
