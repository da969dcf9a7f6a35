"""What a population-statistics pass (`kerasbn.recompute_statistics`) returns.

`StatisticsSummary` holds a `LayerStatistics` per recomputed batch norm and prints
as a table. Both are importable from `kerasbn.statistics`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """What a pass did to one batch norm.

    Attributes:
        name: the layer's name.
        count: values per channel that entered the statistics (examples for a batch
            norm after a Dense layer; examples × positions after a convolution; masked
            values left out). The smallest over channels if they differ.
        mean_change: the largest change of the moving mean over channels, in units of
            the channel's new standard deviation sqrt(var + ε).
        variance_change: the largest relative change of the moving variance over
            channels, |new − old| / (old + ε).
        updated: False when no value reached the layer (its statistics were kept).
    """

    name: str
    count: int
    mean_change: float
    variance_change: float
    updated: bool = True


@dataclasses.dataclass(frozen=True)
class StatisticsSummary:
    """What `recompute_statistics` did, layer by layer; printing it shows a table.

    Iterating gives the `LayerStatistics` of every recomputed layer; `summary["name"]`
    the one of a layer by name.

    Attributes:
        layers: a `LayerStatistics` per recomputed batch norm, in model order.
        batches: steps run (global batches under a strategy).
        examples: examples whose activations entered the statistics.
        skipped_batches: batches left out because an activation entering a batch norm
            was not finite (under a strategy, counted per replica: each replica's part
            of a global batch is kept or left out on its own).
        frozen: names of batch norms with `trainable=False`, left as they were (they
            run in inference mode in training and keep their statistics).
        renorm_kept: names of renorm layers left as they were (`recompute_renorm`
            False): they ran in training mode in the pass, as in training.
    """

    layers: tuple
    batches: int
    examples: int
    skipped_batches: int
    frozen: tuple = ()
    renorm_kept: tuple = ()

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, key):
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(key)
        return self.layers[key]

    def __str__(self):
        lines = [
            f"Population statistics over {self.batches} batches ({self.examples} examples"
            f", {self.skipped_batches} skipped as not finite):"
        ]
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines.append(f"  {'layer':<{width}}  {'values/channel':>14}  "
                     f"{'mean change (std)':>17}  {'variance change':>15}")
        for layer in self.layers:
            if layer.updated:
                lines.append(f"  {layer.name:<{width}}  {layer.count:>14}  "
                             f"{layer.mean_change:>17.3g}  {layer.variance_change:>15.3g}")
            else:
                lines.append(f"  {layer.name:<{width}}  {0:>14}  {'(no values: kept)':>34}")
        if self.frozen:
            lines.append(f"  frozen, kept: {', '.join(self.frozen)}")
        if self.renorm_kept:
            lines.append(f"  renorm, kept (recompute_renorm=True recomputes them): "
                         f"{', '.join(self.renorm_kept)}")
        return "\n".join(lines)
