"""train / predict / evaluate through the Python API, for every head.

Images are 96x96 PNGs of dark noise; the positive ones hold a bright square blob. The
backbone is the tiny ``test_efficientnet`` with seeded random weights, windows of 64 px
(a 2x2 grid), and heads made small (few epochs, few trees) so that every head trains in
a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitoscope.artifacts import sha256_file
from mitoscope.backbones import state_dict_sha256
from mitoscope.errors import InputError
from mitoscope.features import FeatureCache, resize_image
from mitoscope.heads import HEADS, DenseHead, EnsembleHead, ForestHead
from mitoscope.pipeline import (
    MitoscopeModel,
    TrainConfig,
    build_head,
    evaluate,
    head_epochs,
    load_model,
    predict,
    train,
)
from mitoscope.tiling import make_grid

SIZE = 96
WINDOW = 64
HEAD_PARAMS = {
    "ensemble": {"max_epochs": 5, "n_estimators": 20},
    "dense": {"max_epochs": 5},
    "forest": {"n_estimators": 20},
    "pooled": {},
    "attention": {"max_epochs": 5},
}


def blob_image(rng: np.random.Generator, positive: bool, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    if positive:
        y, x = rng.integers(0, height - 16), rng.integers(0, width - 16)
        image[y : y + 16, x : x + 16] = 250
    return image


def make_blob_dataset(folder: Path, n_per_class: int, words: tuple[str, str] = ("Mitosis", "Normal"), seed: int = 0) -> Path:
    """``folder/images/*.png`` and ``folder/labels.csv`` (Image,Label); returns the CSV."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(2 * n_per_class):
        positive = i % 2 == 0
        name = f"img{i:02d}.png"
        Image.fromarray(blob_image(rng, positive)).save(folder / "images" / name)
        rows.append(f"{name},{words[0] if positive else words[1]}")
    csv_path = folder / "labels.csv"
    csv_path.write_text("Image,Label\n" + "\n".join(rows) + "\n")
    return csv_path


def config_for(head: str, cv: int = 0, **kwargs) -> TrainConfig:
    return TrainConfig(head=head, backbone="test_efficientnet", pretrained=False, window=WINDOW, overlap=0.5,
                       cv=cv, head_params=HEAD_PARAMS[head], device="cpu", **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blobs")
    make_blob_dataset(folder, 4)
    return folder


@pytest.fixture(scope="module")
def image_paths(data) -> list[Path]:
    return sorted((data / "images").glob("*.png"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FeatureCache:
    return FeatureCache(tmp_path_factory.mktemp("pipeline-cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, cache):
    """head name -> TrainResult, trained once per module (pooled with 2-fold CV, the rest without)."""
    results = {}

    def get(head: str):
        if head not in results:
            out = tmp_path_factory.mktemp(f"model-{head}") / "model"
            results[head] = train(data, data / "labels.csv", out, config_for(head, cv=2 if head == "pooled" else 0), cache)
        return results[head]

    return get


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory) -> Path:
    """An 80x128 image: not the training size."""
    path = tmp_path_factory.mktemp("odd") / "odd.png"
    Image.fromarray(blob_image(np.random.default_rng(5), True, 80, 128)).save(path)
    return path


# --------------------------------------------------------------------------- round trip


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEADS))
def test_saved_model_gives_the_same_probabilities(head, trained, image_paths, cache):
    result = trained(head)
    before = result.model.predict_paths(image_paths, cache=cache)
    loaded = MitoscopeModel.load(result.model_dir)
    after = loaded.predict_paths(image_paths, cache=cache)
    assert isinstance(load_model(result.model_dir), MitoscopeModel)
    assert loaded.classes == result.model.classes == ("Normal", "Mitosis")
    assert loaded.threshold == result.model.threshold
    assert type(loaded.head) is HEADS[head]
    assert before.proba.shape == (len(image_paths),)
    assert np.all((before.proba >= 0) & (before.proba <= 1))
    np.testing.assert_allclose(after.proba, before.proba, rtol=0, atol=1e-6)
    assert set(after.members) == set(before.members) == ({"dense", "forest"} if head == "ensemble" else set())
    for name in before.members:
        np.testing.assert_allclose(after.members[name], before.members[name], rtol=0, atol=1e-6)


def test_a_loaded_model_recomputes_the_same_features(trained, image_paths, cache):
    """Random-init backbone weights travel with the model: without the cache they give the same answer."""
    result = trained("pooled")
    loaded = MitoscopeModel.load(result.model_dir)
    fresh = loaded.predict_paths(image_paths[:2], cache=None)
    cached = result.model.predict_paths(image_paths[:2], cache=cache)
    np.testing.assert_allclose(fresh.proba, cached.proba, rtol=1e-5, atol=1e-6)
    assert (result.model_dir / "backbone.safetensors").is_file()


def test_a_loaded_model_runs_from_the_onnx_export_without_building_the_network(trained, image_paths):
    result = trained("pooled")
    first = MitoscopeModel.load(result.model_dir)
    expected = first.predict_paths(image_paths[:2], cache=None, device="cpu")  # exports the backbone if needed
    assert first.extractor().engine == "openvino"
    again = MitoscopeModel.load(result.model_dir)
    got = again.predict_paths(image_paths[:2], cache=None, device="cpu")
    extractor = again.extractor()
    assert again._backbone is None and extractor.model is None and extractor.engine == "openvino"
    np.testing.assert_allclose(got.proba, expected.proba, rtol=0, atol=1e-6)


def test_model_json_records_what_prediction_needs(trained):
    result = trained("ensemble")
    config = json.loads((result.model_dir / "model.json").read_text())
    assert config["format_version"] == 1
    for package in ("mitoscope", "python", "torch", "timm", "scikit-learn", "numpy"):
        assert config["versions"][package]
    loaded = MitoscopeModel.load(result.model_dir)
    backbone = loaded._load_backbone()
    assert config["backbone"]["name"] == "test_efficientnet"
    assert config["backbone"]["weights_sha256"] == state_dict_sha256(backbone.model) == result.model._backbone.weights_id
    assert config["tiling"]["window"] == WINDOW and config["tiling"]["overlap"] == 0.5
    assert config["read"]["channels"] is None
    assert config["read"]["percentiles"] == [0.5, 99.5]
    assert config["read"]["max_pixels"] > 0
    assert config["classes"] == ["Normal", "Mitosis"] and config["positive"] == "Mitosis"
    assert config["threshold"] == 0.5  # no CV: the stored rule says so
    assert "no CV" in config["threshold_rule"]
    assert config["train_image_size"] == [SIZE, SIZE]
    assert config["head"]["name"] == "ensemble" and config["head"]["instances"] == "windows"
    assert config["training"]["n_per_class"] == {"Normal": 4, "Mitosis": 4}
    listed = set(config["files"])
    assert {"head.dense.safetensors", "head.forest.skops", "backbone.safetensors"} <= listed
    for name, digest in config["files"].items():
        assert sha256_file(result.model_dir / name) == digest
    on_disk = {p.name for p in result.model_dir.iterdir()}
    assert on_disk == listed | {"model.json"}


def test_cross_validated_model_stores_its_tuned_threshold_and_report(trained):
    result = trained("pooled")
    config = json.loads((result.model_dir / "model.json").read_text())
    assert config["train_image_size"] is None  # pooling takes any size
    assert config["threshold"] == pytest.approx(result.cv_metrics["threshold"])
    assert "cross-validated" in config["threshold_rule"]
    report = json.loads((result.model_dir / "metrics.json").read_text())
    assert report["n_images"] == 8 and report["n_splits"] == 2
    for name in ("metrics.json", "roc.png", "confusion_matrix.png"):
        assert name in config["files"]


def test_training_is_reproducible(tmp_path, data, cache):
    first = train(data, data / "labels.csv", tmp_path / "a", config_for("pooled"), cache)
    second = train(data, data / "labels.csv", tmp_path / "b", config_for("pooled"), cache)
    config_a = json.loads((first.model_dir / "model.json").read_text())
    config_b = json.loads((second.model_dir / "model.json").read_text())
    assert config_a["backbone"]["weights_sha256"] == config_b["backbone"]["weights_sha256"]
    paths = sorted((data / "images").glob("*.png"))
    np.testing.assert_array_equal(first.model.predict_paths(paths, cache=cache).proba,
                                  second.model.predict_paths(paths, cache=cache).proba)


# --------------------------------------------------------------------------- image sizes


def test_fixed_grid_head_resizes_another_size_and_says_so(trained, odd_image, image_paths, cache, tmp_path):
    model = MitoscopeModel.load(trained("ensemble").model_dir)
    pred = model.predict_paths([odd_image, image_paths[0]], cache=cache)
    assert "resized 128x80" in pred.notes[0] and f"{SIZE}x{SIZE}" in pred.notes[0]
    assert pred.notes[1] == ""
    # Windows are reported where they lie in the image as read.
    assert pred.image_sizes[0] == (80, 128)
    assert pred.boxes[0][:, 2].max() == 128 and pred.boxes[0][:, 3].max() == 80
    # Same answer as for the image resized beforehand to the training size.
    pre = tmp_path / "pre.png"
    Image.fromarray(resize_image(np.asarray(Image.open(odd_image)), (SIZE, SIZE))).save(pre)
    direct = model.predict_paths([pre], cache=cache)
    assert direct.notes == [""]
    np.testing.assert_allclose(pred.proba[0], direct.proba[0], rtol=0, atol=1e-6)
    rows = model.predict([odd_image], cache=cache)
    assert list(rows[0]) == ["Image", "Label", "Probability", "Threshold", "dense", "forest", "Note"]
    assert rows[0]["Note"] == pred.notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["pooled", "attention"])
def test_pooling_heads_take_any_size_without_resizing(head, trained, odd_image, cache):
    model = MitoscopeModel.load(trained(head).model_dir)
    pred = model.predict_paths([odd_image], cache=cache, with_window_scores=True)
    assert pred.notes == [""]
    assert pred.image_sizes == [(80, 128)]
    np.testing.assert_array_equal(pred.boxes[0], make_grid(80, 128, WINDOW, 0.5).boxes())
    assert 0.0 <= pred.proba[0] <= 1.0
    assert pred.window_scores is not None and pred.window_scores[0].shape == (len(pred.boxes[0]),)


# --------------------------------------------------------------------------- predict / evaluate files


def test_predict_and_evaluate_write_their_files(trained, data, image_paths, cache, tmp_path):
    model_dir = trained("pooled").model_dir
    rows = predict(model_dir, [data / "images"], tmp_path / "out" / "predictions.csv", cache)
    assert len(rows) == len(image_paths)
    text = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert text[0] == "Image,Label,Probability,Threshold,pooled,Note"
    assert {line.split(",")[1] for line in text[1:]} <= {"Mitosis", "Normal"}
    metrics = evaluate(model_dir, data, data / "labels.csv", tmp_path / "report", cache)
    assert metrics["n_images"] == 8
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    for key in ("f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "confusion_matrix"):
        assert key in saved
    assert np.sum(saved["confusion_matrix"]) == 8
    truth = {line.split(",")[0]: line.split(",")[1] for line in (data / "labels.csv").read_text().splitlines()[1:]}
    evaluated = (tmp_path / "report" / "predictions.csv").read_text().splitlines()
    assert evaluated[0].split(",")[-1] == "True"
    for line in evaluated[1:]:
        cells = line.split(",")
        assert cells[-1] == truth[Path(cells[0]).name]


def test_predict_max_pixels_overrides_the_models_limit(trained, image_paths, cache, tmp_path):
    with pytest.raises(InputError, match="img00.png"):
        predict(trained("pooled").model_dir, image_paths[:1], tmp_path / "p.csv", cache, max_pixels=SIZE * SIZE - 1)
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------- warnings


def test_a_model_at_chance_says_so_in_its_result_its_metrics_and_its_description(tmp_path, cache):
    # The same pixels under both labels: equal probabilities, AUC 0.5, and max F1 calls every image positive.
    folder = tmp_path / "same"
    (folder / "images").mkdir(parents=True)
    pixels = blob_image(np.random.default_rng(0), positive=True)
    for i in range(8):
        Image.fromarray(pixels).save(folder / "images" / f"img{i:02d}.png")
    (folder / "labels.csv").write_text("Image,Label\n" + "".join(
        f"img{i:02d}.png,{'Mitosis' if i % 2 == 0 else 'Normal'}\n" for i in range(8)))
    result = train(folder, folder / "labels.csv", tmp_path / "model", config_for("pooled", cv=2), cache)
    assert result.cv_metrics["auc"] == 0.5
    constant, chance, degenerate = result.warnings
    assert constant.endswith("it collapsed to a constant output")  # the same pixels, the same answer
    assert chance.startswith("2-fold cross-validation (out-of-fold) AUC 0.5 (95% CI") and "chance" in chance
    assert degenerate.startswith(f"threshold {result.model.threshold:.3g} is degenerate: all 8")
    assert degenerate.endswith("calls every one of those images Mitosis")
    assert json.loads((result.model_dir / "metrics.json").read_text())["warnings"] == result.warnings
    assert json.loads((result.model_dir / "model.json").read_text())["training"]["warnings"] == result.warnings


def test_every_report_lists_its_warnings_even_when_there_are_none(trained):
    result = trained("pooled")  # 2-fold CV
    assert json.loads((result.model_dir / "metrics.json").read_text())["warnings"] == result.warnings
    forest = trained("forest")  # no CV (no held-out predictions to judge) and no epochs
    assert forest.warnings == [] and json.loads((forest.model_dir / "model.json").read_text())["training"]["warnings"] == []


def test_head_epochs_reads_the_early_stopped_network_of_a_head():
    from types import SimpleNamespace

    dense = DenseHead()
    dense.history_ = {"best_epoch": 1, "epochs_run": 12}
    assert head_epochs(dense) == head_epochs(SimpleNamespace(dense_=dense)) == [("DenseHead (final fit)", 1, 12)]
    dense.history_ = {"best_epoch": None, "epochs_run": 40}  # too few images for a validation split
    assert head_epochs(dense) == [] and head_epochs(ForestHead()) == []


# --------------------------------------------------------------------------- configuration


def test_head_parameters_reach_an_ensembles_members():
    head = build_head("ensemble", {"max_epochs": 5, "n_estimators": 20, "dense_weight": 2.0,
                                   "forest__max_features": 0.5})
    assert isinstance(head, EnsembleHead) and head.dense_weight == 2.0
    assert isinstance(head.dense, DenseHead) and head.dense.max_epochs == 5
    assert isinstance(head.forest, ForestHead) and head.forest.n_estimators == 20
    assert head.forest.max_features == 0.5
    # random_state of both members shares its name: a plain key goes to every member that has it.
    both = build_head("ensemble", {"random_state": 3})
    assert both.dense.random_state == both.forest.random_state == 3
    assert build_head("forest", {"n_estimators": 7}).n_estimators == 7
    # A member's parameters as a JSON object (what --head-param dense='{...}' gives).
    nested = build_head("ensemble", {"dense": {"max_epochs": 2, "hidden": 8}})
    assert isinstance(nested.dense, DenseHead) and (nested.dense.max_epochs, nested.dense.hidden) == (2, 8)
    with pytest.raises(InputError, match="bogus"):
        build_head("ensemble", {"bogus": 1})
    with pytest.raises(InputError, match="bogus"):
        build_head("ensemble", {"dense__bogus": 1})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head": "nope"}, "unknown --head 'nope'"),
        ({"cv": 1}, "--cv"),
        ({"window": 4}, "window"),
        ({"overlap": 1.0}, "overlap"),
        ({"batch_size": 0}, "--batch-size"),
        ({"head": "ensemble", "head_params": {"no_such_param": 1}}, "no_such_param"),
        ({"head": "pooled", "head_params": {"max_epochs": 1}}, "max_epochs"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"weights": "/does/not/exist.safetensors"}, "exist.safetensors"),
        ({"engine": "tensorrt"}, "unknown --engine 'tensorrt': expected one of auto, torch, openvino, onnxruntime"),
        ({"engine": "openvino", "device": "cuda"}, "--engine openvino runs on the CPU only"),
    ],
)
def test_bad_configuration_fails_before_any_work(changes, message, data, tmp_path, monkeypatch):
    monkeypatch.setattr("mitoscope.pipeline.create_backbone", lambda *a, **k: pytest.fail("work started"))
    params = {"head": "pooled", "backbone": "test_efficientnet", "pretrained": False, "window": WINDOW, "cv": 0}
    with pytest.raises(InputError, match=message):
        train(data, data / "labels.csv", tmp_path / "model", TrainConfig(**{**params, **changes}))
    assert not (tmp_path / "model").exists()


def test_too_few_images_for_the_folds_is_refused(data, tmp_path, monkeypatch):
    monkeypatch.setattr("mitoscope.pipeline.create_backbone", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InputError, match="lower --cv"):
        train(data, data / "labels.csv", tmp_path / "model", config_for("pooled", cv=5))
