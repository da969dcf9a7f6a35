"""The parts of a population-statistics pass (`kerasbn.statistics`) below the pass itself.

Argument errors; finding a model's batch norms; reading and writing their variables
component by component, and writing a layer's new statistics; turning `data` into
batches; patching the batch norms' `call` for the pass (training mode, statistics held,
the input's moments collected); and the moments of one replica's batch.
`kerasbn.statistics` holds the pass and what it returns.
"""

import functools
import inspect
import numbers

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _graph
from kerasbn import ops
from kerasbn import programs
from kerasbn._population_summary import LayerStatistics
from kerasbn.layer import BatchNormalization

DEFAULT_BATCH_SIZE = 32
# Layer attributes that, during the pass, keep the moving statistics where they are
# (so that renorm corrections, which read them in training, stay fixed): momentum 1
# is the exact identity of Keras's moving average, and the warm-up (kerasbn's
# `momentum_warmup`) would otherwise lower the momentum of early updates.
PASS_ATTRIBUTES = (("momentum", 1.0), ("renorm_momentum", 1.0), ("momentum_warmup", False))


# ---------------------------------------------------------------------- errors


def argument_error(argument, value, allowed, detail=""):
    shown = _describe(value)
    return ValueError(f"recompute_statistics: argument `{argument}` must be {allowed}; "
                      f"received {argument}={shown}.{' ' + detail if detail else ''}")


def _describe(value):
    """A short description of an argument: arrays by type, shape and dtype, else its repr."""
    def short(item):
        if hasattr(item, "shape") and hasattr(item, "dtype") and not isinstance(
                item, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            return f"{type(item).__name__}(shape={tuple(item.shape)}, dtype={item.dtype})"
        return item

    if isinstance(value, (dict, list, tuple)) or hasattr(value, "shape"):
        try:
            shown = tf.nest.map_structure(short, value)
            text = shown if isinstance(shown, str) else repr(shown).replace("'", "")
            text = text if isinstance(value, (dict, list, tuple)) else shown
            return text if len(text) <= 300 else text[:300] + "...>"
        except (TypeError, ValueError):
            pass
    text = " ".join(repr(value).split())
    return text if len(text) <= 200 else f"<{type(value).__name__}: {text[:160]}...>"


def shortened(error, limit=600):
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " [...]"


def check_arguments(steps, verbose, batch_size):
    if steps is not None and (not isinstance(steps, numbers.Integral)
                              or isinstance(steps, bool) or steps <= 0):
        raise argument_error("steps", steps, "None or an int > 0")
    if not (verbose == "auto" if isinstance(verbose, str) else (
            isinstance(verbose, numbers.Integral) and not isinstance(verbose, bool)
            and verbose in (0, 1, 2))):
        raise argument_error("verbose", verbose, 'one of "auto", 0, 1, 2')
    if batch_size is not None and (not isinstance(batch_size, numbers.Integral)
                                   or isinstance(batch_size, bool) or batch_size <= 0):
        raise argument_error("batch_size", batch_size, "None or an int > 0")


# ---------------------------------------------------------------------- batch norms


def all_layers(model):
    """`model` and every layer inside it, at any depth, each once (`_graph` holds the walk)."""
    return [model] + list(_graph.nested_layers(model))


is_batch_norm = _graph.is_batch_norm  # kerasbn's and Keras's BatchNormalization


def batch_norms(model, recompute_renorm=False):
    """The batch norms of `model` as a pass treats them; raises when there is nothing to do.

    Returns:
        `(recomputed, renorm_kept, frozen)`, lists of layers in model order: the
        trainable batch norms whose statistics the pass sets; the trainable renorm
        layers whose statistics it keeps (unless `recompute_renorm`); the frozen ones
        (`trainable=False`), kept.
    """
    if not isinstance(model, keras.layers.Layer):
        raise argument_error("model", model, "a Keras model or layer")
    norms = [layer for layer in all_layers(model) if is_batch_norm(layer)]
    name = getattr(model, "name", type(model).__name__)
    if not norms:
        raise argument_error(
            "model", f"<{type(model).__name__} '{name}'>",
            "a model holding at least one BatchNormalization layer (kerasbn's or "
            "Keras's), but it holds none")
    unbuilt = [layer.name for layer in norms if not layer.built
               or getattr(layer, "moving_mean", None) is None]
    if unbuilt:
        raise argument_error(
            "model", f"<{type(model).__name__} '{name}'>",
            "a built model", f"Its batch norms {unbuilt} are not built yet: call the "
            "model on a batch (or give it an Input) first.")
    trainable = [layer for layer in norms if layer.trainable]
    frozen = [layer for layer in norms if not layer.trainable]
    if not trainable:
        raise argument_error(
            "model", f"<{type(model).__name__} '{name}'>",
            "a model with at least one trainable batch norm",
            f"Every batch norm is frozen (trainable=False): {[l.name for l in frozen]}. "
            "Frozen batch norms run in inference mode in training and keep their "
            "statistics; set trainable=True on those to recompute.")
    kept = [] if recompute_renorm else [layer for layer in trainable if is_renorm(layer)]
    return [layer for layer in trainable if layer not in kept], kept, frozen


def is_renorm(layer):
    """Whether a batch norm uses Batch Renormalization (kerasbn's or Keras's `renorm`)."""
    return bool(getattr(layer, "renorm", False)) and hasattr(layer, "moving_stddev")


def strategy_of(model):
    """The `tf.distribute` strategy `model` runs under (the default one if none)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy if strategy is not None else tf.distribute.get_strategy()


# ---------------------------------------------------------------------- variables


def components(variable):
    """The per-device tf.Variables behind a Keras or TF variable (one when not distributed).

    A Keras variable keeps its TensorFlow variable in `.value`; under a strategy that is
    a distributed variable with one component per local replica. Reading and assigning
    the components directly is exact whatever the variable's aggregation (a
    cross-replica assign of a SUM on-read variable would divide the value).
    """
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if isinstance(value, tf.distribute.DistributedValues):
        return list(value.values)
    return [value]


def set_variable(variable, value):
    for component in components(variable):
        component.assign(np.asarray(value, component.dtype.as_numpy_dtype))


def read_variable(variable):
    """The value of `variable` as it is read outside the replicas (for an on-read
    variable that averages its copies, the average)."""
    return np.asarray(variable.numpy() if isinstance(variable, keras.Variable) else variable)


class Snapshot:
    """Every non-trainable variable of the batch norms, per component, to restore exactly."""

    def __init__(self, layers):
        self._saved = [(component, component.numpy())
                       for layer in layers for variable in layer.non_trainable_variables
                       for component in components(variable)]

    def restore(self):
        for component, value in self._saved:
            component.assign(value)


def set_statistics(layer, count, mean, variance, old_mean, old_variance):
    """Writes a layer's new statistics (channels with no value keep theirs).

    Args:
        layer: the batch norm.
        count, mean, variance: the population's, per channel (float64 NumPy arrays).
        old_mean, old_variance: the moving statistics before the pass.

    Returns:
        The layer's `LayerStatistics`: the values counted and how far its statistics
        moved.
    """
    epsilon = float(layer.epsilon)
    present = count > 0
    if not np.any(present):
        return LayerStatistics(layer.name, 0, 0.0, 0.0, updated=False)
    if getattr(layer, "bessel_correction", False):
        variance = variance * count / np.maximum(count - 1.0, 1.0)
    dtype = layer.moving_mean.dtype
    dtype = np.dtype(dtype if isinstance(dtype, str) else tf.as_dtype(dtype).as_numpy_dtype)
    new_mean = np.where(present, mean, old_mean).astype(dtype)
    if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
        old_stddev = read_variable(layer.moving_stddev)
        stddev = np.where(present, np.sqrt(variance + epsilon), old_stddev).astype(dtype)
        # As the layer keeps it: relu(moving_stddev² − ε), in the variable's dtype.
        new_variance = np.maximum(stddev * stddev - dtype.type(epsilon), 0).astype(dtype)
        set_variable(layer.moving_stddev, stddev)
        set_variable(layer.renorm_stddev,
                     np.where(present, stddev, read_variable(layer.renorm_stddev)))
        set_variable(layer.renorm_mean,
                     np.where(present, new_mean, read_variable(layer.renorm_mean)))
    else:
        new_variance = np.where(present, variance, old_variance).astype(dtype)
    set_variable(layer.moving_mean, new_mean)
    set_variable(layer.moving_variance, new_variance)
    new_mean64, new_variance64 = new_mean.astype(np.float64), new_variance.astype(np.float64)
    mean_change = np.abs(new_mean64 - old_mean) / np.sqrt(new_variance64 + epsilon)
    variance_change = np.abs(new_variance64 - old_variance) / (np.abs(old_variance) + epsilon)
    return LayerStatistics(layer.name, int(np.min(count[present])),
                           float(np.max(mean_change)), float(np.max(variance_change)))


# ---------------------------------------------------------------------- data


def is_distributed_dataset(data):
    # Both experimental_distribute_dataset's and distribute_datasets_from_function's.
    return isinstance(data, tf.distribute.DistributedDataset)


def as_dataset(data, batch_size, steps):
    """`data` as a tf.data.Dataset of batches (or a distributed dataset), and its length.

    Arrays, tensors, dicts of them, PyDatasets and generators go through Keras's own
    data adapters (a private module), so that they are batched and read exactly as
    `model.predict` reads them.
    """
    if is_distributed_dataset(data):
        if batch_size is not None:
            raise argument_error(
                "batch_size", batch_size,
                "None when `data` is a distributed dataset (already batched)")
        return data, None
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            raise argument_error("batch_size", batch_size,
                                  "None when `data` is a tf.data.Dataset (already batched)")
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise argument_error("steps", steps, "an int > 0 when `data` is infinite",
                                  "The dataset repeats forever; pass steps=.")
        return data, cardinality if cardinality >= 0 else None
    from keras.src.trainers import data_adapters  # private: the adapters of predict

    is_arrays = data_adapters.array_data_adapter.can_convert_arrays((data, None, None))
    if batch_size is not None and not is_arrays:
        raise argument_error("batch_size", batch_size,
                              "None unless `data` is arrays or tensors (other data come "
                              "in batches)")
    try:
        adapter = data_adapters.get_data_adapter(
            data, batch_size=(batch_size or DEFAULT_BATCH_SIZE) if is_arrays else None,
            steps_per_epoch=steps, shuffle=False)
        dataset = adapter.get_tf_dataset()
    except (ValueError, TypeError) as error:
        raise argument_error(
            "data", data, "a tf.data.Dataset, a distributed dataset, NumPy arrays, "
            "tensors or a dict of them, a keras.utils.PyDataset or a generator of batches",
            f"({shortened(error)})") from error
    return dataset, adapter.num_batches


def first_input(x):
    return tf.nest.flatten(x)[0]


class DataMismatch(Exception):
    """Carries a model call's error on a batch out of the replica function (tracing)."""

    def __init__(self, spec, error):
        super().__init__(str(spec))
        self.spec = spec
        self.error = error  # kept here: re-raising through tf.function drops __cause__


def spec_of(x):
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype) if hasattr(t, "dtype") else t, x)


# ---------------------------------------------------------------------- the layers in a pass


class Patches:
    """For the pass: batch norms' `call` wrapped and their momenta set to keep statistics.

    Every layer in `recomputed` and `kept` runs in training mode, whatever the model
    is called with; only those in `recomputed` add their input's moments to
    `local.moments` (a list per layer, when the replica step has set it).
    """

    def __init__(self, recomputed, kept, local):
        self.layers = list(recomputed) + list(kept)
        self.collecting = len(recomputed)
        self.local = local
        self.undo = []

    def __enter__(self):
        try:
            for index, layer in enumerate(self.layers):
                for attribute, value in PASS_ATTRIBUTES:
                    if hasattr(layer, attribute):
                        self.undo.append((layer, attribute, getattr(layer, attribute)))
                        object.__setattr__(layer, attribute, value)
                # An instance attribute, set and removed past Keras's attribute
                # tracking; Layer.__call__ looks `self.call` up on the instance.
                previous = layer.__dict__.get("call", _ABSENT)
                layer.__dict__["call"] = _wrapped_call(
                    layer, layer.call, self.local,
                    index if index < self.collecting else None)
                self.undo.append((layer, "call", previous))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        for layer, attribute, value in reversed(self.undo):
            if attribute == "call":
                if value is _ABSENT:
                    layer.__dict__.pop("call", None)
                else:
                    layer.__dict__["call"] = value
            else:
                object.__setattr__(layer, attribute, value)
        self.undo = []
        return False


_ABSENT = object()


def _wrapped_call(layer, original, local, index):
    """`original` (a layer's `call`) in training mode, its input's moments collected at
    `local.moments[index]` (none when `index` is None)."""
    signature = inspect.signature(original)
    parameters = list(signature.parameters)

    @functools.wraps(original)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        collected = getattr(local, "moments", None)
        if collected is not None and index is not None:
            inputs = bound.arguments[parameters[0]]
            mask = bound.arguments.get("mask")
            collected[index].append(local_moments(layer, inputs, mask))
        if "training" in signature.parameters:
            bound.arguments["training"] = True
        return original(*bound.args, **bound.kwargs)

    return call


def local_moments(layer, inputs, mask):
    """This replica's (count, shift, offset, variance) of a batch norm's input, float64."""
    inputs = tf.convert_to_tensor(inputs)
    axes = ops.channel_axes(layer.axis, inputs.shape.rank)
    layout = ops.Layout(inputs.shape.as_list(), axes)
    dtype = ops.statistics_dtype(inputs.dtype)
    weights = None
    if mask is not None:
        weights = layout.view(ops.mask_weights(mask, inputs, dtype))
    compiled = isinstance(layer, BatchNormalization) and programs.compiles(
        layer.jit_compile, inputs.shape)
    moments = ops.shifted_moments(layout.view(inputs), layout.axes, weights,
                                  compiled=compiled)
    return [tf.cast(layout.to_channels(t), tf.float64) for t in moments]
