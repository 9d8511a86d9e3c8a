"""What any model's prediction returns (:class:`Predictions`) and how it becomes rows and a CSV.

The lowest layer of prediction: every model kind (:mod:`mitoscope.inference`,
:mod:`mitoscope.window_model`, :mod:`mitoscope.finetune`) returns :class:`Predictions`, and
:func:`mitoscope.predictions.predict` and the workflows write them with :func:`prediction_rows`
and :func:`rows_to_csv`. Imports nothing of mitoscope.
"""

from __future__ import annotations

import csv
import io as stdio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["DIGITS", "Predictions", "Progress", "Warn", "prediction_rows", "rows_to_csv", "skipped_row",
           "written_probability"]

# (stage description, done, total)
Progress = Callable[[str, int, int], None]
# One line for the user: an image that differs from the training images, or was skipped.
Warn = Callable[[str], None]

# Significant digits of the probabilities written (more where needed to keep their side of the threshold).
DIGITS = 6


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
    # Images that could not be read (path -> the error), left out of everything above (skip_bad).
    skipped: dict[Path, str] = field(default_factory=dict)
    # Mitotic cells per image (models whose instances are cells): written as the Count column.
    counts: list[int] | None = None


def written_probability(proba: float, threshold: float, digits: int = DIGITS) -> float:
    """``proba`` rounded to ``digits`` significant digits, or to more where fewer would move it to
    the other side of ``threshold``: a CSV row's Label always agrees with its Probability >= Threshold."""
    above = proba >= threshold
    for more in range(digits, 18):
        written = float(f"{proba:.{more}g}")
        if (written >= threshold) == above:
            return written
    return float(proba)


def prediction_rows(pred: Predictions, classes: Sequence[str], threshold: float, head_name: str,
                    warnings: Mapping[Path, str] | None = None) -> list[dict[str, Any]]:
    """One row per predicted image: Image (its path as given), Label, Probability, Threshold,
    one column per head, Count (the mitotic cells found, for models that find cells), Note (the model's notes, then ``warning: warnings[path]``)."""
    negative, positive = classes
    threshold = float(threshold)
    rows = []
    for i, path in enumerate(pred.paths):
        proba = float(pred.proba[i])
        row: dict[str, Any] = {
            "Image": str(path),
            "Label": positive if proba >= threshold else negative,
            "Probability": written_probability(proba, threshold),
            "Threshold": threshold,
        }
        for name, values in (pred.members or {head_name: pred.proba}).items():
            row[name] = float(f"{float(values[i]):.{DIGITS}g}")
        if pred.counts is not None:
            row["Count"] = int(pred.counts[i])
        warning = (warnings or {}).get(path)
        row["Note"] = "; ".join(note for note in (pred.notes[i], warning and f"warning: {warning}") if note)
        rows.append(row)
    return rows


def skipped_row(path: Path, error: str, columns: Sequence[str]) -> dict[str, Any]:
    """The row of an image that could not be predicted: empty but for Image and the error in Note."""
    return {**{column: "" for column in columns}, "Image": str(path), "Note": f"not predicted: {error}"}


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
