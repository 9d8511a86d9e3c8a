"""`run_demo`: the whole job (data, train, evaluate, predict) on tiny sets."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mitoscope.demo
from mitoscope.demo import run_demo
from mitoscope.errors import InputError
from mitoscope.pipeline import TrainConfig
from mitoscope.synthetic import make_synthetic_dataset

METRIC_KEYS = ("f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "confusion_matrix")


def tiny_config(**changes) -> TrainConfig:
    params = dict(head="pooled", backbone="test_efficientnet", pretrained=False, window=64, cv=2, device="cpu")
    return TrainConfig(**{**params, **changes})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_user_data(folder: Path, n_per_class: int) -> Path:
    """64x64 PNGs (one window each); 'Mitosis' ones hold a bright square. Returns labels.csv."""
    rng = np.random.default_rng(3)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(2 * n_per_class):
        image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        if i % 2 == 0:
            image[20:36, 24:40] = 250
        Image.fromarray(image).save(folder / "images" / f"cell{i:02d}.png")
        rows.append(f"cell{i:02d}.png,{'Mitosis' if i % 2 == 0 else 'Normal'}")
    (folder / "labels.csv").write_text("Image,Label\n" + "\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.mark.slow
def test_demo_on_a_tiny_synthetic_set_writes_model_report_and_predictions(tmp_path, monkeypatch):
    small = functools.partial(make_synthetic_dataset, size=(96, 96), cells=(3, 5), mitoses=(1, 2),
                              cell_radius=(6, 9))
    monkeypatch.setattr(mitoscope.demo, "make_synthetic_dataset", small)
    out = tmp_path / "demo"
    result = run_demo(out, config=tiny_config(), n_train=8, n_test=6)

    assert result.synthetic
    assert result.model_dir == out / "model" and (out / "model" / "model.json").is_file()
    assert "SYNTHETIC" in (out / "synthetic-train" / "README.txt").read_text()
    assert len(read_rows(out / "synthetic-train" / "labels.csv")) == 8
    assert result.cv_metrics is not None and result.cv_metrics["n_images"] == 8

    metrics = json.loads((result.report_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics
    assert metrics["n_images"] == 6
    assert metrics["f1"] == result.test_metrics["f1"]
    for png in ("roc.png", "confusion_matrix.png"):
        assert (result.report_dir / png).is_file()

    test_names = [r["Image"] for r in read_rows(out / "synthetic-test" / "labels.csv")]
    rows = read_rows(result.predictions_csv)
    assert result.predictions_csv == out / "predictions.csv"
    assert [r["Image"] for r in rows] == [str(out / "synthetic-test" / "images" / name) for name in test_names]
    assert list(rows[0]) == ["Image", "Label", "Probability", "Threshold", "pooled", "Note"]
    assert {r["Label"] for r in rows} <= {"Mitosis", "Normal"}
    assert list((out / "feature-cache").rglob("*.safetensors"))

    # A second run into the same folder replaces the model and gives the same answers.
    again = run_demo(out, config=tiny_config(), n_train=8, n_test=6)
    assert read_rows(again.predictions_csv) == rows


@pytest.mark.slow
def test_demo_on_user_images_holds_out_a_stratified_split(tmp_path):
    data = tmp_path / "my, data"  # a comma in the path must survive the split CSVs
    labels = write_user_data(data, 8)
    out = tmp_path / "demo"
    result = run_demo(out, data, labels, config=tiny_config())

    assert not result.synthetic
    assert not (out / "synthetic-train").exists() and not (out / "synthetic-test").exists()
    train_rows = read_rows(out / "train.csv")
    test_rows = read_rows(out / "test.csv")
    train_paths = {r["path"] for r in train_rows}
    test_paths = {r["path"] for r in test_rows}
    assert not train_paths & test_paths
    assert {Path(p).name for p in train_paths | test_paths} == {f"cell{i:02d}.png" for i in range(16)}
    assert all(Path(p).is_file() for p in train_paths | test_paths)
    assert len(test_rows) == 4
    assert sorted(r["label"] for r in test_rows) == ["Mitosis", "Mitosis", "Normal", "Normal"]
    truth = {Path(r["path"]).name: r["label"] for r in train_rows + test_rows}
    assert all(truth[f"cell{i:02d}.png"] == ("Mitosis" if i % 2 == 0 else "Normal") for i in range(16))

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    assert json.loads((out / "model" / "model.json").read_text())["training"]["n_images"] == 12
    predicted = [r["Image"] for r in read_rows(result.predictions_csv)]
    assert sorted(predicted) == sorted(test_paths)


def test_demo_needs_enough_user_images_to_hold_some_out(tmp_path):
    labels = write_user_data(tmp_path / "data", 3)
    with pytest.raises(InputError, match=r"labels.csv: the demo needs at least 4 images of each class"):
        run_demo(tmp_path / "demo", tmp_path / "data", labels, config=tiny_config())
    assert not (tmp_path / "demo" / "model").exists()


@pytest.mark.slow
def test_demo_default_is_the_cell_model_with_counts(tmp_path, monkeypatch):
    small = functools.partial(make_synthetic_dataset, size=(128, 128), cells=(3, 5), mitoses=(1, 2),
                              cell_radius=(6, 9))
    monkeypatch.setattr(mitoscope.demo, "make_synthetic_dataset", small)
    out = tmp_path / "demo"
    result = run_demo(out, n_train=8, n_test=6)
    card = json.loads((out / "model" / "model.json").read_text())
    assert card["kind"] == "cells"
    # the default scorer (self-trained, its networks' weights averaged) on the demo's short schedule
    assert card["cells"]["scorer"] == "finetuned" and card["training"]["soup_networks"] == 4
    assert {k: card["head"]["params"][k] for k in mitoscope.demo.DEMO_SCHEDULE} == mitoscope.demo.DEMO_SCHEDULE
    rows = read_rows(result.predictions_csv)
    assert len(rows) == 6
    assert all(row["Count"].isdigit() and (int(row["Count"]) >= 1) == (row["Label"] == "Mitosis") for row in rows)
    assert set(result.test_metrics) >= set(METRIC_KEYS)
