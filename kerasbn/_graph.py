"""Walking and rebuilding Keras models: what convert and fold share.

    _graph.check_model(model, "fold_batch_norms")    # TypeError/ValueError naming `model`
    rebuilt = _graph.rebuild(model, replace, "fold_batch_norms")

`rebuild` copies a Sequential or functional model, the Sequential and functional models
nested in it included, layer by layer with their weights, through `replace`, which may
swap a layer for another or remove it. The operations Keras records that are not layers
(`x + 3.0`, `keras.ops.*` calls, the mask of `Embedding(mask_zero=True)`) are copied from
their config, as `keras.models.clone_model` copies them. Input layers keep their names
(`clone_model` would name them after their tensors, "keras_tensor_<n>"), so a rebuilt
model has the input names, layer names and output names of the original. In a
functional model a copy's variables are created with the original's values as it
builds (`_values_at_creation`: no initializer runs, nothing is assigned twice); in a
Sequential one, and for weights whose names repeat in a layer (its sublayers'), they
are assigned after the build.

Keras 3 has no public API for a model's graph: no accessor for its call nodes in order,
for the layer or operation that produced a symbolic tensor, for the layers nested at any
depth, for whether a model was built with the functional API, or for whether a name was
generated. Those private reads (`_nodes_by_depth`, `_functional`, `_keras_history`,
`_flatten_layers`, `keras.src.utils.naming`) are all in this module, each where it is
used, so that they can go when upstream offers them.
"""

import contextlib
import dataclasses
import re
import warnings

import keras
import tensorflow as tf

from kerasbn.layer import BatchNormalization

# Keras names an unnamed object after its class: "input_layer", "dense_3", "add_1".
# Upstream lacks a public form of the rule (keras.src.utils.naming.to_snake_case).
from keras.src.utils.naming import to_snake_case as _snake_case  # noqa: E402


def is_batch_norm(layer):
    """True for `kerasbn.BatchNormalization` and `keras.layers.BatchNormalization`."""
    return isinstance(layer, (BatchNormalization, keras.layers.BatchNormalization))


def is_graph_model(model):
    """True for Sequential and functional models, whose layers can be rebuilt.

    A functional model is the one that keeps its graph of call nodes; Keras has no
    public test for it (the class `Functional` lives in `keras.src`).
    """
    return isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")


def is_built(model):
    """True when `model` has symbolic inputs (a functional model always has them)."""
    try:
        model.inputs
    except (AttributeError, ValueError):  # an unbuilt Sequential raises AttributeError
        return False
    return True


def check_model(model, caller, *, built=True, subclassed_hint=""):
    """Raises unless `model` is a Sequential or functional `keras.Model` (built, if asked).

    Args:
        model: the argument to check.
        caller: the public function's name, which the messages start with.
        built: also require the model to be built.
        subclassed_hint: a sentence appended to the error for a subclassed model.

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if `model` is subclassed, or unbuilt when `built=True`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{caller}: argument `model` must be a keras.Model (Sequential or functional); "
            f"received model={model!r} of type {type(model).__name__}.")
    if not is_graph_model(model):
        raise ValueError(
            f"{caller}: argument `model` must be a Sequential or functional model; "
            f"received the subclassed model {model.name!r} of type "
            f"{type(model).__name__}, whose layers cannot be rebuilt from outside."
            + (f" {subclassed_hint}" if subclassed_hint else ""))
    if built and not is_built(model):
        raise ValueError(
            f"{caller}: argument `model` must be built (give it a keras.Input, or call "
            f"it once on data); received the unbuilt model {model.name!r}.")


def has_generated_name(operation):
    """True when `operation`'s name is the one Keras generates from its class."""
    return re.fullmatch(re.escape(_snake_case(type(operation).__name__)) + r"(_[0-9]+)?",
                        operation.name) is not None


def producer(tensor):
    """The layer or operation whose call returned the symbolic `tensor`."""
    return tensor._keras_history.operation  # KerasTensor's history: no public accessor


@dataclasses.dataclass(frozen=True)
class Call:
    """One call in a model's graph: the operation and its symbolic tensors (flat)."""

    operation: object
    inputs: tuple
    outputs: tuple


def calls(model):
    """The calls of a built Sequential or functional model, in an order inputs-first.

    Nested models appear as one call each (their own calls are theirs); input layers
    are left out.
    """
    if isinstance(model, keras.Sequential):
        model = model._functional  # a built Sequential runs as this functional model
    # A functional model keeps its nodes by depth, the outputs at depth 0.
    nodes_by_depth = model._nodes_by_depth
    return [Call(node.operation, tuple(node.input_tensors), tuple(node.outputs))
            for depth in sorted(nodes_by_depth, reverse=True)
            for node in nodes_by_depth[depth] if not node.is_input]


def nested_layers(model):
    """Every layer inside `model`, at any depth, custom layers' sublayers included."""
    return model._flatten_layers(include_self=False)  # no public recursive listing


def input_layer_names(model):
    """The names of the input layers of a built model, in the order of `model.inputs`."""
    return [producer(tensor).name for tensor in model.inputs]


def warn_hidden_batch_norms(model, caller, what, consequence, predicate=is_batch_norm):
    """Warns about batch norms (per `predicate`) that `rebuild` could not reach.

    They sit inside custom layers or subclassed models, which are copied whole.
    """
    hidden = [layer.name for layer in nested_layers(model) if predicate(layer)]
    if hidden:
        warnings.warn(
            f"{caller}: the {what} {hidden} sit inside custom layers or subclassed "
            f"models, whose structure is not visible from outside; {consequence}",
            stacklevel=3)


# ------------------------------------------------------------------------ rebuilding


@dataclasses.dataclass
class Replacement:
    """What `replace` returns for a layer that is not to be copied as it is.

    Attributes:
        layer: the new layer, or None to remove the original (each call of it then
            returns its first argument).
        weights: the new layer's weight values by weight name, assigned once it is
            built; weights it has that are not named here keep their initial values.
    """

    layer: object
    weights: dict = dataclasses.field(default_factory=dict)


def rebuild(model, replace, caller):
    """A copy of a Sequential or functional model, each layer passed through `replace`.

    `replace(layer, path)` is called once per layer (a shared layer is replaced once
    and shared in the copy), `path` being "" at the top level and "inner/" inside the
    nested model "inner". It returns a `Replacement`, or None to copy the layer with
    `from_config(get_config())` and its weights. Nested Sequential and functional
    models are rebuilt the same way, and keep their kind and name; other layers, and
    the operations that are not layers, are never passed to `replace` (operations are
    copied from their config). The copy is compiled as the original was, as with
    `keras.models.clone_model`.

    Args:
        model: a Sequential or functional `keras.Model` (a Sequential may be unbuilt).
        replace: a callable `(layer, path) -> Replacement | None`.
        caller: the public function's name, for error messages.

    Returns:
        A new `keras.Model` of the same kind and name.

    Raises:
        ValueError: if a replacement lacks a weight the original has.
    """
    copier = _Copier(replace)
    rebuilt = copier.model(model, "")
    copier.assign_weights(caller)
    if model.compiled and not rebuilt.compiled:  # clone_model compiles functional ones
        rebuilt.compile_from_config(model.get_compile_config())
    return rebuilt


class _Copier:
    def __init__(self, replace):
        self.replace = replace
        self.copies = {}  # id(original) -> its copy (None: removed)
        self.pending = []  # (original, copy, weights: a list or a dict by name)
        self.values_by_name = {}  # id(copy) -> {weight name: value} (unique names only)
        self.created = {}  # id(copy) -> names of its weights created with their values

    def model(self, model, path):
        if isinstance(model, keras.Sequential):
            return self._sequential(model, path)
        return self._functional(model, path)

    def copy(self, operation, path):
        key = id(operation)
        if key not in self.copies:
            self.copies[key] = self._copy(operation, path)
        return self.copies[key]

    def _copy(self, operation, path):
        if isinstance(operation, keras.Model) and is_graph_model(operation):
            return self.model(operation, f"{path}{operation.name}/")
        if not isinstance(operation, keras.layers.Layer):
            return _copied_operation(operation)
        replacement = self.replace(operation, path)
        if replacement is None:
            copy = operation.__class__.from_config(operation.get_config())
            replacement = Replacement(copy, operation.get_weights())
        if replacement.layer is not None and len(replacement.weights):
            self.pending.append((operation, replacement.layer, replacement.weights))
            self.values_by_name[id(replacement.layer)] = _by_name(operation,
                                                                 replacement.weights)
        return replacement.layer

    def _sequential(self, model, path):
        layers = [self.copy(layer, path) for layer in model.layers]
        layers = [layer for layer in layers if layer is not None]
        if is_built(model):
            first = model.inputs[0]
            layers.insert(0, keras.Input(batch_shape=first.shape, dtype=first.dtype,
                                         sparse=first.sparse, name=producer(first).name))
        return keras.Sequential(layers, name=model.name, trainable=model.trainable)

    def _functional(self, model, path):
        inputs = keras.tree.map_structure(_input_like, model.input)

        def clone(operation):
            return self.copy(operation, path)

        def call(copy, *args, **kwargs):
            if copy is None:
                return args[0]
            with self._created_with_values(copy):  # its build, in its first call
                return copy(*args, **kwargs)

        return keras.models.clone_model(model, input_tensors=inputs,
                                        clone_function=clone, call_function=call)

    @contextlib.contextmanager
    def _created_with_values(self, copy):
        """While `copy` builds, its variables named as the original's weights are
        created with their values (`_values_at_creation`); recorded in `self.created`."""
        values = self.values_by_name.get(id(copy))
        if not values or getattr(copy, "built", True):
            yield
            return
        with _values_at_creation(values) as used:
            yield
        self.created[id(copy)] = used

    def assign_weights(self, caller):
        """Assigns each copy the weights it was not created with."""
        for original, copy, values in self.pending:
            created = self.created.get(id(copy), set())
            if not isinstance(values, dict):
                if len(created) < len(values):
                    copy.set_weights(values)
                continue
            values = {name: value for name, value in values.items() if name not in created}
            weights = {weight.name: weight for weight in copy.weights}
            missing = sorted(set(values) - set(weights))
            if missing:
                raise ValueError(
                    f"{caller}: layer {original.name!r} has weights {missing} that its "
                    f"replacement, a {type(copy).__name__}, does not have.")
            for name, value in values.items():
                weight = weights[name]
                weight.assign(keras.ops.cast(value, weight.dtype))


def _input_like(tensor):
    """A new `keras.Input` like a model input, named as its input layer (not its tensor).

    `clone_model` names a new input after the old input's tensor, "keras_tensor_<n>" for
    an unnamed input, a name that depends on how many tensors the process made before.
    """
    layer = producer(tensor)
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, sparse=tensor.sparse,
                       name=layer.name, optional=getattr(layer, "optional", False))


def _copied_operation(operation):
    """A copy of an operation that is not a layer (it holds no state)."""
    try:
        return operation.__class__.from_config(operation.get_config())
    except NotImplementedError:  # no config (made with positional-only arguments)
        return operation  # stateless: the same operation serves both models



def _by_name(original, weights):
    """`weights` (a dict by name, or values in the order of `original.weights`) by
    name; empty when names repeat (a layer holding sublayers), which are then assigned
    after the build."""
    if isinstance(weights, dict):
        return weights
    names = [weight.name for weight in original.weights]
    if len(set(names)) != len(names) or len(names) != len(weights):
        return {}
    return dict(zip(names, weights))


@contextlib.contextmanager
def _values_at_creation(values):
    """Creates the variables made inside the block and named in `values` with those
    values instead of their initializers'.

    A workaround: Keras 3 has no way to create a layer's variables with given values;
    a copy built and then given its weights (`set_weights`, as `clone_model` users do)
    first computes every initializer (random kernels included) and then assigns,
    under a strategy once a replica. TensorFlow's variable creator scope hands each
    `tf.Variable` Keras creates to `creator` with its name and initial value. Yields
    the set of names used (each once).
    """
    used = set()

    def creator(next_creator, **kwargs):
        name = kwargs.get("name")
        if name in values and name not in used:
            value, dtype = values[name], kwargs.get("dtype")
            kwargs["initial_value"] = lambda: (tf.convert_to_tensor(value) if dtype is None
                                               else tf.cast(value, dtype))
            used.add(name)
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield used
