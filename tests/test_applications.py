"""Every keras.applications model converts, folds and exports, serving the stock outputs.

Each model is built at a small input size with `weights=None` and 10 classes (logits,
no softmax), its batch norms given random statistics, scales and offsets; then

- `convert_to_kerasbn` must compute what the stock model computes in inference,
- `fold_batch_norms` of the stock model too, with no batch norm left,
- the SavedModel `export_saved_model` writes for the converted model, loaded with
  `tf.saved_model.load`, must serve the stock model's inference outputs,

all to 1e-4 relative (max abs error over max abs output) on a fresh random batch.

By default the test runs a representative subset, `DEFAULT_APPLICATIONS`, chosen to
cover much of what the others are made of in about half a minute on 2 CPU cores:
MobileNetV3Small (hard-swish: `x + 3.0` and `*` operations that are not layers,
squeeze-and-excitation, depthwise convolutions, Rescaling) and EfficientNetB0
(Normalization with its own weights, swish, SE blocks, depthwise convolutions). Their
batch norms all fold; those that cannot (after Concatenate, Add or pooling, as in
DenseNet, ResNet*V2 and NASNet) are frozen in test_fold.py's graphs, and in the full
list. `KERASBN_ALL_APPLICATIONS=1` runs every model of keras.applications (40 in
Keras 3.15, all passing: 42 minutes on 2 shared CPU cores, from 4 s for VGG16 to 3
minutes for EfficientNetB7, a few GB of memory for the largest).
"""

import gc
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
import reference
from kerasbn import _graph

ALL_APPLICATIONS = sorted(name for name in dir(keras.applications)
                          if name[0].isupper() and callable(getattr(keras.applications, name)))
DEFAULT_APPLICATIONS = ("MobileNetV3Small", "EfficientNetB0")
SELECTED = (ALL_APPLICATIONS if os.environ.get("KERASBN_ALL_APPLICATIONS") == "1"
            else DEFAULT_APPLICATIONS)
# The smallest side each model builds at (Keras refuses smaller ones); 32 for the rest.
MIN_SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
TOLERANCE = 1e-4


def test_the_default_subset_is_part_of_keras_applications():
    assert set(DEFAULT_APPLICATIONS) <= set(ALL_APPLICATIONS)
    assert len(ALL_APPLICATIONS) > 30


@pytest.fixture
def collect_garbage():
    """Frees each model's weights before the next test builds another."""
    yield
    gc.collect()


def _build(name):
    size = MIN_SIZES.get(name, 32)
    try:
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=10,
            classifier_activation=None)
    except ValueError as error:  # Keras's own limits on the input shape
        pytest.skip(f"{name} does not build at {size}x{size}: {error}")


def _randomize_moderately(model, rng):
    """Random batch-norm weights whose gain a = γ/sqrt(var + ε) lies in about [0.55, 1.1].

    Folding has work to do, and a hundred norms in series stay tame. With γ up to 1.3
    and variances down to 0.5, EfficientNetV2M and V2L grew activations to 1e3-1e4 and
    the folded model's float32 rounding, 1e-6 relative after 40 layers, grew steadily
    (no jump at any layer) to the order of the outputs.
    """
    for layer in _graph.nested_layers(model):
        if _graph.is_batch_norm(layer):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.1, shape))
            layer.moving_variance.assign(rng.uniform(0.8, 1.2, shape))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.6, 1.0, shape))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.1, shape))


@pytest.mark.parametrize("name", SELECTED)
def test_application_converts_folds_and_serves_the_stock_outputs(name, rng, tmp_path,
                                                                 collect_garbage):
    model = _build(name)
    _randomize_moderately(model, rng)
    count = sum(_graph.is_batch_norm(layer) for layer in _graph.nested_layers(model))
    x = rng.uniform(0.0, 255.0, (2,) + tuple(model.input.shape[1:])).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float64)
    assert np.all(np.isfinite(expected)) and np.max(np.abs(expected)) > 0

    # jit_compile=False: the eager check below would compile each layer with XLA.
    converted = kerasbn.convert_to_kerasbn(model, synchronized=False, jit_compile=False)
    assert sum(isinstance(layer, kerasbn.BatchNormalization)
               for layer in _graph.nested_layers(converted)) == count
    assert _graph.input_layer_names(converted) == _graph.input_layer_names(model)
    assert reference.relative_error(converted(x, training=False), expected) < TOLERANCE

    folded, report = kerasbn.export.fold_batch_norms(model, return_report=True)
    assert len(report.folded) + len(report.frozen) == count
    print(f"{name}: {count} batch norms, {len(report.folded)} folded, "
          f"{len(report.frozen)} frozen")
    assert not any(_graph.is_batch_norm(layer) for layer in _graph.nested_layers(folded))
    assert reference.relative_error(folded(x, training=False), expected) < TOLERANCE
    del folded

    path = kerasbn.export.export_saved_model(converted, tmp_path / name, verify=False)
    signature = tf.saved_model.load(path).signatures["serving_default"]
    (input_name, _), = signature.structured_input_signature[1].items()
    assert input_name == kerasbn.export.DEFAULT_INPUT_NAME  # their inputs are unnamed
    served = signature(inputs=tf.constant(x))
    (output_name,) = served
    assert output_name == _graph.producer(model.outputs[0]).name  # "predictions", ...
    assert reference.relative_error(served[output_name], expected) < TOLERANCE
