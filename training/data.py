"""Datasets for the training programs: tensorflow-datasets in, tf.data pipelines out.

Any tfds image-classification dataset (mnist, fashion_mnist, cifar10, ...) works
where its data can be had: a prepared copy in `data_dir`, or a download when
`allow_download=True` and the network allows it. The default, "digits", is
scikit-learn's handwritten digits (`training.digits_dataset`), which tfds prepares
offline on first use.

```python
train, test, info = data.load("digits")
train = data.batched(train, 64, shuffle=True, seed=0)
test = data.batched(test, 64, shuffle=False)
```

`training_stream` is the training program's stream of batches: epoch after epoch, each
shuffled with seeds made of (seed, epoch), sharded across workers by data.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import socket
import urllib.parse
import urllib.request

import tensorflow as tf
import tensorflow_datasets as tfds

from training import digits_dataset
from training.program import first_error_line

DEFAULT_DATASET = "digits"

# Public names of the project's own tfds builders; these prepare without a network.
_OWN_BUILDERS = {"digits": digits_dataset.KerasbnDigits.name}
_TEST_SPLITS = ("test", "validation")
# Examples a shuffle draws from: all of "digits", and enough to mix larger sets.
SHUFFLE_BUFFER = 10_000
_CONNECT_TIMEOUT_SECONDS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}
_MAX_REASON_CHARS = 200


class DatasetUnavailableError(ValueError):
    """A dataset that does not exist, does not fit, or whose data cannot be had here.

    The message is one line and names the offline default, "digits".
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Attributes:
        name: The name the dataset was loaded by, e.g. "digits" or "mnist".
        image_shape: `(height, width, channels)` of every image.
        num_classes: Number of classes; labels run from 0 to `num_classes - 1`.
        num_train: Number of training examples.
        num_test: Number of test examples.
    """

    name: str
    image_shape: tuple
    num_classes: int
    num_train: int
    num_test: int


def default_data_dir() -> str:
    """The tfds data dir used when none is given.

    Returns:
        `$KERASBN_DATA_DIR` if set, else tensorflow-datasets' default
        (`$TFDS_DATA_DIR`, or `~/tensorflow_datasets`).
    """
    return os.environ.get("KERASBN_DATA_DIR") or os.path.expanduser(
        tfds.core.constants.DATA_DIR
    )


def load(
    name: str = DEFAULT_DATASET,
    data_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetInfo]:
    """Loads an image-classification dataset through tensorflow-datasets.

    The project's own "digits" is prepared into `data_dir` on first use. Any
    other dataset must already be prepared there, unless `allow_download` is
    set, in which case tfds downloads and prepares it.

    Args:
        name: "digits" (the default, offline) or a tfds dataset name such as
            "mnist", "fashion_mnist" or "cifar10", optionally with a config
            and version ("name/config:1.2.3").
        data_dir: The tfds data dir. Defaults to `default_data_dir()`.
        allow_download: Whether to download and prepare a dataset that has no
            prepared copy in `data_dir`.

    Returns:
        A tuple `(train, test, info)`: two unbatched `tf.data.Dataset`s of
        `(image, label)` pairs, image float32 `(height, width, channels)` in
        [0, 1] and label int32, in a fixed order; and a `DatasetInfo`. The
        test set is the "test" split, or "validation" where there is none.

    Raises:
        DatasetUnavailableError: If tfds has no dataset called `name`, if it
            is not an image-classification dataset of fixed-size images with
            train and test splits, or if its data is neither in `data_dir`
            nor (with `allow_download`) obtainable.
    """
    data_dir = os.fspath(data_dir or default_data_dir())
    builder = _builder(name, data_dir)
    if not _is_image_classification(builder.info):
        raise _error(
            name,
            "is not an image-classification dataset (one needs supervised keys "
            "naming an Image feature of fixed shape and a ClassLabel)",
            "another tfds image-classification dataset",
        )
    if not _is_prepared(builder):
        if not (allow_download or builder.name in _OWN_BUILDERS.values()):
            raise _unavailable(name, f"no prepared copy in {data_dir}, and downloads are off")
        _prepare(name, builder, data_dir)

    splits = builder.info.splits
    test_split = next((split for split in _TEST_SPLITS if split in splits), None)
    if "train" not in splits or test_split is None:
        raise _error(
            name,
            f"has splits {sorted(splits)}, not 'train' and 'test'",
            "another tfds image-classification dataset",
        )
    image_key, label_key = builder.info.supervised_keys
    image, label = builder.info.features[image_key], builder.info.features[label_key]
    info = DatasetInfo(
        name=name,
        image_shape=tuple(image.shape),
        num_classes=label.num_classes,
        num_train=splits["train"].num_examples,
        num_test=splits[test_split].num_examples,
    )
    return _read(builder, "train"), _read(builder, test_split), info


def batched(
    dataset: tf.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Shuffles (when asked), batches and prefetches a dataset.

    Args:
        dataset: An unbatched `tf.data.Dataset`, e.g. from `load()`.
        batch_size: Number of examples per batch, a positive integer.
        shuffle: Whether to shuffle, anew each epoch, through a buffer of
            `SHUFFLE_BUFFER` examples.
        seed: The shuffle seed; the same seed gives the same orders in every
            run. None leaves them to TensorFlow's global seed
            (`tf.random.set_seed`), random when that is unset.
        drop_remainder: Whether to drop a last batch smaller than
            `batch_size`. By default it is kept.

    Returns:
        The batched, prefetched `tf.data.Dataset`.

    Raises:
        ValueError: If `batch_size` is not a positive integer.
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shuffle:
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


def training_stream(
    train: tf.data.Dataset,
    num_examples: int,
    batch_size: int,
    seed: int,
    first_epoch: int,
    epochs: int,
    steps_per_epoch: int,
) -> tf.data.Dataset:
    """The batches of epochs `first_epoch` .. `epochs - 1`, one after another.

    Epoch e reads `steps_per_epoch` batches from passes over the training split, pass p
    shuffled with `pass_seed(seed, e, p)` and batched by `batched` (the last partial
    batch of a pass kept). What an epoch sees thus depends on the seed and e only: not
    on the epochs before it in this process, nor on how often the dataset is iterated
    (Keras iterates it once more to build a model under a strategy). A resumed run
    continues with the very batches an uninterrupted one reads. Workers split each
    batch (auto-sharding by data: a generated stream has no files to split).

    Args:
        train: the unbatched training split, e.g. from `load()`.
        num_examples: the number of examples in `train`.
        batch_size: the global batch size.
        seed: the run's seed.
        first_epoch: the 0-based epoch to start from (> 0 when resuming).
        epochs: the number of epochs in all, counting those before `first_epoch`.
        steps_per_epoch: batches per epoch.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.
    """
    batches_per_pass = math.ceil(num_examples / batch_size)
    buffer = min(num_examples, SHUFFLE_BUFFER)

    def one_pass(epoch, index):
        order = train.shuffle(buffer, seed=pass_seed(seed, epoch, index),
                              reshuffle_each_iteration=False)
        return batched(order, batch_size, shuffle=False)

    def epoch_batches(epoch):
        passes = math.ceil(steps_per_epoch / batches_per_pass)
        return _joined([lambda p=p: one_pass(epoch, p) for p in range(passes)]).take(
            steps_per_epoch)

    epochs_left = [lambda e=e: epoch_batches(e) for e in range(first_epoch, epochs)]
    if not epochs_left:
        return _with_data_sharding(one_pass(first_epoch, 0).take(0))
    return _with_data_sharding(_joined(epochs_left).prefetch(tf.data.AUTOTUNE))


def pass_seed(seed: int, epoch: int, index: int) -> int:
    """The shuffle seed of pass `index` of epoch `epoch` (both 0-based) under `seed`."""
    return (seed * 1_000_003 + epoch * 1_009 + index) % (2**31 - 1)


def examples_per_epoch(num_examples: int, batch_size: int,
                       steps_per_epoch: int | None) -> int:
    """Training examples one epoch of `training_stream` reads.

    Args:
        num_examples: the number of examples in the training split.
        batch_size: the global batch size.
        steps_per_epoch: batches per epoch; None for one pass.

    Returns:
        `num_examples` for one pass, else what `steps_per_epoch` batches of passes hold.
    """
    batches_per_pass = math.ceil(num_examples / batch_size)
    if steps_per_epoch is None:
        return num_examples
    passes, extra = divmod(steps_per_epoch, batches_per_pass)
    return passes * num_examples + extra * batch_size


def _joined(makers):
    """The datasets made by `makers`, concatenated as a balanced tree (shallow nesting)."""
    if len(makers) == 1:
        return makers[0]()
    middle = len(makers) // 2
    return _joined(makers[:middle]).concatenate(_joined(makers[middle:]))


def _with_data_sharding(dataset):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def _builder(name, data_dir):
    tfds_name = _OWN_BUILDERS.get(name, name)
    base_name = tfds_name.split(":")[0].split("/")[0]
    if base_name not in tfds.list_builders(with_community_datasets=False):
        raise _error(
            name,
            "is not a tensorflow-datasets name",
            "a name from tfds.list_builders()",
        )
    try:
        return tfds.builder(tfds_name, data_dir=data_dir)
    except ValueError as error:  # e.g. a config or version the dataset lacks
        raise _unavailable(name, first_error_line(error, _MAX_REASON_CHARS)) from error


def _is_image_classification(info):
    keys = info.supervised_keys
    if not (
        isinstance(info.features, tfds.features.FeaturesDict)
        and isinstance(keys, tuple)
        and len(keys) == 2
        and all(isinstance(key, str) for key in keys)
    ):
        return False
    image, label = (info.features[key] for key in keys)
    return (
        isinstance(image, tfds.features.Image)
        and None not in image.shape
        and isinstance(label, tfds.features.ClassLabel)
    )


def _is_prepared(builder):
    # WORKAROUND (tensorflow-datasets): builder.is_prepared() logs a warning when the
    # directory does not exist, which is the normal case before a first download.
    return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


def _prepare(name, builder, data_dir):
    # WORKAROUND (tensorflow-datasets): without a network tfds retries each download
    # for minutes; fail at once.
    host = _unreachable_host(builder)
    if host:
        raise _unavailable(name, f"no prepared copy in {data_dir}, and {host} cannot be reached")
    try:
        builder.download_and_prepare()
    except Exception as error:
        raise _unavailable(
            name, f"no prepared copy in {data_dir}, and preparing one failed: {first_error_line(error, _MAX_REASON_CHARS)}"
        ) from error


def _unreachable_host(builder):
    """The first host `builder` downloads from that does not answer, or None."""
    if urllib.request.getproxies():
        return None  # Downloads go through the proxy; let tfds try.
    addresses = set()
    for url in builder.url_infos or {}:
        parts = urllib.parse.urlsplit(url)
        addresses.add((parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)))
    for host, port in sorted(addresses):
        try:
            socket.create_connection((host, port), _CONNECT_TIMEOUT_SECONDS).close()
        except OSError:
            return host
    return None


def _read(builder, split):
    def to_float(image, label):
        return tf.image.convert_image_dtype(image, tf.float32), tf.cast(label, tf.int32)

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    return dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)


def _unavailable(name, reason):
    return _error(
        name,
        f"is not available here ({reason})",
        "point --data-dir at a prepared copy",
    )


def _error(name, problem, alternative):
    return DatasetUnavailableError(
        f"dataset {name!r} {problem}: use --dataset {DEFAULT_DATASET}, the offline "
        f"default, or {alternative}"
    )


def population_batches(train, batch_size, seed, epochs):
    """The training data of the population pass: one pass, in batches of `batch_size`.

    Shuffled, so that the pass's batches are made up like training's and the first
    --population-batches of them are a fair sample, in an order fixed by the seed (the
    order `pass_seed` gives an epoch after the last), the same on every
    worker; the last partial batch kept; split by data across workers as the training
    stream is.

    Args:
        train: the unbatched training split, e.g. from `training.data.load()`.
        batch_size: the global batch size (--batch-size).
        seed: the run's --seed.
        epochs: the run's --epochs.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches.
    """
    batches = batched(train, batch_size, shuffle=True, seed=pass_seed(seed, epochs, 0))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return batches.with_options(options)
