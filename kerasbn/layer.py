"""kerasbn.BatchNormalization: the Keras layer (weights, config, modes, moving statistics)."""

import keras
import tensorflow as tf

from kerasbn import _arguments
from kerasbn import distribute, fused_kernel
from kerasbn import moving_statistics, normalization, ops
from kerasbn import programs
from kerasbn import virtual_batches

# What get_config writes, in this order (Keras objects serialized).
_CONFIG_ARGUMENTS = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
    "synchronized", "renorm", "renorm_clipping", "renorm_momentum", "bessel_correction",
    "sync_group_size", "momentum_warmup", "virtual_batch_size", "jit_compile",
)


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015), exact and synchronizable.

    In training (`training=True` and `trainable=True`) the layer normalizes with the
    statistics of the batch and updates the moving statistics; otherwise it applies
    the frozen affine of Algorithm 2:

        training:   y = γ·(x - mean_B)/sqrt(var_B + ε) + β
                    moving_mean ← momentum·moving_mean + (1 - momentum)·mean_B
        inference:  y = γ·(x - moving_mean)/sqrt(moving_var + ε) + β

    Every argument of `keras.layers.BatchNormalization` keeps its name, default and
    meaning, and the weights (`gamma`, `beta`, `moving_mean`, `moving_variance`, plus
    the renorm ones) copy between the two layers one to one. What it adds: exact
    variance (no E[x²] - E[x]²), a hand-derived gradient, `axis` as a list,
    cross-replica statistics in one collective per pass, replica groups, Bessel's
    correction, and moving statistics that non-finite values cannot corrupt.

    Args:
        axis: the channel axis, or a list of axes, that keep their own statistics.
        momentum: weight of the old value in the moving averages, in [0, 1]; at 1
            the moving statistics stay as they are while γ and β train.
        epsilon: added to the variance before the square root, > 0.
        center: whether to add the learned offset β.
        scale: whether to multiply by the learned scale γ.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: initializers of the weights.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        synchronized: under a `tf.distribute` strategy with several replicas, compute
            the statistics over the global batch of all replicas (forward and
            backward). Outside a strategy it changes nothing. When False, each
            replica normalizes with its own batch and moves its own copy of the
            moving statistics; read outside the replicas (saved, exported) they are
            the average of the copies.
        renorm: use Batch Renormalization (Ioffe, 2017).
        renorm_clipping: dict with optional keys "rmax", "rmin", "dmax" bounding the
            renorm corrections r and d.
        renorm_momentum: momentum of the renorm moving mean and stddev, in [0, 1].
        bessel_correction: update the moving variance with the unbiased estimate
            m/(m-1)·var_B (PyTorch's convention, the paper's Algorithm 2).
        sync_group_size: with `synchronized=True`, share statistics within groups of
            this many consecutive replicas instead of across all of them.
        virtual_batch_size: Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017):
            in training, normalize each group of this many consecutive examples of the
            batch with the group's own statistics (a last, smaller group with its own);
            the moving statistics move toward the whole batch's, merged exactly from
            the groups; inference ignores it. With `synchronized=True`, each replica
            forms groups of its own examples and the moving statistics are the
            global batch's. None for ordinary batch norm.
        momentum_warmup: let the moving averages start right: update t (counted
            from 0) uses the momentum min(momentum, t/(t+1)), so the first update
            replaces the initial values and the averages are the exact mean of the
            batches seen until t/(t+1) reaches `momentum` (about 1/(1-momentum)
            updates). The count of updates, per channel, is a non-trainable weight,
            `update_count`, saved, restored and synchronized like the moving
            statistics. Off by default, as in Keras. With `momentum=1.0` the moving
            statistics are the cumulative average of every batch (PyTorch's
            `momentum=None`).
        jit_compile: run the layer's math (moments, normalization, each part of the
            backward pass) as XLA programs of its own: True, False, or "auto" (the
            default) for inputs of 1,048,576 values or more, where they repay their
            compile time within a few hundred steps (an unknown batch size counted
            as 32, Keras's default; see `programs.worth_compiling`). These programs touch
            no variable and no collective, so they compile under every strategy, on
            CPUs too, where TensorFlow refuses to compile a whole multi-replica step.
            Inside a step that XLA compiles as a whole
            (`model.compile(jit_compile=True)`), the math is part of that program
            whatever this says. Under "auto", on a CPU where TensorFlow runs oneDNN
            and sees no GPU, an unmasked float32 training step of 131,072 values or
            more a replica normalizes on TensorFlow's fused kernels, given the layer's
            own exact statistics (see `kerasbn.fused_kernel`).
        fused: accepted for configs written by tf-keras, and ignored: kerasbn picks its
            own kernels.
        adjustment: accepted only as None (tf-keras configs carry it); a callable is
            refused, see the error for what to do instead.
        **kwargs: base layer arguments (name, dtype, trainable, ...).

    Raises:
        ValueError: on an argument outside what is allowed (the message names it).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((32, 32, 3)),
    ...     keras.layers.Conv2D(16, 3, use_bias=False),
    ...     kerasbn.BatchNormalization(),
    ...     keras.layers.ReLU(),
    ... ])
    """

    def __init__(
        self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
        beta_initializer="zeros", gamma_initializer="ones",
        moving_mean_initializer="zeros", moving_variance_initializer="ones",
        beta_regularizer=None, gamma_regularizer=None,
        beta_constraint=None, gamma_constraint=None, synchronized=False,
        renorm=False, renorm_clipping=None, renorm_momentum=0.99,
        # Keras's arguments above, kerasbn's below, then tf-keras's (see Args).
        bessel_correction=False, sync_group_size=None, momentum_warmup=False,
        virtual_batch_size=None, jit_compile="auto", fused=None, adjustment=None, **kwargs,
    ):
        super().__init__(**kwargs)
        check = _arguments.Checks(self.name)
        check.refuse_adjustment(adjustment)
        self.supports_masking = True
        self.axis = check.axis(axis)
        self.momentum = check.momentum("momentum", momentum)
        self.epsilon = check.epsilon(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        self.renorm = bool(renorm)
        self.renorm_clipping = check.renorm_clipping(renorm_clipping)
        self.renorm_momentum = check.momentum("renorm_momentum", renorm_momentum)
        self.bessel_correction = bool(bessel_correction)
        self.sync_group_size = check.sync_group_size(sync_group_size, self.synchronized)
        self.momentum_warmup = bool(momentum_warmup)
        self.virtual_batch_size = check.virtual_batch_size(virtual_batch_size, self.axis)
        self.jit_compile = check.jit_compile(jit_compile)
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def _channel_axes_for_rank(self, rank):
        """The channel axes, made non-negative and sorted, for inputs of `rank`."""
        check = _arguments.Checks(self.name)
        try:
            axes = ops.channel_axes(self.axis, rank)
        except ops.AxisError as error:
            raise check.error("axis", self.axis, error.allowed) from None
        check.refuse_batch_axis(self.axis, axes, self.virtual_batch_size, rank)
        return axes

    # ---------------------------------------------------------------- build

    def build(self, input_shape):
        rank = len(input_shape)
        self._rank = rank
        self._channel_axes = self._channel_axes_for_rank(rank)
        channel_shape = [input_shape[a] for a in self._channel_axes]
        if any(size is None for size in channel_shape):
            raise ValueError(
                f"BatchNormalization layer '{self.name}': the channel dimension of the "
                f"input (axis={self.axis}) must be known when the layer is built; "
                f"received input shape {tuple(input_shape)}."
            )
        self._channel_shape = channel_shape
        self._layout = ops.Layout(input_shape, self._channel_axes)
        if self.scale:
            self.gamma = self.add_weight(
                shape=channel_shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=channel_shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        self.moving_mean = self._add_statistic("moving_mean", self.moving_mean_initializer)
        self.moving_variance = self._add_statistic("moving_variance",
                                                   self.moving_variance_initializer)
        if self.renorm:
            stddev_initializer = _SqrtOf(self.moving_variance_initializer)
            self.moving_stddev = self._add_statistic("moving_stddev", stddev_initializer)
            self.renorm_mean = self._add_statistic("renorm_mean", self.moving_mean_initializer)
            self.renorm_stddev = self._add_statistic("renorm_stddev", stddev_initializer)
        if self.momentum_warmup:
            self.update_count = self._add_statistic("update_count", "zeros")

    def _add_statistic(self, name, initializer):
        # Each replica keeps its own copy (ON_READ): an update touches only the local
        # copy and costs no cross-replica traffic. Synchronized, every replica of a
        # group computes the same update from the same statistics, and what is read,
        # saved and restored outside the replicas is the first replica's copy (with
        # replica groups, the average of the groups' copies). Unsynchronized, each
        # replica moves toward its own batches, and what is read outside the replicas
        # is the average of the copies, which is the moving average of the replicas'
        # average statistics (the update is linear), as tf.keras's layer kept it.
        # Averaging every update instead (ON_WRITE, aggregation "mean") costs two
        # cross-replica reductions a layer and step (README, Performance: session 9).
        grouped = self.sync_group_size is not None
        aggregation = "only_first_replica" if self.synchronized and not grouped else "mean"
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer=keras.initializers.get(initializer),
                shape=self._channel_shape, dtype=self.variable_dtype,
                trainable=False, autocast=False, name=name,
                synchronization="on_read", aggregation=aggregation,
            )
        self._track_variable(variable)
        return variable

    def compute_output_shape(self, input_shape):
        return input_shape

    # ---------------------------------------------------------------- call

    def call(self, inputs, training=None, mask=None):
        self._check_inputs(inputs)
        compiled = programs.compiles(self.jit_compile, inputs.shape)
        if training and self.trainable:
            return self._normalize_with_batch_statistics(inputs, mask, compiled)
        return self._normalize_with_moving_statistics(inputs, compiled)

    def _check_inputs(self, inputs):
        dtype = tf.as_dtype(inputs.dtype)
        if not dtype.is_floating:
            raise TypeError(
                f"BatchNormalization layer '{self.name}': argument `inputs` must be a "
                "floating-point tensor (float16, bfloat16, float32 or float64); "
                f"received dtype={dtype.name}."
            )
        if inputs.shape.rank != self._rank:
            raise ValueError(
                f"BatchNormalization layer '{self.name}': argument `inputs` must have "
                f"rank {self._rank}, the rank the layer was built for; received shape "
                f"{tuple(inputs.shape)} (rank {inputs.shape.rank})."
            )

    def _in_view(self, variable, dtype):
        """A per-channel variable as a tensor of `dtype`, shaped for the layout's view."""
        return self._layout.to_view_channels(tf.cast(variable, dtype))

    def _scale_and_offset(self, dtype):
        shape = self._layout.view_channel_shape
        gamma = self._in_view(self.gamma, dtype) if self.scale else tf.ones(shape, dtype)
        beta = self._in_view(self.beta, dtype) if self.center else tf.zeros(shape, dtype)
        return gamma, beta

    def _normalize_with_moving_statistics(self, inputs, compiled):
        dtype = ops.statistics_dtype(inputs.dtype)
        a, b = ops.inference_coefficients(
            self._in_view(self.moving_mean, dtype),
            self._in_view(self.moving_variance, dtype),
            self._in_view(self.gamma, dtype) if self.scale else None,
            self._in_view(self.beta, dtype) if self.center else None,
            self.epsilon,
        )
        outputs = ops.affine(self._layout.view(inputs), a, b, self._layout.shape,
                             compiled=compiled)
        return self._layout.unview(outputs, inputs)

    def _normalize_with_batch_statistics(self, inputs, mask, compiled):
        if self.virtual_batch_size is not None:
            return self._normalize_in_virtual_batches(
                inputs, self._mask_weights(mask, inputs), compiled)
        layout = self._layout
        x = layout.view(inputs)
        weights = self._mask_weights(mask, inputs)
        if weights is not None:
            weights = layout.view(weights)
        group = distribute.replica_group(self.sync_group_size) if self.synchronized else None
        if group is None:
            count, mean, variance = ops.moments(
                x, layout.axes, weights, compiled=compiled
            )
        else:
            count, mean, variance = group.merge_moments(
                *ops.shifted_moments(x, layout.axes, weights, compiled=compiled)
            )
        gamma, beta = self._scaled_for_training(mean, variance)
        fused = fused_kernel.applies(
            self.jit_compile, inputs.shape, inputs.dtype, view_axes=layout.axes,
            masked=weights is not None)
        outputs = normalization.normalize_for_training(
            x, mean, variance, gamma, beta,
            epsilon=self.epsilon, axes=layout.axes,
            count=count, mask=weights,
            sum_across_replicas=None if group is None else group.sum,
            compiled=compiled, fused=fused,
        )
        self._update_moving_statistics(*(layout.to_channels(t) for t in (count, mean, variance)))
        return self._layout.unview(outputs, inputs)

    def _scaled_for_training(self, mean, variance):
        """γ and β for the batch statistics (mean, variance), with Batch Renormalization's
        r and d folded in when `renorm`."""
        gamma, beta = self._scale_and_offset(mean.dtype)
        if not self.renorm:
            return gamma, beta
        r, d = ops.renorm_correction(
            mean, variance, self._in_view(self.renorm_mean, mean.dtype),
            self._in_view(self.renorm_stddev, mean.dtype),
            epsilon=self.epsilon, **self.renorm_clipping)
        return gamma * r, gamma * d + beta

    def _normalize_in_virtual_batches(self, inputs, weights, compiled):
        """Ghost batch norm: see `virtual_batches.normalize`. The moving statistics move
        toward the whole batch's, merged exactly from the groups (and across replicas
        when synchronized)."""
        outputs, batch = virtual_batches.normalize(
            inputs, weights, self.virtual_batch_size, self._channel_axes,
            self._scaled_for_training, epsilon=self.epsilon, compiled=compiled)
        group = distribute.replica_group(self.sync_group_size) if self.synchronized else None
        if group is None:
            count, mean, variance = batch[0], batch[1] + batch[2], batch[3]
        else:
            count, mean, variance = group.merge_moments(*batch)
        self._update_moving_statistics(
            *(self._layout.to_channels(t) for t in (count, mean, variance)))
        return outputs

    def _mask_weights(self, mask, inputs):
        """A Keras mask as 0/1 weights of the input's shape (see `ops.mask_weights`)."""
        if mask is None:
            return None
        self._check_mask(mask, inputs)
        return ops.mask_weights(mask, inputs, ops.statistics_dtype(inputs.dtype))

    def _check_mask(self, mask, inputs):
        input_shape = tuple(inputs.shape)
        expected = input_shape[:-1]
        mask_shape = tuple(mask.shape)
        broadcasts = len(mask_shape) == len(expected) and all(
            m is None or d is None or m in (1, d) for m, d in zip(mask_shape, expected)
        )
        if not broadcasts:
            raise ValueError(
                f"BatchNormalization layer '{self.name}': argument `mask` must have the "
                f"input's shape without its last axis, {expected}, or a shape that "
                "broadcasts to it (a dimension may be 1), as Keras passes masks; "
                f"received mask shape {mask_shape} for input shape {input_shape}."
            )

    # ---------------------------------------------------------------- moving statistics

    def _update_moving_statistics(self, count, mean, variance):
        """Moves each channel's averages toward this batch, where its statistics are
        usable (`moving_statistics.moved`: a channel that had no values, or a
        non-finite statistic, keeps every average and its warm-up count bit for bit)."""
        if self.bessel_correction:
            variance = variance * count / tf.maximum(count - 1.0, 1.0)
        if self.renorm:
            batch = [mean, tf.sqrt(variance + self.epsilon)]  # mean, stddev
        else:
            batch = [mean, variance]
        updates = (tf.cast(self.update_count, mean.dtype) if self.momentum_warmup
                   else None)

        def move(variables, momentum):
            old = [tf.cast(variable, mean.dtype) for variable in variables]
            new, new_updates = moving_statistics.moved(old, batch, count, momentum, updates)
            for variable, value in zip(variables, new):
                variable.assign(tf.cast(value, variable.dtype))
            return new, new_updates

        if self.renorm:
            move([self.renorm_mean, self.renorm_stddev], self.renorm_momentum)
            (_, moving_stddev), new_updates = move(
                [self.moving_mean, self.moving_stddev], self.momentum)
            self.moving_variance.assign(
                tf.cast(tf.nn.relu(moving_stddev * moving_stddev - self.epsilon),
                        self.moving_variance.dtype)
            )
        else:
            _, new_updates = move([self.moving_mean, self.moving_variance], self.momentum)
        if self.momentum_warmup:
            self.update_count.assign(tf.cast(new_updates, self.update_count.dtype))

    # ---------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        for name in _CONFIG_ARGUMENTS:
            value = getattr(self, name)
            if name.endswith(("_initializer", "_regularizer", "_constraint")):
                value = keras.saving.serialize_keras_object(value)
            config[name] = value
        config["renorm_clipping"] = self.renorm_clipping or None
        return config


class _SqrtOf(keras.initializers.Initializer):
    """sqrt of another initializer: the renorm stddevs start at sqrt(moving variance)."""

    def __init__(self, initializer):
        self.initializer = initializer

    def __call__(self, shape, dtype=None):
        return tf.sqrt(self.initializer(shape, dtype=dtype))
