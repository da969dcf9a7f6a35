"""kerasbn.programs: when a batch norm's math runs as XLA programs, and in which form.

The auto rule of the layer's own programs is checked with the layer
(tests/test_layer.py, `test_auto_compiles_the_math_from_1048576_values`); here, the
form a step compiled whole reduces an input in.
"""

import pytest
import tensorflow as tf

from kerasbn import programs


@pytest.mark.parametrize("shape,axes,short", [
    ((32, 16, 16, 64), [0, 1, 2], True),
    ((33, 16, 16, 64), [0, 1, 2], False),       # a batch over 32
    ((32, 64, 8), [0, 2], True),                # channels first: the kept axis may be long
    ((None, 8, 8, 64), [0, 1, 2], True),        # an unknown batch counts as 32
    ((32, None, 8, 64), [0, 1, 2], False),      # an unknown axis after the batch: not known
    ((8192, 64), [0], False),                   # the [N·H·W, C] view
])
def test_short_axes_are_those_xla_keeps_in_one_reduction(shape, axes, short):
    assert programs.short_axes(shape, axes) is short


@pytest.mark.parametrize("shape,as_it_is", [
    ((32, 16, 16, 16), True),                   # 131,072 values: the largest taken as it is
    ((32, 16, 16, 17), False),                  # 139,264
    ((None, 8, 8, 48), True),
    ((64, 4, 4, 16), False),                    # a batch over 32
    ((32, 1280), True),
])
def test_a_step_compiled_whole_takes_small_inputs_with_short_axes_as_they_are(shape,
                                                                             as_it_is):
    axes = list(range(len(shape) - 1))
    assert programs.reduces_as_it_is(shape, axes) is False  # outside an XLA program
    traced = []

    @tf.function(jit_compile=True)
    def step(x):
        traced.append(programs.reduces_as_it_is(shape, axes))
        return x

    step(tf.constant(1.0))
    assert traced == [as_it_is]
