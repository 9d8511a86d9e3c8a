"""Where the model looks: window scores drawn over the image, listed and cropped.

The inputs are model-agnostic: an (H, W, 3) uint8 image as :func:`mitoscope.io.read_image`
returns it, the window boxes ``[x0, y0, x1, y1]`` in that image's full-resolution
coordinates (a padded image's windows may pass its edge; they are clipped) and one score
per window, higher = more mitotic (attention weights, per-window logits...).

**The score map.** A pixel covered by several (overlapping) windows gets the *mean* of
their scores; a pixel covered by no window has no score (NaN). The map is accumulated with
summed-area tables (one corner update per window, then two cumulative sums), so its cost
does not depend on the window size and thousands of windows take milliseconds.
"""

from __future__ import annotations

import csv
import io as stdio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path, atomic_write_text
from .errors import InputError
from .heads.registry import WINDOW_SCORING_HEADS
from .io import ReadOptions, read_image

if TYPE_CHECKING:
    from .predictions import Predictions

__all__ = [
    "OverlayLayout",
    "WINDOW_SCORE_HEADS",
    "check_heatmap_names",
    "clip_boxes",
    "rank_windows",
    "render_overlay",
    "require_window_scores",
    "save_top_crops",
    "score_map",
    "write_heatmaps",
    "write_window_csv",
]

logger = logging.getLogger(__name__)

# The models that score windows: the heads the registry says do, or a fine-tuned attention model.
WINDOW_SCORE_HEADS = f"cells (scores each cell), {', '.join(WINDOW_SCORING_HEADS)}, or a fine-tuned model trained with --pool attention"
DEFAULT_SCORE_LABEL = "window score (higher = more mitotic)"
# Narrow images still get a legend that can be read.
_MIN_CANVAS_WIDTH = 360
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)
_TOP_WINDOW_COLOUR = (0, 255, 255)
_FOUND_COLOUR = (255, 40, 40)


# --------------------------------------------------------------------------- inputs


def _check_windows(boxes: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    box_array = np.asarray(boxes)
    score_array = np.asarray(scores, dtype=np.float64)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise InputError(f"window boxes must be an (N, 4) array of [x0, y0, x1, y1]; got shape {box_array.shape}")
    if score_array.shape != (box_array.shape[0],):
        raise InputError(
            f"expected one score per window ({box_array.shape[0]} windows); got scores of shape {score_array.shape}"
        )
    if not np.all(np.isfinite(score_array)):
        raise InputError(f"window scores must be finite; got {int(np.sum(~np.isfinite(score_array)))} NaN/inf")
    if not np.all(np.isfinite(box_array.astype(np.float64))):
        raise InputError("window boxes must be finite numbers")
    return box_array, score_array


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or min(int(v) for v in image_size) < 1:
        raise InputError(f"image size must be (height, width) of positive integers; got {tuple(image_size)!r}")
    return int(image_size[0]), int(image_size[1])


def clip_boxes(boxes: Any, image_size: Sequence[int]) -> np.ndarray:
    """(N, 4) int64 boxes clipped to an image of ``image_size`` = (H, W)."""
    height, width = _check_size(image_size)
    clipped = np.rint(np.asarray(boxes, dtype=np.float64)).astype(np.int64)
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    return clipped


def rank_windows(scores: Any) -> np.ndarray:
    """Window indices from the highest score down; ties keep grid order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


# --------------------------------------------------------------------------- score map


def score_map(boxes: Any, scores: Any, image_size: Sequence[int], scale: float = 1.0) -> np.ndarray:
    """Per-pixel blend of window scores: the mean score of the windows covering each pixel.

    Parameters
    ----------
    boxes : (N, 4) array
        ``[x0, y0, x1, y1]`` in full-resolution pixels (x1, y1 exclusive); parts outside
        the image are ignored.
    scores : (N,) array
        One finite score per window.
    image_size : (H, W)
        Size of the image the boxes belong to.
    scale : float in (0, 1]
        Compute the map on a grid of ``max(1, round(H * scale))`` x ``max(1, round(W * scale))``
        cells instead; a cell takes the windows that cover its centre in the full image.

    Returns
    -------
    (H', W') float64 array; NaN where no window covers the pixel (cell).
    """
    height, width = _check_size(image_size)
    box_array, score_array = _check_windows(boxes, scores)
    if not 0 < scale <= 1:
        raise InputError(f"scale must be in (0, 1]; got {scale!r}")
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    sy, sx = out_h / height, out_w / width
    # Cell j (centre at (j + 0.5) / sx in the image) is inside [x0, x1) iff
    # ceil(x0 * sx - 0.5) <= j < ceil(x1 * sx - 0.5); with sx = 1 that is x0 <= j < x1.
    b = box_array.astype(np.float64)
    x0 = np.clip(np.ceil(b[:, 0] * sx - 0.5), 0, out_w).astype(np.int64)
    x1 = np.clip(np.ceil(b[:, 2] * sx - 0.5), 0, out_w).astype(np.int64)
    y0 = np.clip(np.ceil(b[:, 1] * sy - 0.5), 0, out_h).astype(np.int64)
    y1 = np.clip(np.ceil(b[:, 3] * sy - 0.5), 0, out_h).astype(np.int64)
    keep = (x1 > x0) & (y1 > y0)
    x0, x1, y0, y1, values = x0[keep], x1[keep], y0[keep], y1[keep], score_array[keep]

    # Summed-area accumulation: +v at the top-left corner, -v at the two far corners,
    # +v at the opposite one; the 2-D cumulative sum then holds v over exactly the box.
    totals = np.zeros((out_h + 1, out_w + 1), dtype=np.float64)
    counts = np.zeros((out_h + 1, out_w + 1), dtype=np.int64)
    for grid, weight in ((totals, values), (counts, np.ones_like(x0))):
        np.add.at(grid, (y0, x0), weight)
        np.add.at(grid, (y0, x1), -weight)
        np.add.at(grid, (y1, x0), -weight)
        np.add.at(grid, (y1, x1), weight)
    totals = totals.cumsum(axis=0).cumsum(axis=1)[:out_h, :out_w]
    counts = counts.cumsum(axis=0).cumsum(axis=1)[:out_h, :out_w]
    result = np.full((out_h, out_w), np.nan)
    covered = counts > 0
    result[covered] = totals[covered] / counts[covered]
    # Rounding in the cumulative sums can leave a mean a hair outside its windows' range.
    if values.size:
        np.clip(result, values.min(), values.max(), out=result)
    return result


# --------------------------------------------------------------------------- overlay


@dataclass(frozen=True)
class OverlayLayout:
    """Where things are in a PNG written by :func:`render_overlay` (pixels, x1/y1 exclusive)."""

    path: Path
    canvas_size: tuple[int, int]  # (width, height) of the whole PNG
    image_box: tuple[int, int, int, int]  # the (downsampled) image, untouched but for the outlines
    map_box: tuple[int, int, int, int]  # the same image with the score map blended over it
    colorbar_box: tuple[int, int, int, int]  # the colour strip of the legend
    scale: tuple[float, float]  # (x, y): PNG pixels per image pixel
    score_range: tuple[float, float]  # scores at the left and right ends of the colour bar
    flat: bool  # the scores hardly differ: the map shows no "where"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    import matplotlib

    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:  # a stripped matplotlib install: Pillow's own font still labels the bar
        return ImageFont.load_default(size)


def _colormap(name: str) -> Any:
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise InputError(f"unknown colour map {name!r}; expected a matplotlib colour map name such as 'magma'") from None


def _format_score(value: float) -> str:
    return f"{value:.3g}"


def is_flat(scores: Any) -> bool:
    """Whether the scores hardly differ: the highest within half the larger magnitude of the lowest
    (e.g. attention weights of 0.0104-0.0153, all near uniform): stretched to the full colour range
    such a map would look confident about a place it does not single out."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size < 2:
        return True
    low, high = float(values.min()), float(values.max())
    return high - low <= 0.5 * max(abs(low), abs(high), 1e-12)


def render_overlay(
    image: np.ndarray,
    boxes: Any,
    scores: Any,
    path: str | os.PathLike[str],
    max_side: int = 2048,
    cmap: str = "magma",
    alpha: float = 0.45,
    title: str | None = None,
    score_label: str = DEFAULT_SCORE_LABEL,
    mark_top: bool = True,
    threshold: float | None = None,
    score_range: tuple[float, float] | None = None,
) -> OverlayLayout:
    """Write a PNG of ``image`` twice, side by side: on the left as it is (the instances found
    outlined), on the right with its score map blended over it; a legend below.

    The image is downsampled (never enlarged) so that its longer side is at most ``max_side``
    in each panel, keeping its aspect ratio (each side rounded to whole pixels). In the map,
    pixels covered by windows get ``(1 - alpha) * image + alpha * colour(score)``, pixels
    covered by none are left as they are. The colour map spans ``score_range``, by default the
    lowest to the highest score; with ``threshold`` (scores that are probabilities, e.g. a
    cell model's) it spans 0 to 1, so that a field of low scores stays dark, and every
    instance at or over the threshold is outlined in red in both panels. With ``mark_top`` the
    top-scoring instance is outlined in cyan. Scores that hardly differ (:func:`is_flat`) are
    said so in the legend. An optional ``title`` goes above.
    """
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"render_overlay expects an (H, W, 3) uint8 image; got {got}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1]; got {alpha!r}")
    if int(max_side) < 16:
        raise InputError(f"max_side must be at least 16 pixels; got {max_side!r}")
    box_array, score_array = _check_windows(boxes, scores)
    colormap = _colormap(cmap)
    height, width = image.shape[:2]

    factor = min(1.0, int(max_side) / max(height, width))
    img_w, img_h = max(1, round(width * factor)), max(1, round(height * factor))
    picture = Image.fromarray(image)
    if (img_w, img_h) != (width, height):
        picture = picture.resize((img_w, img_h), Image.Resampling.LANCZOS, reducing_gap=2.0)
    pixels = np.asarray(picture, dtype=np.float32)

    values = score_map(box_array, score_array, (height, width), scale=factor)
    if values.shape != (img_h, img_w):  # same rounding rule on both sides; a guard, not a case
        raise RuntimeError(f"score map {values.shape} does not match the image area {(img_h, img_w)}")
    if score_range is None and threshold is not None:
        score_range = (0.0, 1.0)
    if score_range is not None:
        low, high = (float(v) for v in score_range)
        if not high > low:
            raise InputError(f"score_range must be (low, high) with high > low; got {score_range!r}")
    else:
        low = float(score_array.min()) if score_array.size else 0.0
        high = float(score_array.max()) if score_array.size else 1.0
    flat = score_range is None and is_flat(score_array)
    covered = np.isfinite(values)
    # Equal scores everywhere carry no "where": draw them mid-scale.
    normalised = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.full_like(values, 0.5)
    colours = colormap(np.where(covered, normalised, 0.0), bytes=True)[..., :3].astype(np.float32)
    blended = np.where(covered[..., None], (1.0 - alpha) * pixels + alpha * colours, pixels)
    overlay = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))

    gap = max(8, img_w // 50)
    canvas_w = max(2 * img_w + gap, _MIN_CANVAS_WIDTH)
    font_size = int(np.clip(round(canvas_w / 70), 11, 32))
    font = _font(font_size)
    pad = max(4, font_size // 2)
    line = font_size + font_size // 3
    header_h = line + 2 * pad if title else 0
    bar_h = max(8, font_size)
    legend_h = pad + line + pad // 2 + bar_h + pad // 2 + line + pad
    canvas_h = header_h + img_h + legend_h

    canvas = Image.new("RGB", (canvas_w, canvas_h), _BACKGROUND)
    image_x = (canvas_w - 2 * img_w - gap) // 2
    map_x = image_x + img_w + gap
    canvas.paste(picture.convert("RGB"), (image_x, header_h))
    canvas.paste(overlay, (map_x, header_h))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=_INK, font=font)
    sx, sy = img_w / width, img_h / height
    line_width = max(1, round(min(img_w, img_h) / 400))
    clipped = clip_boxes(box_array, (height, width)) if score_array.size else np.zeros((0, 4), np.int64)

    def outline(index: int, colour: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = clipped[index]
        for panel_x in (image_x, map_x):
            draw.rectangle((panel_x + round(x0 * sx), header_h + round(y0 * sy),
                            panel_x + max(round(x0 * sx), round(x1 * sx) - 1),
                            header_h + max(round(y0 * sy), round(y1 * sy) - 1)), outline=colour, width=line_width)

    n_found = 0
    if threshold is not None:
        for index in np.flatnonzero(score_array >= threshold):
            outline(int(index), _FOUND_COLOUR)
            n_found += 1
    if mark_top and score_array.size:
        outline(int(rank_windows(score_array)[0]), _TOP_WINDOW_COLOUR)

    legend_top = header_h + img_h
    bar_x0, bar_x1 = 2 * pad, canvas_w - 2 * pad
    bar_y0 = legend_top + pad + line + pad // 2
    bar_y1 = bar_y0 + bar_h
    ramp = colormap(np.linspace(0.0, 1.0, bar_x1 - bar_x0), bytes=True)[:, :3]
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (bar_x0, bar_y0))
    draw.rectangle((bar_x0 - 1, bar_y0 - 1, bar_x1, bar_y1), outline=_INK, width=1)
    if not high > low or (score_array.size and float(score_array.max()) == float(score_array.min())):
        label = f"{score_label} (all equal: no place stands out)"
    elif flat:
        label = f"{score_label}: NEARLY FLAT ({_format_score(float(score_array.min()))} to " \
                f"{_format_score(float(score_array.max()))}), no place stands out"
    else:
        label = score_label
    draw.text((bar_x0, legend_top + pad), label, fill=_INK, font=font)
    notes = []
    if threshold is not None:
        notes.append(f"red: {n_found} at or over {_format_score(threshold)}")
    if mark_top:
        notes.append("cyan: top")
    note = "   ".join(notes)
    if note and draw.textlength(label + "    " + note, font=font) <= bar_x1 - bar_x0:
        draw.text((bar_x1 - draw.textlength(note, font=font), legend_top + pad), note, fill=_INK, font=font)
    low_text, high_text = _format_score(low), _format_score(high)
    draw.text((bar_x0, bar_y1 + pad // 2), low_text, fill=_INK, font=font)
    draw.text((bar_x1 - draw.textlength(high_text, font=font), bar_y1 + pad // 2), high_text, fill=_INK, font=font)

    destination = Path(path)
    with atomic_path(destination) as temp:
        canvas.save(temp, format="PNG")
    return OverlayLayout(
        path=destination,
        canvas_size=(canvas_w, canvas_h),
        image_box=(image_x, header_h, image_x + img_w, header_h + img_h),
        map_box=(map_x, header_h, map_x + img_w, header_h + img_h),
        colorbar_box=(bar_x0, bar_y0, bar_x1, bar_y1),
        scale=(sx, sy),
        score_range=(low, high),
        flat=flat,
    )


# --------------------------------------------------------------------------- lists and crops


def write_window_csv(
    path: str | os.PathLike[str],
    boxes: Any,
    scores: Any,
    image_name: str,
    image_size: Sequence[int],
) -> Path:
    """Write ``Image,x0,y0,x1,y1,score,rank``, one row per window, best first (rank 1).

    Coordinates are full-resolution pixels of the image (x1, y1 exclusive), clipped to
    ``image_size`` = (H, W); ties keep grid order.
    """
    box_array, score_array = _check_windows(boxes, scores)
    clipped = clip_boxes(box_array, image_size)
    buffer = stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Image", "x0", "y0", "x1", "y1", "score", "rank"])
    for rank, index in enumerate(rank_windows(score_array), start=1):
        writer.writerow([image_name, *clipped[index].tolist(), repr(float(score_array[index])), rank])
    return atomic_write_text(path, buffer.getvalue())


def save_top_crops(
    image: np.ndarray,
    boxes: Any,
    scores: Any,
    out_dir: str | os.PathLike[str],
    stem: str,
    k: int = 3,
) -> list[Path]:
    """Save the ``k`` top-scoring windows as PNG crops ``{stem}_top{rank}_x{x0}_y{y0}.png``.

    Crops are the image's own pixels inside the (clipped) window, at full resolution.
    """
    if k < 0:
        raise InputError(f"k (number of top windows) must be 0 or more; got {k!r}")
    box_array, score_array = _check_windows(boxes, scores)
    clipped = clip_boxes(box_array, image.shape[:2])
    folder = Path(out_dir)
    written = []
    for rank, index in enumerate(rank_windows(score_array)[:k], start=1):
        x0, y0, x1, y1 = clipped[index].tolist()
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"window {box_array[index].tolist()} lies outside the {image.shape[1]}x{image.shape[0]} image")
        target = folder / f"{stem}_top{rank}_x{x0}_y{y0}.png"
        with atomic_path(target) as temp:
            Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).save(temp, format="PNG")
        written.append(target)
    return written


# --------------------------------------------------------------------------- whole predictions


def require_window_scores(predictions: Predictions) -> None:
    """Raise InputError unless every image of ``predictions`` has window scores and boxes."""
    scores = predictions.window_scores
    if scores is None:
        missing = list(predictions.paths)
    else:
        missing = [path for path, image_scores in zip(predictions.paths, scores) if image_scores is None]
    if scores is None or missing or predictions.boxes is None or predictions.image_sizes is None:
        first = f" (e.g. {missing[0]})" if missing else ""
        raise InputError(
            f"the model gives no window scores{first}; heatmaps and localisation need a head "
            f"that scores windows: {WINDOW_SCORE_HEADS}"
        )
    n = len(predictions.paths)
    lengths = {"window_scores": len(scores), "boxes": len(predictions.boxes), "image_sizes": len(predictions.image_sizes)}
    if any(length != n for length in lengths.values()):
        raise InputError(f"predictions for {n} images hold {lengths}; expected {n} of each")
    for path, box_array, score_array in zip(predictions.paths, predictions.boxes, scores):
        if len(box_array) != len(score_array):
            raise InputError(f"{path}: {len(box_array)} windows but {len(score_array)} window scores")


def check_heatmap_names(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Raise InputError if two images share a name stem: their heatmap files would collide."""
    stems: dict[str, Path] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in stems:
            raise InputError(
                f"{path}: has the same name stem as {stems[stem]}; their heatmap files ({stem}_heatmap.png) "
                f"would overwrite each other, rename one"
            )
        stems[stem] = Path(path)


def write_heatmaps(
    out_dir: str | os.PathLike[str],
    predictions: Predictions,
    read_options: ReadOptions | None = None,
    top_k: int = 3,
    score_label: str = DEFAULT_SCORE_LABEL,
    max_side: int = 2048,
    threshold: float | None = None,
) -> list[Path]:
    """For each predicted image write ``{stem}_heatmap.png``, ``{stem}_windows.csv`` and its
    ``top_k`` crops into ``out_dir`` (created if needed); return the files written.

    Images are read again with ``read_options`` (the model's), so boxes and pixels agree.
    """
    require_window_scores(predictions)
    check_heatmap_names(predictions.paths)
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the heatmap folder ({error.strerror})") from error

    written: list[Path] = []
    for index, path in enumerate(predictions.paths):
        path = Path(path)
        image = read_image(path, read_options)
        expected = tuple(int(v) for v in predictions.image_sizes[index])
        if image.shape[:2] != expected:
            raise InputError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} now but was {expected[1]}x{expected[0]} when "
                f"predicted; the file changed or other reading options were used"
            )
        boxes, scores = predictions.boxes[index], predictions.window_scores[index]
        stem = path.stem
        title = f"{path.name}   probability {float(predictions.proba[index]):.3f}"
        render_overlay(image, boxes, scores, folder / f"{stem}_heatmap.png", max_side=max_side,
                       title=title, score_label=score_label, threshold=threshold)
        written.append(folder / f"{stem}_heatmap.png")
        written.append(write_window_csv(folder / f"{stem}_windows.csv", boxes, scores, path.name, expected))
        written += save_top_crops(image, boxes, scores, folder, stem, k=top_k)
        logger.debug("heatmap of %s written to %s", path, folder)
    return written
