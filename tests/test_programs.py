"""programs: how a batch norm's pieces run, as XLA programs of their own, as graph
functions shared by every call of one signature, or op by op."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from kerasbn import ops, programs


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
def test_a_piece_traced_in_a_graph_is_one_function_for_each_signature(rng, compiled):
    shapes = [(64, 8), (64, 8), (32, 8), (64, 8)]

    @tf.function(autograph=False)
    def four_calls(*xs):
        return [ops.moments(x, (0,), compiled=compiled) for x in xs]

    graph = four_calls.get_concrete_function(*[tf.TensorSpec(s) for s in shapes]).graph
    counts, xla = _calls(graph)
    assert sorted(counts.values()) == [1, 3]  # (64, 8) three times, (32, 8) once
    assert all(name.startswith("__inference_moments_") for name in counts)
    assert set(xla.values()) == {compiled}

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
