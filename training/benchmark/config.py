"""The sizes of a run, decided once: `FULL` or `QUICK`, as one frozen `Config`.

A section reads its sizes from the `Config` it is given and nothing else; `--reps`
makes a copy with every repetition count replaced (`Config.with_reps`). The JSON output
records `Config.to_json()`, whose keys are the field names below.
"""

import dataclasses
from typing import NamedTuple, Tuple

REPLICAS = 4  # logical CPU devices of the sync section
EPSILON, MOMENTUM = 1e-3, 0.99  # Keras's defaults, given to every contender
NUM_CLASSES = 10
# Bytes a call must move, as multiples of the size of x (see the bandwidth section).
BYTES_MOVED = {"training": 8, "inference": 2, "copy": 2}


class LayerCase(NamedTuple):
    """One input of the layer section: a name for the tables, a shape, a channel axis."""

    name: str
    shape: Tuple[int, ...]
    axis: int


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
                 LayerCase("NCHW", (64, 64, 32, 32), 1)),
    layer_reps=60, sync_reps=80, resnet_reps=30, export_reps=100, warmup=3,
    sync_batch=128, sync_image=(32, 32, 16), sync_blocks=2,
    resnet_batch=64, resnet_image=(32, 32, 3), resnet_xla=True,
    export_batches=(1, 64), export_all=True,
)
QUICK = Config(
    layer_cases=(LayerCase("NHWC", (16, 16, 16, 32), -1), LayerCase("dense", (64, 256), -1),
                 LayerCase("NCHW", (16, 32, 16, 16), 1)),
    layer_reps=5, sync_reps=3, resnet_reps=3, export_reps=5, warmup=1,
    sync_batch=32, sync_image=(8, 8, 4), sync_blocks=1,
    resnet_batch=16, resnet_image=(8, 8, 1), resnet_xla=False,
    export_batches=(1, 16), export_all=False,
)
