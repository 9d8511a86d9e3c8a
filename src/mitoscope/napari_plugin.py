"""The napari plugin (manifest ``napari.yaml``; extra ``[napari]``): open what ``predict`` writes.

Dropping a ``--geojson`` file (``{stem}.geojson``) or a ``--heatmaps`` list
(``{stem}_windows.csv``) on napari, over the image, gives two layers: the heatmap (each pixel
the mean score of the instances covering it, as in the PNGs) and the instances as rectangles
(face colour: score; red edge: counted as mitotic) with their scores as layer features. Both
are in the image's full-resolution pixels (a slide's level 0). napari is never imported
here: the reader returns plain layer data, so it is tested without a display.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError

LayerData = tuple[Any, dict[str, Any], str]
_MAX_MAP_SIDE = 2048
_MITOTIC_EDGE = (1.0, 0.16, 0.16, 1.0)
_OTHER_EDGE = (1.0, 1.0, 1.0, 0.6)


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """napari's reader hook: a reader for a mitoscope GeoJSON or windows CSV, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    name = Path(path).name.lower()
    if name.endswith(".geojson"):
        return read_geojson
    if name.endswith("_windows.csv"):
        return read_windows_csv
    return None


def _rectangles(boxes: np.ndarray) -> list[np.ndarray]:
    """(x0, y0, x1, y1) boxes as napari rectangles: 4 corners each in (row, column) order."""
    return [np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=np.float64) for x0, y0, x1, y1 in boxes]


def _layers(boxes: np.ndarray, scores: np.ndarray, mitotic: np.ndarray, size: tuple[int, int], stem: str,
            low_high: tuple[float, float] | None) -> list[LayerData]:
    import matplotlib

    from .heatmaps import score_map

    height, width = size
    layers: list[LayerData] = []
    if len(boxes):
        scale = min(1.0, _MAX_MAP_SIDE / max(height, width))
        values = np.nan_to_num(score_map(boxes, scores, size, scale=scale), nan=float(scores.min()))
        step = 1.0 / scale
        limits = low_high or (float(scores.min()), float(scores.max()) if scores.max() > scores.min() else
                              float(scores.min()) + 1.0)
        layers.append((values, {"name": f"{stem} heatmap", "colormap": "magma", "opacity": 0.5,
                                "blending": "additive", "scale": (step, step),
                                "translate": (step / 2 - 0.5, step / 2 - 0.5), "contrast_limits": limits}, "image"))
    low, high = low_high or (float(scores.min(initial=0.0)), float(scores.max(initial=1.0)))
    norm = np.clip((scores - low) / (high - low), 0, 1) if high > low else np.full(len(scores), 0.5)
    faces = matplotlib.colormaps["magma"](norm)
    faces[:, 3] = 0.35
    edges = np.array([_MITOTIC_EDGE if flag else _OTHER_EDGE for flag in mitotic]).reshape(-1, 4)
    layers.append((_rectangles(boxes), {
        "name": f"{stem} instances", "shape_type": "rectangle", "face_color": faces, "edge_color": edges,
        "edge_width": [(3.0 if flag else 1.0) * max(1.0, max(height, width) / 1000) for flag in mitotic],
        "features": {"score": scores, "mitotic": mitotic.astype(bool)}}, "shapes"))
    return layers


def read_geojson(path: str) -> list[LayerData]:
    """Layers of a GeoJSON written by ``predict --geojson`` (or any FeatureCollection of polygons
    with a ``mitosis score`` measurement)."""
    try:
        collection = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable GeoJSON file ({error})") from None
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection")
    boxes, scores, mitotic = [], [], []
    for feature in collection.get("features", []):
        properties = feature.get("properties") or {}
        score = (properties.get("measurements") or {}).get("mitosis score")
        geometry = feature.get("geometry") or {}
        if score is None or geometry.get("type") != "Polygon" or properties.get("objectType") == "annotation":
            continue  # the hotspot and the top-window annotation repeat what the instances show
        ring = np.asarray(geometry["coordinates"][0], dtype=np.float64)
        boxes.append((ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()))
        scores.append(float(score))
        mitotic.append((properties.get("classification") or {}).get("name") == "Mitosis")
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    summary = collection.get("mitoscope") or {}
    size = (int(summary["height"]), int(summary["width"])) if "height" in summary and "width" in summary else \
        (int(np.ceil(box_array[:, 3].max(initial=1))), int(np.ceil(box_array[:, 2].max(initial=1))))
    low_high = (0.0, 1.0) if summary.get("instances") == "cells" else None
    return _layers(box_array, np.asarray(scores, dtype=np.float64), np.asarray(mitotic, dtype=bool), size,
                   Path(path).stem, low_high)


def read_windows_csv(path: str) -> list[LayerData]:
    """Layers of a ``{stem}_windows.csv`` written by ``predict --heatmaps`` (no threshold there: no
    instance is marked mitotic)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        boxes = np.array([[float(row[key]) for key in ("x0", "y0", "x1", "y1")] for row in rows]).reshape(-1, 4)
        scores = np.array([float(row["score"]) for row in rows])
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"{path}: not a windows CSV of mitoscope (Image,x0,y0,x1,y1,score,rank): {error}") from None
    size = (int(np.ceil(boxes[:, 3].max(initial=1))), int(np.ceil(boxes[:, 2].max(initial=1))))
    return _layers(boxes, scores, np.zeros(len(scores), dtype=bool), size, Path(path).name[:-len("_windows.csv")], None)
