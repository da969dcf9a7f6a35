"""The paper's network in every variant the experiments compare, and what they read off it.

The network is `training.models`' "mlp": three hidden layers of 100 sigmoid units
("hidden1".."hidden3"), with batch norm before each sigmoid ("hidden1_bn".."hidden3_bn")
or none, and a softmax ("predictions"). Variants (`VARIANTS`):

    none      no batch norm (the hidden layers have biases)
    kerasbn   kerasbn.BatchNormalization
    keras     keras.layers.BatchNormalization
    renorm    kerasbn.BatchNormalization(renorm=True, renorm_clipping=RENORM_CLIPPING)
    ghost     kerasbn.BatchNormalization(virtual_batch_size=k): Ghost Batch Normalization

A seed fixes the initial kernels (`initial_kernels`), which `reset` gives to any variant,
so every variant starts from the same weights. `Probe` reads the class probabilities and
the true pre-activation of the last hidden layer's sigmoids: the tensor its
"hidden3_sigmoid" layer receives (the batch norm's output with BN, Wx + b without).
"""

import numpy as np

from training.paper.config import PERCENTILES, RENORM_CLIPPING

VARIANTS = ("none", "kerasbn", "keras", "renorm", "ghost")
NUM_CLASSES = 10
HIDDEN = ("hidden1", "hidden2", "hidden3")
OUTPUT = "predictions"
SIGMOID_INPUT = "hidden3_sigmoid"


def build(variant, image_shape, virtual_batch_size=None):
    """Builds the paper's network in one variant.

    Args:
        variant: one of `VARIANTS`.
        image_shape: the shape of one image, e.g. (28, 28, 1).
        virtual_batch_size: for "ghost" only: the examples of each group.

    Returns:
        A functional `keras.Model`, with the layer names of `training.models`' "mlp".

    Raises:
        ValueError: if `variant` is unknown, or `virtual_batch_size` is given for a
            variant other than "ghost" (or missing for "ghost").
    """
    import keras

    import kerasbn
    from training import models

    if variant not in VARIANTS:
        raise ValueError(f"build: argument `variant` must be one of {list(VARIANTS)}; "
                         f"received variant={variant!r}.")
    if (variant == "ghost") != (virtual_batch_size is not None):
        raise ValueError("build: argument `virtual_batch_size` must be an int for "
                         "variant='ghost' and None otherwise; received "
                         f"virtual_batch_size={virtual_batch_size!r} for {variant!r}.")
    if variant in ("none", "kerasbn", "keras"):
        return models.build_model("mlp", image_shape, NUM_CLASSES, bn=variant)
    base = models.build_model("mlp", image_shape, NUM_CLASSES, bn="kerasbn")
    if variant == "renorm":
        options = {"renorm": True, "renorm_clipping": dict(RENORM_CLIPPING)}
    else:
        options = {"virtual_batch_size": int(virtual_batch_size)}

    def with_options(layer):
        if not isinstance(layer, kerasbn.BatchNormalization):
            return layer.__class__.from_config(layer.get_config())
        return kerasbn.BatchNormalization(**{**layer.get_config(), **options})

    return keras.models.clone_model(base, clone_function=with_options)


def initial_kernels(seed, image_shape):
    """The initial kernels of the four dense layers under `seed`.

    Keras's default for Dense, Glorot-uniform, drawn with seeds made of `seed`.

    Args:
        seed: an int.
        image_shape: the shape of one image.

    Returns:
        A dict layer name -> float32 kernel array.
    """
    import keras

    sizes = [int(np.prod(image_shape)), 100, 100, 100, NUM_CLASSES]
    kernels = {}
    for i, name in enumerate(HIDDEN + (OUTPUT,)):
        init = keras.initializers.GlorotUniform(seed=seed * 10 + i)
        kernels[name] = np.asarray(init((sizes[i], sizes[i + 1])), np.float32)
    return kernels


class Pristine:
    """A model's weights as built, to start every run of that model from.

    Args:
        model: a freshly built model of `build`.
    """

    def __init__(self, model):
        self.model = model
        self.weights = model.get_weights()

    def reset(self, kernels, init_scale=1.0):
        """Restores the built weights, then sets the kernels (hidden ones scaled).

        Args:
            kernels: from `initial_kernels`.
            init_scale: the factor on the three hidden layers' kernels.
        """
        self.model.set_weights(self.weights)
        for name, kernel in kernels.items():
            factor = init_scale if name in HIDDEN else 1.0
            self.model.get_layer(name).kernel.assign(kernel * np.float32(factor))


class Probe:
    """Reads a model's class probabilities and the true inputs of its last sigmoids.

    `probabilities` runs the network as it is used (inference mode: batch norms with
    their moving averages). `pre_activations` reads the tensor the "hidden3_sigmoid"
    layer receives in training mode, as a sigmoid sees it while the network trains:
    each batch normalized with its own statistics. It leaves every variable as it was
    (the moving statistics that a training-mode call updates are restored).

    Args:
        model: a model of `build`.
    """

    def __init__(self, model):
        import keras
        import tensorflow as tf

        self._model = model
        self._inner = keras.Model(model.inputs, model.get_layer(SIGMOID_INPUT).input)
        shape = tuple(model.inputs[0].shape[1:])
        self._predict = tf.function(lambda images: model(images, training=False),
                                    input_signature=[tf.TensorSpec((None,) + shape)])
        self._read = tf.function(self._read_restoring,
                                 input_signature=[tf.TensorSpec((None, None) + shape)])

    def _read_restoring(self, batches):
        import tensorflow as tf

        state = self._model.non_trainable_variables
        saved = [tf.identity(variable.value) for variable in state]
        values = tf.TensorArray(tf.float32, size=tf.shape(batches)[0])
        with tf.control_dependencies(saved):
            for i in tf.range(tf.shape(batches)[0]):
                values = values.write(i, self._inner(batches[i], training=True))
        stacked = values.stack()
        with tf.control_dependencies([stacked]):
            for variable, value in zip(state, saved):
                variable.assign(value)
        return tf.identity(stacked)

    def probabilities(self, images):
        """The class probabilities of `images` in inference mode, NumPy `(n, 10)`."""
        return self._predict(images).numpy()

    def pre_activations(self, batches):
        """The last hidden layer's sigmoid inputs, each batch in training mode.

        Args:
            batches: `(k, n, 28, 28, 1)`: k batches of n images.

        Returns:
            NumPy `(k * n, 100)`: row i holds the input of each sigmoid for image i, its
            batch norms normalizing with the statistics of that image's batch.
        """
        values = self._read(batches).numpy()
        return values.reshape(-1, values.shape[-1])


def accuracy(probabilities, labels):
    """The fraction of rows whose largest probability is at the label (NaN rows: wrong)."""
    probabilities = np.nan_to_num(np.asarray(probabilities, np.float64), nan=-1.0)
    return float(np.mean(np.argmax(probabilities, axis=1) == np.asarray(labels)))


def percentiles(pre_activations):
    """The `PERCENTILES` of every unit over the examples.

    Args:
        pre_activations: `(examples, units)`.

    Returns:
        float64 `(len(PERCENTILES), units)`.
    """
    return np.percentile(np.asarray(pre_activations, np.float64), PERCENTILES, axis=0)
