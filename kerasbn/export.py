"""Freeze batch norms, fold them into the Conv/Dense layers before them, write SavedModels.

    folded = kerasbn.export.fold_batch_norms(model)        # an ordinary keras.Model
    path = kerasbn.export.export_saved_model(model, "saved_models/digits")
    # -> "saved_models/digits/1", TF Serving's layout <name>/<version>/

In inference a batch norm is the per-channel affine y = a·x + b, with
a = γ/sqrt(moving_var + ε) and b = β - a·moving_mean. When it directly follows a
convolution or a dense layer z = W·x + c (no activation in between, nothing else
reading z, the norm's axis that layer's channel axis), the two compose into one layer
with kernel W·a (along the output channels) and bias a·c + b. Every other batch norm
becomes a `FrozenAffine` layer holding a and b as constants.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections import Counter

import keras
import numpy as np
import tensorflow as tf

from kerasbn.layer import BatchNormalization

# Layers a batch norm can fold into. Their output channels are the last dimension of the
# kernel (Conv, Dense), of the pointwise kernel (SeparableConv), or the flattened
# (input channel, multiplier) pair of the depthwise kernel (DepthwiseConv).
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_FOLDABLE = _CONVS + _DEPTHWISE + _SEPARABLE + (keras.layers.Dense,)

VERIFY_TIMEOUT_SECONDS = 300
_VERSION = re.compile(r"[0-9]+")
# TensorFlow rewrites other characters of signature input names to "_".
_SIGNATURE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

# Run by `export_saved_model(verify=True)` in a fresh Python: it needs TensorFlow only,
# which is what a server has.
_VERIFY_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
path, sample, result, input_name = sys.argv[1:5]
signature = tf.saved_model.load(path).signatures["serving_default"]
outputs = signature(**{input_name: tf.constant(np.load(sample))})
np.savez(result, **{name: value.numpy() for name, value in outputs.items()})
"""


@keras.saving.register_keras_serializable(package="kerasbn")
class FrozenAffine(keras.layers.Layer):
    """A per-channel affine y = scale·x + offset with constant, non-trainable weights.

    What a batch norm becomes in inference when it cannot be folded into the layer
    before it. It computes in float32 at least (like the batch norms) and returns the
    layer's compute dtype.

    Args:
        axis: the channel axis, or a list of axes, of the weights (as the batch norm's).
        **kwargs: base layer arguments (name, dtype, ...).
    """

    def __init__(self, axis=-1, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else int(axis)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        axes = _positive_axes(self.axis, rank)
        channel_shape = [input_shape[a] for a in axes]
        self._broadcast_shape = [input_shape[a] if a in axes else 1 for a in range(rank)]
        self.scale = self.add_weight(shape=channel_shape, name="scale", initializer="ones",
                                     trainable=False, autocast=False)
        self.offset = self.add_weight(shape=channel_shape, name="offset",
                                      initializer="zeros", trainable=False, autocast=False)

    def call(self, inputs, mask=None):  # a mask passes through, as in batch norms
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        shape = self._broadcast_shape
        scale = keras.ops.reshape(keras.ops.cast(self.scale, dtype), shape)
        offset = keras.ops.reshape(keras.ops.cast(self.offset, dtype), shape)
        outputs = keras.ops.cast(inputs, dtype) * scale + offset
        return keras.ops.cast(outputs, self.compute_dtype)

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


# ------------------------------------------------------------------------ folding


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
    models nested in them (a batch norm is not folded across a nesting boundary).
    All other layers are copied with their weights; the original is unchanged.

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
    _check_model(model, caller)
    report = FoldReport()
    rebuilt = _rebuild_model(model, fold, report, prefix="")
    hidden = [layer.name for layer in rebuilt._flatten_layers(include_self=False)
              if _is_batch_norm(layer)]
    if hidden:
        warnings.warn(
            f"{caller}: the batch norms {hidden} sit inside custom layers or subclassed "
            "models, whose structure is not visible from outside; they were copied "
            "unchanged (in inference they still use their moving statistics).",
            stacklevel=3,
        )
    return (rebuilt, report) if return_report else rebuilt


def _check_model(model, caller):
    if not isinstance(model, keras.Model):
        raise TypeError(f"{caller}: argument `model` must be a keras.Model; received "
                        f"model={model!r} of type {type(model).__name__}.")
    if not _is_graph_model(model):
        raise ValueError(
            f"{caller}: argument `model` must be a Sequential or functional model; "
            f"received the subclassed model {model.name!r} of type "
            f"{type(model).__name__}, whose layers cannot be rebuilt from outside.")
    try:
        model.inputs
    except (AttributeError, ValueError):
        raise ValueError(
            f"{caller}: argument `model` must be built (give it a keras.Input, or call "
            f"it once on data); received the unbuilt model {model.name!r}.") from None


def _is_graph_model(model):
    return isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")


def _is_batch_norm(layer):
    return isinstance(layer, (BatchNormalization, keras.layers.BatchNormalization))


def _positive_axes(axis, rank):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(a % rank for a in axes)


def _rebuild_model(model, fold, report, prefix):
    if isinstance(model, keras.Sequential):
        # Fold the chain as a functional model, then list its layers again.
        chain = _rebuild_functional(keras.Model(model.inputs, model.outputs),
                                    fold, report, prefix)
        first = model.inputs[0]
        inputs = keras.Input(batch_shape=first.shape, dtype=first.dtype,
                             name=first._keras_history.operation.name)
        layers = [layer for layer in chain.layers
                  if not isinstance(layer, keras.layers.InputLayer)]
        return keras.Sequential([inputs] + layers, name=model.name)
    if _is_graph_model(model):
        return _rebuild_functional(model, fold, report, prefix)
    copy = model.__class__.from_config(model.get_config())  # a subclassed inner model
    copy.set_weights(model.get_weights())
    return copy


def _rebuild_functional(model, fold, report, prefix):
    into = _plan(model, fold, report, prefix)  # id(conv) -> the batch norm it absorbs
    folded = {id(bn) for bn in into.values()}
    assignments = []  # run once the copies are built

    def clone(layer):
        if isinstance(layer, keras.Model):
            return _rebuild_model(layer, fold, report, f"{prefix}{layer.name}/")
        if id(layer) in folded:
            return None  # not called: its input goes straight on (see `call`)
        if _is_batch_norm(layer):
            copy = FrozenAffine(axis=layer.axis, name=layer.name, dtype=layer.dtype_policy)
            assignments.append((copy, dict(zip(("scale", "offset"),
                                               _inference_affine(layer)))))
        elif id(layer) in into:
            config = layer.get_config()
            config["use_bias"] = True
            copy = layer.__class__.from_config(config)
            assignments.append((copy, _folded_weights(layer, into[id(layer)])))
        else:
            copy = layer.__class__.from_config(layer.get_config())
            assignments.append((copy, layer.get_weights()))
        return copy

    def call(layer, *args, **kwargs):
        return args[0] if layer is None else layer(*args, **kwargs)

    rebuilt = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for copy, values in assignments:
        if isinstance(values, dict):
            for weight in copy.weights:
                weight.assign(values[weight.name].astype(weight.dtype))
        else:
            copy.set_weights(values)
    return rebuilt


def _plan(model, fold, report, prefix):
    """Decides which batch norms fold; records the decisions in `report`."""
    # Keras keeps a functional model's graph in `_nodes_by_depth` (no public accessor).
    depths = sorted(model._nodes_by_depth, reverse=True)  # inputs first
    nodes = [node for depth in depths for node in model._nodes_by_depth[depth]
             if not node.is_input]
    calls = Counter(id(node.operation) for node in nodes)
    readers = Counter(id(t) for node in nodes for t in node.input_tensors)
    readers.update(id(t) for t in model.outputs)
    into = {}
    for node in nodes:
        bn = node.operation
        if not _is_batch_norm(bn):
            continue
        x = node.input_tensors[0]
        producer = x._keras_history.operation
        reason = (_why_not_foldable(bn, producer, x, calls, readers) if fold
                  else "folding disabled")
        if reason is None:
            into[id(producer)] = bn
            report.folded.append((prefix + bn.name, prefix + producer.name))
        else:
            report.frozen.append((prefix + bn.name, reason))
    return into


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
    if _positive_axes(bn.axis, rank) != [channel_axis]:
        return (f"its axis {bn.axis} is not the channel axis ({channel_axis}) of "
                f"{producer.name!r}")
    return None


def _numpy64(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _inference_affine(bn):
    """(a, b) of the batch norm in inference, y = a·x + b, in float64."""
    mean, variance = _numpy64(bn.moving_mean), _numpy64(bn.moving_variance)
    gamma = _numpy64(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _numpy64(bn.beta) if bn.center else np.zeros_like(mean)
    a = gamma / np.sqrt(variance + bn.epsilon)
    return a, beta - a * mean


def _folded_weights(layer, bn):
    """The weights, by name, of `layer` followed by `bn`, as one layer with a bias."""
    a, b = _inference_affine(bn)
    bias = _numpy64(layer.bias) if layer.use_bias else 0.0
    weights = {"bias": a * bias + b}
    if isinstance(layer, _DEPTHWISE):
        kernel = _numpy64(layer.kernel)  # (*window, in, multiplier); out = in·mult + m
        weights["kernel"] = kernel * a.reshape(kernel.shape[-2:])
    elif isinstance(layer, _SEPARABLE):
        weights["depthwise_kernel"] = _numpy64(layer.depthwise_kernel)
        weights["pointwise_kernel"] = _numpy64(layer.pointwise_kernel) * a
    else:  # Conv (*window, in/groups, out) and Dense (in, out)
        weights["kernel"] = _numpy64(layer.kernel) * a
    return weights


# ------------------------------------------------------------------------ SavedModel


class ExportVerificationError(RuntimeError):
    """The exported SavedModel, loaded in a fresh process, computes something else."""


def export_saved_model(model, export_dir, version=None, fold=True, input_name=None,
                       output_names=None, verify=True, overwrite=False):
    """Writes `model` for serving to `export_dir/<version>/` (TF Serving's layout).

    The SavedModel has one signature, `serving_default`, which takes the input by
    name and returns a dict of named outputs. Its graph runs the model in inference
    mode with every batch norm frozen (`FrozenAffine`) and, with `fold=True`, folded
    into the Conv/Dense layer before it where possible (see `fold_batch_norms`): no
    training flag, no batch statistics.

    The SavedModel is written to a hidden temporary directory in `export_dir`
    (".tmp-..."; TF Serving loads only all-digit directory names), verified, and only
    then renamed to `export_dir/<version>`, so a server never sees a half-written or
    wrong version. Verification loads it with `tf.saved_model.load` in a fresh Python
    process and compares its outputs on a random batch with `model(x, training=False)`.

    Args:
        model: a built Sequential or functional `keras.Model` with one input.
        export_dir: the model's base directory, e.g. "saved_models/digits"; created
            if missing.
        version: the version number, an int >= 1, or None for the next free one
            (1 + the largest existing, 1 in an empty directory).
        fold: fold batch norms into the layers before them (else only freeze them).
        input_name: the signature's input name; default: the model's input name.
        output_names: the signature's output names, one per output of the model;
            default: the names of the model's output layers.
        verify: load the export in a fresh process and compare outputs first.
        overwrite: replace an existing `export_dir/<version>`.

    Returns:
        The path of the version directory, `export_dir/<version>`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on an argument outside what is allowed (the message names it).
        FileExistsError: if `export_dir/<version>` exists and `overwrite=False`.
        ExportVerificationError: if the loaded export's outputs differ from the
            model's by more than the tolerance; nothing is left on disk.
        RuntimeError: if the fresh process fails to load or run the export.
    """
    _check_model(model, "export_saved_model")
    if len(model.inputs) != 1:
        raise ValueError(
            "export_saved_model: argument `model` must have exactly one input; received "
            f"model {model.name!r} with {len(model.inputs)} inputs.")
    export_dir = _checked_export_dir(export_dir)
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or version < 1):
        raise ValueError("export_saved_model: argument `version` must be None or an int "
                         f">= 1; received version={version!r}.")
    input_name = _checked_name("input_name", _default_input_name(model)
                               if input_name is None else input_name)
    output_names = _checked_output_names(model, output_names)

    os.makedirs(export_dir, exist_ok=True)
    if version is None:
        version = _next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"export_saved_model: version directory {target!r} already "
                              "exists; pass overwrite=True to replace it, or another "
                              "version.")
    serving_model = (fold_batch_norms if fold else freeze_batch_norms)(model)
    # Hidden from TF Serving; os.mkdir (unlike mkdtemp's 0700) keeps the umask's mode.
    temporary = os.path.join(export_dir, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
    os.mkdir(temporary)
    try:
        _save(serving_model, temporary, input_name, output_names)
        if verify:
            _verify(model, temporary, input_name, output_names)
        _move_into_place(temporary, target, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _checked_export_dir(export_dir):
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir):
        raise ValueError("export_saved_model: argument `export_dir` must be a non-empty "
                         f"path; received export_dir={export_dir!r}.")
    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError("export_saved_model: argument `export_dir` must be a directory "
                         f"(or not exist yet); received export_dir={export_dir!r}, a file.")
    return export_dir


def _checked_name(argument, name):
    if not isinstance(name, str) or not _SIGNATURE_NAME.fullmatch(name):
        raise ValueError(
            f"export_saved_model: argument `{argument}` must be a name of letters, "
            "digits and '_', starting with a letter (the default is the model's, with "
            f"other characters made '_'); received {argument}={name!r}.")
    return name


def _default_input_name(model):
    # The InputLayer's name: keras.Input(name="images") names both; an unnamed input's
    # tensor is called "keras_tensor..." but its layer "input_layer...".
    return _as_signature_name(model.inputs[0]._keras_history.operation.name)


def _default_output_names(model):
    names = getattr(model, "output_names", None)
    if names is None:  # Sequential
        names = [t._keras_history.operation.name for t in model.outputs]
    return [_as_signature_name(name) for name in names]


def _as_signature_name(name):
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _checked_output_names(model, output_names):
    count = len(model.outputs)
    if output_names is None:
        output_names = _default_output_names(model)
    elif isinstance(output_names, str):
        output_names = [output_names]
    output_names = list(output_names)
    if len(output_names) != count or len(set(output_names)) != count:
        raise ValueError(
            "export_saved_model: argument `output_names` must hold one distinct name per "
            f"output of the model ({count}); received output_names={output_names!r}.")
    for name in output_names:
        _checked_name("output_names", name)
    return output_names


def _next_version(export_dir):
    versions = [int(n) for n in os.listdir(export_dir) if _VERSION.fullmatch(n)]
    return max(versions, default=0) + 1


def _save(model, path, input_name, output_names):
    spec = model.inputs[0]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name=input_name)])
    def serve(inputs):
        outputs = keras.tree.flatten(model(inputs, training=False))
        return dict(zip(output_names, outputs))

    serving = serve.get_concrete_function()
    module = tf.Module()
    module.serve = serve
    # Track the tf.Variables the graph reads, not the Keras model and its Keras
    # variables (as Keras's own export does): converters such as TFLite's then see
    # read-only variables and turn them into constants.
    module.serving_variables = list(serving.variables)
    tf.saved_model.save(module, path, signatures={"serving_default": serving})


def _sample_batch(model, batch_size=4):
    spec = model.inputs[0]
    shape = [batch_size] + [16 if d is None else d for d in spec.shape[1:]]
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        return rng.integers(0, 2, shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def _tolerance(model):
    """Relative tolerance of the verification: folding reorders float rounding."""
    return 1e-4 if model.compute_dtype in ("float32", "float64") else 2e-2


def _verify(model, path, input_name, output_names):
    sample = _sample_batch(model)
    expected = [keras.ops.convert_to_numpy(t) for t in
                keras.tree.flatten(model(sample, training=False))]
    with tempfile.TemporaryDirectory(prefix="kerasbn-verify-") as scratch:
        sample_file = os.path.join(scratch, "sample.npy")
        result_file = os.path.join(scratch, "result.npz")
        np.save(sample_file, sample)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        try:
            done = subprocess.run(
                [sys.executable, "-c", _VERIFY_SCRIPT, path, sample_file, result_file,
                 input_name],
                capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                "export_saved_model: verification timed out after "
                f"{VERIFY_TIMEOUT_SECONDS} s loading {path!r} in a fresh process."
            ) from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            raise RuntimeError(
                "export_saved_model: verification could not load and run the SavedModel "
                f"in a fresh process (exit code {done.returncode}): {lines[-1]}")
        with np.load(result_file) as result:
            actual = {name: result[name] for name in result.files}
    if sorted(actual) != sorted(output_names):
        raise ExportVerificationError(
            f"export_saved_model: the export's outputs are {sorted(actual)}, expected "
            f"{sorted(output_names)}.")
    tolerance = _tolerance(model)
    errors = {name: _errors(actual[name], value)
              for name, value in zip(output_names, expected)}
    bad = {name: e for name, e in errors.items() if not e[1] <= tolerance}
    if bad:
        numbers = ", ".join(f"{name!r}: max abs error {abs_:.3g}, max rel error {rel:.3g}"
                            for name, (abs_, rel) in bad.items())
        raise ExportVerificationError(
            "export_saved_model: the SavedModel loaded in a fresh process differs from "
            f"model(x, training=False) on a sample batch beyond the relative tolerance "
            f"{tolerance:g}: {numbers}. Nothing was written.")


def _errors(actual, expected):
    """(max |actual - expected|, that / max |expected|), in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return np.inf, np.inf
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    return error, error / max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)


def _move_into_place(temporary, target, overwrite):
    """Renames `temporary` to `target` (replacing it if `overwrite`)."""
    parent = os.path.dirname(target) or "."
    retired = None
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"export_saved_model: version directory {target!r} "
                                  "appeared during the export; nothing was replaced.")
        retired = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rename(target, os.path.join(retired, "version"))
    try:
        os.rename(temporary, target)
    except OSError as error:
        raise FileExistsError(f"export_saved_model: could not move the export to "
                              f"{target!r}: {error}") from error
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def describe_signature(path, signature="serving_default"):
    """The names, dtypes and shapes of a SavedModel signature's inputs and outputs.

    Args:
        path: a SavedModel directory, e.g. "saved_models/digits/1".
        signature: the signature's key.

    Returns:
        A dict {"inputs": {name: (dtype, shape)}, "outputs": {name: (dtype, shape)}},
        dtype a string such as "float32", shape a tuple with None for unknown sizes.

    Raises:
        ValueError: if `path` holds no SavedModel or it has no such signature.
    """
    if not os.path.isfile(os.path.join(os.fspath(path), "saved_model.pb")):
        raise ValueError("describe_signature: argument `path` must be a SavedModel "
                         f"directory (with saved_model.pb); received path={path!r}.")
    signatures = tf.saved_model.load(os.fspath(path)).signatures
    if signature not in signatures:
        raise ValueError(f"describe_signature: argument `signature` must be one of "
                         f"{sorted(signatures)}; received signature={signature!r}.")
    function = signatures[signature]

    def described(specs):
        return {name: (spec.dtype.name, tuple(spec.shape.as_list()))
                for name, spec in sorted(specs.items())}

    return {"inputs": described(function.structured_input_signature[1]),
            "outputs": described(function.structured_outputs)}
