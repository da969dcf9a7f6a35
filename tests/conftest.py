"""Test configuration: the CPU is split into logical devices before TensorFlow starts.

Multi-replica tests run MirroredStrategy over these devices; everything else runs on
the first one, as it would on a single-device machine.
"""

import logging
import os

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
)

import keras  # noqa: E402  (after the devices are split: it may start TensorFlow's runtime)


SEED_VARIABLE = "KERASBN_TEST_SEED"
# Modules whose runs take longest, started first so that the two processes of
# `make test` (pytest-xdist, one module to a process) end together.
LONGEST_FIRST = ("test_train.py", "test_distribute.py", "test_benchmark.py",
                 "test_statistics.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its order


@pytest.fixture
def rng(request):
    """A NumPy generator with a fresh seed each run; the seed is printed on failure.

    The same seed seeds Keras (its initializers and dropout), TensorFlow, NumPy's and
    Python's global generators, so that a test that builds layers replays too: run it
    again with the printed seed,
    `KERASBN_TEST_SEED=<seed> .venv/bin/python -m pytest tests/<file>::<test>`.
    """
    replay = os.environ.get(SEED_VARIABLE)
    seed = int(replay) if replay else np.random.SeedSequence().entropy % (2**32)
    print(f"rng seed for {request.node.name}: {seed} (replay: {SEED_VARIABLE}={seed})")
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """MirroredStrategy over the logical CPU devices: NUM_LOGICAL_CPUS replicas."""
    from training import runtime

    # Keys of its own: test modules that run training.train make strategies too.
    return runtime.mirrored_strategy([f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)])


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A tfds data dir holding the prepared kerasbn_digits (the offline default dataset)."""
    from training import digits_dataset

    data_dir = os.fspath(tmp_path_factory.mktemp("tfds"))
    digits_dataset.KerasbnDigits(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture
def tensorflow_log():
    """The messages TensorFlow's logger emits during the test, as a list of strings."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    tf.get_logger().addHandler(handler)
    yield messages
    tf.get_logger().removeHandler(handler)
