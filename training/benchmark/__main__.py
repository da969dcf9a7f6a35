"""`python -m training.benchmark`: see `training.benchmark.cli`."""

import os
import sys

# Before Keras and TensorFlow are first imported (by the imports below): Keras's
# backend, and TensorFlow's C++ start-up logs.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
