"""Freeze batch norms for inference, and fold them into the Conv/Dense layers before them.

    folded = kerasbn.export.fold_batch_norms(model)        # an ordinary keras.Model
    folded, report = kerasbn.export.fold_batch_norms(model, return_report=True)

In inference a batch norm is the per-channel affine y = a·x + b, with
a = γ/sqrt(moving_var + ε) and b = β - a·moving_mean (as
`kerasbn.ops.inference_coefficients` computes them).
When it directly follows a convolution or a dense layer z = W·x + c (no activation in
between, nothing else reading z, the norm's axis that layer's channel axis), the two
compose into one layer with kernel W·a (along the output channels) and bias a·c + b.
Every other batch norm becomes a `FrozenAffine` layer holding a and b as constants.

Importing this module registers `FrozenAffine` for `keras.saving.load_model`
(`import kerasbn` imports it).
"""

import dataclasses
from collections import Counter

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _graph
from kerasbn import ops

# Layers a batch norm can fold into. Their output channels are the last dimension of the
# kernel (Conv, Dense), of the pointwise kernel (SeparableConv), or the flattened
# (input channel, multiplier) pair of the depthwise kernel (DepthwiseConv).
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_FOLDABLE = _CONVS + _DEPTHWISE + _SEPARABLE + (keras.layers.Dense,)


@keras.saving.register_keras_serializable(package="kerasbn")
class FrozenAffine(keras.layers.Layer):
    """A per-channel affine y = scale·x + offset with constant, non-trainable weights.

    What a batch norm becomes in inference when it cannot be folded into the layer
    before it. It computes in float32 at least, as the batch norms do
    (`kerasbn.ops.affine`), and returns its input's dtype. A mask passes through.

    Args:
        axis: the channel axis, or a list of axes, of the weights (as the batch norm's).
        **kwargs: base layer arguments (name, dtype, ...).

    Raises:
        ValueError: when built on an input whose rank `axis` does not fit.
    """

    def __init__(self, axis=-1, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else int(axis)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        try:
            axes = ops.channel_axes(self.axis, rank)
        except ops.AxisError as error:
            raise ValueError(f"FrozenAffine layer '{self.name}': argument `axis` must be "
                             f"{error.allowed}; received axis={self.axis!r}.") from None
        channel_shape = [input_shape[a] for a in axes]
        self._broadcast_shape = ops.broadcast_shape(rank, axes, channel_shape)
        self.scale = self.add_weight(shape=channel_shape, name="scale", initializer="ones",
                                     trainable=False, autocast=False)
        self.offset = self.add_weight(shape=channel_shape, name="offset",
                                      initializer="zeros", trainable=False, autocast=False)

    def call(self, inputs, mask=None):
        dtype = ops.statistics_dtype(inputs.dtype)
        return ops.affine(inputs, tf.cast(self.scale, dtype), tf.cast(self.offset, dtype),
                          self._broadcast_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config


@dataclasses.dataclass
class FoldReport:
    """What `fold_batch_norms` did with each batch norm of a model.

    Attributes:
        folded: (batch norm, layer it was folded into) name pairs.
        frozen: (batch norm, why it could not be folded) pairs; each became a
            `FrozenAffine`. Names inside nested models read "inner_model/bn".
    """

    folded: list = dataclasses.field(default_factory=list)
    frozen: list = dataclasses.field(default_factory=list)


def fold_batch_norms(model, *, return_report=False):
    """An inference-equivalent copy of `model` with its batch norms folded or frozen.

    Every batch norm (`kerasbn.BatchNormalization` or `keras.layers.BatchNormalization`,
    renorm variants included: in inference they all use the moving statistics) that
    directly follows a Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D (its
    pointwise part) or Dense layer is folded into that layer's kernel and bias:

        a = γ/sqrt(moving_var + ε),  kernel ← kernel·a (output channels),
        bias ← a·bias + β - a·moving_mean   (a layer without bias gets one)

    provided the layer has no activation, is called once, nothing else reads its
    output, and the norm's axis is the layer's channel axis (its `data_format`).
    Every other batch norm becomes a `FrozenAffine` layer with constant a and b.
    Sequential and functional models are handled, with the Sequential and functional
    models nested in them (a batch norm is not folded across a nesting boundary), and
    with the operations Keras records in a graph that are not layers (`x + 3.0`,
    `keras.ops` calls, masks). All other layers are copied with their weights; input
    and layer names are kept; the original is unchanged.

    Args:
        model: a built Sequential or functional `keras.Model`.
        return_report: also return a `FoldReport` of what happened to each batch norm.

    Returns:
        A new `keras.Model` of the same kind, or `(model, report)` when
        `return_report=True`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if `model` is subclassed or not built.
    """
    return _rebuild(model, fold=True, return_report=return_report,
                    caller="fold_batch_norms")


def freeze_batch_norms(model, *, return_report=False):
    """Like `fold_batch_norms`, but every batch norm becomes a `FrozenAffine` layer.

    Args:
        model: a built Sequential or functional `keras.Model`.
        return_report: also return a `FoldReport` (whose `folded` list is empty).

    Returns:
        A new `keras.Model`, or `(model, report)` when `return_report=True`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if `model` is subclassed or not built.
    """
    return _rebuild(model, fold=False, return_report=return_report,
                    caller="freeze_batch_norms")


def _rebuild(model, fold, return_report, caller):
    _graph.check_model(model, caller)
    report = FoldReport()
    into = {}  # id(Conv/Dense) -> the batch norm folded into it
    _plan(model, "", fold, report, into, seen=set())
    folded = {id(bn) for bn in into.values()}

    def replace(layer, path):
        if id(layer) in folded:
            return _graph.Replacement(None)  # its Conv/Dense computes it
        if _graph.is_batch_norm(layer):
            a, b = inference_affine(layer)
            return _graph.Replacement(
                FrozenAffine(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy),
                {"scale": a, "offset": b})
        if id(layer) in into:
            config = layer.get_config()
            config["use_bias"] = True
            return _graph.Replacement(layer.__class__.from_config(config),
                                      _folded_weights(layer, into[id(layer)]))
        return None

    rebuilt = _graph.rebuild(model, replace, caller)
    _graph.warn_hidden_batch_norms(
        rebuilt, caller, "batch norms",
        "they were copied unchanged (in inference they still use their moving statistics).")
    return (rebuilt, report) if return_report else rebuilt


def _plan(model, path, fold, report, into, seen):
    """Decides which batch norms of `model` and its nested models fold; records it.

    The decisions of a model come before those of the models nested in it.
    """
    seen.add(id(model))
    calls = _graph.calls(model)
    call_counts = Counter(id(call.operation) for call in calls)
    readers = Counter(id(t) for call in calls for t in call.inputs)
    readers.update(id(t) for t in model.outputs)
    for call in calls:
        bn = call.operation
        if not _graph.is_batch_norm(bn):
            continue
        x = call.inputs[0]
        producer = _graph.producer(x)
        reason = (_why_not_foldable(bn, producer, x, call_counts, readers) if fold
                  else "folding disabled")
        if reason is None:
            into[id(producer)] = bn
            report.folded.append((path + bn.name, path + producer.name))
        else:
            report.frozen.append((path + bn.name, reason))
    for call in calls:
        inner = call.operation
        if (isinstance(inner, keras.Model) and _graph.is_graph_model(inner)
                and id(inner) not in seen):
            _plan(inner, f"{path}{inner.name}/", fold, report, into, seen)


def _why_not_foldable(bn, producer, x, calls, readers):
    """None if `bn` can fold into `producer`, else why not."""
    if calls[id(bn)] > 1:
        return "it is called more than once"
    if isinstance(producer, keras.layers.InputLayer):
        return f"it follows the model input {producer.name!r}"
    if not isinstance(producer, _FOLDABLE):
        return f"it follows {producer.name!r} ({type(producer).__name__}), not a Conv/Dense"
    if calls[id(producer)] > 1:
        return f"{producer.name!r} is called more than once"
    if producer.activation is not keras.activations.linear:
        return (f"{producer.name!r} applies the activation "
                f"{keras.activations.serialize(producer.activation)!r} before it")
    if readers[id(x)] > 1:
        return f"the output of {producer.name!r} is also read elsewhere"
    if producer.dtype_policy.quantization_mode is not None:
        return f"{producer.name!r} is quantized"
    rank = len(x.shape)
    channel_axis = (rank - 1 if isinstance(producer, keras.layers.Dense)
                    or producer.data_format == "channels_last" else 1)
    if ops.channel_axes(bn.axis, rank) != [channel_axis]:
        return (f"its axis {bn.axis} is not the channel axis ({channel_axis}) of "
                f"{producer.name!r}")
    return None


def inference_affine(bn):
    """A batch norm in inference as the per-channel affine y = a·x + b.

    Computed by `kerasbn.ops.inference_coefficients` from the layer's weights in
    float64, so that folding rounds once, when the result is stored.

    Args:
        bn: a built `kerasbn.BatchNormalization` or `keras.layers.BatchNormalization`.

    Returns:
        `(a, b)`, float64 NumPy arrays of the layer's channel shape.
    """
    def float64(variable):
        return tf.cast(keras.ops.convert_to_tensor(variable), tf.float64)

    a, b = ops.inference_coefficients(
        float64(bn.moving_mean), float64(bn.moving_variance),
        float64(bn.gamma) if bn.scale else None, float64(bn.beta) if bn.center else None,
        bn.epsilon)
    return a.numpy(), b.numpy()


def _folded_weights(layer, bn):
    """The weights, by name, of `layer` followed by `bn`, as one layer with a bias."""
    def float64(variable):
        return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)

    a, b = inference_affine(bn)
    bias = float64(layer.bias) if layer.use_bias else 0.0
    weights = {"bias": a * bias + b}
    if isinstance(layer, _DEPTHWISE):
        kernel = float64(layer.kernel)  # (*window, in, multiplier); out = in·mult + m
        weights["kernel"] = kernel * a.reshape(kernel.shape[-2:])
    elif isinstance(layer, _SEPARABLE):
        weights["depthwise_kernel"] = float64(layer.depthwise_kernel)
        weights["pointwise_kernel"] = float64(layer.pointwise_kernel) * a
    else:  # Conv (*window, in/groups, out) and Dense (in, out)
        weights["kernel"] = float64(layer.kernel) * a
    return weights
