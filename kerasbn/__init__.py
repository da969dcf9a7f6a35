"""kerasbn: Batch Normalization for Keras 3 on TensorFlow.

    import kerasbn
    layer = kerasbn.BatchNormalization(synchronized=True)
    model = kerasbn.convert_to_kerasbn(model)          # swap stock Keras batch norms
    kerasbn.export.export_saved_model(model, "saved_models/my_model")
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "kerasbn needs Keras's TensorFlow backend, but Keras is using the "
        f"'{_keras.backend.backend()}' backend. Set the environment variable "
        "KERAS_BACKEND=tensorflow before Python starts (or before the first "
        "`import keras`), or set \"backend\": \"tensorflow\" in ~/.keras/keras.json."
    )

from kerasbn.layer import BatchNormalization  # noqa: E402
from kerasbn.convert import convert_to_kerasbn  # noqa: E402
from kerasbn import fold, export  # noqa: E402  (fold registers FrozenAffine for loading)
from kerasbn.statistics import recompute_statistics  # noqa: E402
from kerasbn import callbacks  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BatchNormalization", "convert_to_kerasbn", "export", "recompute_statistics",
           "callbacks"]
