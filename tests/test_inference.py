"""Serving a saved model without PyTorch or scikit-learn: the same predictions as the full pipeline.

Models are trained on 240x240 blob images with the tiny ``test_efficientnet`` at its own input
size (160 px windows, a 2x2 grid), so its export can run them; each head's served output is
held against the PyTorch/scikit-learn head it stands for (each head's numpy form alone, on
constructed data: ``test_heads_serving.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")

from blobs import write_blobs  # noqa: E402
from mitoscope.array_features import box_average as box_average_numpy  # noqa: E402
from mitoscope.features import box_average as box_average_torch  # noqa: E402
from mitoscope.errors import InputError, ModelError  # noqa: E402
from mitoscope.inference import NotServable, ServedModel  # noqa: E402
from mitoscope.pipeline import MitoscopeModel, TrainConfig, train  # noqa: E402
from mitoscope.predictions import predict  # noqa: E402

SIZE = 240
WINDOW = 160  # the tiny backbone's own input size: no resizing, so servable
HEAD_PARAMS = {
    "ensemble": {"max_epochs": 4, "n_estimators": 15},
    "pooled": {},
    "attention": {"max_epochs": 4},
}


def blob_images(folder: Path, n_per_class: int, seed: int) -> Path:
    write_blobs(folder, n_per_class, seed=seed, size=SIZE, blob=24)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return blob_images(tmp_path_factory.mktemp("serve-blobs"), 4, seed=0)


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> list[Path]:
    return sorted((blob_images(tmp_path_factory.mktemp("serve-new"), 2, seed=1) / "images").glob("*.png"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    models: dict[tuple[str, str], Path] = {}

    def get(head: str, extraction: str = "windows", window: int = WINDOW) -> Path:
        key = (head, f"{extraction}-{window}")
        if key not in models:
            out = tmp_path_factory.mktemp(f"served-{head}-{extraction}-{window}") / "model"
            config = TrainConfig(head=head, backbone="test_efficientnet", pretrained=False, window=window, overlap=0.5,
                                 extraction=extraction, cv=0, head_params=HEAD_PARAMS[head], device="cpu")
            train(data, data / "labels.csv", out, config, None)
            models[key] = out
        return models[key]

    return get


@pytest.mark.parametrize("head,extraction", [("ensemble", "windows"), ("pooled", "fullconv"), ("attention", "windows")])
def test_a_served_model_predicts_what_the_full_pipeline_predicts(trained, new_images, head, extraction):
    model_dir = trained(head, extraction)
    served = ServedModel.load(model_dir)
    assert served.engine == "openvino"
    full = MitoscopeModel.load(model_dir)
    got = served.predict_paths(new_images, with_window_scores=True)
    expected = full.predict_paths(new_images, cache=None, device="cpu", with_window_scores=True)
    assert got.proba.shape == (len(new_images),) and np.ptp(got.proba) > 0  # real, differing answers
    np.testing.assert_allclose(got.proba, expected.proba, rtol=0, atol=2e-5)
    assert set(got.members) == set(expected.members) == ({"dense", "forest"} if head == "ensemble" else set())
    for name in expected.members:
        np.testing.assert_allclose(got.members[name], expected.members[name], rtol=0, atol=2e-5)
    for boxes, reference in zip(got.boxes, expected.boxes):
        np.testing.assert_array_equal(boxes, reference)
    if head == "ensemble":
        assert got.window_scores is None and expected.window_scores is None
    else:
        for scores, reference in zip(got.window_scores, expected.window_scores):
            np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-5)


def test_predict_serves_without_importing_torch_or_sklearn_and_writes_the_same_csv(trained, new_images, tmp_path):
    model_dir = trained("ensemble")
    full_csv = tmp_path / "full.csv"
    predict(model_dir, new_images, full_csv, cache=None, serve=False)
    served_csv = tmp_path / "served.csv"
    script = (
        "import sys, json\n"
        "from mitoscope.predictions import predict\n"
        f"predict({str(model_dir)!r}, {[str(p) for p in new_images]!r}, {str(served_csv)!r}, cache=None)\n"
        "print(json.dumps([m for m in ('torch', 'sklearn', 'skops', 'timm', 'scipy') if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    full_rows = [line.split(",") for line in full_csv.read_text().splitlines()]
    served_rows = [line.split(",") for line in served_csv.read_text().splitlines()]
    assert served_rows[0] == full_rows[0] == ["Image", "Label", "Probability", "Threshold", "dense", "forest", "Note"]
    for served, full in zip(served_rows[1:], full_rows[1:]):
        assert served[:2] == full[:2]
        np.testing.assert_allclose([float(v) for v in served[2:6]], [float(v) for v in full[2:6]], atol=2e-5)


def test_what_cannot_be_served_falls_back_to_the_full_pipeline(trained, data, new_images, tmp_path, caplog):
    resized_windows = trained("pooled", window=96)  # 96 px windows are resized to 160 px in PyTorch
    with pytest.raises(NotServable, match="resized to 160 px in PyTorch"):
        ServedModel.load(resized_windows)
    with caplog.at_level("INFO", logger="mitoscope.predictions"):
        rows = predict(resized_windows, new_images, tmp_path / "a.csv", cache=None)
    assert len(rows) == len(new_images) and "full pipeline" in caplog.text

    # A fixed-grid model and an image of another size: found once read, then resized as at training.
    big = tmp_path / "big.png"
    Image.open(new_images[0]).resize((320, 320)).save(big)
    caplog.clear()
    with caplog.at_level("INFO", logger="mitoscope.predictions"):
        rows = predict(trained("ensemble"), [big], tmp_path / "b.csv", cache=None)
    assert "resized in PyTorch" in caplog.text and rows[0]["Note"].startswith("resized 320x320")

    # A model saved before the head arrays existed: its spec lists no arrays file.
    old = tmp_path / "old-model"
    old.mkdir()
    source = trained("pooled", "fullconv")
    config = json.loads((source / "model.json").read_text())
    config["head"]["spec"]["files"] = [f for f in config["head"]["spec"]["files"] if not f.endswith(".arrays.safetensors")]
    config["files"] = {k: v for k, v in config["files"].items() if not k.endswith(".arrays.safetensors")}
    for name in config["files"]:
        (old / name).write_bytes((source / name).read_bytes())
    (old / "model.json").write_text(json.dumps(config))
    with pytest.raises(NotServable, match="without its .arrays.safetensors file"):
        ServedModel.load(old)
    rows = predict(old, new_images, tmp_path / "c.csv", cache=None)
    assert len(rows) == len(new_images)


def test_numpy_box_average_equals_the_pytorch_one_inside_on_and_past_the_edges():
    rng = np.random.default_rng(2)
    fmap = rng.standard_normal((6, 9, 13)).astype(np.float32)
    boxes = np.array([[0, 0, 64, 64], [32, 16, 96, 80], [300, 200, 416, 288], [-20, -10, 40, 30], [100, 50, 101, 51],
                      [380, 260, 440, 300]], dtype=np.float32)
    expected = box_average_torch(torch.from_numpy(fmap)[None], torch.from_numpy(boxes), 1 / 32).numpy()
    np.testing.assert_allclose(box_average_numpy(fmap, boxes, 1 / 32), expected, rtol=1e-5, atol=1e-6)


def test_a_damaged_file_of_a_served_model_stops_prediction_before_any_output(trained, new_images, tmp_path):
    source = trained("ensemble")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in source.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = damaged / "head.dense.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # same size, one weight changed: only the hash can tell
    weights.write_bytes(bytes(raw))
    served = ServedModel.load(damaged)  # the hashes are checked when prediction starts
    with pytest.raises(ModelError, match=r"head\.dense\.safetensors: file was changed or truncated"):
        served.predict_paths(new_images)
    out = tmp_path / "out.csv"
    with pytest.raises(ModelError, match=r"head\.dense\.safetensors"):
        predict(damaged, new_images, out, cache=None)
    assert not out.exists()


def test_the_engine_can_be_chosen_and_torch_means_the_full_pipeline(trained, new_images, tmp_path, caplog):
    model_dir = trained("pooled", "fullconv")
    by_onnxruntime = ServedModel.load(model_dir, engine="onnxruntime")
    assert by_onnxruntime.engine == "onnxruntime"
    expected = ServedModel.load(model_dir).predict_paths(new_images)
    np.testing.assert_allclose(by_onnxruntime.predict_paths(new_images).proba, expected.proba, rtol=0, atol=2e-5)
    with pytest.raises(NotServable, match="engine torch asked for"):
        ServedModel.load(model_dir, engine="torch")
    with caplog.at_level("INFO", logger="mitoscope.predictions"):
        rows = predict(model_dir, new_images, tmp_path / "torch.csv", cache=None, engine="torch")
    assert "full pipeline: engine torch asked for" in caplog.text
    np.testing.assert_allclose([row["Probability"] for row in rows], expected.proba, rtol=0, atol=2e-5)
    with pytest.raises(InputError, match="unknown engine 'cuda'"):
        predict(model_dir, new_images, tmp_path / "bad.csv", cache=None, engine="cuda")


def test_serving_honours_the_verdicts_beside_the_export(trained, new_images, tmp_path, caplog):
    """An engine rejected by its check is skipped by auto and refused when named, served or not."""
    from mitoscope.atomic import atomic_write_bytes, atomic_write_json
    from mitoscope.engines import onnx_path, verdict_path

    model_dir = trained("pooled", "fullconv")
    backbone = json.loads((model_dir / "model.json").read_text())["backbone"]
    verdict = verdict_path(onnx_path(backbone["name"], backbone["weights_sha256"]), "openvino")
    passed = verdict.read_bytes()
    try:
        atomic_write_json(verdict, {**json.loads(passed), "relative_error": 0.5})
        with caplog.at_level("WARNING", logger="mitoscope.engines"):
            served = ServedModel.load(model_dir)
        assert served.engine == "onnxruntime"
        assert "openvino cannot run" in caplog.text and "relative error 0.5" in caplog.text
        assert MitoscopeModel.load(model_dir).extractor(device="cpu").engine == "onnxruntime"
        with pytest.raises(InputError, match="engine openvino cannot run .*relative error 0.5, expected at most 0.001"):
            ServedModel.load(model_dir, engine="openvino")
        with pytest.raises(InputError, match="engine openvino cannot run .*relative error 0.5"):
            predict(model_dir, new_images, tmp_path / "p.csv", cache=None, engine="openvino")
        verdict.unlink()  # not checked (e.g. a new OpenVINO): the full pipeline checks it, then it serves
        with pytest.raises(NotServable, match="engine openvino has not been checked against PyTorch"):
            ServedModel.load(model_dir)
        predict(model_dir, new_images, tmp_path / "q.csv", cache=None)
        assert json.loads(verdict.read_text())["relative_error"] <= 1e-3
        assert ServedModel.load(model_dir).engine == "openvino"
    finally:
        atomic_write_bytes(verdict, passed)


def test_served_heatmaps_are_written_from_the_served_window_scores(trained, new_images, tmp_path, caplog):
    model_dir = trained("attention")
    with caplog.at_level("INFO", logger="mitoscope.predictions"):
        rows = predict(model_dir, new_images[:1], tmp_path / "p.csv", cache=None, heatmaps_dir=tmp_path / "maps")
    assert "full pipeline" not in caplog.text  # served
    stem = new_images[0].stem
    assert (tmp_path / "maps" / f"{stem}_heatmap.png").is_file()
    scores = (tmp_path / "maps" / f"{stem}_windows.csv").read_text().splitlines()
    assert len(scores) == 1 + 4  # header + the 2x2 grid
    expected = MitoscopeModel.load(model_dir).predict_paths(new_images[:1], with_window_scores=True)
    assert rows[0]["Probability"] == pytest.approx(expected.proba[0], abs=2e-5)
