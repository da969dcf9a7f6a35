"""Tests of training.data and the kerasbn_digits tfds builder.

Every test uses its own tfds data dir under pytest's tmp_path, so none depends on
what the machine holds in ~/tensorflow_datasets.
"""

import concurrent.futures
import os
import socket
import threading
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from training import data, digits_dataset

NUM_TRAIN, NUM_TEST = 1437, 360


def read_split(data_dir, split):
    """A split of kerasbn_digits, read through tfds.load, as NumPy arrays in file order."""
    dataset = tfds.load("kerasbn_digits", split=split, data_dir=data_dir, batch_size=-1)
    return tfds.as_numpy(dataset)


def labels_of(dataset):
    return np.concatenate([labels for _, labels in dataset.as_numpy_iterator()])


def test_digits_builder_prepares_and_loads_through_tfds(digits_data_dir):
    builder = tfds.builder("kerasbn_digits", data_dir=digits_data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == NUM_TRAIN
    assert builder.info.splits["test"].num_examples == NUM_TEST
    assert builder.info.features["label"].num_classes == 10

    sklearn_digits = load_digits()
    train, test = read_split(digits_data_dir, "train"), read_split(digits_data_dir, "test")
    for split, size in ((train, NUM_TRAIN), (test, NUM_TEST)):
        assert split["image"].shape == (size, 8, 8, 1)
        assert split["image"].dtype == np.uint8
        assert set(split["label"]) == set(range(10))
        rows = split["index"]
        expected = np.round(sklearn_digits.images[rows] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(split["image"][..., 0], expected)
        np.testing.assert_array_equal(split["label"], sklearn_digits.target[rows])
    assert train["image"].min() == 0 and train["image"].max() == 255
    all_rows = np.concatenate([train["index"], test["index"]])
    np.testing.assert_array_equal(np.sort(all_rows), np.arange(1797))


def test_digits_split_and_order_are_the_same_in_every_build(digits_data_dir, tmp_path):
    digits_dataset.KerasbnDigits(data_dir=os.fspath(tmp_path)).download_and_prepare()
    for split in ("train", "test"):
        np.testing.assert_array_equal(read_split(digits_data_dir, split)["index"],
                                      read_split(os.fspath(tmp_path), split)["index"])


def test_two_builds_at_once_both_succeed(tmp_path):
    # Threads stand in for processes and start much faster: the lock is a file
    # lock, which also holds between two opens of the file in one process.
    start = threading.Barrier(2)

    def build():
        start.wait()
        train, test, info = data.load("digits", data_dir=os.fspath(tmp_path))
        return info.num_train, info.num_test, len(labels_of(test.batch(NUM_TEST)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = [future.result() for future in [pool.submit(build), pool.submit(build)]]
    assert results == [(NUM_TRAIN, NUM_TEST, NUM_TEST)] * 2
    assert os.listdir(tmp_path / "kerasbn_digits") == ["1.0.0"]


def test_load_returns_float_images_and_int32_labels(digits_data_dir):
    train, test, info = data.load("digits", data_dir=digits_data_dir)
    assert info == data.DatasetInfo(
        name="digits",
        image_shape=(8, 8, 1),
        num_classes=10,
        num_train=NUM_TRAIN,
        num_test=NUM_TEST,
    )
    for dataset, size in ((train, NUM_TRAIN), (test, NUM_TEST)):
        assert dataset.element_spec == (
            tf.TensorSpec((8, 8, 1), tf.float32),
            tf.TensorSpec((), tf.int32),
        )
        images, labels = next(iter(dataset.batch(size + 1)))
        assert images.shape[0] == size
        assert float(tf.reduce_min(images)) == 0.0 and float(tf.reduce_max(images)) == 1.0
        assert set(labels.numpy()) == set(range(10))
    # Same order as the uint8 images tfds stores.
    images, _ = next(iter(test.batch(NUM_TEST)))
    stored = read_split(digits_data_dir, "test")["image"]
    np.testing.assert_allclose(images.numpy() * 255, stored, atol=1e-4)


def test_load_defaults_to_digits_in_kerasbn_data_dir(digits_data_dir, monkeypatch):
    monkeypatch.setenv("KERASBN_DATA_DIR", digits_data_dir)
    assert data.default_data_dir() == digits_data_dir
    _, _, info = data.load()
    assert data.DEFAULT_DATASET == "digits"
    assert (info.name, info.num_train) == ("digits", NUM_TRAIN)


def test_batched_keeps_the_last_partial_batch_unless_asked_to_drop_it(digits_data_dir):
    train, _, _ = data.load(data_dir=digits_data_dir)
    kept = data.batched(train, 64, shuffle=False)
    sizes = [len(labels) for _, labels in kept.as_numpy_iterator()]
    assert sizes == [64] * 22 + [29]

    dropped = data.batched(train, 64, shuffle=True, seed=0, drop_remainder=True)
    assert dropped.element_spec[0].shape == (64, 8, 8, 1)
    sizes = [len(labels) for _, labels in dropped.as_numpy_iterator()]
    assert sizes == [64] * 22


def test_shuffling_with_a_seed_is_reproducible(digits_data_dir):
    train, _, _ = data.load(data_dir=digits_data_dir)
    in_order = labels_of(data.batched(train, 64, shuffle=False))
    shuffled = data.batched(train, 64, shuffle=True, seed=7)
    first_epoch, second_epoch = labels_of(shuffled), labels_of(shuffled)
    same_seed = labels_of(data.batched(train, 64, shuffle=True, seed=7))
    other_seed = labels_of(data.batched(train, 64, shuffle=True, seed=8))

    np.testing.assert_array_equal(first_epoch, same_seed)
    assert not np.array_equal(first_epoch, in_order)
    assert not np.array_equal(first_epoch, second_epoch)  # a new order every epoch
    assert not np.array_equal(first_epoch, other_seed)
    np.testing.assert_array_equal(np.sort(first_epoch), np.sort(in_order))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "64", True])
def test_batched_rejects_a_batch_size_that_is_not_a_positive_integer(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        data.batched(tf.data.Dataset.range(10), batch_size, shuffle=False)


# ------------------------------------------------------------------ the training stream


def numbers_dataset(count):
    return tf.data.Dataset.range(count).map(lambda i: (i, i % 7))


def stream_batches(stream):
    return [x.numpy().tolist() for x, _ in stream]


def test_training_stream_keeps_the_last_partial_batch_and_reshuffles_each_epoch():
    keras.utils.set_random_seed(0)
    stream = data.training_stream(numbers_dataset(10), 10, 4, seed=1, first_epoch=0,
                                  epochs=2, steps_per_epoch=3)
    batches = stream_batches(stream)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    first, second = batches[:3], batches[3:]
    assert sorted(sum(first, [])) == list(range(10))
    assert sorted(sum(second, [])) == list(range(10))
    assert first != second
    # Iterating again gives the same batches (Keras iterates once more under a strategy).
    assert stream_batches(stream) == batches
    # A run resumed at epoch 1 reads what the uninterrupted run read in epoch 1.
    resumed = data.training_stream(numbers_dataset(10), 10, 4, seed=1, first_epoch=1,
                                   epochs=2, steps_per_epoch=3)
    assert stream_batches(resumed) == second
    # Workers split the batches (a generated stream has no files to split).
    assert (stream.options().experimental_distribute.auto_shard_policy
            == tf.data.experimental.AutoShardPolicy.DATA)


def test_training_stream_runs_over_passes_when_an_epoch_asks_for_more():
    keras.utils.set_random_seed(0)
    stream = data.training_stream(numbers_dataset(10), 10, 4, seed=1, first_epoch=0,
                                  epochs=1, steps_per_epoch=5)
    batches = stream_batches(stream)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    assert sorted(sum(batches[:3], [])) == list(range(10))
    assert batches[3:] != batches[:2]  # the second pass is shuffled anew
    assert data.examples_per_epoch(10, 4, 5) == 18 == sum(len(b) for b in batches)
    assert data.examples_per_epoch(10, 4, None) == 10
    assert data.examples_per_epoch(1437, 64, 22) == 1408


def test_a_stream_resumed_after_the_last_epoch_is_empty():
    stream = data.training_stream(numbers_dataset(10), 10, 4, seed=1, first_epoch=2,
                                  epochs=2, steps_per_epoch=3)
    assert stream_batches(stream) == []


def test_pass_seeds_differ_across_seeds_epochs_and_passes():
    seeds = {data.pass_seed(seed, epoch, index)
             for seed in range(3) for epoch in range(50) for index in range(3)}
    assert len(seeds) == 3 * 50 * 3
    assert all(0 <= seed < 2**31 - 1 for seed in seeds)


# ------------------------------------------------------------------ unavailable datasets


def assert_one_line_naming_digits(error):
    message = str(error.value)
    assert "\n" not in message
    assert "--dataset digits" in message


def test_unknown_name_raises_dataset_unavailable(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("no_such_dataset", data_dir=os.fspath(tmp_path))
    assert isinstance(error.value, ValueError)
    assert "'no_such_dataset'" in str(error.value)
    assert_one_line_naming_digits(error)


def test_tfds_name_without_local_data_raises_quickly(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("mnist", data_dir=os.fspath(tmp_path))
    assert time.monotonic() - start < 5
    assert "'mnist'" in str(error.value) and os.fspath(tmp_path) in str(error.value)
    assert_one_line_naming_digits(error)
    assert not (tmp_path / "mnist").exists()


def test_download_that_cannot_reach_its_host_raises_quickly(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "getproxies", dict)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("mnist", data_dir=os.fspath(tmp_path), allow_download=True)
    assert time.monotonic() - start < 5
    assert "cannot be reached" in str(error.value)
    assert_one_line_naming_digits(error)


def test_dataset_that_is_not_image_classification_raises(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("glue", data_dir=os.fspath(tmp_path))
    assert "image-classification" in str(error.value)
    assert_one_line_naming_digits(error)
