"""Whole-slide images (.svs, .ndpi, .mrxs, pyramidal TIFF): opened lazily, read region by region.

A slide is never decoded whole: :class:`Slide` reads any level-0 rectangle at any scale from
the pyramid level nearest to it (OpenSlide, which bundles its C library through the
``openslide-bin`` wheel; tiffslide for the TIFF pyramids OpenSlide does not read), and
:func:`tissue_mask` finds the tissue on a thumbnail so that background is never read at all.
Needs the ``[wsi]`` extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from .reading import ImageHeader

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideTiling", "TileRead", "is_slide", "plan_tiles", "slide_header", "tissue_mask"]

# Formats only slide readers open; a .tif/.tiff is a slide when it holds a pyramid.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
_TIFF_SUFFIXES = (".tif", ".tiff")
_WSI_EXTRA = "pip install -e '.[wsi]'"


def is_slide(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read as a whole slide: a slide format's suffix, or a TIFF with pyramid levels."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in _TIFF_SUFFIXES or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0] if tif.series else None
            return bool(series is not None and len(series.levels) > 1)
    except Exception:  # not readable as TIFF: the image reader says what is wrong
        return False


def _open_handle(path: Path) -> Any:
    errors = []
    try:
        import openslide
    except ImportError:
        openslide = None
    if openslide is not None:
        try:
            return openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as error:
            errors.append(str(error) or type(error).__name__)
    try:
        import tiffslide
    except ImportError:
        tiffslide = None
    if tiffslide is not None:
        try:
            return tiffslide.TiffSlide(str(path))
        except Exception as error:  # tifffile's errors for a file that is no TIFF
            errors.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
    if openslide is None and tiffslide is None:
        raise InputError(f"{path}: whole-slide images need the wsi extra: {_WSI_EXTRA}")
    raise InputError(f"{path}: not a whole-slide image that can be read, or the file is damaged "
                     f"({'; '.join(errors)})")


_UNITS_IN_MICRONS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(path: Path) -> float | None:
    """Microns per pixel from an OME-TIFF's OME-XML (``Pixels@PhysicalSizeX``), which neither
    OpenSlide nor tiffslide read; None when the file does not say."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata if tif.is_ome else None
        if not xml:
            return None
        for element in ET.fromstring(xml).iter():
            if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
                unit = _UNITS_IN_MICRONS.get(element.get("PhysicalSizeXUnit", "µm"))
                value = float(element.get("PhysicalSizeX")) * unit if unit else None
                return value if value and value > 0 else None
    except Exception:  # unreadable metadata: the pixel size stays unknown, as the file's readers say
        return None
    return None


@dataclass
class Slide:
    """An open slide. Coordinates are level-0 pixels (x right, y down); ``mpp`` is level 0's
    microns per pixel, or None when the file does not say."""

    path: Path
    width: int
    height: int
    mpp: float | None
    _handle: Any

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "Slide":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: slide file not found")
        handle = _open_handle(path)
        width, height = (int(v) for v in handle.dimensions)
        mpp = None
        for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
            value = handle.properties.get(key)
            try:
                if value is not None and float(value) > 0:
                    mpp = float(value)
                    break
            except (TypeError, ValueError):
                pass
        if mpp is None:
            mpp = _ome_mpp(path)  # OME-TIFF: its pyramid is read, its pixel size is in the OME-XML
        return cls(path, width, height, mpp, handle)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read(self, x: int, y: int, width: int, height: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """The level-0 rectangle (x, y, width, height) as (H, W, 3) uint8, resampled to ``out_size``
        (W, H) when given, from the coarsest level that still has the detail asked for. Parts past
        the slide's edge, and transparent parts, come back white."""
        from PIL import Image

        out_w, out_h = out_size if out_size is not None else (width, height)
        downsample = max(width / out_w, height / out_h, 1.0)
        level = int(self._handle.get_best_level_for_downsample(downsample))
        level_ds = float(self._handle.level_downsamples[level])
        size = (max(1, int(np.ceil(width / level_ds))), max(1, int(np.ceil(height / level_ds))))
        try:
            region = self._handle.read_region((int(x), int(y)), level, size)
        except Exception as error:  # a damaged tile deep in the file
            raise InputError(f"{self.path}: cannot read the region at ({x}, {y}) of level {level}: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        region = region.convert("RGBA")
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, region).convert("RGB")
        if rgb.size != (out_w, out_h):
            rgb = rgb.resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return np.asarray(rgb)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side ``max_side`` (never enlarged), and its scale
        (thumbnail pixels per level-0 pixel)."""
        scale = min(1.0, max_side / max(self.width, self.height))
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        return self.read(0, 0, self.width, self.height, size), scale


def slide_header(path: str | os.PathLike[str]) -> "ImageHeader":
    """What a slide's tiles are, as an image header: level 0's size, 3 channels of 8 bits (RGB)."""
    from .reading import ImageHeader

    with Slide.open(path) as slide:
        return ImageHeader(Path(path), slide.height, slide.width, 3, 8)


def tissue_mask(thumbnail: np.ndarray, min_distance: float = 12.0) -> np.ndarray:
    """Where the tissue (or any specimen) is on a thumbnail: pixels whose colour is far from the
    background's, the background being the median colour of the thumbnail's outer frame (a
    slide's scanned area reaches past its specimen). The threshold is Otsu's level on that
    distance, at least ``min_distance`` grey levels; specks are removed and holes closed."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    pixels = thumbnail.astype(np.float32)
    height, width = pixels.shape[:2]
    frame = max(1, min(height, width) // 20)
    border = np.concatenate([pixels[:frame].reshape(-1, 3), pixels[-frame:].reshape(-1, 3),
                             pixels[:, :frame].reshape(-1, 3), pixels[:, -frame:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    distance = ndimage.uniform_filter(np.max(np.abs(pixels - background), axis=-1), size=3)
    level = threshold_otsu(distance) if float(distance.max()) > float(distance.min()) else np.inf
    mask = distance > max(float(level), float(min_distance))
    mask = ndimage.binary_opening(mask, iterations=1)
    return ndimage.binary_closing(mask, iterations=2)


# --------------------------------------------------------------------------- tiles of the tissue


def plan_tiles(width: int, height: int, mask: np.ndarray, mask_scale: float, tile0: float, step0: float
               ) -> list[tuple[int, int]]:
    """(column, row) of the tiles that touch tissue: tile (c, r) covers level-0
    ``[c * step0, c * step0 + tile0) x [r * step0, r * step0 + tile0)``; ``mask`` is the tissue at
    ``mask_scale`` mask pixels per level-0 pixel."""
    columns = max(1, math.ceil((width - tile0) / step0) + 1) if width > tile0 else 1
    rows = max(1, math.ceil((height - tile0) / step0) + 1) if height > tile0 else 1
    mask_h, mask_w = mask.shape
    planned = []
    for row in range(rows):
        for column in range(columns):
            x0, y0 = column * step0 * mask_scale, row * step0 * mask_scale
            x1, y1 = x0 + tile0 * mask_scale, y0 + tile0 * mask_scale
            window = mask[int(y0):max(int(y0) + 1, math.ceil(min(y1, mask_h))),
                          int(x0):max(int(x0) + 1, math.ceil(min(x1, mask_w)))]
            if window.any():
                planned.append((column, row))
    return planned


def _owners(centres: np.ndarray, tile0: float, step0: float, overlap0: float, planned: set[tuple[int, int]]
            ) -> list[tuple[int, int]]:
    """The tile that keeps each instance: the one whose core holds its centre; where that tile was
    not read (no tissue), the first read tile (by row, then column) that covers the centre."""
    owners = []
    for x, y in centres:
        core = (max(0, int((x - overlap0 / 2) // step0)), max(0, int((y - overlap0 / 2) // step0)))
        if core in planned:
            owners.append(core)
            continue
        covering = sorted((r, c) for c in range(max(0, math.ceil((x - tile0) / step0)), int(x // step0) + 1)
                          for r in range(max(0, math.ceil((y - tile0) / step0)), int(y // step0) + 1)
                          if (c, r) in planned)
        owners.append((covering[0][1], covering[0][0]) if covering else core)
    return owners


@dataclass
class TileRead:
    """One tile of a slide: its pixels (``tile`` x ``tile``), which of them are tissue, and where it
    lies in level 0."""

    pixels: np.ndarray
    tissue: np.ndarray
    column: int
    row: int
    x0: float
    y0: float


class SlideTiling:
    """The tissue tiles of an open slide (see the module doc), and which instances each one keeps."""

    def __init__(self, slide: Slide, mpp: float | None = None, tile: int = 2048, overlap: int = 128,
                 thumbnail_side: int = 2048) -> None:
        if tile < 64 or not 0 <= overlap < tile // 2:
            raise InputError(f"tiles must be at least 64 px with an overlap under half a tile; got {tile} and {overlap}")
        if mpp is not None:
            if slide.mpp is None:
                raise InputError(f"{slide.path}: the slide does not say its pixel size, so --mpp cannot be used; "
                                 f"leave it out to read level 0")
            if mpp < slide.mpp * 0.999:
                raise InputError(f"{slide.path}: --mpp {mpp} is finer than the slide's {slide.mpp} µm/px")
        self.slide, self.mpp, self.tile = slide, mpp, tile
        self.scale0 = (mpp / slide.mpp) if mpp is not None else 1.0  # level-0 pixels per tile pixel
        self.tile0, self.overlap0 = tile * self.scale0, overlap * self.scale0
        self.step0 = self.tile0 - self.overlap0
        self.thumbnail, self.thumb_scale = slide.thumbnail(thumbnail_side)
        self.mask = tissue_mask(self.thumbnail)
        self.planned = plan_tiles(slide.width, slide.height, self.mask, self.thumb_scale, self.tile0, self.step0)
        self._planned_set = set(self.planned)
        from scipy import ndimage

        self._near_tissue = ndimage.binary_dilation(self.mask, iterations=2)
        # where cells are looked for: the tissue less a thumbnail pixel at its edge, so that no sliver
        # of glass (the mask's edge is as coarse as the thumbnail) is taken for cells
        self._inner_tissue = ndimage.binary_erosion(self.mask, iterations=1)

    def tiles(self) -> Iterator[TileRead]:
        """The tiles that touch tissue, read one at a time, each with its tissue mask (the
        thumbnail's, nearest pixel)."""
        index = (np.arange(self.tile) + 0.5) * self.tile0 / self.tile
        for column, row in self.planned:
            x0, y0 = column * self.step0, row * self.step0
            pixels = self.slide.read(round(x0), round(y0), round(self.tile0), round(self.tile0), (self.tile, self.tile))
            rows = np.clip(((y0 + index) * self.thumb_scale).astype(int), 0, self.mask.shape[0] - 1)
            columns = np.clip(((x0 + index) * self.thumb_scale).astype(int), 0, self.mask.shape[1] - 1)
            yield TileRead(pixels, self._inner_tissue[np.ix_(rows, columns)], column, row, x0, y0)

    def to_level0(self, read: TileRead, boxes: np.ndarray) -> np.ndarray:
        """Boxes in a tile's pixels -> level-0 pixels."""
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * self.scale0 + np.array([read.x0, read.y0] * 2)

    def keeps(self, read: TileRead, boxes0: np.ndarray, on_tissue: bool = False) -> np.ndarray:
        """Which of a tile's instances (level-0 boxes) this tile keeps: those whose centre its core
        holds (each instance once across overlaps); with ``on_tissue``, only those on the tissue."""
        centres = (boxes0[:, :2] + boxes0[:, 2:]) / 2
        keep = np.array([owner == (read.column, read.row) for owner in
                         _owners(centres, self.tile0, self.step0, self.overlap0, self._planned_set)], dtype=bool)
        if on_tissue and len(centres):
            mask = self._near_tissue
            columns = np.clip((centres[:, 0] * self.thumb_scale).astype(int), 0, mask.shape[1] - 1)
            rows = np.clip((centres[:, 1] * self.thumb_scale).astype(int), 0, mask.shape[0] - 1)
            keep &= mask[rows, columns]
        return keep.reshape(-1)
