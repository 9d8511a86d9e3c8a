"""Labelled blob images for tests: dark noise, the positives with one bright square."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_blobs(folder: Path, n_per_class: int, words: tuple[str, str] = ("Mitosis", "Normal"), seed: int = 0,
                size: int = 96, blob: int = 16) -> Path:
    """``folder/images/imgNN.png`` (even NN positive) and ``folder/labels.csv`` (Image,Label); returns the CSV."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(2 * n_per_class):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        if i % 2 == 0:
            y, x = rng.integers(0, size - blob, 2)
            image[y : y + blob, x : x + blob] = 250
        name = f"img{i:02d}.png"
        Image.fromarray(image).save(folder / "images" / name)
        rows.append((name, words[0] if i % 2 == 0 else words[1]))
    return write_labels(folder / "labels.csv", rows)


def write_labels(path: Path, rows: list[tuple[str, str]], header: str = "Image,Label") -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path
