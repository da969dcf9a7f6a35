"""XLA's compile of a training step compiled whole, timed in this process.

The xla_compile section of the benchmark alternates `xla_compile_time` between
kerasbn's model and the stock one: fresh processes' compile times drift by seconds
on this machine, and in one process both contenders drift alike.
"""

import time

import keras
import tensorflow as tf


def xla_compile_time(model, x, y):
    """Compiles one SGD step of `model` on (x, y) whole with XLA, as a new function.

    `model.compile(jit_compile=True)` compiles this: the forward pass in training
    mode (moving statistics updated), the loss, the gradients and the update, one XLA
    program. The function is new at every call, so XLA compiles it anew.

    Returns:
        `(trace_s, compile_s)`: the seconds spent tracing the step into a graph, and
        those of its first call (XLA's lowering and compile, then one step) less a
        second call's (one step).
    """
    loss = keras.losses.SparseCategoricalCrossentropy()

    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        variables = model.trainable_variables
        for variable, gradient in zip(variables, tape.gradient(value, variables)):
            variable.assign_sub(0.01 * gradient)
        return value

    compiled = tf.function(step, jit_compile=True)
    started = time.perf_counter()
    compiled.get_concrete_function(x, y)
    traced = time.perf_counter()
    compiled(x, y).numpy()
    first = time.perf_counter()
    compiled(x, y).numpy()
    second = time.perf_counter()
    return traced - started, (first - traced) - (second - first)
