"""Sliding windows that cover a whole image, right and bottom edges included.

Windows step by ``round(window * (1 - overlap))`` pixels; the last window of each axis is
snapped to the edge so that no pixel is left out (the write-up's 4K grid of 352 windows).
An image smaller than one window is padded with zeros at the bottom/right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


def axis_starts(length: int, window: int, stride: int) -> tuple[int, ...]:
    """Start offsets along one axis; the last one ends exactly at ``max(length, window)``."""
    span = max(length, window)
    starts = list(range(0, span - window + 1, stride))
    if starts[-1] + window < span:
        starts.append(span - window)
    return tuple(starts)


@dataclass(frozen=True)
class WindowGrid:
    """The windows of one image, in row-major order."""

    height: int
    width: int
    window: int
    overlap: float
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)

    @property
    def n_windows(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def padded_size(self) -> tuple[int, int]:
        return max(self.height, self.window), max(self.width, self.window)

    def boxes(self) -> np.ndarray:
        """(N, 4) int64 ``[x0, y0, x1, y1]``; boxes of a padded image may pass the image edge."""
        yy, xx = np.meshgrid(np.asarray(self.ys), np.asarray(self.xs), indexing="ij")
        x0, y0 = xx.ravel(), yy.ravel()
        return np.stack([x0, y0, x0 + self.window, y0 + self.window], axis=1).astype(np.int64)


def validate_tiling(window: int, overlap: float) -> None:
    if not isinstance(window, (int, np.integer)) or window < 8:
        raise InputError(f"window must be an integer of at least 8 pixels, got {window!r}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap!r}")


def stride_for(window: int, overlap: float) -> int:
    return max(1, int(round(window * (1.0 - overlap))))


def make_grid(height: int, width: int, window: int = 224, overlap: float = 0.5) -> WindowGrid:
    validate_tiling(window, overlap)
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {height}x{width}")
    stride = stride_for(window, overlap)
    return WindowGrid(
        height=int(height),
        width=int(width),
        window=int(window),
        overlap=float(overlap),
        ys=axis_starts(height, window, stride),
        xs=axis_starts(width, window, stride),
    )


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad an (H, W, C) image at the bottom/right to at least ``height`` x ``width``."""
    pad_h, pad_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if pad_h == 0 and pad_w == 0:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))


def crop_windows(image: np.ndarray, grid: WindowGrid) -> np.ndarray:
    """(N, window, window, C) crops in grid order, as views where no padding is needed."""
    if image.shape[:2] != (grid.height, grid.width):
        raise InputError(
            f"image is {image.shape[1]}x{image.shape[0]} but the grid was made for "
            f"{grid.width}x{grid.height}"
        )
    padded = pad_to(image, *grid.padded_size)
    w = grid.window
    return np.stack([padded[y : y + w, x : x + w] for y in grid.ys for x in grid.xs])
