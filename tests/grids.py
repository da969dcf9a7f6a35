"""The grids the tests of the layer's math run over, defined once for every test file."""


# (per-example shape, axis): ranks 2-5; channels-last, channels-first, axis lists; square
# shapes, where a mask laid along the wrong axes would still broadcast and go unnoticed.
LAYOUTS = [
    ((7,), -1),
    ((9, 5), -1),
    ((5, 9), 1),
    ((5, 5), 1),
    ((6, 5, 4), -1),
    ((4, 6, 5), 1),
    ((6, 5, 4), [1, 3]),
    ((4, 4, 4), [1, 2]),
    ((5, 3, 4, 3), -1),
]


def layout_id(layout):
    shape, axis = layout
    return f"{'x'.join(map(str, shape))}-axis{axis}"


LAYOUT_IDS = [layout_id(layout) for layout in LAYOUTS]

# How a Keras mask can be shaped for an input: the input's shape without its last axis
# ("full"), or broadcastable to it with every dim but the batch's set to 1 ("broadcast").
MASK_KINDS = ("full", "broadcast")


def random_mask(rng, full_shape, kind):
    """A random Keras mask (bool) for an input of `full_shape`; never empty, never full."""
    shape = full_shape[:-1]
    if kind == "broadcast":
        shape = (shape[0],) + (1,) * (len(shape) - 1)
    mask = rng.uniform(size=shape) < 0.6
    mask[0] = True  # the first example counts in every channel
    mask.flat[-1] = False
    return mask
