"""The final evaluation of a checkpoint of `python -m training.train`, on one device.

Inference needs no replicas, and compiling the evaluation once beats compiling it for
every replica, so the saved `.keras` file is loaded and evaluated in the process that
trained it, outside the run's strategy.
"""

import keras

import kerasbn  # noqa: F401 -- registers kerasbn.BatchNormalization for loading


def evaluate_statistics(path, batches, examples, moving_averages=None, jit_compile=False):
    """Test results of the checkpoint at `path`, and with the moving averages if given.

    The checkpoint is loaded and compiled once (on one device); it is evaluated as
    saved, then, when `moving_averages` is given, again with those weights (the model's
    `get_weights()` before the population pass: the same weights, the moving averages
    in place of the population statistics), reusing the compiled evaluation.

    Args:
        path: a `.keras` file written by this program.
        batches: a `tf.data.Dataset` of (images, labels) batches.
        examples: the number of test examples, to count those classified right.
        moving_averages: None, or the list of weights to evaluate with as well.
        jit_compile: compile the evaluation step with XLA.

    Returns:
        A dict: "test_loss", "test_accuracy", "test_correct" of the checkpoint, and
        the same keys with "_moving_averages" appended (equal to the checkpoint's when
        `moving_averages` is None).
    """
    model = _loaded_for_evaluation(path, jit_compile)
    loss, accuracy = (float(v) for v in model.evaluate(batches, verbose=0))
    if moving_averages is not None:
        model.set_weights(moving_averages)
        moving_loss, moving_accuracy = (float(v) for v in model.evaluate(batches,
                                                                         verbose=0))
    else:
        moving_loss, moving_accuracy = loss, accuracy
    return {
        "test_loss": loss,
        "test_accuracy": accuracy,
        "test_correct": correct_examples(accuracy, examples),
        "test_loss_moving_averages": moving_loss,
        "test_accuracy_moving_averages": moving_accuracy,
        "test_correct_moving_averages": correct_examples(moving_accuracy, examples),
    }


def _loaded_for_evaluation(path, jit_compile):
    model = keras.models.load_model(path, compile=False)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=jit_compile)
    return model


def correct_examples(accuracy, examples):
    """The number of examples classified right, from Keras's accuracy over `examples`.

    Keras's accuracy is a float32 quotient (correct / examples), a hair off the exact
    fraction (342 of 360 comes out just below 0.95); below 2**23 examples it is close
    enough to round back to the integer count.
    """
    return round(accuracy * examples)
