"""Keras callbacks for `fit`: population statistics before evaluation and at the end.

    model.fit(train, validation_data=val, epochs=10,
              callbacks=[kerasbn.callbacks.PopulationStatistics(train, steps=50),
                         keras.callbacks.ModelCheckpoint("best.keras")])
"""

import inspect

import keras

from kerasbn import _population_parts
from kerasbn import statistics


class PopulationStatistics(keras.callbacks.Callback):
    """Recomputes every batch norm's population statistics while `fit` runs.

    Before each evaluation that `fit` runs on its validation data (`on_test_begin`
    inside `fit`), and at the end of training (`on_train_end`), the moving statistics
    are set by `kerasbn.recompute_statistics(model, data, steps)`. So the validation
    metrics, the checkpoints and exports that follow them (callbacks placed after this
    one, e.g. `ModelCheckpoint`, see the recomputed statistics) and the model `fit`
    returns all reflect population statistics of the weights they go with, rather than
    moving averages that lag behind them. `evaluate` called outside `fit` is left alone.

    The moving averages go on from the recomputed values in the next epoch; the
    training-mode forward pass does not read them. Renorm layers keep their
    statistics (their corrections read them in training) unless `recompute_renorm`.
    The traced pass is kept from one evaluation to the next (retraced only when the
    model's batch norms or their `trainable` flags change). Works under the model's
    MirroredStrategy or MultiWorkerMirroredStrategy like `recompute_statistics`.

    Args:
        data: what `recompute_statistics` takes, read again for every recompute: a
            `tf.data.Dataset` (e.g. the training data), a distributed dataset, arrays,
            tensors, a dict of them, or a `keras.utils.PyDataset`; not a generator,
            which would be used up by the first pass.
        steps: None for all of `data`, or the number of batches per pass.
        batch_size: for arrays and tensors: examples per batch (default 32).
        verbose: the passes' progress: 0 (default, quiet: fit shows its own), 1, 2.
        on_evaluation: recompute before each validation inside `fit`.
        on_train_end: recompute when `fit` ends.
        recompute_renorm: recompute renorm layers too (see `recompute_statistics`).

    Attributes:
        summary: the `StatisticsSummary` of the last pass, or None.
    """

    def __init__(self, data, steps=None, batch_size=None, verbose=0, on_evaluation=True,
                 on_train_end=True, recompute_renorm=False):
        super().__init__()
        _population_parts.check_arguments(steps, verbose, batch_size)
        if inspect.isgenerator(data):
            raise ValueError(
                "PopulationStatistics: argument `data` must be data that can be read "
                "again at every recompute (a tf.data.Dataset, arrays, a PyDataset); "
                f"received a generator, data={data!r}, which the first pass would use up.")
        self.data = data
        self.steps = steps
        self.batch_size = batch_size
        self.verbose = verbose
        self.on_evaluation = bool(on_evaluation)
        self.recompute_on_train_end = bool(on_train_end)
        self.recompute_renorm = bool(recompute_renorm)
        self.summary = None
        self._pass = None
        self._in_fit = False

    def recompute(self):
        """Recomputes now (what the callback does at its moments)."""
        if self._pass is None or not self._pass.matches(self.model):
            self._pass = statistics.PopulationPass(self.model, self.recompute_renorm)
        self.summary = self._pass.run(self.data, steps=self.steps, verbose=self.verbose,
                                      batch_size=self.batch_size)
        return self.summary

    def on_train_begin(self, logs=None):
        self._in_fit = True

    def on_test_begin(self, logs=None):
        if self._in_fit and self.on_evaluation:
            self.recompute()

    def on_train_end(self, logs=None):
        self._in_fit = False
        if self.recompute_on_train_end:
            self.recompute()
