"""Predictions of any model as rows and a CSV, and ``predict``: model folder + images -> CSV.

Nothing here imports PyTorch or scikit-learn: :func:`predict` serves a window-feature model
through :mod:`mitoscope.inference` when it can (a 4K image in seconds on a 2-core CPU) and
loads the full pipeline only when it must (a fine-tuned network, resized windows, a model
saved before its head arrays existed).
"""

from __future__ import annotations

import csv
import io as stdio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .atomic import atomic_write_text
from .cache import FeatureCache
from .io import find_images

logger = logging.getLogger(__name__)

# (stage description, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class Predictions:
    """What any mitoscope model returns for a list of images."""

    paths: list[Path]
    proba: np.ndarray  # (n,) probability of the positive class
    members: dict[str, np.ndarray]  # per-head probabilities of an ensemble
    notes: list[str]  # e.g. that an image was resized to the training grid
    window_scores: list[np.ndarray] | None = None  # one score per window, higher = more mitotic
    boxes: list[np.ndarray] | None = None  # (N, 4) window boxes in image coordinates
    image_sizes: list[tuple[int, int]] | None = None


def prediction_rows(pred: Predictions, classes: Sequence[str], threshold: float, head_name: str) -> list[dict[str, Any]]:
    negative, positive = classes
    rows = []
    for i, path in enumerate(pred.paths):
        row: dict[str, Any] = {
            "Image": path.name,
            "Label": positive if pred.proba[i] >= threshold else negative,
            "Probability": round(float(pred.proba[i]), 6),
        }
        for name, values in (pred.members or {head_name: pred.proba}).items():
            row[name] = round(float(values[i]), 6)
        row["Note"] = pred.notes[i]
        rows.append(row)
    return rows


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def score_label(model: Any) -> str:
    head = model.config["head"]["name"]
    return {"pooled": "window score (logistic-regression logit)"}.get(head, "attention weight (higher = more mitotic)")


def _full_model(model_dir: str | Path, max_pixels: int | None) -> Any:
    from .pipeline import load_model

    return load_model(model_dir, max_pixels)


def predict(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    out_csv: str | Path,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
    heatmaps_dir: str | Path | None = None,
    top_k: int = 3,
    max_pixels: int | None = None,
    serve: bool = True,
    engine: str = "auto",
) -> list[dict[str, Any]]:
    """Predict images into a CSV; with ``heatmaps_dir`` also write each image's heatmap,
    window-score CSV and top-k window crops. ``max_pixels`` replaces the model's pixel limit.
    ``engine`` runs the backbone (see :mod:`mitoscope.engines`); ``serve=False`` (or engine
    torch) always uses the full PyTorch/scikit-learn pipeline."""
    from .engines import ENGINES
    from .errors import InputError
    from .inference import NotServable, ServedModel

    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    model: Any = None
    if serve:
        try:
            model = ServedModel.load(model_dir, max_pixels, engine)
        except NotServable as reason:
            logger.info("predicting with the full pipeline: %s", reason)
    if model is None:
        model = _full_model(model_dir, max_pixels)
    paths = find_images(inputs)
    with_scores = heatmaps_dir is not None
    try:
        pred = model.predict_paths(paths, cache=cache, progress=progress, with_window_scores=with_scores,
                                   engine=engine)
    except NotServable as reason:  # found only once the images were read; cached features are reused
        logger.info("predicting with the full pipeline: %s", reason)
        model = _full_model(model_dir, max_pixels)
        pred = model.predict_paths(paths, cache=cache, progress=progress, with_window_scores=with_scores,
                                   engine=engine)
    if heatmaps_dir is not None:
        from .heatmaps import require_window_scores, write_heatmaps

        require_window_scores(pred)
    rows = prediction_rows(pred, model.classes, model.threshold, model.config["head"]["name"])
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_csv, rows_to_csv(rows))
    if heatmaps_dir is not None:
        write_heatmaps(heatmaps_dir, pred, model.read_options, top_k=top_k, score_label=score_label(model))
    return rows
