"""The training program's Keras callbacks: epoch timing, batch-norm statistics, interruption.

    timer = EpochTimer()
    model.fit(..., callbacks=[timer, BatchNormStatistics("runs/train/logs/batch_norm")])
    examples_per_second(examples_per_epoch, timer.seconds)
    kerasbn.recompute_statistics(model, train)
    write_population_statistics("runs/train/logs/batch_norm", model, step=epochs - 1)
"""

import time

import keras
import tensorflow as tf

import kerasbn

BATCH_NORM_KINDS = (kerasbn.BatchNormalization, keras.layers.BatchNormalization)
# TensorBoard tags, after "<layer name>/": {statistic: tag}.
MOVING_TAGS = {"moving_mean": "moving_mean", "moving_variance": "moving_variance"}
POPULATION_TAGS = {"moving_mean": "population_mean",
                   "moving_variance": "population_variance"}


class TrainingInterrupted(RuntimeError):
    """Raised by `InterruptAfterEpoch`: training stopped as if the job were preempted.

    The backup of the last finished epoch is in place; the same command resumes it.
    """


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch's training steps (no evaluation, no saving).

    Attributes:
        seconds: one float per finished epoch, from its start to its last batch.
    """

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._last = self._start

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(self._last - self._start)


class BatchNormStatistics(keras.callbacks.Callback):
    """Writes each batch-norm layer's moving statistics to TensorBoard every epoch.

    For every kerasbn or Keras `BatchNormalization` layer, histograms of `moving_mean`
    and `moving_variance` over the channels and scalars of their channel means, under
    `<layer name>/...`, at step = epoch (as Keras's own TensorBoard callback counts).

    Args:
        log_dir: directory of the summaries (a `tf.summary` file writer), or None to
            read the statistics without writing them (non-chief workers: the read may
            be a collective every worker must join).
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        statistics = batch_norm_statistics(self.model)
        if self._writer is None:
            return
        _write(self._writer, statistics, epoch, MOVING_TAGS)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_population_statistics(log_dir, model, step):
    """Writes each batch norm's statistics, after a population pass, to TensorBoard.

    Beside `BatchNormStatistics`'s moving averages, under `<layer name>/population_mean`
    and `<layer name>/population_variance` (histograms over the channels, and scalars of
    their channel means with the suffix `_channel_mean`), so that TensorBoard shows how
    far the moving averages were from the population statistics at the same step.

    Args:
        log_dir: the directory of the summaries (`BatchNormStatistics`'s).
        model: the model whose batch norms hold population statistics.
        step: the step to write at: the last epoch (0-based), as Keras counts.
    """
    writer = tf.summary.create_file_writer(log_dir)
    try:
        _write(writer, batch_norm_statistics(model), step, POPULATION_TAGS)
    finally:
        writer.close()


def _write(writer, statistics, step, tags):
    with writer.as_default(step=step):
        for name, stats in statistics.items():
            for key, tag in tags.items():
                tf.summary.histogram(f"{name}/{tag}", stats[key])
                tf.summary.scalar(f"{name}/{tag}_channel_mean", float(stats[key].mean()))
    writer.flush()


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Raises `TrainingInterrupted` at the end of epoch `epoch` (1-based).

    Args:
        epoch: the last epoch to finish, counted from 1.
    """

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise TrainingInterrupted(
                f"stopped after epoch {self.epoch} as asked (--interrupt-after-epoch);"
                " run the same command without that flag to resume")


def batch_norm_layers(model):
    """The kerasbn and Keras batch-norm layers of `model`, nested models included, in order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, BATCH_NORM_KINDS):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(batch_norm_layers(layer))
    return found


def batch_norm_statistics(model):
    """{layer name: {"moving_mean": array, "moving_variance": array}} of every BN layer."""
    return {layer.name: {"moving_mean": _numpy(layer.moving_mean),
                         "moving_variance": _numpy(layer.moving_variance)}
            for layer in batch_norm_layers(model)}


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable.value)


def examples_per_second(examples_in_epoch, epoch_seconds):
    """Training speed of a typical epoch: examples / the median epoch time.

    The first epoch is left out when there are others: it includes tracing and XLA
    compilation. The median leaves out later one-off compilations too (a new shape,
    such as the last partial batch, compiles when it comes back in the next epoch).

    Args:
        examples_in_epoch: training examples one epoch reads.
        epoch_seconds: `EpochTimer.seconds`.

    Returns:
        Examples per second, NaN without a timed epoch.
    """
    timed = sorted(epoch_seconds[1:] or epoch_seconds)
    if not timed:
        return float("nan")
    middle = len(timed) // 2
    median = timed[middle] if len(timed) % 2 else (timed[middle - 1] + timed[middle]) / 2
    return examples_in_epoch / median if median > 0 else float("nan")
