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
SUPPORTED = "PNG, JPEG, TIFF (8/16-bit, multi-channel) or BMP"
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
    from ..predictions import score_label

    image = read_image(path, model.read_options)
    target = folder / "heatmap.png"
    render_overlay(image, boxes, scores, target, max_side=1024, title=title, score_label=score_label(model),
                   threshold=float(model.threshold) if _cells(model) else None)
    return "data:image/png;base64," + base64.b64encode(target.read_bytes()).decode("ascii")


def _cells(model: Any) -> bool:
    from ..predictions import finds_cells

    return finds_cells(model)


def analyse(model: Any, path: Path, name: str, size: tuple[int, int], max_instances: int = 500) -> dict[str, Any]:
    """Predict one saved upload; the answer as JSON-ready data (see the module doc of :mod:`mitoscope.web`)."""
    from ..geojson import feature_collection
    from ..predictions import screen_images

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
        "model": runnable.head_name, "instances_kind": "cells" if _cells(runnable) else "windows",
        "instances": [], "heatmap": None, "csv": rows_to_csv([row]), "geojson": None,
    }
    if pred.window_scores is not None and pred.window_scores[0] is not None:
        boxes, scores = np.asarray(pred.boxes[0], dtype=np.float64), np.asarray(pred.window_scores[0], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[:max_instances]
        cells = _cells(runnable)
        answer["instances"] = [
            {"x0": float(boxes[i, 0]), "y0": float(boxes[i, 1]), "x1": float(boxes[i, 2]), "y1": float(boxes[i, 3]),
             "score": float(scores[i]), "mitotic": bool(cells and scores[i] >= threshold)}
            for i in order
        ]
        answer["geojson"] = feature_collection(boxes, scores, size, cells=cells, threshold=threshold,
                                               label=row["Label"], probability=proba, count=row.get("Count"),
                                               image=name)
        answer["heatmap"] = _heatmap_uri(runnable, path, boxes, scores, f"{name}   probability {proba:.3f}",
                                         path.parent)
    return answer
