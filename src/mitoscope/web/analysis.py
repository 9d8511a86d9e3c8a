"""One uploaded image -> the JSON answer of ``POST /api/predict``.

The upload is written under a fresh temporary folder with a name chosen here (``upload`` and
the suffix its first bytes say), never the client's; the client's name is only echoed back,
cleaned. Errors name the upload by that cleaned name, never by a server path.
"""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import read_header, read_image
from ..predictions import finds_cells, score_label
from ..results import prediction_rows, rows_to_csv

# First bytes -> the suffix the readers expect (TIFF is recognised by its bytes anyway).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),  # BigTIFF
    (b"MM\x00+", ".tif"),
    (b"BM", ".bmp"),
)
SUPPORTED = "PNG, JPEG, TIFF (8/16-bit, multi-channel), BMP, or a whole slide (.svs, .ndpi, pyramidal TIFF)"
_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]")


def display_name(name: str | None) -> str:
    """The client's file name, reduced to a harmless label: last path part, plain characters, 100 at most."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    cleaned = _UNSAFE.sub("_", base).strip(" .")[:100]
    return cleaned or "upload"


def sniff_suffix(head: bytes) -> str | None:
    """The image suffix its first bytes announce, or None when they are no image format we read."""
    for magic, suffix in _MAGIC:
        if head.startswith(magic):
            return suffix
    return None


def _scrub(message: str, path: Path, name: str) -> str:
    """An error message with every mention of the server-side file replaced by the upload's name."""
    for text in (str(path), str(path.parent)):
        message = message.replace(text, name)
    return message


class UploadTooLarge(InputError):
    """An upload whose header announces more pixels than the server takes."""


def check_upload(path: Path, name: str, read_options: Any, max_pixels: int) -> tuple[int, int]:
    """(H, W) of the saved upload from its header alone: :class:`UploadTooLarge` over ``max_pixels``,
    InputError if it is no image the model reads."""
    try:
        # The header's size only (no pixels are decoded): compared with the server's limit below.
        header = read_header(path, replace(read_options, max_pixels=2 ** 62))
    except InputError as error:
        raise InputError(_scrub(str(error), path, name)) from None
    pixels = header.height * header.width
    if pixels > max_pixels:
        raise UploadTooLarge(f"{name}: {header.width}x{header.height} is {pixels:,} pixels; this server takes at most "
                             f"{max_pixels:,}")
    return header.height, header.width


def _heatmap_uri(model: Any, path: Path, boxes: np.ndarray, scores: np.ndarray, title: str, folder: Path) -> str:
    from ..heatmaps import render_overlay

    image = read_image(path, model.read_options)
    target = folder / "heatmap.png"
    render_overlay(image, boxes, scores, target, max_side=1024, title=title, score_label=score_label(model),
                   threshold=float(model.threshold) if finds_cells(model) else None)
    return _data_uri(target)


def upload_suffix(head: bytes, name: str) -> str | None:
    """The suffix to save an upload under: what its first bytes say, or a slide format's when the
    client's name has one and the bytes are TIFF (.svs, .ndpi... are TIFF inside)."""
    from ..io.slides import SLIDE_SUFFIXES

    suffix = sniff_suffix(head)
    claimed = PurePosixPath(name).suffix.lower()
    if suffix == ".tif" and claimed in SLIDE_SUFFIXES:
        return claimed
    return suffix


def check_slide(path: Path, name: str) -> tuple[int, int]:
    """(H, W) of an uploaded slide's level 0; InputError naming the upload if it cannot be opened."""
    from ..io.slides import Slide

    try:
        with Slide.open(path) as slide:
            return slide.height, slide.width
    except InputError as error:
        raise InputError(_scrub(str(error), path, name)) from None


def analyse_slide(model: Any, path: Path, name: str, max_instances: int = 500) -> dict[str, Any]:
    """Predict one uploaded whole slide, tile by tile over its tissue (:mod:`mitoscope.wsi`)."""
    from ..results import written_probability
    from ..wsi import predict_slide, render_slide_heatmap, slide_collection, slide_row

    cells = finds_cells(model)
    try:
        prediction = predict_slide(model, path, cells=cells)
    except InputError as error:
        raise InputError(_scrub(str(error), path, name)) from None
    threshold = float(model.threshold)
    row = dict(slide_row(prediction, model.classes, threshold, model.head_name), Image=name)
    order = np.argsort(-prediction.scores, kind="stable")[:max_instances]
    heatmap = render_slide_heatmap(prediction, threshold, cells, score_label(model), path.parent / "heatmap.png",
                                   name=name)
    hotspot = prediction.hotspot
    return {
        "image": name, "width": prediction.size[1], "height": prediction.size[0],
        "label": row["Label"], "probability": written_probability(prediction.proba, threshold),
        "threshold": threshold, "classes": list(model.classes), "count": prediction.count, "note": row["Note"],
        "model": model.head_name, "instances_kind": "cells" if cells else "windows", "slide": True,
        "hotspot": None if hotspot is None else {"count": hotspot.count, "area_mm2": hotspot.area_mm2,
                                                 "per_mm2": hotspot.per_mm2, "box": list(hotspot.box)},
        "instances": [_instance(prediction.boxes[i], prediction.scores[i], cells and prediction.scores[i] >= threshold)
                      for i in order],
        "heatmap": None if heatmap is None else _data_uri(heatmap),
        "csv": rows_to_csv([row]), "geojson": slide_collection(prediction, threshold, cells, row["Label"], name),
    }


def _instance(box: Any, score: float, mitotic: bool) -> dict[str, Any]:
    return {"x0": float(box[0]), "y0": float(box[1]), "x1": float(box[2]), "y1": float(box[3]),
            "score": float(score), "mitotic": bool(mitotic)}


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def analyse(model: Any, path: Path, name: str, size: tuple[int, int], max_instances: int = 500) -> dict[str, Any]:
    """Predict one saved upload; the answer as JSON-ready data (see the module doc of :mod:`mitoscope.web`)."""
    from ..geojson import feature_collection
    from ..io.slides import is_slide
    from ..predictions import screen_images

    if is_slide(path):
        return analyse_slide(model, path, name, max_instances)

    try:
        _, warnings, _ = screen_images(model, [path])
        runnable = model.for_images({path: size})
        pred = runnable.predict_paths([path], with_window_scores=runnable.gives_window_scores)
    except InputError as error:
        raise InputError(_scrub(str(error), path, name)) from None
    rows = prediction_rows(pred, runnable.classes, runnable.threshold, runnable.head_name,
                           {p: _scrub(w, path, name) for p, w in warnings.items()})
    row = dict(rows[0], Image=name)
    proba, threshold = float(pred.proba[0]), float(runnable.threshold)
    answer: dict[str, Any] = {
        "image": name, "width": size[1], "height": size[0],
        "label": row["Label"], "probability": proba, "threshold": threshold,
        "classes": list(runnable.classes), "count": row.get("Count"), "note": row["Note"],
        "model": runnable.head_name, "instances_kind": "cells" if finds_cells(runnable) else "windows", "slide": False,
        "hotspot": None, "instances": [], "heatmap": None, "csv": rows_to_csv([row]), "geojson": None,
    }
    if pred.window_scores is not None and pred.window_scores[0] is not None:
        boxes, scores = np.asarray(pred.boxes[0], dtype=np.float64), np.asarray(pred.window_scores[0], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:max_instances]
        cells = finds_cells(runnable)
        answer["instances"] = [_instance(boxes[i], scores[i], cells and scores[i] >= threshold) for i in order]
        answer["geojson"] = feature_collection(boxes, scores, size, cells=cells, threshold=threshold,
                                               label=row["Label"], probability=proba, count=row.get("Count"),
                                               image=name)
        answer["heatmap"] = _heatmap_uri(runnable, path, boxes, scores, f"{name}   probability {proba:.3f}",
                                         path.parent)
    return answer
