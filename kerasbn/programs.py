"""How a batch norm's math runs: as XLA programs of its own, as graph functions that
every layer shares whose inputs have the same ranks and dtypes, or op by op.

`ops` and `normalization` mark their pieces with `compilable`; a layer decides per
input shape with `compiles` (its `jit_compile`: True, False or "auto", see
`worth_compiling`) whether they run as XLA programs of their own. Inside a function
that XLA compiles as a whole they are compiled with it, whatever was asked.
"""

import functools
import math

import tensorflow as tf


def compilable(fn):
    """Gives `fn` a keyword `compiled`: when True, the call runs as one XLA program.

    The compiled pieces touch no variable and no collective, which is what lets XLA
    compile them inside any strategy's replica function, on CPUs as on GPUs. Each
    input signature gets an XLA program of its own (XLA compiles per concrete shape
    anyway), so a layer called eagerly on a few shapes never triggers TensorFlow's
    "frequent retracing" warning, which counts the traces of one function. `fn` itself
    receives `compiled`, to pick the form of a computation that suits XLA.

    Traced into a graph (a `tf.function`, such as the step `fit` traces), a piece
    that is not compiled is a graph function too, without XLA of its own, traced once
    for the ranks and dtypes of its tensors (every dim unknown) and its other
    arguments, and called by every layer whose call has them. TensorFlow infers each
    call's output shapes through the function from the call's input shapes, so the
    static shapes are those a trace for the call's shapes would give, and it knows
    every shape again once it inlines the calls when it optimizes the graph (a profile
    of the step shows the pieces' ops run under the call's name, no call op): the
    steps take what they took (the project's ResNet, one layer on dense and NHWC
    inputs: within 2 %), and a fresh process traces each piece once instead of once
    for each shape: `fit`'s first trace of the converted MobileNetV2 (52 batch norms
    on 18 shapes) took 1.91-1.97 s against 2.68-2.74 with a trace for each shape
    (Keras's layer 2.62-2.68; README, Performance, session 17). Inside a step XLA
    compiles whole such a piece is one function too, which XLA compiles with the
    program at the shapes it has there. A piece that runs as an XLA program of its own
    (`compiled`) is traced for each input signature: its form depends on the input's
    size (`sums`). Called eagerly and not compiled, a piece runs op by op, as written.
    """
    by_signature = {}

    def call(*args, compiled=False, **kwargs):
        if not (compiled or tf.inside_function()):
            return fn(*args, compiled=compiled, **kwargs)
        whole = in_xla_program()  # a piece may trace another form there
        own_program = compiled and not whole
        any_dims = not compiled  # an XLA program of its own is traced for its shapes
        key = (compiled, whole, _signature((args, sorted(kwargs.items())), any_dims))
        program = by_signature.get(key)
        if program is None:
            # A partial, not a closure: TensorFlow counts traces per code object. Named
            # after fn, so that graphs and profiles say which piece a call runs. Not a
            # program of its own: jit_compile None, not False, so that auto-clustering
            # (tf.config.optimizer.set_jit) may still take the piece's ops, and a
            # program compiled whole compiles it with the rest.
            piece = functools.partial(fn, compiled=compiled)
            piece.__name__ = fn.__name__
            program = by_signature[key] = tf.function(
                piece, jit_compile=True if own_program else None, autograph=False)
            if any_dims:  # the one trace; calls of any shape then find it
                program.get_concrete_function(*_with_any_dims(args),
                                              **_with_any_dims(kwargs))
        return program(*args, **kwargs)

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    call.body = fn  # for compiled pieces made of others: one program, not nested ones
    return call


# When a batch norm's math runs as XLA programs of its own. Measured on this 2-core CPU
# (one layer's training step in a `tf.function`, XLA programs / plain TensorFlow ops):
# 64x256 values 1.14, 256x256 1.11, 32x8x8x64 0.82, 256x1024 0.69, 32x16x16x64 0.78;
# 64x16x16x64 (1M values) 0.68, saving 1.8 ms a step; 64x32x32x32 (2M) 0.52, saving
# 8.7 ms. XLA compiles each program before the first step: 40-50 ms, and about 25 ms
# more for each reduction (the moments' program about 180 ms, the backward's about
# 100): some 0.3 s per input shape, which the saving repays after about 130 steps at
# 1M values and 500-3000 steps below that, where the stock layer compiles nothing.
COMPILE_FROM_VALUES = 1 << 20
ASSUMED_BATCH_SIZE = 32


def assumed_values(shape):
    """The number of values in an input of `shape`, an unknown batch size counted as
    `ASSUMED_BATCH_SIZE` (Keras's default batch: a model traced by `fit` rarely knows
    its batch size); None when a dim after the batch is unknown.

    Args:
        shape: the input's shape (a `tf.TensorShape` or a list).

    Returns:
        An int, or None.
    """
    dims = tf.TensorShape(shape).as_list()
    if None in dims[1:]:
        return None
    batch = ASSUMED_BATCH_SIZE if dims[0] is None else dims[0]
    return batch * math.prod(dims[1:])


def worth_compiling(shape):
    """Whether the math of a batch norm whose input has `shape` is worth running as XLA
    programs of its own: from `COMPILE_FROM_VALUES` (1,048,576) values, where they
    repay their compile time within the first few hundred steps (see `assumed_values`
    for an unknown batch size). When a dim after the batch is unknown the answer is True.

    Args:
        shape: the input's shape (a `tf.TensorShape` or a list).

    Returns:
        A bool.
    """
    values = assumed_values(shape)
    return values is None or values >= COMPILE_FROM_VALUES


def compiles(jit_compile, shape):
    """Whether a batch norm with this `jit_compile` (True, False or "auto") runs its
    math as XLA programs of its own for inputs of `shape` (see `worth_compiling`)."""
    return worth_compiling(shape) if jit_compile == "auto" else jit_compile


def in_xla_program():
    """True while tracing code that XLA compiles as a whole (a `tf.function` with
    `jit_compile=True`, such as a model compiled with `jit_compile=True`): a piece
    traced there is compiled with it, and a program of its own would only cost a
    function trace. TensorFlow has no public way to ask."""
    from tensorflow.python.ops import control_flow_util  # pylint: disable=import-outside-toplevel

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _is_tensor_like(value):
    return isinstance(value, (tf.Tensor, tf.Variable)) or (
        hasattr(value, "shape") and hasattr(value, "dtype"))


def _signature(value, any_dims=False):
    """A hashable key of a call's arguments: shape (or, with `any_dims`, rank) and
    dtype for tensors, else values."""
    if _is_tensor_like(value):
        shape = tf.TensorShape(value.shape)
        dims = shape.rank if any_dims or shape.rank is None else tuple(shape.as_list())
        return ("tensor", dims, tf.as_dtype(value.dtype).name)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(item, any_dims) for item in value)
    return value


def _with_any_dims(value):
    """The call's arguments with each tensor as a `tf.TensorSpec` of its rank and dtype
    whose dims are all unknown."""
    if _is_tensor_like(value):
        rank = tf.TensorShape(value.shape).rank
        return tf.TensorSpec(None if rank is None else [None] * rank, value.dtype)
    if isinstance(value, dict):
        return {name: _with_any_dims(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_any_dims(item) for item in value)
    return value
