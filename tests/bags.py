"""Bags of cells for tests: images of green discs (decoys); a Mitosis image holds one red disc among them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = (30, 90, 40)
DECOY = (60, 230, 80)  # interphase-like: green discs
TARGET = (240, 60, 40)  # the distinctive instance: a red disc


def disc_image(centres, colours, size=160, radius=7, seed=0):
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[...] = BACKGROUND
    yy, xx = np.mgrid[:size, :size]
    for (x, y), colour in zip(centres, colours):
        image[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = colour
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def grid_centres(n, size=160, seed=0):
    rng = np.random.default_rng(seed)
    slots = [(x, y) for y in range(20, size - 10, 30) for x in range(20, size - 10, 30)]
    chosen = rng.choice(len(slots), size=n, replace=False)
    return [(slots[i][0] + rng.integers(-3, 4), slots[i][1] + rng.integers(-3, 4)) for i in chosen]


def write_bags(folder: Path, n_images=32, cells=9, seed=0):
    """Images of ``cells`` discs; half of them (Mitosis) hold one red disc among green decoys (an odd
    number of cells, so that the one red disc never moves the median cell size, and the crop scale, of its image).
    Returns the folder and, per image, the centre of its red disc (None for Normal)."""
    (folder / "images").mkdir(parents=True)
    rows, targets = [], {}
    for i in range(n_images):
        centres = grid_centres(cells, seed=seed * 1000 + i)
        mitosis = i % 2 == 1
        colours = [DECOY] * cells
        if mitosis:
            colours[0] = TARGET
        name = f"img_{i:03d}.png"
        Image.fromarray(disc_image(centres, colours, seed=i)).save(folder / "images" / name)
        rows.append((name, "Mitosis" if mitosis else "Normal"))
        targets[name] = centres[0] if mitosis else None
    with open(folder / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("Image", "Label"), *rows])
    return folder, targets


def train_cell_model(folder: Path, out: Path, scorer: str = "linear", **settings):
    """A cell model trained on ``write_bags(folder)`` with a tiny random-weight backbone (seconds);
    ``settings`` override the :class:`CellTrainConfig` used."""
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.workflow import train_cells

    config = CellTrainConfig(**{**dict(backbone="test_efficientnet", input_size=32, scorer=scorer,
                                       views=2, epochs=12, learning_rate=3e-3, top_learning_rate=3e-3,
                                       validation_fraction=0.25,
                                       # one pass over the few negatives an epoch: seconds, not a minute
                                       min_steps_per_epoch=0), **settings})
    return train_cells(folder, folder / "labels.csv", out, config, pretrained=False)
