"""Population statistics: every batch norm's moving statistics recomputed exactly.

What a batch norm serves at inference is its moving statistics, and the exponential
moving average that training keeps lags behind the weights (and, at Keras's momentum
0.99, behind its own initial values for the first hundreds of steps).
`recompute_statistics` replaces them, with every weight fixed, by the population
statistics of Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", section 3): the
mean and variance of every value a layer sees over a pass of the data,

    μ = E[μ_B]        σ² = E[σ²_B + μ_B²] − μ²        (count-weighted over batches)

with the layer normalizing each batch with that batch's own statistics, exactly as in
training. That is not the average of the per-batch variances
(`torch.optim.swa_utils.update_bn`), which leaves out the variance of the batch means.

How a pass runs:

- each trainable batch norm's `call` is wrapped for the pass: the wrapper computes
  this replica's moments of the layer's input (`ops.shifted_moments`, the mask through
  `ops.mask_weights`) and then calls the layer with `training=True`; the model itself
  is called with `training=False`, so every other layer runs in inference mode;
- the moments are merged, batch after batch, into per-replica float64 accumulators
  (count, shift, offset, variance per channel; `ops.merge_shifted_moments`), so memory
  is constant in the number of batches and the count stays exact past 2²⁴ values;
- at the end, one collective gathers every replica's accumulators (all layers at
  once) and merges them exactly (`distribute.ReplicaGroup.merge_moments`), so every
  replica and worker computes the same bits;
- the moving statistics are then set; every other variable of the batch norms is
  restored from a snapshot, and on any error everything is restored.

The pass's step runs outside XLA auto-clustering (`jit_scope(compile_ops=False)`):
a pass runs once, so compiling its clusters costs far more than it saves (on 4 CPU
replicas, most of the pass), and the layers' own XLA programs (`jit_compile`) are
the ones training compiled already.

Renorm layers (`renorm=True`) keep their statistics unless asked
(`recompute_renorm=True`): in training, Batch Renormalization's r and d make a layer
normalize with its moving statistics (renorm_mean, renorm_stddev), not with the
batch's, so the weights after it are fitted to those; the batch-mode population
measures something else (its stddev takes in the variance between batch means,
renorm's averages the per-batch stddevs, which is smaller at small batches).

The parts below the pass (argument errors, finding batch norms, variables by
component, writing a layer's new statistics, data, patching, one replica's moments)
are in `kerasbn._population_parts`; what a pass returns (`StatisticsSummary`, a
`LayerStatistics` per layer) is in `kerasbn._population_summary`, and importable
from here.
"""

import functools
import threading
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _population_parts as parts
from kerasbn import distribute
from kerasbn import moving_statistics, ops
from kerasbn._population_summary import LayerStatistics, StatisticsSummary  # noqa: F401

is_batch_norm = parts.is_batch_norm  # kerasbn's and Keras's BatchNormalization


# ---------------------------------------------------------------------- the entry point


def recompute_statistics(model, data, steps=None, verbose="auto", batch_size=None,
                         recompute_renorm=False):
    """Sets every batch norm's moving statistics to its population statistics over `data`.

    With every weight fixed, runs `data` through `model` with its batch norms in
    training mode (each normalizing with its own batch's statistics, synchronized
    layers with the global batch, exactly as in training) and every other layer in
    inference mode (dropout off), and sets each batch norm's `moving_mean` and
    `moving_variance` to the mean and variance of every value that layer saw over the
    pass, count-weighted: a partial batch counts for what it holds, masked values not
    at all. `bessel_correction=True` layers get the unbiased variance n/(n−1)·σ².

    Renorm layers (`renorm=True`) keep their statistics by default, and run in the
    pass in training mode as in training (their r and d from the statistics they
    keep). Batch Renormalization trains each layer to normalize with its moving
    statistics (x̂·r + d = (x − renorm_mean)/renorm_stddev, up to the clipping of r
    and d), so the weights after it are fitted to those, and they are what it should
    serve. Population statistics of the batch-mode pass differ from them: the
    population stddev takes in the variance between batch means, where renorm's
    averages the per-batch stddevs (about 0.8σ at 4 values a batch). Measured on the
    digits MLP with 4 replicas × 4 examples (`python -m training.small_batches`),
    serving recomputed statistics fell from 0.956 to 0.717 test accuracy. With
    `recompute_renorm=True` they are recomputed all the same: `moving_stddev` =
    `renorm_stddev` = sqrt(σ² + ε), `renorm_mean` = μ, `moving_variance` derived from
    `moving_stddev` as the layer keeps it (the layers after them are measured with
    the old corrections).

    Works on `kerasbn.BatchNormalization` and `keras.layers.BatchNormalization` (and
    subclasses) anywhere in Sequential, functional, subclassed and nested models.
    Batch norms with `trainable=False` are left as they are; with nothing but renorm
    layers to recompute, nothing is read and nothing changes. Under the model's
    `tf.distribute` strategy (MirroredStrategy, MultiWorkerMirroredStrategy) the
    population is the union of every replica's examples, and every replica and worker
    ends with the same bits; a plain `tf.data.Dataset` is distributed with
    `strategy.experimental_distribute_dataset`, a distributed dataset is used as it is.

    Nothing else changes: trainable weights, optimizer state, every other variable
    (including the batch norms' other non-trainable weights), `trainable` flags and
    layer attributes. On any error, every moving statistic is left exactly as it was.

    Args:
        model: a built Keras model (or layer) holding batch norms.
        data: a `tf.data.Dataset` of batches (elements `x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)`; labels are ignored), a distributed dataset, NumPy
            arrays, tensors or a dict of them (batched by `batch_size`), a Keras
            `PyDataset` or a generator of batches: what `model.predict` takes.
        steps: None for the whole of `data`, or the number of batches to use (> 0).
        verbose: "auto" (1), 0 silent, 1 a progress bar, 2 one line at the end.
        batch_size: for arrays and tensors only: examples per batch (default 32).
        recompute_renorm: also recompute the statistics of renorm layers (see above).

    Returns:
        A `StatisticsSummary` (prints as a table): per layer the values counted and
        the largest change of mean and variance, with the batches run and skipped.

    Raises:
        ValueError: `data` yields no batch or does not match the model's inputs, or
            every batch had non-finite activations; `steps`, `verbose` or
            `batch_size` is not allowed; `model` holds no trainable batch norm or an
            unbuilt one. The message names the argument, the value and what is allowed.
    """
    parts.check_arguments(steps, verbose, batch_size)
    return _pass_for(model, bool(recompute_renorm)).run(
        data, steps=steps, verbose=verbose, batch_size=batch_size)


# Each model's passes, kept while the model lives: a later recompute of the same model
# reuses the traced step and the accumulators instead of tracing anew (which costs many
# times the pass's batches on a small dataset).
_PASSES = weakref.WeakKeyDictionary()


def _pass_for(model, recompute_renorm):
    """The `PopulationPass` of `model`, made anew only when the model's batch norms or
    their `trainable` flags have changed since the last one."""
    passes = _PASSES.setdefault(model, {})
    population_pass = passes.get(recompute_renorm)
    if population_pass is None or not population_pass.matches(model):
        population_pass = PopulationPass(model, recompute_renorm)
        population_pass._holds_model = None  # the cache must not keep the model alive
        passes[recompute_renorm] = population_pass
    return population_pass


# ---------------------------------------------------------------------- the pass


class PopulationPass:
    """A reusable population-statistics pass over one model's batch norms.

    Holds the traced step (reused across calls and batches; retraced only for a new
    input signature) and the accumulators, so that the callback does not retrace at
    every evaluation. `run` rebuilds nothing as long as the model's batch norms and
    their `trainable` flags are the same (`matches`).

    Args:
        model: a built Keras model or layer holding batch norms.
        recompute_renorm: also recompute renorm layers (see `recompute_statistics`).
    """

    def __init__(self, model, recompute_renorm=False):
        self._holds_model = model
        self._model = weakref.ref(model)
        self.recompute_renorm = bool(recompute_renorm)
        self.layers, self.renorm_kept, self.frozen = parts.batch_norms(
            model, self.recompute_renorm)
        self.strategy = parts.strategy_of(model)
        self.key = self._key_of(model)
        self._local = threading.local()
        with self.strategy.scope():
            # Per-replica (ON_READ) accumulators: each replica merges into its own
            # copy, with no cross-replica traffic until the end of the pass.
            self._accumulators = [
                self._new_variable([4] + list(layer.moving_mean.shape),
                                   f"population_moments_{i}")
                for i, layer in enumerate(self.layers)
            ]
            self._tallies = self._new_variable([2], "population_tallies")  # skipped, examples
        # Partials, not bound methods: TensorFlow counts traces per code object, and a
        # process that recomputes many models would be warned of "frequent retracing".
        self._step = tf.function(functools.partial(type(self)._distributed_step, self),
                                 reduce_retracing=True)
        self._finish = tf.function(functools.partial(type(self)._distributed_finish, self))

    @staticmethod
    def _new_variable(shape, name):
        return tf.Variable(tf.zeros(shape, tf.float64), trainable=False, name=name,
                           synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.NONE)

    @staticmethod
    def _key_of(model):
        return tuple((id(layer), bool(layer.trainable))
                     for layer in parts.all_layers(model) if parts.is_batch_norm(layer))

    @property
    def model(self):
        """The model whose batch norms the pass recomputes."""
        return self._model()

    def matches(self, model):
        """True when this pass still fits `model` (same batch norms, same trainable flags)."""
        return model is self.model and self._key_of(model) == self.key

    # ------------------------------------------------------------------ running

    def run(self, data, steps=None, verbose="auto", batch_size=None):
        """One pass over `data`; see `recompute_statistics`."""
        parts.check_arguments(steps, verbose, batch_size)
        if not self.layers:  # nothing but renorm layers, kept
            return self._summary((), 0, 0, 0)
        verbose = 1 if verbose == "auto" else verbose
        dataset, length = parts.as_dataset(data, batch_size, steps)
        target = length if steps is None else (steps if length is None else min(steps, length))
        snapshot = parts.Snapshot(self.layers + self.renorm_kept)
        old = [(parts.read_variable(layer.moving_mean), parts.read_variable(layer.moving_variance))
               for layer in self.layers]
        try:
            with self._patched():
                for accumulator in [*self._accumulators, self._tallies]:
                    parts.set_variable(accumulator, np.zeros(accumulator.shape))
                batches = self._accumulate(data, dataset, steps, verbose, target)
                moments, tallies = self._merged()
            snapshot.restore()
            summary = self._apply(moments, tallies, batches, old)
        except BaseException:
            snapshot.restore()
            raise
        if summary.skipped_batches:
            warnings.warn(
                f"recompute_statistics: {summary.skipped_batches} batch(es) left out: an "
                "activation entering a batch norm was not finite (NaN or infinite).",
                RuntimeWarning, stacklevel=3)
        return summary

    def _accumulate(self, data, dataset, steps, verbose, target):
        with self.strategy.scope():
            if not parts.is_distributed_dataset(dataset):
                dataset = self.strategy.experimental_distribute_dataset(dataset)
        self._trace(dataset)
        progbar = keras.utils.Progbar(target, verbose=verbose) if verbose else None
        batches = 0
        iterator = iter(dataset)
        while steps is None or batches < steps:  # no batch read beyond `steps`
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self._run_step(data, batch, dataset)
            batches += 1
            if progbar is not None and verbose == 1:
                progbar.update(batches)
        if progbar is not None and (verbose == 2 or batches != target):
            progbar.update(batches, finalize=True)  # else the last update finalized it
        if batches == 0:
            raise parts.argument_error("data", data, "data that yields at least one batch",
                                  "It yielded none.")
        return batches

    def _trace(self, dataset):
        """Traces the step once for every batch of `dataset`: its element spec leaves the
        batch size open, so a partial last batch does not trace (and, under a strategy,
        optimize a multi-device graph) a second time. If the model cannot be traced
        without a static batch size, each batch shape is traced when it comes, and a
        real mismatch is reported then."""
        spec = getattr(dataset, "element_spec", None)
        if spec is None:
            return
        try:
            self._step.get_concrete_function(spec)
        except Exception:  # noqa: BLE001 -- only an optimization; the calls trace anew
            pass

    def _run_step(self, data, batch, dataset):
        try:
            self._step(batch)
        except parts.DataMismatch as mismatch:
            raise self._mismatch_error(data, mismatch.spec, mismatch.error) from (
                mismatch.error)
        except tf.errors.InvalidArgumentError as error:
            spec = getattr(dataset, "element_spec", None)
            raise self._mismatch_error(data, spec, error) from error

    def _mismatch_error(self, data, spec, error):
        try:
            expected = [f"{t.name}: {tuple(t.shape)} {t.dtype}" for t in self.model.inputs]
        except (AttributeError, TypeError, ValueError):
            expected = None
        fits = f"batches that fit the inputs of model '{self.model.name}'"
        if expected is not None:
            fits += f" ({', '.join(expected)})"
        return parts.argument_error(
            "data", data, fits,
            f"Its batches are {spec}; calling the model on them failed: {parts.shortened(error)}")

    # ------------------------------------------------------------------ traced steps

    @tf.autograph.experimental.do_not_convert  # as Keras's own steps
    def _distributed_step(self, batch):
        # Outside auto-clustering (see the module docstring); traced in graph mode.
        with tf.xla.experimental.jit_scope(compile_ops=False):
            self.strategy.run(self._replica_step, args=(batch,))

    @tf.autograph.experimental.do_not_convert  # as Keras's own steps
    def _replica_step(self, batch):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        self._local.moments = [[] for _ in self.layers]
        try:
            self.model(x, training=False)
        except (ValueError, TypeError) as error:
            raise parts.DataMismatch(parts.spec_of(x), error) from error
        finally:
            collected, self._local.moments = self._local.moments, None
        flat = [t for layer_moments in collected for batch_moments in layer_moments
                for t in batch_moments]
        finite = moving_statistics.all_finite(*flat) if flat else tf.constant(True)
        for accumulator, layer_moments in zip(self._accumulators, collected):
            if not layer_moments:
                continue
            stacked = [tf.stack([accumulator[i]] + [m[i] for m in layer_moments])
                       for i in range(4)]
            merged = tf.stack(ops.merge_shifted_moments(*stacked))
            accumulator.assign(tf.where(finite, merged, accumulator))
        examples = tf.cast(tf.shape(parts.first_input(x))[0], tf.float64)
        zero = tf.constant(0.0, tf.float64)
        self._tallies.assign_add(tf.where(finite, tf.stack([zero, examples]),
                                          tf.stack([zero + 1.0, zero])))

    @tf.autograph.experimental.do_not_convert  # as Keras's own steps
    def _distributed_finish(self):
        return self.strategy.run(self._replica_finish)

    @tf.autograph.experimental.do_not_convert  # as Keras's own steps
    def _replica_finish(self):
        """Every replica's accumulators merged: one collective for all layers and one for
        the tallies."""
        stacked = tf.concat([tf.reshape(a, [4, -1]) for a in self._accumulators], axis=1)
        group = distribute.replica_group()
        if group is None:
            return stacked[0], stacked[1] + stacked[2], stacked[3], tf.identity(self._tallies)
        count, mean, variance = group.merge_moments(*tf.unstack(stacked))
        return count, mean, variance, group.sum(tf.identity(self._tallies))

    def _merged(self):
        with self.strategy.scope():
            results = self.strategy.experimental_local_results(self._finish())
        first = [t.numpy() for t in results[0]]
        for other in results[1:]:  # the merge is the same program on the same data
            if not all(np.array_equal(a, b.numpy()) for a, b in zip(first, other)):
                raise RuntimeError("recompute_statistics: replicas disagree on the merged "
                                   "statistics; this is a bug in kerasbn.")
        count, mean, variance, tallies = first
        moments, start = [], 0
        for layer in self.layers:
            shape = list(layer.moving_mean.shape)
            size = int(np.prod(shape))
            moments.append(tuple(v[start:start + size].reshape(shape)
                                 for v in (count, mean, variance)))
            start += size
        return moments, tallies

    # ------------------------------------------------------------------ patching

    def _patched(self):
        return parts.Patches(self.layers, self.renorm_kept, self._local)

    # ------------------------------------------------------------------ results

    def _apply(self, moments, tallies, batches, old):
        skipped, examples = int(round(tallies[0])), int(round(tallies[1]))
        if examples == 0 and skipped > 0:
            raise parts.argument_error(
                "data", f"<{batches} batches>", "data whose activations are finite",
                f"Every batch ({skipped}) had a NaN or infinite activation entering a "
                "batch norm; the statistics were left as they were.")
        if all(not np.any(count > 0) for count, _, _ in moments):
            raise parts.argument_error(
                "data", f"<{batches} batches>", "data that puts values through the batch "
                "norms", "No value reached any batch norm (every value masked, or the "
                "batches were empty); the statistics were left as they were.")
        results = []
        for layer, (count, mean, variance), (old_mean, old_variance) in zip(
                self.layers, moments, old):
            results.append(parts.set_statistics(layer, count, mean, variance, old_mean,
                                           old_variance))
        return self._summary(tuple(results), batches, examples, skipped)

    def _summary(self, results, batches, examples, skipped):
        return StatisticsSummary(
            layers=results, batches=batches, examples=examples, skipped_batches=skipped,
            frozen=tuple(layer.name for layer in self.frozen),
            renorm_kept=tuple(layer.name for layer in self.renorm_kept))
