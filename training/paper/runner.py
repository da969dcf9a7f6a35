"""Training runs: plain SGD on in-memory data, in a loop TensorFlow runs as one graph.

A `Runner` holds one model of each variant it is asked for (built once, traced once,
reset to the seed's initial weights before every run), the dataset as tensors, and a
`Probe` per model. `Runner.run` trains one model and returns its `Run`: the steps at
which it was evaluated, the test accuracy there and, when asked, the percentiles of
every unit's sigmoid input on the test images (read in training-mode batches).

The data order is a function of the seed alone (`batch_order`): every variant of a seed
sees the same batches in the same order.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from training.paper import networks
from training.paper.config import BATCH_SIZE

# Training steps the graph runs per call (the loop between calls is Python's).
CHUNK = 500
EVAL_BATCH = 2000


@dataclasses.dataclass
class Run:
    """What one training run gave.

    Attributes:
        steps: the steps after which the model was evaluated (0: before training).
        accuracy: the test accuracy at each of `steps`.
        percentiles: None, or float64 `(len(steps), 3, 100)`: the 15th, 50th and 85th
            percentiles over the test images of each last-hidden-layer sigmoid input.
        diverged: whether the loss became NaN or infinite.
    """

    steps: list
    accuracy: list
    percentiles: np.ndarray | None
    diverged: bool

    @property
    def final_accuracy(self):
        """The accuracy at the last evaluation."""
        return self.accuracy[-1]


def batch_order(seed, num_examples, batch_size, steps):
    """The example indices of each training step under `seed`.

    Epoch after epoch, a permutation of the training split drawn from NumPy's legacy
    `RandomState` seeded by (seed, epoch), cut into batches; a last partial batch of an
    epoch is dropped (a batch never holds an example twice).

    Args:
        seed: the run's seed.
        num_examples: the size of the training split.
        batch_size: examples per step, at most `num_examples`.
        steps: the number of steps.

    Returns:
        int32 `(steps, batch_size)`.
    """
    per_epoch = num_examples // batch_size
    epochs = math.ceil(steps / per_epoch)
    order = [np.random.RandomState([seed, epoch]).permutation(num_examples)
             [:per_epoch * batch_size].reshape(per_epoch, batch_size)
             for epoch in range(epochs)]
    return np.concatenate(order)[:steps].astype(np.int32)


def evaluation_steps(steps, evaluations):
    """Step 0 and `evaluations` evenly spaced steps up to `steps`, without repeats."""
    points = np.linspace(0, steps, evaluations + 1).round().astype(int)
    return sorted(set(points.tolist()))


class _Trained:
    """One model with its optimizer, its compiled training loop and its probe."""

    def __init__(self, model):
        import keras
        import tensorflow as tf

        self.model = model
        self.pristine = networks.Pristine(model)
        self.probe = networks.Probe(model)
        self.optimizer = keras.optimizers.SGD(learning_rate=0.1)
        self.optimizer.build(model.trainable_variables)
        self.loss = keras.losses.SparseCategoricalCrossentropy()
        shape = tuple(model.inputs[0].shape[1:])
        self.steps = tf.function(self._steps, input_signature=[
            tf.TensorSpec((None,) + shape, tf.float32), tf.TensorSpec((None,), tf.int32),
            tf.TensorSpec((None, None), tf.int32)])

    def _steps(self, images, labels, batches):
        """Trains on each row of `batches`; returns the last loss (NaN once any is)."""
        import tensorflow as tf

        worst = tf.constant(0.0)
        for i in tf.range(tf.shape(batches)[0]):
            x = tf.gather(images, batches[i])
            y = tf.gather(labels, batches[i])
            with tf.GradientTape() as tape:
                loss = self.loss(y, self.model(x, training=True))
            variables = self.model.trainable_variables
            gradients = tape.gradient(loss, variables)
            self.optimizer.apply(gradients, variables)
            worst = tf.where(tf.math.is_finite(loss), worst, float("nan"))
        return worst


class Runner:
    """Trains the paper's network in its variants on one dataset.

    Args:
        arrays: a `datasets.Arrays`.
    """

    def __init__(self, arrays):
        import tensorflow as tf

        self.arrays = arrays
        self._train = (tf.constant(arrays.train_images), tf.constant(arrays.train_labels))
        self._test_images = tf.constant(arrays.test_images)
        whole = len(arrays.test_labels) // BATCH_SIZE * BATCH_SIZE
        self._test_batches = tf.reshape(self._test_images[:whole],
                                        (-1, BATCH_SIZE) + arrays.image_shape)
        self._models = {}
        self._kernels = {}

    def model(self, variant, virtual_batch_size=None):
        """The (cached) `_Trained` model of a variant."""
        key = (variant, virtual_batch_size)
        if key not in self._models:
            built = networks.build(variant, self.arrays.image_shape, virtual_batch_size)
            self._models[key] = _Trained(built)
        return self._models[key]

    def kernels(self, seed):
        """The (cached) initial kernels of `seed`."""
        if seed not in self._kernels:
            self._kernels[seed] = networks.initial_kernels(seed, self.arrays.image_shape)
        return self._kernels[seed]

    def evaluate(self, trained, with_percentiles=False):
        """Test accuracy, and the percentiles of every sigmoid input when asked.

        The percentiles are over the test images read in training-mode batches of 60
        (`Probe.pre_activations`; a last partial batch left out), so a batch norm
        normalizes each with its own statistics, as in training.

        Returns:
            `(accuracy, table)`: a float, and None or float64 `(3, units)`.
        """
        images = self._test_images
        probabilities = np.concatenate([
            trained.probe.probabilities(images[i:i + EVAL_BATCH])
            for i in range(0, len(self.arrays.test_labels), EVAL_BATCH)])
        result = networks.accuracy(probabilities, self.arrays.test_labels)
        if not with_percentiles:
            return result, None
        return result, networks.percentiles(trained.probe.pre_activations(self._test_batches))

    def train_accuracy(self, trained):
        """The accuracy of `trained` on the training split, in inference mode."""
        images = self._train[0]
        probabilities = np.concatenate([
            trained.probe.probabilities(images[i:i + EVAL_BATCH])
            for i in range(0, len(self.arrays.train_labels), EVAL_BATCH)])
        return networks.accuracy(probabilities, self.arrays.train_labels)

    def run(self, variant, seed, *, learning_rate, steps, batch_size, evaluate_at=None,
            init_scale=1.0, virtual_batch_size=None, with_percentiles=False):
        """Trains one variant from the seed's initial weights, in the seed's data order.

        Args:
            variant: one of `networks.VARIANTS`.
            seed: the seed of the initial kernels and the data order.
            learning_rate: plain SGD's learning rate.
            steps: training steps.
            batch_size: examples per step.
            evaluate_at: the steps after which to evaluate (sorted, within 0..steps);
                None for the last one only.
            init_scale: the factor on the hidden layers' initial kernels.
            virtual_batch_size: for "ghost": the examples of each group.
            with_percentiles: whether to record the sigmoid inputs' percentiles.

        Returns:
            The `Run`. Its model is left trained, in `self.model(variant, ...)`.
        """
        trained = self.model(variant, virtual_batch_size)
        trained.pristine.reset(self.kernels(seed), init_scale)
        trained.optimizer.learning_rate = float(learning_rate)
        trained.optimizer.iterations.assign(0)
        order = batch_order(seed, len(self.arrays.train_labels), batch_size, steps)
        run = Run([], [], None, False)
        points = list(evaluate_at) if evaluate_at is not None else [steps]
        tables, done = [], 0
        for point in points:
            while done < point and not run.diverged:
                upto = min(point, done + CHUNK)
                last = trained.steps(*self._train, order[done:upto])
                run.diverged = bool(np.isnan(last.numpy()))
                done = upto
            accuracy, table = self.evaluate(trained, with_percentiles)
            run.steps.append(point)
            run.accuracy.append(accuracy)
            tables.append(table)
        if with_percentiles:
            run.percentiles = np.stack(tables)
        return run

