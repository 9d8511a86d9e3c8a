"""Cell proposals by classical image analysis: where the cells of an image are, with no labels.

A field of cells is a common background with objects on it. Each pixel's distance from the
background (per channel, in robust units: the median and the median absolute deviation of the
channel), smoothed, is thresholded by Otsu's method; touching cells are split by a watershed on
the distance transform, seeded at its peaks one cell radius apart. Each region becomes one
instance: its centre, its size and a square crop side shared by the whole image (a multiple of
the image's median cell diameter, so that every crop holds one cell at the same relative scale
whatever the magnification).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Regions smaller than this fraction of the median region are debris or noise.
MIN_AREA_FRACTION = 0.15
# The crop side, in median cell diameters: the cell and a ring of its surroundings.
CROP_DIAMETERS = 1.4



@dataclass(frozen=True)
class Proposals:
    """The cells found in one image: centres ``(n, 2)`` as (x, y), diameters ``(n,)`` in pixels,
    and the crop side (pixels) every instance of this image is cut at."""

    centres: np.ndarray
    diameters: np.ndarray
    crop_side: int

    def __len__(self) -> int:
        return int(len(self.centres))

    def boxes(self) -> np.ndarray:
        """``(n, 4)`` boxes (x0, y0, x1, y1) of the crops, in image pixels (as window boxes are)."""
        half = self.crop_side / 2
        return np.concatenate([self.centres - half, self.centres + half], axis=1).reshape(-1, 4)


def foreground(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """How far each pixel is from the background, in robust standard deviations (max over channels);
    the background's statistics come from the ``valid`` pixels only (e.g. a slide tile's tissue)."""
    flat = image.reshape(-1, image.shape[-1]) if valid is None else image[valid]
    # Quantiles on a strided sample: the same answer as on all pixels, ten times faster on a 4K image.
    sample = flat[:: max(1, len(flat) // 200_000)].astype(np.float32)
    median = np.median(sample, axis=0)
    spread = np.median(np.abs(sample - median), axis=0) * 1.4826
    spread = np.maximum(spread, 1.0)
    if image.dtype in (np.uint8, np.uint16):
        # A table per channel, indexed by the pixel value: the same float32 arithmetic once per
        # possible value instead of once per pixel (a 4K RGB image: 0.8 s -> 0.1 s).
        values = np.arange(np.iinfo(image.dtype).max + 1, dtype=np.float32)
        out = np.abs(values - median[0]) / spread[0]
        out = out[image[..., 0]]
        for channel in range(1, image.shape[-1]):
            np.maximum(out, (np.abs(values - median[channel]) / spread[channel])[image[..., channel]], out=out)
        return out
    pixels = image.astype(np.float32)
    return np.max(np.abs(pixels - median) / spread, axis=-1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole filled: background not 4-connected to the image border. The answer of
    ``scipy.ndimage.binary_fill_holes``, by one labelling instead of repeated dilations (4x faster)."""
    from scipy import ndimage as ndi

    background, _ = ndi.label(~mask)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    outside = np.zeros(int(background.max()) + 1, dtype=bool)
    outside[border] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def distance_inside(labels: np.ndarray) -> np.ndarray:
    """Each labelled pixel's Euclidean distance to the nearest unlabelled pixel (0 outside the
    regions): ``scipy.ndimage.distance_transform_edt(labels > 0)``, exactly, region by region
    within its box and a one-pixel rim, so that a field mostly of background costs its cells only.

    Exact because the regions are 4-connected components: the nearest pixel outside a region is
    background (a mask pixel 4-adjacent to the region would belong to it, and a step towards the
    region from any other pixel gets strictly closer), and it lies within the rim-padded box
    (stepping towards the region from outside crosses the rim first)."""
    from scipy import ndimage as ndi

    out = np.zeros(labels.shape, dtype=np.float64)
    height, width = labels.shape
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, height)
        x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, width)
        region = labels[y0:y1, x0:x1] == index
        if region.all():  # no pixel outside it within the image's edge: the global transform decides
            return ndi.distance_transform_edt(labels > 0)
        out[y0:y1, x0:x1][region] = ndi.distance_transform_edt(region)[region]
    return out


def find_cells(image: np.ndarray, min_diameter: float = 8.0, max_cells: int = 5000,
               valid: np.ndarray | None = None) -> Proposals:
    """Propose one instance per cell of an (H, W, C) image; an empty field gives no instances.
    With ``valid`` (an (H, W) bool mask, e.g. the tissue of a slide tile) cells are looked for, and
    the background measured, only there: glass beside the tissue neither counts as background nor
    makes the tissue stand out as one giant cell."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    if image.ndim != 3:
        raise ValueError(f"find_cells expects an (H, W, C) image, got shape {image.shape}")
    if valid is not None and not valid.any():
        return _none(min_diameter)
    distance_from_background = foreground(image, valid)
    if valid is not None:
        distance_from_background[~valid] = 0.0
    distance_from_background = gaussian(distance_from_background, sigma=2.0, preserve_range=True)
    considered = distance_from_background if valid is None else distance_from_background[valid]
    if float(considered.max() - considered.min()) < 1e-6:
        return _none(min_diameter)
    # Otsu's level on the logarithm of the distance: on the distance itself a few very distinct
    # cells (the mitoses) raise the level and shrink every other cell of their image, so that the
    # instances of an image would tell its label through their size.
    level = float(np.expm1(threshold_otsu(np.log1p(considered))))
    level = max(level, 3.0)
    mask = fill_holes(distance_from_background > level)
    if valid is not None:
        mask &= valid
    labels, n = ndi.label(mask)
    if n == 0:
        return _none(min_diameter)
    areas = np.bincount(labels.ravel())[1:]
    smallest = np.pi * (min_diameter / 2) ** 2
    large_enough = areas[areas >= smallest]
    typical = float(np.median(large_enough)) if len(large_enough) else float(smallest)
    radius = max(min_diameter / 2, float(np.sqrt(typical / np.pi)))
    # Split touching cells: one seed per distance-transform peak, a cell radius apart.
    distance = distance_inside(labels)
    peaks = peak_local_max(distance, min_distance=max(2, int(radius * 0.8)), labels=labels,
                           threshold_abs=radius * 0.35, exclude_border=False)
    markers = np.zeros(labels.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    cells = watershed(-distance, markers, mask=mask)
    centres, diameters = [], []
    min_area = max(smallest, MIN_AREA_FRACTION * typical)
    for region in regionprops(cells):
        if region.area < min_area:
            continue
        y, x = region.centroid
        centres.append((x, y))
        diameters.append(region.equivalent_diameter_area)
        if len(centres) >= max_cells:
            break
    if not centres:
        return _none(min_diameter)
    diameters_arr = np.asarray(diameters, dtype=np.float64)
    side = int(round(CROP_DIAMETERS * max(min_diameter, float(np.median(diameters_arr)))))
    return Proposals(np.asarray(centres, dtype=np.float64), diameters_arr, side)


def _none(min_diameter: float) -> Proposals:
    return Proposals(np.zeros((0, 2)), np.zeros((0,)), int(round(CROP_DIAMETERS * min_diameter)))


def cut_crops(image: np.ndarray, proposals: Proposals, size: int, valid: np.ndarray | None = None) -> np.ndarray:
    """The instances of an image as ``(n, size, size, C)`` uint8 crops, each centred on its cell
    (edges padded with the median of the image, or of its ``valid`` pixels: the background) and
    resized to ``size``."""
    from PIL import Image

    side = proposals.crop_side
    flat = image.reshape(-1, image.shape[-1]) if valid is None or not valid.any() else image[valid]
    fill = np.median(flat[:: max(1, len(flat) // 100_000)], axis=0).astype(image.dtype)
    height, width = image.shape[:2]
    out = np.empty((len(proposals), size, size, image.shape[2]), dtype=np.uint8)
    window = np.empty((side, side, image.shape[2]), dtype=image.dtype)
    for i, (x, y) in enumerate(proposals.centres):
        x0, y0 = int(round(x - side / 2)), int(round(y - side / 2))
        # the part of the crop inside the image, the rest background (no padded copy of the image)
        ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)
        if ix0 == x0 and iy0 == y0 and ix1 == x0 + side and iy1 == y0 + side:
            crop = image[y0:y0 + side, x0:x0 + side]
        else:
            window[...] = fill
            if ix1 > ix0 and iy1 > iy0:
                window[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
            crop = window
        if side != size:
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
        out[i] = crop
    return out
