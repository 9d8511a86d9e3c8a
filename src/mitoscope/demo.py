"""The main job end to end on the built-in default: data, train, evaluate, predict.

Without user data it draws a small SYNTHETIC dataset (mitoscope.synthetic: procedurally
drawn cells, not real microscopy) so that a fresh clone runs offline in a few minutes on two
CPU cores. With ``data_dir``/``labels_csv`` it runs the same steps on the user's images,
holding out a stratified quarter of them for evaluation and prediction.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from .atomic import atomic_write_text
from .errors import InputError
from .io import load_labelled_images
from .options import TrainConfig
from .pipeline import Progress, evaluate, open_cache, predict, train
from .synthetic import make_synthetic_dataset


# The cell model's schedule on the built-in synthetic set: 2 epochs of one pass over the known
# negatives (the recipe: 6 epochs of at least 50 steps, 1,200 steps in all on so few images).
DEMO_SCHEDULE = {"epochs": 2, "min_steps_per_epoch": 0}


@dataclass
class DemoResult:
    out_dir: Path
    model_dir: Path
    report_dir: Path
    predictions_csv: Path
    cv_metrics: dict[str, Any] | None
    test_metrics: dict[str, Any]
    synthetic: bool
    warnings: list[str]  # the trained model's (see TrainResult.warnings)


def write_split_csv(path: Path, paths: list[Path], labels: list[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quotes paths and labels that hold commas
    writer.writerow(["path", "label"])
    writer.writerows([str(p.resolve()), label] for p, label in zip(paths, labels))
    return atomic_write_text(path, buffer.getvalue())


def user_split(data_dir: Path, labels_csv: Path | None, out_dir: Path, positive: str | None, seed: int) -> tuple[Path, Path]:
    """Stratified 75/25 split of the user's labelled images into two CSVs under ``out_dir``."""
    data = load_labelled_images(data_dir, labels_csv, positive)
    if min(np.bincount(data.y, minlength=2)) < 4:
        raise InputError(f"{labels_csv or data_dir}: the demo needs at least 4 images of each class to hold some out")
    index = np.arange(len(data.paths))
    train_idx, test_idx = train_test_split(index, test_size=0.25, stratify=data.y, random_state=seed)
    train_csv = write_split_csv(out_dir / "train.csv", [data.paths[i] for i in train_idx], [data.labels[i] for i in train_idx])
    test_csv = write_split_csv(out_dir / "test.csv", [data.paths[i] for i in test_idx], [data.labels[i] for i in test_idx])
    return train_csv, test_csv


def run_demo(
    out_dir: str | Path = "mitoscope-demo",
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    config: TrainConfig | None = None,
    n_train: int = 48,
    n_test: int = 24,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    positive: str | None = None,
) -> DemoResult:
    """``config`` None: the default model (cells, see :mod:`mitoscope.cells`) with ``seed`` and
    ``positive``; a TrainConfig: that window head (its own seed and positive class)."""
    cells = config is None
    config = (config or TrainConfig(cv=3, seed=seed, positive=positive)).validate()  # before any data is drawn
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = open_cache(cache_dir or out_dir / "feature-cache")
    if data_dir is None:
        train_labels = make_synthetic_dataset(out_dir / "synthetic-train", n_images=n_train, seed=config.seed + 1)
        test_labels = make_synthetic_dataset(out_dir / "synthetic-test", n_images=n_test, seed=config.seed + 2)
        train_dir, test_dir = train_labels.parent, test_labels.parent
    else:
        train_labels, test_labels = user_split(Path(data_dir), Path(labels_csv) if labels_csv else None,
                                               out_dir, config.positive, config.seed)
        train_dir = test_dir = out_dir
    model_dir = out_dir / "model"
    if cells:
        from .cells.config import CellTrainConfig
        from .cells.workflow import train_cells

        # The built-in synthetic set is small: a short schedule of the default recipe (DEMO_SCHEDULE)
        # keeps a fresh clone's demo to minutes; the user's images get the whole recipe.
        schedule = DEMO_SCHEDULE if data_dir is None else {}
        result = train_cells(train_dir, train_labels, model_dir, CellTrainConfig(seed=config.seed, **schedule),
                             config.read_options, config.positive, progress=progress, overwrite=True)
    else:
        result = train(train_dir, train_labels, model_dir, config, cache, progress, overwrite=True)
    report_dir = out_dir / "report"
    metrics = evaluate(model_dir, test_dir, test_labels, report_dir, cache, progress)
    predictions_csv = out_dir / "predictions.csv"
    with open(test_labels, newline="") as handle:
        column = "Image" if data_dir is None else "path"
        names = [row[column] for row in csv.DictReader(handle)]
    images = [test_dir / "images" / n for n in names] if data_dir is None else [Path(n) for n in names]
    predict(model_dir, images, predictions_csv, cache, progress)
    return DemoResult(out_dir, model_dir, report_dir, predictions_csv, result.cv_metrics, metrics, data_dir is None,
                      result.warnings)
