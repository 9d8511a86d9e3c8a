"""The eight flipped/turned views of a cell crop (a cell has no orientation), in numpy, so that
the served path needs no PyTorch; :func:`mitoscope.augment.dihedral` does the same to tensors."""

from __future__ import annotations

import numpy as np

# (quarter turns, left-right flip first), in the order views are taken: the first k of them.
VIEWS = [(0, False), (1, False), (2, True), (3, True), (2, False), (1, True), (3, False), (0, True)]


def crop_views(crops: np.ndarray, view: int, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    """(n, s, s, c) crops under view ``view`` of :data:`VIEWS`; ``axes``: the rows and columns
    axes, e.g. (2, 3) for (n, c, s, s) arrays."""
    turns, flip = VIEWS[view]
    out = np.flip(crops, axis=axes[1]) if flip else crops
    return np.ascontiguousarray(np.rot90(out, turns, axes=axes) if turns % 4 else out)
