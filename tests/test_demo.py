"""training.demo: the export and serving steps of `make demo`, on a trained checkpoint.

The training step is `training.train`'s program, tested end to end in test_train.py;
`make demo` itself is the full run.
"""

import os
import re

import keras
import numpy as np
import pytest

from training import data, demo, models

SERVED_ROW = re.compile(r"^\s+(\d+)\s+(\d)\s+(\d)\s+(0\.\d{3}|1\.000)(  \(wrong\))?$")


@pytest.fixture(scope="module")
def trained_checkpoint(digits_data_dir, tmp_path_factory):
    """A kerasbn ResNet trained for one epoch on digits, saved as the demo saves it."""
    train, test, info = data.load("digits", data_dir=digits_data_dir)
    keras.utils.set_random_seed(int(np.random.SeedSequence().entropy % 2**31))
    model = models.build_model("resnet", info.image_shape, info.num_classes, "kerasbn",
                               bn_momentum=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.batched(train, 64, shuffle=True), epochs=1, verbose=0)
    path = os.fspath(tmp_path_factory.mktemp("trained") / "model.keras")
    model.save(path)
    images, labels = (np.concatenate(parts) for parts in zip(
        *[(x.numpy(), y.numpy()) for x, y in data.batched(test, 512, shuffle=False)]))
    return path, images, labels


def test_demo_exports_a_version_and_serves_the_trained_model(trained_checkpoint,
                                                             digits_data_dir, tmp_path,
                                                             capsys):
    checkpoint, images, labels = trained_checkpoint
    export_dir = os.fspath(tmp_path / "saved_models" / "digits_resnet")

    path = demo.export(checkpoint, export_dir)
    served_accuracy = demo.serve(path, digits_data_dir)
    out = capsys.readouterr().out

    assert path == os.path.join(export_dir, "1")
    assert "batch norms: 9 folded into the layer before them, 0 frozen" in out
    assert "signature serving_default(images: float32[None, 8, 8, 1]) -> predictions" in out
    rows = [SERVED_ROW.match(line) for line in out.splitlines()]
    rows = [row for row in rows if row]
    assert len(rows) == demo.SHOWN_PREDICTIONS
    assert [int(row[2]) for row in rows] == list(labels[:demo.SHOWN_PREDICTIONS])

    keras_model = keras.models.load_model(checkpoint)
    predictions = keras_model.predict(images, verbose=0)
    assert [int(row[3]) for row in rows] == list(
        predictions[:demo.SHOWN_PREDICTIONS].argmax(axis=-1))
    keras_accuracy = float(np.mean(predictions.argmax(axis=-1) == labels))
    assert served_accuracy == pytest.approx(keras_accuracy, abs=1.5 / len(labels))
    assert f"exported model: test accuracy {served_accuracy:.2%} on {len(labels)}" in out


def test_a_second_demo_run_exports_the_next_version(trained_checkpoint, tmp_path, capsys):
    checkpoint, _, _ = trained_checkpoint
    export_dir = os.fspath(tmp_path / "digits_resnet")
    first = demo.export(checkpoint, export_dir)
    second = demo.export(checkpoint, export_dir)
    capsys.readouterr()
    assert (os.path.basename(first), os.path.basename(second)) == ("1", "2")
    assert sorted(os.listdir(export_dir)) == ["1", "2"]
