"""`kerasbn_digits`: scikit-learn's handwritten digits as a tensorflow-datasets builder.

The 1797 8x8 images of `sklearn.datasets.load_digits` (the test part of the UCI
"Optical Recognition of Handwritten Digits" set) ship with scikit-learn, so this
dataset prepares offline, in a few seconds, into any tfds data dir:

```python
import tensorflow_datasets as tfds
from training import digits_dataset  # registers "kerasbn_digits"

train = tfds.load("kerasbn_digits", split="train", data_dir=data_dir)
```
"""

import numpy as np
import tensorflow_datasets as tfds

from training.offline_builder import OfflineBuilder

NUM_EXAMPLES = 1797
NUM_TEST = 360
SPLIT_SEED = 0
# load_digits stores 17 grey levels, from 0 (background) to 16 (ink).
MAX_LEVEL = 16


def split_indices():
    """The fixed split of `load_digits` rows into train and test.

    A permutation drawn from NumPy's legacy `RandomState`, whose stream NumPy
    keeps unchanged across releases, so the split is the same everywhere.

    Returns:
        A tuple `(train, test)` of sorted int arrays of row indices, of sizes
        `NUM_EXAMPLES - NUM_TEST` and `NUM_TEST`.
    """
    order = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
    return np.sort(order[NUM_TEST:]), np.sort(order[:NUM_TEST])


def to_uint8(levels):
    """Scales `load_digits` grey levels 0..16 to uint8 0..255, rounding."""
    return np.round(np.asarray(levels) * (255 / MAX_LEVEL)).astype(np.uint8)


class KerasbnDigits(OfflineBuilder):
    """scikit-learn's 8x8 handwritten digits, split 1437 train / 360 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 1797 8x8 handwritten digits of sklearn.datasets.load_digits, "
                "grey levels 0..16 scaled to 0..255; a fixed random split of "
                f"{NUM_EXAMPLES - NUM_TEST} train and {NUM_TEST} test images."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": tfds.features.Scalar(
                        dtype=np.int64, doc="Row of the image in load_digits()."
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation=(
                "@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, "
                "title={Optical Recognition of Handwritten Digits}, year={1998}, "
                "howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits

        digits = load_digits()
        train, test = split_indices()
        return {
            "train": self._generate_examples(digits, train),
            "test": self._generate_examples(digits, test),
        }

    def _generate_examples(self, digits, indices):
        for i in indices:
            yield int(i), {
                "image": to_uint8(digits.images[i])[..., np.newaxis],
                "label": int(digits.target[i]),
                "index": int(i),
            }
