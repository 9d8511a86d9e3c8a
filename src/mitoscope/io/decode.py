"""Decoding: TIFF files with tifffile, every other format with Pillow, into (H, W, C) pixels as
stored (and their headers alone, for :func:`mitoscope.io.read_header`). Every failure is an
:class:`~mitoscope.errors.InputError` naming the file.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ..errors import InputError, one_line
from .reading import ImageHeader, ReadOptions, _check_channels, _check_dtype, _check_pixels

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# tifffile axis codes that hold channels: channel, sample, and generic page sequences.
_CHANNEL_AXES = frozenset("CSIQ")
_AXIS_NAMES = {"Z": "Z-slices", "T": "time points", "R": "tiles", "M": "mosaic tiles"}

# Pillow's decompression-bomb limit is a module attribute; it is swapped for ours only
# while one of our reads holds this lock, so concurrent reads never see a stale value.
_PILLOW_LIMIT_LOCK = threading.Lock()


def magic(path: Path) -> bytes:
    """The first bytes of an image file, after checking that there is one."""
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise InputError(f"{path}: cannot open ({one_line(err, None)})") from err
    if not magic:
        raise InputError(f"{path}: file is empty (0 bytes), expected an image")
    return magic


@contextmanager
def _tiff_errors(path: Path) -> Iterator[list[str]]:
    """tifffile's and its codecs' failures (raised or logged) as InputError naming ``path``."""
    try:
        with _tifffile_errors() as tiff_errors:
            yield tiff_errors
    except InputError:
        raise
    except Exception as err:  # tifffile and codecs raise many types for corrupt files
        raise InputError(
            f"{path}: cannot read TIFF, the file is truncated or corrupt ({one_line(err, None)})"
        ) from err


def _tiff_series(path: Path, tif: tifffile.TiffFile, options: ReadOptions) -> tuple[Any, dict[str, int], int]:
    """The one image series of an open TIFF, the positions of its axes and its channel count, checked."""
    all_series = tif.series
    if not all_series:
        raise InputError(f"{path}: TIFF holds no image data")
    if len(all_series) > 1:
        shapes = ", ".join(f"{s.axes} {tuple(s.shape)}" for s in all_series[:4])
        raise InputError(
            f"{path}: TIFF holds {len(all_series)} separate images ({shapes}); "
            f"expected one image"
        )
    series = all_series[0]
    axes, shape = series.axes, tuple(series.shape)
    photometric = series.keyframe.photometric
    axis_of = _tiff_layout(path, axes, shape)
    _check_pixels(path, shape[axis_of["Y"]], shape[axis_of["X"]], options.max_pixels)
    n_channels = shape[axis_of["C"]] if "C" in axis_of else 1
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        n_channels = 3
    elif photometric not in (
        tifffile.PHOTOMETRIC.MINISBLACK,
        tifffile.PHOTOMETRIC.MINISWHITE,
        tifffile.PHOTOMETRIC.RGB,
        tifffile.PHOTOMETRIC.YCBCR,  # tifffile decodes (JPEG-compressed) YCbCr to RGB
    ):
        raise InputError(
            f"{path}: unsupported TIFF colour model {photometric.name}; expected grey, "
            f"RGB(A), palette or a channel stack"
        )
    _check_channels(path, n_channels, options.channels)
    _check_dtype(path, np.dtype(series.dtype))
    return series, axis_of, n_channels


def tiff_header(path: Path, options: ReadOptions) -> ImageHeader:
    with _tiff_errors(path) as tiff_errors, tifffile.TiffFile(path) as tif:
        series, axis_of, n_channels = _tiff_series(path, tif, options)
        _raise_logged_errors(path, tiff_errors)
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        if series.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE:
            bit_depth = 8  # the colour map's values, as read_image returns them
        else:
            bit_depth = 1 if dtype == np.bool_ else 8 * dtype.itemsize
    return ImageHeader(path, int(shape[axis_of["Y"]]), int(shape[axis_of["X"]]), int(n_channels), bit_depth)


def read_tiff(path: Path, options: ReadOptions) -> tuple[np.ndarray, bool]:
    """Decode a TIFF into (H, W, C) pixels; return them and whether they are 8-bit."""
    with _tiff_errors(path) as tiff_errors, tifffile.TiffFile(path) as tif:
        series, axis_of, _ = _tiff_series(path, tif, options)
        photometric = series.keyframe.photometric
        _raise_logged_errors(path, tiff_errors)
        data = series.asarray()
        colormap = series.keyframe.colormap
        _raise_logged_errors(path, tiff_errors)

    order = [axis_of["Y"], axis_of["X"]] + ([axis_of["C"]] if "C" in axis_of else [])
    data = np.transpose(data, order)
    if data.ndim == 2:
        data = data[:, :, None]

    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        if colormap is None or data.shape[2] != 1:
            raise InputError(f"{path}: palette TIFF without a usable colour map")
        colormap = np.asarray(colormap)
        if colormap.dtype != np.uint8:
            colormap = (colormap.astype(np.uint32) // 256).astype(np.uint8)  # as Pillow does
        index = data[:, :, 0].astype(np.intp)
        if index.max(initial=0) >= colormap.shape[1]:
            raise InputError(f"{path}: palette TIFF with pixel values beyond its colour map")
        return np.moveaxis(colormap[:, index], 0, -1), True
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        data = _invert(data)
    if data.dtype == np.bool_:
        return data.astype(np.uint8) * 255, True
    return data, data.dtype == np.uint8


class _ThreadErrors(logging.Handler):
    """Collects the ERROR records this thread logs (tifffile logs, rather than raises,
    when a file's pages or strips are missing, e.g. because it is truncated)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    handler = _ThreadErrors()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        tiff_logger.removeHandler(handler)


def _raise_logged_errors(path: Path, messages: list[str]) -> None:
    if messages:
        raise InputError(
            f"{path}: cannot read TIFF, the file is truncated or corrupt (tifffile: "
            f"{one_line(messages[0], None)})"
        )


def _tiff_layout(path: Path, axes: str, shape: tuple[int, ...]) -> dict[str, int]:
    """Positions of Y, X and the (single) channel axis; refuse anything else of size > 1."""
    if "Y" not in axes or "X" not in axes:
        raise InputError(
            f"{path}: TIFF axes {axes!r} with shape {shape} have no Y and X; expected a 2-D image"
        )
    axis_of = {"Y": axes.index("Y"), "X": axes.index("X")}
    channel_axes = []
    for position, (code, size) in enumerate(zip(axes, shape)):
        if code in "YX" or size == 1:
            continue
        if code not in _CHANNEL_AXES:
            what = _AXIS_NAMES.get(code, f"entries along axis {code!r}")
            raise InputError(
                f"{path}: TIFF has {size} {what} (axes {axes!r}, shape {shape}); expected a "
                f"single 2-D image, optionally with one channel axis"
            )
        channel_axes.append(position)
    if len(channel_axes) > 1:
        raise InputError(
            f"{path}: TIFF has several pages of multi-channel images (axes {axes!r}, shape "
            f"{shape}); expected a single 2-D image with at most one channel axis"
        )
    if channel_axes:
        axis_of["C"] = channel_axes[0]
    return axis_of


def _invert(data: np.ndarray) -> np.ndarray:
    """Invert a 'min-is-white' TIFF so that larger values are brighter, as in every other case."""
    if data.dtype == np.bool_:
        return ~data
    if np.issubdtype(data.dtype, np.unsignedinteger):
        return np.iinfo(data.dtype).max - data
    if np.issubdtype(data.dtype, np.signedinteger):
        return ~data
    return -data


@contextmanager
def _pillow_errors(path: Path, options: ReadOptions) -> Iterator[None]:
    """Pillow's failures as InputError naming ``path``."""
    try:
        yield
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(
            f"{path}: image is over the limit of {options.max_pixels:,} pixels (max_pixels; raise "
            f"it only for files you trust): {one_line(err, None)}"
        ) from err
    except UnidentifiedImageError as err:
        raise InputError(
            f"{path}: not an image file (expected PNG, JPEG, TIFF, BMP or another format "
            f"Pillow reads)"
        ) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        raise InputError(
            f"{path}: cannot decode image, the file is truncated or corrupt ({one_line(err, None)})"
        ) from err


@contextmanager
def _pillow_open(path: Path, options: ReadOptions) -> Iterator[Image.Image]:
    """The image open with its header checked (size, a single frame); its pixels not yet decoded."""
    with _pillow_errors(path, options):
        with _pillow_pixel_limit(options.max_pixels):
            img = Image.open(path)  # reads the header only; Pillow checks its size here
        with img:
            width, height = img.size
            _check_pixels(path, height, width, options.max_pixels)
            with _pillow_pixel_limit(options.max_pixels):
                n_frames = getattr(img, "n_frames", 1)  # walking GIF frames checks sizes too
            if n_frames > 1:
                raise InputError(
                    f"{path}: {img.format} file holds {n_frames} frames; expected a single image"
                )
            yield img


# Pillow modes -> (channels, bits per sample) as _pillow_pixels hands them on; others become RGB.
_PILLOW_LAYOUTS = {"1": (1, 1), "L": (1, 8), "LA": (1, 8), "La": (1, 8), "RGB": (3, 8), "RGBA": (4, 8),
                   "I": (1, 32), "F": (1, 32)}


def pillow_header(path: Path, options: ReadOptions) -> ImageHeader:
    with _pillow_open(path, options) as img:
        mode, (width, height) = img.mode, img.size
    channels, bit_depth = (1, 16) if mode.startswith("I;16") else _PILLOW_LAYOUTS.get(mode, (3, 8))
    _check_channels(path, channels, options.channels)
    return ImageHeader(path, int(height), int(width), channels, bit_depth)


def read_with_pillow(path: Path, options: ReadOptions) -> tuple[np.ndarray, bool]:
    """Decode a non-TIFF file into (H, W, C) pixels; return them and whether they are 8-bit."""
    with _pillow_open(path, options) as img:
        img.load()  # decode everything now, so a truncated file fails here
        pixels = _pillow_pixels(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    _check_channels(path, pixels.shape[2], options.channels)
    _check_dtype(path, pixels.dtype)
    return pixels, pixels.dtype == np.uint8


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb check use ``max_pixels``, and make its warning an error.

    Pillow's own default (about 89 million pixels, error at twice that) would otherwise
    override ours in both directions.
    """
    with _PILLOW_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    """Pillow image -> array of 1, 3 or 4 channels, keeping 16-bit and float data as they are."""
    mode = img.mode
    # "I" (32-bit integers) is how Pillow may hold 16-bit PNGs; "F" is 32-bit float.
    if mode in ("L", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
        return np.asarray(img)
    if mode in ("1", "LA", "La"):
        return np.asarray(img.convert("L"))  # 1-bit -> 0/255; grey's alpha dropped
    return np.asarray(img.convert("RGB"))  # palette, CMYK, YCbCr, LAB, HSV, RGBX, ...
