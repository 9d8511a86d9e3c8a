"""Reading images: the one rule by which every file becomes an (H, W, 3) uint8 array.

Every image, whatever its format, becomes an 8-bit RGB array of shape (H, W, 3), dtype
uint8, by one rule:

1. **Decoding.** TIFF files (recognised by their first bytes, not their suffix) are read
   with tifffile; everything else (PNG, JPEG, BMP, ...) with Pillow. Pixels are used as
   stored: EXIF orientation is not applied. A TIFF must hold one 2-D image, optionally with
   one channel axis, channels first or last (tifffile's axes ``C``, ``S``, or pages ``I``/
   ``Q``); Z-stacks, time series and files with several separate images are refused.
   Pillow's palette images become RGB, grey + alpha becomes grey, CMYK/YCbCr/LAB become
   RGB, 1-bit images become 0/255; multi-frame files (animated GIF/PNG) are refused.
2. **Channels.** ``channels=(r, g, b)`` takes source channels ``r``, ``g`` and ``b``
   (0-based) as red, green and blue, e.g. ``(1, 0, 2)``; an index the image does not have
   is an error. Without it: 1 channel -> grey (R = G = B); 2 channels -> (0, 1, zeros);
   3 channels -> as they are; 4 channels (RGBA) -> the first three (alpha dropped);
   more than 4 -> an error asking for ``channels``.
3. **Intensities.** 8-bit (uint8) data is kept as is. Any other integer data of up to
   32 bits (e.g. 16-bit) and floating-point data is scaled per channel: the channel's
   ``percentiles`` (default 0.5 and 99.5, over its finite values) ``lo`` and ``hi`` map to
   0 and 255, ``round(255 * clip((v - lo) / (hi - lo), 0, 1))``; a channel with
   ``hi == lo`` (e.g. constant) becomes 0, NaN becomes 0. Other pixel types (complex,
   64-bit integers) are refused.

Images larger than ``max_pixels`` (height x width, default 250,000,000) are refused from
their header, before anything is decoded, as a guard against decompression bombs.
Every problem (missing, empty, truncated, not an image, too large, unsupported layout or
pixel type) raises :class:`~mitoscope.errors.InputError` with a one-line message that names
the file.

:func:`read_header` tells, from the header alone, the channels and bit depth this rule
starts from; :class:`~mitoscope.io.source_profile.SourceProfile` records those of a model's training images and checks
new images against them (refused: a channel count never seen; warned: the other side of the
8-bit line).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .decode import TIFF_MAGIC, magic, pillow_header, read_tiff, read_with_pillow, tiff_header
from .reading import ImageHeader, ReadOptions

logger = logging.getLogger(__name__)


def read_image(path: str | os.PathLike[str], options: ReadOptions | None = None) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array by the module's documented rule.

    Parameters
    ----------
    path : path-like
        PNG, JPEG, BMP, TIFF (8/16-bit/float, grey, RGB(A), palette, channel stacks) or any
        other single-frame format Pillow reads.
    options : ReadOptions, optional
        Channel choice, scaling percentiles and pixel limit; defaults to ``ReadOptions()``.

    Raises
    ------
    InputError
        The file is missing, empty, truncated, not an image, too large, or of an
        unsupported layout or pixel type; the message names the file.
    """
    options = ReadOptions() if options is None else options
    path = Path(path)
    if magic(path) in TIFF_MAGIC:
        pixels, is_8bit = read_tiff(path, options)
    else:
        pixels, is_8bit = read_with_pillow(path, options)
    image = _to_rgb8(pixels, is_8bit, options, path)
    logger.debug("read %s: %dx%d", path, image.shape[1], image.shape[0])
    return image


def read_header(path: str | os.PathLike[str], options: ReadOptions | None = None) -> ImageHeader:
    """The size, channel count and bit depth of an image file, from its header alone.

    Runs every check of :func:`read_image` that needs no pixels (the file exists and is an
    image of a supported layout and pixel type, within ``options.max_pixels``, with the
    channels ``options.channels`` asks for), with the same messages. A truncated file is only
    found when it is decoded.
    """
    options = ReadOptions() if options is None else options
    path = Path(path)
    if magic(path) in TIFF_MAGIC:
        return tiff_header(path, options)
    return pillow_header(path, options)


def _to_rgb8(pixels: np.ndarray, is_8bit: bool, options: ReadOptions, path: Path) -> np.ndarray:
    """Pick three channels and bring them to uint8, per the module's rule."""
    n_channels = pixels.shape[2]
    if options.channels is not None:
        picks: list[int | None] = list(options.channels)
    elif n_channels == 1:
        picks = [0, 0, 0]
    elif n_channels == 2:
        picks = [0, 1, None]
    else:  # 3 channels as they are; 4 (RGBA) without the alpha
        picks = [0, 1, 2]
    height, width = pixels.shape[:2]
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    scaled: dict[int, np.ndarray] = {}
    for out_channel, source in enumerate(picks):
        if source is None:
            continue
        if source not in scaled:
            channel = pixels[:, :, source]
            scaled[source] = channel if is_8bit else _scale_to_uint8(channel, options.percentiles)
        rgb[:, :, out_channel] = scaled[source]
    return rgb


def _scale_to_uint8(channel: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the channel's low/high percentiles to 0/255 (constant or all-NaN -> 0)."""
    values = channel.astype(np.float32) if channel.dtype == np.float16 else channel
    finite = np.isfinite(values) if np.issubdtype(values.dtype, np.floating) else None
    sample = values[finite] if finite is not None and not finite.all() else values
    if sample.size == 0:
        return np.zeros(channel.shape, dtype=np.uint8)
    low, high = np.percentile(sample, percentiles)
    if not high > low:
        return np.zeros(channel.shape, dtype=np.uint8)
    # float32 is exact enough for 16-bit and float32 data; wider types keep float64.
    wide = values.dtype == np.float64 or (np.issubdtype(values.dtype, np.integer) and values.dtype.itemsize > 2)
    work_dtype = np.float64 if wide else np.float32
    unit = (values.astype(work_dtype) - work_dtype(low)) / work_dtype(high - low)
    unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
