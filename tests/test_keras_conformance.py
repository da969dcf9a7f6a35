"""Keras's own tests of its BatchNormalization, run against kerasbn.BatchNormalization.

The test module ships inside the installed keras package
(keras/src/layers/normalization/batch_normalization_test.py). It is read from there,
not copied: this file loads it with its `layers.BatchNormalization` pointed at
kerasbn's layer, so every test Keras wrote for its layer runs against ours. Tests that
only check the wording of an error message are expected to fail (strictly: if one
starts passing, this file says so); README's "Keras's own tests" lists them.
"""

import importlib.util
import os
import types

import keras
import pytest

import kerasbn

_SUITE_PATH = os.path.join(
    os.path.dirname(keras.__file__), "src", "layers", "normalization",
    "batch_normalization_test.py",
)

# Tests that only check the wording of Keras's error messages, and why ours differ.
WORDING_ONLY = {
    "test_renorm_invalid_clipping_keys": (
        "checks Keras's wording ('Received invalid keys', 'rmax should be'); kerasbn "
        "refuses the same clippings with a message naming the layer, the argument, "
        "the value and what is allowed"
    ),
}


def _load_suite():
    if not os.path.isfile(_SUITE_PATH):
        pytest.skip(f"the installed keras ships no {_SUITE_PATH}", allow_module_level=True)
    spec = importlib.util.spec_from_file_location("keras_batch_normalization_suite",
                                                  _SUITE_PATH)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    # The suite refers to the layer as `layers.BatchNormalization`: the same module of
    # Keras layers, with kerasbn's batch norm in its place.
    layers = types.ModuleType("layers_with_kerasbn")
    layers.__dict__.update(vars(suite.layers))
    layers.BatchNormalization = kerasbn.BatchNormalization
    suite.layers = layers
    return suite


_suite = _load_suite()


class TestKerasSuiteOnKerasbn(_suite.BatchNormalizationTest):
    """Every test of keras.layers.BatchNormalization's suite, on kerasbn's layer."""


def pytest_collection_modifyitems_for_this_module(items):  # pragma: no cover - doc only
    """(Expected failures are marked below, by name.)"""


for _name, _reason in WORDING_ONLY.items():
    _test = getattr(TestKerasSuiteOnKerasbn, _name)
    setattr(TestKerasSuiteOnKerasbn, _name,
            pytest.mark.xfail(reason=_reason, strict=True, raises=AssertionError)(_test))


def test_the_suite_runs_against_kerasbn():
    """The loaded suite's `layers.BatchNormalization` is kerasbn's, and it has tests."""
    assert _suite.layers.BatchNormalization is kerasbn.BatchNormalization
    names = [n for n in dir(_suite.BatchNormalizationTest) if n.startswith("test_")]
    assert len(names) >= 10
    assert set(WORDING_ONLY) <= set(names)
