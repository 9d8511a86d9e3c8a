"""Reading images and image-level labels.

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
starts from; :class:`SourceProfile` records those of a model's training images and checks
new images against them (refused: a channel count never seen; warned: the other side of the
8-bit line).

Labels come from a CSV (the competition's ``Image,Label`` or a generic ``path,label``) or
from one sub-folder per class; see :func:`load_labelled_images`.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from .errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PERCENTILES",
    "IMAGE_SUFFIXES",
    "ImageHeader",
    "LabelledImages",
    "ReadOptions",
    "SourceProfile",
    "find_images",
    "load_labelled_images",
    "locate_labels",
    "parse_channels",
    "read_header",
    "read_image",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 250_000_000
DEFAULT_PERCENTILES = (0.5, 99.5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# tifffile axis codes that hold channels: channel, sample, and generic page sequences.
_CHANNEL_AXES = frozenset("CSIQ")
_AXIS_NAMES = {"Z": "Z-slices", "T": "time points", "R": "tiles", "M": "mosaic tiles"}
_POSITIVE_WORD = "mitosis"

# Pillow's decompression-bomb limit is a module attribute; it is swapped for ours only
# while one of our reads holds this lock, so concurrent reads never see a stale value.
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReadOptions:
    """How a file becomes an (H, W, 3) uint8 image (see the module docstring for the rule).

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


# --------------------------------------------------------------------------- images


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
    if _magic(path) in _TIFF_MAGIC:
        pixels, is_8bit = _read_tiff(path, options)
    else:
        pixels, is_8bit = _read_with_pillow(path, options)
    image = _to_rgb8(pixels, is_8bit, options, path)
    logger.debug("read %s: %dx%d", path, image.shape[1], image.shape[0])
    return image


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


def read_header(path: str | os.PathLike[str], options: ReadOptions | None = None) -> ImageHeader:
    """The size, channel count and bit depth of an image file, from its header alone.

    Runs every check of :func:`read_image` that needs no pixels (the file exists and is an
    image of a supported layout and pixel type, within ``options.max_pixels``, with the
    channels ``options.channels`` asks for), with the same messages. A truncated file is only
    found when it is decoded.
    """
    options = ReadOptions() if options is None else options
    path = Path(path)
    if _magic(path) in _TIFF_MAGIC:
        return _tiff_header(path, options)
    return _pillow_header(path, options)


@dataclass(frozen=True)
class SourceProfile:
    """The kinds of image file a model was trained on: their bit depths and channel counts.

    ``train`` and ``finetune`` record it in ``model.json`` (``source_images``) from the
    training images' headers; ``predict`` and ``evaluate`` check every image against it
    with :meth:`check`.
    """

    bit_depths: tuple[int, ...]
    channel_counts: tuple[int, ...]
    n_images: int

    @classmethod
    def of(cls, headers: Iterable[ImageHeader]) -> SourceProfile:
        headers = list(headers)
        return cls(tuple(sorted({h.bit_depth for h in headers})), tuple(sorted({h.channels for h in headers})),
                   len(headers))

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]], options: ReadOptions | None = None) -> SourceProfile:
        """The profile of image files, from their headers (see :func:`read_header`)."""
        return cls.of(read_header(path, options) for path in paths)

    def to_dict(self) -> dict[str, Any]:
        return {"bit_depths": list(self.bit_depths), "channel_counts": list(self.channel_counts),
                "n_images": self.n_images}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SourceProfile | None:
        """The profile :meth:`to_dict` wrote; None for a model saved before profiles were recorded."""
        if data is None:
            return None
        try:
            return cls(tuple(int(v) for v in data["bit_depths"]), tuple(int(v) for v in data["channel_counts"]),
                       int(data.get("n_images", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"source image profile: expected bit_depths and channel_counts lists, got {data!r}") from err

    def check(self, header: ImageHeader, channels_chosen: bool = False) -> str:
        """Refuse, or warn about, an image unlike every training image; return the warning ("" if none).

        - A channel count never seen at training is refused (InputError): its R, G and B
          would come from other data than the model learnt from. ``channels_chosen`` (the
          prediction was given its own ``--channels``) accepts it: that choice says which of
          its channels are R, G, B.
        - An image on the other side of the 8-bit line gets a warning: 8-bit data is used as
          it is, deeper data is scaled per channel from its percentiles, so the same scene
          reaches the model with other intensities than at training.
        """
        if not channels_chosen and header.channels not in self.channel_counts:
            seen = " or ".join(str(n) for n in self.channel_counts)
            raise InputError(
                f"{header.path}: image has {header.channels} channel(s), the model was trained on images of {seen} "
                f"channel(s); convert it, or choose its R, G, B channels with --channels r,g,b "
                f"(indices 0..{header.channels - 1})"
            )
        trained_scaled = {depth > 8 for depth in self.bit_depths}
        if header.scaled in trained_scaled:
            return ""
        depths = " and ".join(f"{depth}-bit" for depth in self.bit_depths)
        how = ("percentile scaling gives it other intensities than the training images"
               if header.scaled else "its values are used as they are, the training images were percentile-scaled")
        return (f"{header.bit_depth}-bit image, the model was trained on {depths} images: {how}; "
                f"convert it to the training format for a reliable answer")


def _magic(path: Path) -> bytes:
    """The first bytes of an image file, after checking that there is one."""
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise InputError(f"{path}: cannot open ({_one_line(err)})") from err
    if not magic:
        raise InputError(f"{path}: file is empty (0 bytes), expected an image")
    return magic


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise InputError(
            f"{path}: image is {width}x{height} = {height * width:,} pixels, over the limit of "
            f"{max_pixels:,} pixels (max_pixels; raise it only for files you trust)"
        )


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
            f"{path}: cannot read TIFF, the file is truncated or corrupt ({_one_line(err)})"
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


def _tiff_header(path: Path, options: ReadOptions) -> ImageHeader:
    with _tiff_errors(path) as tiff_errors, tifffile.TiffFile(path) as tif:
        series, axis_of, n_channels = _tiff_series(path, tif, options)
        _raise_logged_errors(path, tiff_errors)
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        if series.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE:
            bit_depth = 8  # the colour map's values, as read_image returns them
        else:
            bit_depth = 1 if dtype == np.bool_ else 8 * dtype.itemsize
    return ImageHeader(path, int(shape[axis_of["Y"]]), int(shape[axis_of["X"]]), int(n_channels), bit_depth)


def _read_tiff(path: Path, options: ReadOptions) -> tuple[np.ndarray, bool]:
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
            f"{' '.join(messages[0].split())})"
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
            f"it only for files you trust): {_one_line(err)}"
        ) from err
    except UnidentifiedImageError as err:
        raise InputError(
            f"{path}: not an image file (expected PNG, JPEG, TIFF, BMP or another format "
            f"Pillow reads)"
        ) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
        raise InputError(
            f"{path}: cannot decode image, the file is truncated or corrupt ({_one_line(err)})"
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


def _pillow_header(path: Path, options: ReadOptions) -> ImageHeader:
    with _pillow_open(path, options) as img:
        mode, (width, height) = img.mode, img.size
    channels, bit_depth = (1, 16) if mode.startswith("I;16") else _PILLOW_LAYOUTS.get(mode, (3, 8))
    _check_channels(path, channels, options.channels)
    return ImageHeader(path, int(height), int(width), channels, bit_depth)


def _read_with_pillow(path: Path, options: ReadOptions) -> tuple[np.ndarray, bool]:
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


# --------------------------------------------------------------------------- finding images


def find_images(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into a list of image paths (for prediction).

    A file is taken as given; a folder contributes its images (suffixes in
    ``IMAGE_SUFFIXES``, any case; hidden files skipped; not recursive), sorted by name.
    The order of ``inputs`` is kept and a path given twice is listed once.

    Raises
    ------
    InputError
        A path does not exist, a folder holds no images, or nothing was given.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            images = _images_in(path)
            if not images:
                raise InputError(
                    f"{path}: folder contains no images (expected files ending in "
                    f"{', '.join(IMAGE_SUFFIXES)})"
                )
        else:
            images = [path]
        for image in images:
            key = image.resolve()
            if key not in seen:
                seen.add(key)
                found.append(image)
    if not found:
        raise InputError("no images given: expected image files or folders of images")
    return found


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelledImages:
    """Images with one label each.

    Attributes
    ----------
    paths : list of Path
        The image files, in the order of the CSV (or sorted by class folder, then name).
    labels : list of str
        Each image's label, in the CSV's (or folder's) own words.
    classes : (negative, positive)
        The two labels.
    y : np.ndarray
        0/1 ints, 1 where the label is ``classes[1]``.
    groups : list of str or None
        Each image's group (from a ``group`` or ``slide`` column) for grouped
        cross-validation; None when the CSV has no such column.
    """

    paths: list[Path]
    labels: list[str]
    classes: tuple[str, str]
    y: np.ndarray = field(repr=False)
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def locate_labels(data_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None) -> Path | None:
    """The labels CSV that :func:`load_labelled_images` reads (a relative ``labels_csv`` that
    does not exist is also looked for inside ``data_dir``), or None for class sub-folders.

    Raises InputError when ``data_dir`` is not a folder or the CSV does not exist; cheap (no
    file is read), so the command line calls it before loading anything heavy.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data folder does not exist")
    if labels_csv is None:
        return None
    csv_path = Path(labels_csv)
    if not csv_path.exists() and not csv_path.is_absolute() and (data_dir / csv_path).exists():
        csv_path = data_dir / csv_path
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: labels file does not exist")
    return csv_path


def load_labelled_images(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    positive: str | None = None,
) -> LabelledImages:
    """Load image paths and their labels.

    Three layouts are understood:

    * the competition's CSV with columns ``Image,Label`` (e.g. ``Mitosis``/``Normal``);
    * a generic CSV with columns ``path,label`` (extra columns are ignored);
    * ``labels_csv=None``: one sub-folder of ``data_dir`` per class, holding its images.

    Column names are matched case-insensitively. Paths in a CSV are relative to
    ``data_dir``, or to ``data_dir/images`` (where the competition and
    ``compose_scenes.py`` keep them); absolute paths are used as they are. A relative
    ``labels_csv`` that does not exist is also looked for inside ``data_dir``. A ``group``
    or ``slide`` column fills ``groups``.

    Parameters
    ----------
    data_dir : path-like
        The folder the images live in.
    labels_csv : path-like, optional
        The labels file; None for the folder-per-class layout.
    positive : str, optional
        The positive class. By default the label that reads ``mitosis`` in any case.

    Raises
    ------
    InputError
        Missing folder or CSV, missing columns, empty CSV, not exactly two classes,
        duplicate or missing images, or no positive class; the message names the file
        and the line.
    """
    data_dir = Path(data_dir)
    csv_path = locate_labels(data_dir, labels_csv)
    if csv_path is None:
        paths, labels, groups, source = _from_class_folders(data_dir)
    else:
        paths, labels, groups, source = _from_csv(data_dir, csv_path)

    classes = _choose_classes(labels, positive, source)
    y = np.array([int(label == classes[1]) for label in labels], dtype=np.int64)
    logger.info(
        "%s: %d images, %d %s, %d %s",
        source, len(paths), int((y == 0).sum()), classes[0], int(y.sum()), classes[1],
    )
    return LabelledImages(paths=paths, labels=labels, classes=classes, y=y, groups=groups)


def _from_class_folders(data_dir: Path) -> tuple[list[Path], list[str], None, str]:
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_images = {folder.name: _images_in(folder) for folder in folders}
    class_images = {name: images for name, images in class_images.items() if images}
    if len(class_images) != 2:
        hint = ""
        csv_files = sorted(p.name for p in data_dir.glob("*.csv"))
        if csv_files:
            hint = f"; to use a labels file pass it (CLI: --labels {data_dir / csv_files[0]})"
        found = ", ".join(repr(name) for name in class_images) or "none"
        raise InputError(
            f"{data_dir}: expected exactly two class sub-folders holding images; found "
            f"{len(class_images)} ({found}){hint}"
        )
    loose = _images_in(data_dir)
    if loose:
        logger.warning(
            "%s: %d images directly in the data folder are not in a class folder and are not used",
            data_dir, len(loose),
        )
    paths = [image for images in class_images.values() for image in images]
    labels = [name for name, images in class_images.items() for _ in images]
    return paths, labels, None, str(data_dir)


def _from_csv(data_dir: Path, csv_path: Path) -> tuple[list[Path], list[str], list[str] | None, str]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{csv_path}: cannot read labels file ({_one_line(err)})") from err
    if header is None or not any(cell.strip() for cell in header):
        raise InputError(f"{csv_path}: labels file is empty; expected a header 'path,label' or 'Image,Label'")

    columns = {name.strip().lower(): index for index, name in reversed(list(enumerate(header)))}
    path_column = next((columns[name] for name in ("path", "image") if name in columns), None)
    label_column = columns.get("label")
    if path_column is None or label_column is None:
        found = ", ".join(repr(name.strip()) for name in header)
        raise InputError(
            f"{csv_path}: expected columns 'path,label' or 'Image,Label'; found {found}"
        )
    group_column = next((columns[name] for name in ("group", "slide") if name in columns), None)

    rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError(f"{csv_path}: labels file has a header but no rows")

    paths: list[Path] = []
    labels: list[str] = []
    groups: list[str] | None = [] if group_column is not None else None
    first_line_of: dict[Path, int] = {}
    missing: list[tuple[int, str]] = []
    needed = max(path_column, label_column, -1 if group_column is None else group_column)
    for line, row in rows:
        if len(row) <= needed:
            raise InputError(
                f"{csv_path}: line {line} has {len(row)} fields; expected {len(header)} as in the header"
            )
        name, label = row[path_column].strip(), row[label_column].strip()
        if not name:
            raise InputError(f"{csv_path}: line {line} has an empty {header[path_column].strip()!r}")
        if not label:
            raise InputError(f"{csv_path}: line {line} has an empty {header[label_column].strip()!r}")
        image = _resolve_image(data_dir, name)
        if image is None:
            missing.append((line, name))
            continue
        key = image.resolve()
        if key in first_line_of:
            raise InputError(
                f"{csv_path}: line {line} lists {name!r} again (already on line {first_line_of[key]}); "
                f"each image must appear once"
            )
        first_line_of[key] = line
        paths.append(image)
        labels.append(label)
        if groups is not None:
            group = row[group_column].strip()
            if not group:
                raise InputError(
                    f"{csv_path}: line {line} has an empty {header[group_column].strip()!r}"
                )
            groups.append(group)
    if missing:
        shown = ", ".join(f"line {line}: {name!r}" for line, name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(
            f"{csv_path}: {len(missing)} listed image(s) not found under {data_dir} "
            f"(or {data_dir / 'images'}): {shown}{more}"
        )
    return paths, labels, groups, str(csv_path)


def _resolve_image(data_dir: Path, name: str) -> Path | None:
    relative = Path(name)
    if relative.is_absolute():
        return relative if relative.is_file() else None
    for candidate in (data_dir / relative, data_dir / "images" / relative):
        if candidate.is_file():
            return candidate
    return None


def _choose_classes(labels: Sequence[str], positive: str | None, source: str) -> tuple[str, str]:
    """(negative, positive) from the labels found and the ``positive`` asked for."""
    found = sorted(set(labels))
    listing = ", ".join(repr(label) for label in found)
    if len(found) != 2:
        raise InputError(
            f"{source}: expected exactly two classes; found {len(found)} ({listing})"
        )
    if positive is None:
        matches = [label for label in found if label.strip().lower() == _POSITIVE_WORD]
        if len(matches) != 1:
            raise InputError(
                f"{source}: cannot tell which class is positive (neither label reads "
                f"'{_POSITIVE_WORD}'); pass --positive with one of {listing}"
            )
        chosen = matches[0]
    elif positive in found:
        chosen = positive
    else:
        matches = [label for label in found if label.lower() == positive.strip().lower()]
        if len(matches) != 1:
            raise InputError(
                f"{source}: positive class {positive!r} is not one of the labels found ({listing})"
            )
        chosen = matches[0]
    negative = found[0] if found[1] == chosen else found[1]
    return negative, chosen
