"""The sizes of a run, decided once: `FULL` (the default) or `QUICK`, as one frozen `Config`.

Every experiment reads its sizes from the `Config` it is given and nothing else;
`--steps` and `--seeds` make a copy with those fields replaced (`Config.replaced`). The
JSON output records `Config.to_json()`, whose keys are the field names below.
"""

import dataclasses
from typing import Tuple

# The paper's network and batch (Ioffe & Szegedy 2015, section 4.1).
BATCH_SIZE = 60
# The unit of the last hidden layer whose input Figures 1b/1c follow (any fixed unit:
# the summary also reports the median over all 100 units).
PLOTTED_UNIT = 0
PERCENTILES = (15, 50, 85)
# Batch Renormalization's clipping (Ioffe 2017, the final values of its schedule).
RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
# A run "trains" (is usable) when its final test accuracy reaches this.
USABLE_ACCURACY = 0.80


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of every experiment.

    Attributes:
        seeds: seeds of Figure 1 (each seed: the initial weights and the data order,
            shared by the three networks). The sweeps and the small-batch table use
            the first seed.
        steps: training steps (batches of 60) of Figure 1 and of every run of the two
            sweeps.
        evaluations: test evaluations along a run of Figure 1 (evenly spaced, plus one
            before the first step).
        learning_rate: plain SGD's learning rate at batch 60 (Figure 1, the
            initialization sweep, and the small-batch table, scaled there by batch/60).
        learning_rates: the learning-rate sweep.
        init_scales: the initialization sweep: factors on the default (Glorot-uniform)
            initial weights of the three hidden layers.
        small_batch_sizes: the rows of the small-batch table.
        small_batch_epochs: passes over the training split every small-batch run makes
            (so each batch size sees the same examples, with the learning rate scaled by
            batch/60).
    """

    seeds: int
    steps: int
    evaluations: int
    learning_rate: float
    learning_rates: Tuple[float, ...]
    init_scales: Tuple[float, ...]
    small_batch_sizes: Tuple[int, ...]
    small_batch_epochs: float

    def replaced(self, **changes):
        """A copy with the given fields replaced (None values are ignored)."""
        return dataclasses.replace(
            self, **{name: value for name, value in changes.items() if value is not None})

    def to_json(self):
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


FULL = Config(
    seeds=5,
    steps=3000,
    evaluations=60,
    learning_rate=1.0,
    learning_rates=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    init_scales=(0.1, 0.3, 1.0, 3.0, 10.0),
    small_batch_sizes=(2, 4, 8, 16, 64),
    small_batch_epochs=5,
)

# Every experiment, at sizes that run in well under a minute on an idle machine.
QUICK = Config(
    seeds=2,
    steps=120,
    evaluations=4,
    learning_rate=1.0,
    learning_rates=(0.1, 10.0),
    init_scales=(0.1, 10.0),
    small_batch_sizes=(16, 64),
    small_batch_epochs=0.1,
)
