"""How a file becomes an image: :class:`ReadOptions` (channels, scaling percentiles, pixel
limit), :class:`ImageHeader` (what a file's header tells) and the checks every decoder runs
(pixel limit, channel choice, pixel type). The rule itself: :mod:`mitoscope.io.images`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

DEFAULT_MAX_PIXELS = 250_000_000
DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class ReadOptions:
    """How a file becomes an (H, W, 3) uint8 image (see :mod:`mitoscope.io.images` for the rule).

    Parameters
    ----------
    channels : tuple of 3 ints or None
        Source channel indices for red, green and blue; None applies the default mapping.
    percentiles : (low, high)
        Percentiles mapped to 0 and 255 when scaling non-8-bit data, 0 <= low < high <= 100.
    max_pixels : int
        Largest accepted height x width; bigger images are refused before decoding.
    """

    channels: tuple[int, int, int] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) to tuples so options compare and hash alike.
        if self.channels is not None:
            channels = tuple(self.channels)
            if len(channels) != 3 or not all(_is_int(c) and c >= 0 for c in channels):
                raise InputError(
                    f"channels must be three non-negative channel indices for R, G, B, "
                    f"e.g. (1, 0, 2); got {self.channels!r}"
                )
            object.__setattr__(self, "channels", tuple(int(c) for c in channels))
        percentiles = tuple(self.percentiles)
        if (
            len(percentiles) != 2
            or not all(isinstance(p, (int, float, np.number)) and not isinstance(p, bool) for p in percentiles)
            or not 0 <= percentiles[0] < percentiles[1] <= 100
        ):
            raise InputError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100; got {self.percentiles!r}"
            )
        object.__setattr__(self, "percentiles", (float(percentiles[0]), float(percentiles[1])))
        if not _is_int(self.max_pixels) or self.max_pixels <= 0:
            raise InputError(f"max_pixels must be a positive integer; got {self.max_pixels!r}")
        object.__setattr__(self, "max_pixels", int(self.max_pixels))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists instead of tuples), the inverse of :meth:`from_dict`."""
        return {
            "channels": None if self.channels is None else list(self.channels),
            "percentiles": list(self.percentiles),
            "max_pixels": self.max_pixels,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReadOptions:
        """Options from :meth:`to_dict`'s output; missing keys take their defaults."""
        if not isinstance(data, Mapping):
            raise InputError(f"reading options must be a mapping; got {type(data).__name__}")
        known = {"channels", "percentiles", "max_pixels"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown reading option(s) {', '.join(map(repr, unknown))}; expected {sorted(known)}"
            )
        return cls(**dict(data))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_channels(text: str) -> tuple[int, int, int]:
    """Parse ``"1,0,2"`` (the CLI's ``--channels``) into ``(1, 0, 2)``."""
    parts = [part.strip() for part in str(text).replace(" ", ",").split(",") if part.strip()]
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise InputError(
            f"--channels expects three comma-separated channel indices for R, G, B such as "
            f"'1,0,2'; got {text!r}"
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header tells: its size, its source channels and their bit depth.

    ``channels`` counts the channels :func:`read_image` picks R, G, B from (a palette image
    has 3, RGBA 4, grey + alpha 1); ``bit_depth`` is the bits per sample (1 for bilevel, 8,
    16, 32 or 64). Data of more than 8 bits is percentile-scaled when read (``scaled``).
    """

    path: Path
    height: int
    width: int
    channels: int
    bit_depth: int

    @property
    def scaled(self) -> bool:
        return self.bit_depth > 8


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise InputError(
            f"{path}: image is {width}x{height} = {height * width:,} pixels, over the limit of "
            f"{max_pixels:,} pixels (max_pixels; raise it only for files you trust)"
        )


def _check_channels(path: Path, n_channels: int, channels: tuple[int, int, int] | None) -> None:
    plural = "channel" if n_channels == 1 else "channels"
    if channels is None:
        if n_channels > 4:
            raise InputError(
                f"{path}: image has {n_channels} channels; choose three for R, G, B with "
                f"channels=(r, g, b) (CLI: --channels r,g,b), indices 0..{n_channels - 1}"
            )
        return
    bad = [c for c in channels if c >= n_channels]
    if bad:
        raise InputError(
            f"{path}: channel index {bad[0]} is out of range: the image has {n_channels} "
            f"{plural} (indices 0..{n_channels - 1}); got channels={channels}"
        )


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    ok = (
        dtype == np.bool_
        or (np.issubdtype(dtype, np.integer) and dtype.itemsize <= 4)
        or np.issubdtype(dtype, np.floating)
    )
    if not ok:
        raise InputError(
            f"{path}: unsupported pixel type {dtype}; expected 8-, 16- or 32-bit integers or "
            f"floating-point values"
        )
