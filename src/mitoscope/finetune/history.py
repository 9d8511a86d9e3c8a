"""The training history: one row per epoch, as CSV, and the curves as a picture."""

from __future__ import annotations

import csv
import io as stdio
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..atomic import atomic_path

if TYPE_CHECKING:
    from .training import PhaseResult

# One row per epoch of every stage and phase, in this order.
HISTORY_COLUMNS = ("stage", "phase", "epoch", "lr", "train_loss", "train_accuracy", "train_auc", "train_logit_sd",
                   "train_live_share", "val_loss", "val_accuracy", "val_auc", "val_logit_sd", "guard")


def history_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_COLUMNS})
    return buffer.getvalue()


def plot_history(rows: Sequence[dict[str, Any]], phases: Sequence[tuple[str, PhaseResult]], path: Path) -> Path:
    """Loss, accuracy and AUC per epoch (training and validation) across stages and phases."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes_row = figure.subplots(1, 3)
    x = np.arange(1, len(rows) + 1)
    for axes, metric in zip(axes_row, ("loss", "accuracy", "auc")):
        for split, style in (("train", "-"), ("val", "--")):
            values = [np.nan if r.get(f"{split}_{metric}") is None else r[f"{split}_{metric}"] for r in rows]
            axes.plot(x, values, style, marker="o", markersize=3, label=f"{'training' if split == 'train' else 'validation'}")
        start = 0
        for label, result in phases:
            if start:
                axes.axvline(start + 0.5, color="grey", linewidth=0.8)
            axes.annotate(label, (start + 1, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=7, color="grey")
            best = start + result.best_epoch
            if 1 <= best <= len(rows):
                value = rows[best - 1].get(f"val_{metric}")
                if value is not None:
                    axes.plot([best], [value], marker="*", markersize=11, color="tab:red",
                              label="best epoch (kept)" if start == 0 else None)
            start += result.epochs_run
        axes.set_xlabel("epoch (all phases)")
        axes.set_ylabel(metric)
        axes.legend(fontsize=8)
    figure.suptitle("fine-tuning history: head on the frozen base, then the unfrozen base")
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return path


def _phase_summary(result: PhaseResult) -> dict[str, Any]:
    """One phase as ``model.json`` and ``history.json`` record it."""
    return {"phase": result.name, "lr": result.lr, "learning_rates": result.learning_rates, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "best_score": result.best_score, "n_trainable_parameters": result.n_trainable,
            **({"restarts": result.restarts} if result.restarts else {})}
