"""Scoring window scores against where the mitotic cells really are, when that is known.

Models learn from image labels alone; a ``boxes.csv`` (``Image,x,y,w,h[,...]``, as written
by ``compose_scenes.py``, boxes in the final image's pixels) says where the mitotic cells
of the Mitosis images are. Two measures, both over Mitosis images only (images with at
least one true box):

* **Pointing game.** Does the top-scoring window point at a mitotic cell? ``hit``: its box
  overlaps a true box (intersection area > 0). ``hit_centre`` (stricter): the window's
  centre lies inside a true box, or the window contains at least ``min_fraction`` (0.5) of
  a true box's area. When several windows tie for the top score, the image's hit is the
  fraction of them that hit (the expected hit of a random tie-break), so constant scores
  never score by the accident of grid order.
* **Window AUC.** ROC AUC of the window scores, windows that share at least
  ``min_fraction`` of the smaller of their own and a true cell box's area with it
  (positives: a window holding most of a cell, or, for windows smaller than cells such as
  a fine-tuned network's feature-map positions, a window lying mostly on a cell) against
  windows that touch no true box at all (negatives). Windows that only clip a cell are
  ambiguous and left out of both sets. Scores are
  meant to be compared within an image (attention weights sum to 1 per image), so the
  mean of the per-image AUCs is reported next to the AUC of all Mitosis images' windows
  pooled. An image without both positives and negatives has no AUC (NaN, ``null`` in JSON).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_auc_score

from .atomic import atomic_write_json
from .errors import InputError
from .heatmaps import clip_boxes, require_window_scores
from .io import read_csv_table

if TYPE_CHECKING:
    from .predictions import Predictions

__all__ = [
    "contained_fraction",
    "intersection_areas",
    "load_boxes",
    "overlap_coefficient",
    "localization_report",
    "pointing_game",
    "window_auc",
    "write_localization",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_FRACTION = 0.5
LOCALIZATION_FILE = "localization.json"
_XYWH = ("x", "y", "w", "h")
_XYXY = ("x0", "y0", "x1", "y1")

# (boxes (N, 4) [x0, y0, x1, y1], scores (N,)) of one image's windows
WindowScores = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- boxes.csv


def load_boxes(csv_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read true cell boxes: image name -> (M, 4) float64 ``[x0, y0, x1, y1]``.

    Accepts ``Image,x,y,w,h`` (compose_scenes.py's ``boxes.csv``; extra columns such as
    ``phase`` are ignored) or ``Image,x0,y0,x1,y1``; header names are case-insensitive.
    Images with no row have no box. Raises InputError naming the file and the problem.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"{path}: boxes file does not exist")
    table = read_csv_table(path, "boxes", "'Image,x,y,w,h'")
    header, columns = table.header, table.columns
    corners = all(name in columns for name in _XYXY) and not all(name in columns for name in _XYWH)
    wanted = ("image", *(_XYXY if corners else _XYWH))
    missing = [name for name in wanted if name not in columns]
    if missing:
        found = ",".join(name.strip() for name in header)
        raise InputError(
            f"{path}: boxes file lacks column(s) {', '.join(map(repr, missing))}; expected 'Image,x,y,w,h' "
            f"(as compose_scenes.py writes) or 'Image,x0,y0,x1,y1'; found {found!r}"
        )
    indices = [columns[name] for name in wanted]
    boxes: dict[str, list[list[float]]] = {}
    for line, row in table.rows:
        table.check_width(line, row, max(indices))
        name = table.cell(line, row, indices[0])
        try:
            a, b, c, d = (float(row[i]) for i in indices[1:])
        except ValueError:
            values = ",".join(row[i].strip() for i in indices[1:])
            raise InputError(f"{path}: line {line} has non-numeric box coordinates {values!r}") from None
        x0, y0, x1, y1 = (a, b, c, d) if corners else (a, b, a + c, b + d)
        if not all(np.isfinite((x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
            raise InputError(f"{path}: line {line} has an empty or invalid box ({a:g}, {b:g}, {c:g}, {d:g})")
        boxes.setdefault(name, []).append([x0, y0, x1, y1])
    return {name: np.asarray(rows_, dtype=np.float64) for name, rows_ in boxes.items()}


# --------------------------------------------------------------------------- geometry


def intersection_areas(windows: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(N, M) overlap areas of N window boxes with M cell boxes, all ``[x0, y0, x1, y1]``."""
    w = np.asarray(windows, dtype=np.float64)[:, None, :]
    c = np.asarray(cells, dtype=np.float64)[None, :, :]
    width = np.minimum(w[..., 2], c[..., 2]) - np.maximum(w[..., 0], c[..., 0])
    height = np.minimum(w[..., 3], c[..., 3]) - np.maximum(w[..., 1], c[..., 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def contained_fraction(windows: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(N, M) fraction of each cell box's area that lies inside each window."""
    cells = np.asarray(cells, dtype=np.float64)
    area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    return intersection_areas(windows, cells) / area[None, :]


def overlap_coefficient(windows: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(N, M) intersection over the smaller of the two areas (1: one box lies inside the other)."""
    windows = np.asarray(windows, dtype=np.float64)
    cells = np.asarray(cells, dtype=np.float64)
    window_area = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    cell_area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    return intersection_areas(windows, cells) / np.minimum(window_area[:, None], cell_area[None, :])


def _check_min_fraction(min_fraction: float) -> None:
    if not 0 < min_fraction <= 1:
        raise InputError(f"min_fraction must be in (0, 1]; got {min_fraction!r}")


def _image_windows(name: str, value: WindowScores) -> tuple[np.ndarray, np.ndarray]:
    boxes, scores = np.asarray(value[0], dtype=np.float64), np.asarray(value[1], dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],) or not len(scores):
        raise InputError(
            f"{name}: expected (N, 4) window boxes and N scores, N >= 1; got boxes {boxes.shape}, scores {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise InputError(f"{name}: window scores must be finite")
    return boxes, scores


def _mitosis_images(boxes_by_image: Mapping[str, np.ndarray], windows: Mapping[str, WindowScores]) -> list[str]:
    return [name for name in windows if len(boxes_by_image.get(name, ())) > 0]


# --------------------------------------------------------------------------- measures


def pointing_game(
    boxes_by_image: Mapping[str, np.ndarray],
    windows: Mapping[str, WindowScores],
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, Any]:
    """Does the top-scoring window of each Mitosis image point at a mitotic cell?

    ``windows`` maps image name -> (window boxes, scores); images with no true box in
    ``boxes_by_image`` are Normal and not scored. See the module docstring for ``hit``
    (any overlap) and ``hit_centre`` (centre inside a cell, or >= ``min_fraction`` of a
    cell inside the window). Returns ``pointing_game`` (hit rate), ``pointing_game_centre``,
    ``n_images``, ``hits``, ``hits_centre`` and ``per_image``.
    """
    _check_min_fraction(min_fraction)
    per_image = []
    for name in _mitosis_images(boxes_by_image, windows):
        boxes, scores = _image_windows(name, windows[name])
        cells = np.asarray(boxes_by_image[name], dtype=np.float64)
        top = np.flatnonzero(scores == scores.max())
        top_boxes = boxes[top]
        overlaps = (intersection_areas(top_boxes, cells) > 0).any(axis=1)
        centre_x = (top_boxes[:, 0] + top_boxes[:, 2]) / 2
        centre_y = (top_boxes[:, 1] + top_boxes[:, 3]) / 2
        centre_inside = (
            (centre_x[:, None] >= cells[None, :, 0]) & (centre_x[:, None] <= cells[None, :, 2])
            & (centre_y[:, None] >= cells[None, :, 1]) & (centre_y[:, None] <= cells[None, :, 3])
        ).any(axis=1)
        contains = (contained_fraction(top_boxes, cells) >= min_fraction).any(axis=1)
        per_image.append({
            "Image": name,
            "hit": float(overlaps.mean()),
            "hit_centre": float((centre_inside | contains).mean()),
            "top_window": [int(round(v)) for v in top_boxes[0]],
            "top_score": float(scores[top[0]]),
            "n_tied_top": int(top.size),
            "n_true": int(len(cells)),
        })
    n_images = len(per_image)
    hits = float(sum(row["hit"] for row in per_image))
    hits_centre = float(sum(row["hit_centre"] for row in per_image))
    return {
        "pointing_game": hits / n_images if n_images else float("nan"),
        "pointing_game_centre": hits_centre / n_images if n_images else float("nan"),
        "n_images": n_images,
        "hits": hits,
        "hits_centre": hits_centre,
        "per_image": per_image,
    }


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def window_auc(
    boxes_by_image: Mapping[str, np.ndarray],
    windows: Mapping[str, WindowScores],
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, Any]:
    """ROC AUC of window scores: windows holding a mitotic cell against windows touching none.

    A window is positive when its overlap with some true cell box is at least ``min_fraction``
    of the smaller of the two boxes (:func:`overlap_coefficient`), negative when it overlaps no
    true box at all, and ambiguous (left out) otherwise.
    Over Mitosis images only. Returns ``window_auc`` (all windows pooled),
    ``mean_image_window_auc`` (mean of the images that have an AUC), ``n_images``,
    ``n_positive``, ``n_negative``, ``n_ambiguous`` and ``per_image``.
    """
    _check_min_fraction(min_fraction)
    per_image, all_labels, all_scores = [], [], []
    for name in _mitosis_images(boxes_by_image, windows):
        boxes, scores = _image_windows(name, windows[name])
        fraction = overlap_coefficient(boxes, np.asarray(boxes_by_image[name], dtype=np.float64)).max(axis=1)
        positive, negative = fraction >= min_fraction, fraction == 0
        used = positive | negative
        labels = positive[used].astype(int)
        all_labels.append(labels)
        all_scores.append(scores[used])
        per_image.append({
            "Image": name,
            "auc": _auc(labels, scores[used]),
            "n_positive": int(positive.sum()),
            "n_negative": int(negative.sum()),
            "n_ambiguous": int((~used).sum()),
        })
    image_aucs = [row["auc"] for row in per_image if np.isfinite(row["auc"])]
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=int)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    return {
        "window_auc": _auc(labels, scores),
        "mean_image_window_auc": float(np.mean(image_aucs)) if image_aucs else float("nan"),
        "n_images": len(per_image),
        "n_images_with_auc": len(image_aucs),
        "n_positive": sum(row["n_positive"] for row in per_image),
        "n_negative": sum(row["n_negative"] for row in per_image),
        "n_ambiguous": sum(row["n_ambiguous"] for row in per_image),
        "per_image": per_image,
    }


# --------------------------------------------------------------------------- report


def localization_report(
    predictions: Predictions,
    boxes_csv: str | os.PathLike[str],
    labels: Sequence[int] | np.ndarray | None = None,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> dict[str, Any]:
    """Pointing game and window AUC of ``predictions``' window scores against ``boxes_csv``.

    Images are matched by file name. Without ``labels`` the Mitosis images are those with
    at least one box. ``labels`` (0/1 per predicted image, 1 = Mitosis, e.g.
    ``LabelledImages.y``) checks the boxes file against the labels: a Normal image with
    boxes is an error; a Mitosis image without boxes cannot be scored and is counted in
    ``n_mitosis_without_boxes`` (and logged).
    """
    require_window_scores(predictions)
    boxes_path = Path(boxes_csv)
    true_boxes = load_boxes(boxes_path)
    by_name: dict[str, np.ndarray] = {}
    for key, cells in true_boxes.items():
        by_name[key] = cells
        by_name.setdefault(Path(key).name, cells)
    names = [Path(path).name for path in predictions.paths]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InputError(f"{twice}: two predicted images share this file name; boxes are matched by name")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(names),) or not np.isin(labels, (0, 1)).all():
            raise InputError(f"labels must be one 0/1 value per predicted image ({len(names)}); got {labels!r}")

    windows: dict[str, WindowScores] = {}
    boxes_of: dict[str, np.ndarray] = {}
    without_boxes: list[str] = []
    for index, name in enumerate(names):
        cells = by_name.get(name, np.zeros((0, 4)))
        if labels is not None and labels[index] == 0 and len(cells):
            raise InputError(
                f"{boxes_path}: lists {len(cells)} mitotic cell box(es) for {name}, which is labelled Normal; "
                f"the boxes file does not belong to these labels"
            )
        if labels is not None and labels[index] == 1 and not len(cells):
            without_boxes.append(name)
        clipped = clip_boxes(predictions.boxes[index], predictions.image_sizes[index])
        windows[name] = (clipped, np.asarray(predictions.window_scores[index], dtype=np.float64))
        boxes_of[name] = cells
    if without_boxes:
        logger.warning("%d Mitosis image(s) have no box in %s and are not scored (e.g. %s)",
                       len(without_boxes), boxes_path, without_boxes[0])

    pointing = pointing_game(boxes_of, windows, min_fraction)
    auc = window_auc(boxes_of, windows, min_fraction)
    if pointing["n_images"] == 0:
        example = f" (e.g. {names[0]})" if names else ""
        raise InputError(
            f"{boxes_path}: gives boxes for none of the {len(names)} predicted images{example}; "
            f"nothing to score: use the boxes file made with these images"
        )
    probability = dict(zip(names, np.asarray(predictions.proba, dtype=np.float64).tolist()))
    auc_of = {row["Image"]: row for row in auc["per_image"]}
    per_image = [
        {
            **row,
            "auc": auc_of[row["Image"]]["auc"],
            "n_positive_windows": auc_of[row["Image"]]["n_positive"],
            "n_negative_windows": auc_of[row["Image"]]["n_negative"],
            "probability": probability[row["Image"]],
        }
        for row in pointing["per_image"]
    ]
    return {
        "pointing_game": pointing["pointing_game"],
        "pointing_game_centre": pointing["pointing_game_centre"],
        "window_auc": auc["window_auc"],
        "mean_image_window_auc": auc["mean_image_window_auc"],
        "n_mitosis_images": pointing["n_images"],
        "n_images": len(names),
        "hits": pointing["hits"],
        "hits_centre": pointing["hits_centre"],
        "n_positive_windows": auc["n_positive"],
        "n_negative_windows": auc["n_negative"],
        "n_ambiguous_windows": auc["n_ambiguous"],
        "n_mitosis_without_boxes": len(without_boxes),
        "boxes_csv": str(boxes_path),
        "min_fraction": float(min_fraction),
        "definitions": {
            "pointing_game": "share of Mitosis images whose top-scoring window overlaps a true mitotic cell box",
            "pointing_game_centre": (
                f"stricter: the top window's centre lies inside a true box, or the window contains at least "
                f"{min_fraction:g} of a true box's area"
            ),
            "window_auc": (
                f"ROC AUC over all Mitosis images' windows: windows sharing >= {min_fraction:g} of the smaller of "
                f"their own and a true cell box's area with it vs windows touching none; the rest are left out"
            ),
            "mean_image_window_auc": "mean of the per-image window AUCs (images with both kinds of window)",
            "ties": "when several windows share the top score, a hit counts the fraction of them that hit",
        },
        "per_image": per_image,
    }


def write_localization(out_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write ``report`` as ``localization.json`` in ``out_dir`` (created if needed), atomically."""
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the report folder ({error.strerror})") from error
    return atomic_write_json(folder / LOCALIZATION_FILE, dict(report))
