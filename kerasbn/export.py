"""Versioned SavedModels for serving, written atomically and verified in a fresh process.

    path = kerasbn.export.export_saved_model(model, "saved_models/digits")
    # -> "saved_models/digits/1", TF Serving's layout <name>/<version>/

The served graph is the model in inference with its batch norms frozen and folded
(`kerasbn.fold`, whose `fold_batch_norms`, `freeze_batch_norms`, `FoldReport` and
`FrozenAffine` this module also offers), under one signature, `serving_default`, whose
input and outputs carry the model's names.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _graph
from kerasbn.fold import FoldReport, FrozenAffine, fold_batch_norms, freeze_batch_norms

__all__ = ["export_saved_model", "describe_signature", "ExportVerificationError",
           "DEFAULT_INPUT_NAME", "fold_batch_norms", "freeze_batch_norms", "FoldReport",
           "FrozenAffine"]

VERIFY_TIMEOUT_SECONDS = 300
# The signature's input name when the model's input layer has the name Keras generated
# ("input_layer", "input_layer_3", ...: it depends on what the process built before).
DEFAULT_INPUT_NAME = "inputs"
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


class ExportVerificationError(RuntimeError):
    """The exported SavedModel, loaded in a fresh process, computes something else."""


def export_saved_model(model, export_dir, version=None, fold=True, input_name=None,
                       output_names=None, verify=True, overwrite=False, *,
                       return_report=False):
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
        input_name: the signature's input name; default: the name of the model's
            input layer (`keras.Input(name="images")`), or `DEFAULT_INPUT_NAME`
            ("inputs") when Keras generated that name ("input_layer_<n>").
        output_names: the signature's output names, one per output of the model;
            default: the keys of a model whose outputs are a dict, else the names of
            its output layers, a name Keras generated without its counter ("dense_7"
            becomes "dense"; followed by the output's position when two coincide).
        verify: load the export in a fresh process and compare outputs first.
        overwrite: replace an existing `export_dir/<version>`.
        return_report: also return the `FoldReport` of the model that was written.

    Returns:
        The path of the version directory, `export_dir/<version>`; or
        `(path, report)` when `return_report=True`.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: on an argument outside what is allowed (the message names it),
            `export_dir` under a file included.
        FileExistsError: if `export_dir/<version>` exists and `overwrite=False`.
        ExportVerificationError: if the loaded export's outputs differ from the
            model's by more than the tolerance; nothing is left on disk.
        RuntimeError: if the fresh process fails to load or run the export.
    """
    export_dir, input_name, output_names = _checked_arguments(
        model, export_dir, version, input_name, output_names)
    os.makedirs(export_dir, exist_ok=True)
    if version is None:
        version = _next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"export_saved_model: version directory {target!r} already "
                              "exists; pass overwrite=True to replace it, or another "
                              "version.")
    serving_model, report = (fold_batch_norms if fold else freeze_batch_norms)(
        model, return_report=True)
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
    return (target, report) if return_report else target


def _checked_arguments(model, export_dir, version, input_name, output_names):
    """`(export_dir, input_name, output_names)` checked, defaults filled in."""
    _graph.check_model(model, "export_saved_model")
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
    return export_dir, input_name, _checked_output_names(model, output_names)


def _checked_export_dir(export_dir):
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir):
        raise ValueError("export_saved_model: argument `export_dir` must be a non-empty "
                         f"path; received export_dir={export_dir!r}.")
    export_dir = os.fspath(export_dir)
    existing = export_dir  # the path itself, or the closest of its parents that exists
    while not os.path.exists(existing) and os.path.dirname(existing) not in ("", existing):
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        where = "a file" if existing == export_dir else f"under the file {existing!r}"
        raise ValueError("export_saved_model: argument `export_dir` must be a directory "
                         "(or not exist yet); received "
                         f"export_dir={export_dir!r}, {where}.")
    return export_dir


def _checked_name(argument, name):
    if not isinstance(name, str) or not _SIGNATURE_NAME.fullmatch(name):
        raise ValueError(
            f"export_saved_model: argument `{argument}` must be a name of letters, "
            "digits and '_', starting with a letter (the default is the model's, with "
            f"other characters made '_'); received {argument}={name!r}.")
    return name


def _default_input_name(model):
    layer = _graph.producer(model.inputs[0])
    if _graph.has_generated_name(layer):
        return DEFAULT_INPUT_NAME
    return _as_signature_name(layer.name)


def _default_output_names(model):
    structure = model.output
    if isinstance(structure, dict) and all(isinstance(k, str) for k in structure):
        keys = keras.tree.flatten({key: key for key in structure})  # model.outputs' order
        return [_as_signature_name(key) for key in keys]
    layers = [_graph.producer(tensor) for tensor in model.outputs]
    names = [re.sub(r"_[0-9]+$", "", layer.name) if _graph.has_generated_name(layer)
             else layer.name for layer in layers]
    names = [name if names.count(name) == 1 or not _graph.has_generated_name(layer)
             else f"{name}_{i}" for i, (name, layer) in enumerate(zip(names, layers))]
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
    # Track the tf.Variables the graph reads, not the Keras model and its Keras
    # variables (as Keras's own export does): converters such as TFLite's then see
    # read-only variables and turn them into constants. The saved object holds only
    # them and the signature: no gradient functions (a server needs none) and no second
    # copy of the function, which halves the time to save large models.
    module.serving_variables = {f"v{i}": v for i, v in enumerate(serving.variables)}
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, path, signatures={"serving_default": serving},
                        options=options)


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
