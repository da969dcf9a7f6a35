"""programs: how a batch norm's pieces run, as XLA programs of their own, as graph
functions shared by every call of one signature, or op by op."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from kerasbn import moving_statistics, normalization, ops, programs


def _calls(graph):
    """{name of the graph function called: how many calls} in `graph`, and whether each
    call is an XLA program of its own ({name: bool})."""
    calls = [op for op in graph.get_operations()
             if op.type in ("PartitionedCall", "StatefulPartitionedCall")]
    counts = collections.Counter(op.get_attr("f").name for op in calls)
    xla = {op.get_attr("f").name: "_XlaMustCompile" in op.node_def.attr
           and op.get_attr("_XlaMustCompile") for op in calls}
    return counts, xla


def _recording_piece():
    """A compilable piece that records, each time its Python body runs, whether it runs
    eagerly (op by op) or is being traced."""
    bodies = []

    @programs.compilable
    def piece(x, *, compiled):
        bodies.append("eager" if tf.executing_eagerly() else "traced")
        return x * 2.0 + 1.0

    return piece, bodies


@pytest.mark.parametrize("compiled", [False, True])
def test_a_graph_piece_is_one_function_for_each_rank_and_a_program_for_each_shape(
        rng, compiled):
    shapes = [(64, 8), (64, 8), (32, 8), (64, 5)]

    @tf.function(autograph=False)
    def four_calls(*xs):
        return [ops.moments(x, (0,), compiled=compiled) for x in xs]

    graph = four_calls.get_concrete_function(*[tf.TensorSpec(s) for s in shapes]).graph
    counts, xla = _calls(graph)
    # Not compiled: one function for the rank; compiled: an XLA program for each shape.
    assert sorted(counts.values()) == ([1, 1, 2] if compiled else [4])
    assert all(name.startswith("__inference_moments_") for name in counts)
    assert set(xla.values()) == {compiled}
    # Each call's statistics keep their static shape, as a trace of their own gives.
    outputs = four_calls.get_concrete_function(
        *[tf.TensorSpec(s) for s in shapes]).structured_outputs
    assert [[t.shape.as_list() for t in stats] for stats in outputs] == [
        [[shape[1]]] * 3 for shape in shapes]

    xs = [(rng.standard_normal(s) * 3.0 + 5.0).astype(np.float32) for s in shapes]
    for (count, mean, variance), x in zip(four_calls(*xs), xs):
        exact = x.astype(np.float64)
        assert np.all(count.numpy() == x.shape[0])
        np.testing.assert_allclose(mean.numpy(), exact.mean(0), rtol=1e-6)
        np.testing.assert_allclose(variance.numpy(), exact.var(0), rtol=1e-5)


def test_a_graph_function_is_traced_once_whichever_step_calls_it():
    piece, bodies = _recording_piece()
    x = tf.constant([1.0, -2.0, 3.0])

    @tf.function
    def once(x):
        return piece(x)

    @tf.function
    def twice(x):
        return piece(x) + piece(x)

    np.testing.assert_array_equal(once(x).numpy(), [3.0, -3.0, 7.0])
    np.testing.assert_array_equal(twice(x).numpy(), [6.0, -6.0, 14.0])
    assert bodies == ["traced"]  # the second step's two calls reuse the first's trace
    twice(tf.constant([[1.0], [2.0]]))  # a new signature: a trace of its own
    assert bodies == ["traced", "traced"]


def test_called_eagerly_an_uncompiled_piece_runs_op_by_op():
    piece, bodies = _recording_piece()
    x = tf.constant([0.5, 4.0])
    for _ in range(2):
        np.testing.assert_array_equal(piece(x).numpy(), [2.0, 9.0])
    assert bodies == ["eager", "eager"]
    np.testing.assert_array_equal(piece(x, compiled=True).numpy(), [2.0, 9.0])
    assert bodies == ["eager", "eager", "traced"]  # its own XLA program


def test_inside_a_program_compiled_whole_a_piece_compiles_with_it():
    piece, bodies = _recording_piece()

    @tf.function(jit_compile=True)
    def whole(x):
        return piece(x) + piece(x, compiled=True)

    @tf.function(jit_compile=True)
    def again(x):
        return piece(x) * 3.0

    x = tf.constant([1.0, 2.0])
    counts, xla = _calls(whole.get_concrete_function(x).graph)
    assert sum(counts.values()) == 2 and not any(xla.values())  # no program of its own
    assert bodies == ["traced", "traced"]  # compiled or not: two forms of the piece
    np.testing.assert_array_equal(whole(x).numpy(), [6.0, 10.0])
    np.testing.assert_array_equal(again(x).numpy(), [9.0, 15.0])
    assert bodies == ["traced", "traced"]  # the second program reuses the first's trace


def test_inside_a_program_compiled_whole_a_piece_is_one_function_for_any_dims(rng):
    shapes = [(64, 8), (32, 8), (64, 5)]

    @tf.function(jit_compile=True, autograph=False)
    def whole(*xs):
        return [ops.moments(x, (0,)) for x in xs]

    graph = whole.get_concrete_function(*[tf.TensorSpec(s) for s in shapes]).graph
    counts, xla = _calls(graph)
    assert list(counts.values()) == [3] and not any(xla.values())
    xs = [(rng.standard_normal(s) * 3.0 - 7.0).astype(np.float32) for s in shapes]
    for (count, mean, variance), x in zip(whole(*xs), xs):
        exact = x.astype(np.float64)
        assert count.shape == mean.shape == variance.shape == (x.shape[1],)
        np.testing.assert_allclose(mean.numpy(), exact.mean(0), rtol=1e-6)
        np.testing.assert_allclose(variance.numpy(), exact.var(0), rtol=1e-5)


# Inputs as the layer gives them to its pieces: (input shape, axis) -> the view.
LAYOUTS = [((16, 6), -1), ((4, 5, 2, 3), -1), ((4, 3, 5, 2), 1), ((3, 4, 2, 5), [1, 3])]


def _piece_calls(rng, input_shape, axis, masked):
    """(name, piece, arguments) of every piece a layer calls, for one input."""
    layout = ops.Layout(input_shape, ops.channel_axes(axis, len(input_shape)))
    axes = layout.axes

    def tensor(shape, low=-2.0, high=2.0):
        return tf.constant(rng.uniform(low, high, shape), tf.float32)

    x = layout.view(tensor(input_shape) + 3.0)
    dy = tensor(x.shape)
    channels = [size for i, size in enumerate(x.shape) if i not in axes]
    weights = None
    if masked:
        weights = tf.constant(rng.integers(0, 2, [size if i in axes else 1 for i, size
                                                   in enumerate(x.shape)]), tf.float32)
    mean, inv_std, gamma, beta, count = (tensor(channels, 0.5, 1.5) for _ in range(5))
    mean_b, inv_std_b = (ops.broadcast_against(t, x, axes) for t in (mean, inv_std))
    updates = None if masked else tf.ones(channels)
    return [
        ("moments", ops.moments, (x, axes, weights)),
        ("shifted_moments", ops.shifted_moments, (x, axes, weights)),
        ("affine", ops.affine, (x, gamma, beta, layout.shape)),
        ("forward", normalization._normalize_forward,
         (x, mean_b, inv_std_b, gamma, beta, axes)),
        ("backward sums", normalization._backward_sums, (x, dy, mean_b, inv_std_b, axes)),
        ("backward dx", normalization._backward_dx,
         (x, dy, mean_b, inv_std_b, gamma, (mean, beta), weights, axes)),
        ("backward", normalization._backward,
         (x, dy, mean_b, inv_std_b, gamma, count, weights, axes)),
        ("moved", moving_statistics.moved, ([mean, gamma], [beta, inv_std], count, 0.9,
                                            updates)),
    ]


def _static_shape(tensor):
    return None if tensor is None else tensor.shape.as_list()


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("input_shape, axis", LAYOUTS)
def test_every_piece_traced_for_any_shape_gives_its_outputs_their_static_shapes(
        rng, input_shape, axis, masked):
    for name, piece, args in _piece_calls(rng, input_shape, axis, masked):
        eager = piece(*args)  # op by op
        traced = tf.function(lambda piece=piece, args=args: piece(*args), autograph=False)
        graph_outputs = traced.get_concrete_function().structured_outputs
        assert tf.nest.map_structure(_static_shape, graph_outputs) == \
            tf.nest.map_structure(_static_shape, eager), name
        for got, want in zip(tf.nest.flatten(traced()), tf.nest.flatten(eager)):
            if want is None:
                assert got is None, name
                continue
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=name)
