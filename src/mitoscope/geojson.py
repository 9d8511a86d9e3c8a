"""Predictions as GeoJSON that QuPath (and napari, via :mod:`mitoscope.napari`) open directly.

One FeatureCollection per image, in full-resolution pixel coordinates of the image (level 0
of a slide), y down, as QuPath reads them:

- every instance the model scored is a feature: a found cell is ``objectType: "detection"``,
  a window of a window model ``"tile"``; each carries ``measurements: {"mitosis score": s}``;
- what the model calls mitotic is classified ``{"name": "Mitosis", "color": [...]}``: for a
  cell model every cell at or over the threshold (its count), for a window model the
  top-scoring window of an image labelled Mitosis, as an ``"annotation"``.

The image's own result (label, probability, threshold, count) rides along as the foreign
member ``"mitoscope"`` of the collection, which GeoJSON readers ignore.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_write_text
from .errors import InputError

__all__ = ["MITOSIS_CLASS", "feature_collection", "write_geojson"]

MITOSIS_CLASS = {"name": "Mitosis", "color": [220, 20, 60]}
SCORE_MEASUREMENT = "mitosis score"


def _ring(box: Sequence[float]) -> list[list[float]]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(box: Sequence[float], score: float, object_type: str, rank: int, mitotic: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "objectType": object_type,
        "name": f"rank {rank}",
        "measurements": {SCORE_MEASUREMENT: float(score)},
    }
    if mitotic:
        properties["classification"] = dict(MITOSIS_CLASS)
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": "Polygon", "coordinates": [_ring(box)]},
            "properties": properties}


def feature_collection(boxes: Any, scores: Any, image_size: Sequence[int], *, cells: bool, threshold: float,
                       label: str, probability: float, count: int | None = None,
                       image: str = "", offset: Sequence[float] = (0.0, 0.0)) -> dict[str, Any]:
    """The FeatureCollection of one image's instances: ``boxes`` (N, 4) ``[x0, y0, x1, y1]`` and
    ``scores`` (N,) as the model gave them, clipped to ``image_size`` = (H, W); ``cells`` says
    whether they are cells (scores are probabilities, compared with ``threshold``) or windows.
    ``offset`` (x, y) is added to every coordinate (a tile's place in a slide)."""
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(box_array) != len(score_array):
        raise InputError(f"{image}: {len(box_array)} instance boxes but {len(score_array)} scores")
    height, width = (int(v) for v in image_size)
    clipped = box_array.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    clipped[:, [0, 2]] += float(offset[0])
    clipped[:, [1, 3]] += float(offset[1])
    order = np.argsort(-score_array, kind="stable")
    features = []
    for rank, index in enumerate(order, start=1):
        mitotic = cells and score_array[index] >= threshold
        features.append(_feature(clipped[index], score_array[index], "detection" if cells else "tile", rank, mitotic))
    if not cells and len(order) and probability >= threshold:
        top = _feature(clipped[order[0]], score_array[order[0]], "annotation", 1, True)
        top["properties"]["name"] = "top window"
        features.append(top)
    summary: dict[str, Any] = {"image": image, "label": label, "probability": float(probability),
                               "threshold": float(threshold), "instances": "cells" if cells else "windows",
                               "width": width, "height": height}
    if count is not None:
        summary["count"] = int(count)
    return {"type": "FeatureCollection", "features": features, "mitoscope": summary}


def write_geojson(path: str | os.PathLike[str], collection: dict[str, Any]) -> Path:
    """Write one collection atomically (no partial file is left if writing fails)."""
    return atomic_write_text(Path(path), json.dumps(collection, separators=(",", ":")) + "\n")
