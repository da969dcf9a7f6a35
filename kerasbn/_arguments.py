"""The checks of `kerasbn.BatchNormalization`'s arguments.

Each check returns the value as the layer keeps it, or raises a ValueError that names
the layer, the argument, the value received and what is allowed.
"""

import collections.abc
import numbers

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


class Checks:
    """The argument checks of the layer named `layer_name`."""

    def __init__(self, layer_name):
        self.layer_name = layer_name

    def error(self, argument, value, allowed):
        """The ValueError for `argument=value`, which must be `allowed`."""
        return ValueError(
            f"BatchNormalization layer '{self.layer_name}': argument `{argument}` must be "
            f"{allowed}; received {argument}={value!r}."
        )

    def axis(self, axis):
        """An int, or a list of distinct ints (a tuple becomes a list)."""
        axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        if not axes or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
        ):
            raise self.error("axis", axis, "an int or a non-empty list of ints")
        if len(set(axes)) != len(axes):
            raise self.error("axis", axis, "a list of distinct axes")
        return [int(a) for a in axes] if isinstance(axis, (list, tuple)) else int(axis)

    def momentum(self, argument, momentum):
        """A float in [0, 1], for `argument` (momentum or renorm_momentum)."""
        if (not isinstance(momentum, numbers.Real) or isinstance(momentum, bool)
                or not 0.0 <= momentum <= 1.0):
            raise self.error(argument, momentum, "a number in [0, 1]")
        return float(momentum)

    def epsilon(self, epsilon):
        """A float > 0."""
        if not isinstance(epsilon, numbers.Real) or not epsilon > 0.0:
            raise self.error("epsilon", epsilon, "a number > 0")
        return float(epsilon)

    def renorm_clipping(self, clipping):
        """A dict of floats (or None) under `RENORM_CLIPPING_KEYS`; None gives {}."""
        if clipping is None:
            return {}
        if (not isinstance(clipping, collections.abc.Mapping)
                or set(clipping) - set(RENORM_CLIPPING_KEYS)):
            raise self.error(
                "renorm_clipping", clipping,
                f"a dict with keys among {list(RENORM_CLIPPING_KEYS)}",
            )
        clipping = {k: (None if v is None else float(v)) for k, v in clipping.items()}
        rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
        if rmin is not None and rmax is not None and rmin > rmax:
            raise self.error("renorm_clipping", clipping, "rmin <= rmax")
        if rmin is not None and rmin < 0:
            raise self.error("renorm_clipping", clipping, "rmin >= 0")
        if dmax is not None and dmax < 0:
            raise self.error("renorm_clipping", clipping, "dmax >= 0")
        return clipping

    def jit_compile(self, jit_compile):
        """True, False or "auto"."""
        if isinstance(jit_compile, bool) or jit_compile == "auto":
            return jit_compile
        raise self.error("jit_compile", jit_compile, 'True, False or "auto"')

    def virtual_batch_size(self, size, axis):
        """None, or an int >= 1 for a layer whose `axis` (checked) leaves the batch axis."""
        if size is None:
            return None
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise self.error("virtual_batch_size", size, "None or an int >= 1")
        self.refuse_batch_axis(axis, axis if isinstance(axis, list) else [axis], size)
        return int(size)

    def refuse_batch_axis(self, axis, axes, size, rank=None):
        """Raises when ghost batches (`size` not None) meet a channel axis 0 among `axes`
        (the layer's `axis` resolved for inputs of `rank`)."""
        if size is not None and 0 in axes:
            inputs = "" if rank is None else f" for inputs of rank {rank}"
            raise self.error(
                "axis", axis, f"free of the batch axis 0{inputs} when "
                f"virtual_batch_size={size} (the groups are formed along the batch axis)")

    def refuse_adjustment(self, adjustment):
        """Raises unless `adjustment` (tf-keras's argument) is None."""
        if adjustment is not None:
            raise self.error(
                "adjustment", adjustment,
                "None: tf-keras's adjustment callable (a random per-batch rescaling of "
                "the normalized values) is not supported; drop it from the config, or "
                "apply the rescaling in a layer of your own after the batch norm")

    def sync_group_size(self, size, synchronized):
        """None, or an int >= 1 for a synchronized layer."""
        if size is None:
            return None
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise self.error("sync_group_size", size, "None or an int >= 1")
        if not synchronized:
            raise self.error("sync_group_size", size, "None unless synchronized=True")
        return int(size)
