"""The sizes of a run, decided once: `FULL` or `QUICK`, as one frozen `Config`.

A section reads its sizes from the `Config` it is given and nothing else; `--reps`
makes a copy with every repetition count replaced (`Config.with_reps`). The JSON output
records `Config.to_json()`, whose keys are the field names below.
"""

import dataclasses
from typing import NamedTuple, Tuple

REPLICAS = 4  # logical CPU devices of the sync section and of first_step's replicas
# The references of the inference comparisons: the least a batch norm called as it
# comes can cost (`contenders.least_inference_contenders`).
LEAST_INFERENCE = ("a*x+b (ops)", "a*x+b (y in XLA)")
# The reference of the channels-last training comparisons: the least a layer with exact
# statistics costs on TensorFlow's fused kernels (`contenders.least_exact_training`).
LEAST_EXACT_TRAINING = "fused kernels, statistics given"
# The reference of the sync section: the unsynchronized layer plus a synchronized
# layer's two exchanges and nothing else (`contenders.UnsynchronizedWithExchanges`).
SYNC_EXCHANGES_ONLY = "kerasbn + the exchanges alone"
# The copies of x (`contenders.copy_contenders`): numpy's, and TensorFlow's in a
# `tf.function`, TensorFlow's per-call floor.
COPIES = NUMPY_COPY, TF_COPY = ("copy (numpy)", "copy (tf)")
EPSILON, MOMENTUM = 1e-3, 0.99  # Keras's defaults, given to every contender
NUM_CLASSES = 10
# Bytes a call must move, as multiples of the size of x (see the bandwidth section).
BYTES_MOVED = {"training": 8, "inference": 2, "copy": 2}


class LayerCase(NamedTuple):
    """One input of the layer section: a name for the tables, a shape, a channel axis."""

    name: str
    shape: Tuple[int, ...]
    axis: int


class StatisticsCase(NamedTuple):
    """One input of the statistics section: the ResNet's image shape (height, width,
    channels), the batch size and the number of batches of the pass."""

    image: Tuple[int, int, int]
    batch: int
    batches: int


class FirstStepCase(NamedTuple):
    """One configuration of the first_step section.

    Attributes:
        model: "mobilenet" (Keras's MobileNetV2, alpha 0.35) or "resnet"
            (training.models').
        replicas: 1 (one device) or the logical CPU replicas of a MirroredStrategy.
        xla: "off" (`model.compile(jit_compile=False)`), "step"
            (`jit_compile=True`) or "plan" (what `python -m training.train --xla`
            does: `training.runtime.configure_runtime(xla=True)`'s plan).
    """

    model: str
    replicas: int
    xla: str


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes and repetition counts of every section.

    Attributes:
        layer_cases: the inputs of the layer section.
        layer_reps, sync_reps, resnet_reps, export_reps: timed repetitions per
            contender in each section.
        warmup: untimed calls of every contender before timing (tracing, compiling).
        sync_batch, sync_image, sync_blocks: the global batch, the image shape
            (height, width, channels) and the number of conv + BN blocks of the sync
            section's conv net.
        resnet_batch, resnet_image: the batch and image shape of the ResNet step and
            of the exported ResNet.
        resnet_xla: whether the resnet section also times both models compiled whole.
        export_batches: the batch sizes the exported models are served at.
        export_all: whether the export section adds its reference exports (Keras's
            export of the stock-BN twin, our unfolded export, the model without BN).
        statistics_cases: the inputs of the statistics section.
        statistics_reps, ghost_reps: timed repetitions per contender in each section.
        ghost_shape, ghost_virtual_batch_size: the NHWC input of the ghost section and
            the size of its virtual batches.
        first_step_cases: the configurations of the first_step section.
        first_step_reps: fresh processes per contender and configuration (the
            figure is their median).
        first_step_image, first_step_batch, first_step_steps: the image shape of both
            models, the global batch and the number of steps of the first `fit`.
        first_step_timeout: seconds a fresh process may take before it counts as
            not runnable.
        xla_compile_models: the models of the xla_compile section ("mobilenet",
            "resnet", as in first_step; built at first_step's image, batch and
            classes).
        xla_compile_reps: the compiles per contender and model, alternating.
        accuracy_shape: the NHWC input of the accuracy section.
        accuracy_offsets: its inputs' means, in standard deviations (one comparison
            each).
    """

    layer_cases: Tuple[LayerCase, ...]
    layer_reps: int
    sync_reps: int
    resnet_reps: int
    export_reps: int
    warmup: int
    sync_batch: int
    sync_image: Tuple[int, int, int]
    sync_blocks: int
    resnet_batch: int
    resnet_image: Tuple[int, int, int]
    resnet_xla: bool
    export_batches: Tuple[int, ...]
    export_all: bool
    statistics_cases: Tuple[StatisticsCase, ...]
    statistics_reps: int
    ghost_shape: Tuple[int, int, int, int]
    ghost_virtual_batch_size: int
    ghost_reps: int
    first_step_cases: Tuple[FirstStepCase, ...]
    first_step_reps: int
    first_step_image: Tuple[int, int, int]
    first_step_batch: int
    first_step_steps: int
    first_step_timeout: float
    xla_compile_models: Tuple[str, ...]
    xla_compile_reps: int
    accuracy_shape: Tuple[int, int, int, int]
    accuracy_offsets: Tuple[float, ...]

    def with_reps(self, reps):
        """A copy with every `*_reps` count set to `reps`."""
        return dataclasses.replace(self, **{
            field.name: reps for field in dataclasses.fields(self)
            if field.name.endswith("_reps")})

    def to_json(self):
        """The fields as a JSON-ready dict (layer cases as [name, shape, axis])."""
        return {field.name: getattr(self, field.name)
                for field in dataclasses.fields(self)}


FULL = Config(
    layer_cases=(LayerCase("NHWC", (64, 32, 32, 64), -1), LayerCase("dense", (256, 1024), -1),
                 LayerCase("dense-small", (64, 256), -1), LayerCase("NCHW", (64, 64, 32, 32), 1)),
    layer_reps=60, sync_reps=80, resnet_reps=30, export_reps=100, warmup=3,
    sync_batch=128, sync_image=(32, 32, 16), sync_blocks=2,
    resnet_batch=64, resnet_image=(32, 32, 3), resnet_xla=True,
    export_batches=(1, 64), export_all=True,
    statistics_cases=(StatisticsCase((8, 8, 1), 64, 22), StatisticsCase((32, 32, 3), 64, 8)),
    statistics_reps=15,
    ghost_shape=(64, 32, 32, 64), ghost_virtual_batch_size=8, ghost_reps=40,
    # Not "plan": XLA auto-clustering took MobileNetV2 on 4 CPU replicas 16 minutes to
    # its first step here (python -m training.benchmark.first_step --xla plan).
    first_step_cases=tuple(FirstStepCase(model, replicas, xla)
                           for model in ("mobilenet", "resnet")
                           for replicas in (1, REPLICAS) for xla in ("off", "step")),
    first_step_reps=3, first_step_image=(32, 32, 3), first_step_batch=32,
    first_step_steps=2, first_step_timeout=900.0,
    xla_compile_models=("mobilenet", "resnet"), xla_compile_reps=6,
    accuracy_shape=(64, 32, 32, 64), accuracy_offsets=(0.0, 1e2, 1e3, 1e4),
)
QUICK = Config(
    layer_cases=(LayerCase("NHWC", (16, 16, 16, 32), -1), LayerCase("dense", (64, 256), -1),
                 LayerCase("NCHW", (16, 32, 16, 16), 1)),
    layer_reps=5, sync_reps=3, resnet_reps=3, export_reps=5, warmup=1,
    sync_batch=32, sync_image=(8, 8, 4), sync_blocks=1,
    resnet_batch=16, resnet_image=(8, 8, 1), resnet_xla=False,
    export_batches=(1, 16), export_all=False,
    statistics_cases=(StatisticsCase((8, 8, 1), 16, 3),),
    statistics_reps=3,
    ghost_shape=(16, 16, 16, 32), ghost_virtual_batch_size=8, ghost_reps=5,
    first_step_cases=(FirstStepCase("resnet", 1, "off"),),
    first_step_reps=1, first_step_image=(8, 8, 1), first_step_batch=16,
    first_step_steps=2, first_step_timeout=300.0,
    xla_compile_models=("resnet",), xla_compile_reps=1,
    accuracy_shape=(16, 8, 8, 16), accuracy_offsets=(0.0, 1e4),
)
