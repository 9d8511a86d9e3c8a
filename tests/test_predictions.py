"""``predict`` and its rows: self-consistent labels, the checks against what a model was trained
on, unreadable images with and without ``skip_bad``, and heatmap support checked up front.

Models are trained on 96x96 8-bit RGB PNGs (blob images, positives with a bright square) with
the tiny random-weight ``test_efficientnet`` backbone and 64 px windows, as in test_pipeline.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from blobs import write_blobs
from mitoscope.errors import InputError
from mitoscope.pipeline import MitoscopeModel, TrainConfig, train
from mitoscope.predictions import Predictions, predict, prediction_rows, written_probability

SIZE = 96
WINDOW = 64


def config_for(head: str, **kwargs) -> TrainConfig:
    params = {"forest": {"n_estimators": 5}, "pooled": {}}[head]
    return TrainConfig(head=head, backbone="test_efficientnet", pretrained=False, window=WINDOW, overlap=0.5, cv=0,
                       head_params=params, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict-blobs")
    write_blobs(folder, 3, size=SIZE)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from mitoscope.cache import FeatureCache

    return FeatureCache(tmp_path_factory.mktemp("predict-cache"))


@pytest.fixture(scope="module")
def pooled_model(tmp_path_factory, data, cache) -> Path:
    out = tmp_path_factory.mktemp("predict-pooled") / "model"
    train(data, data / "labels.csv", out, config_for("pooled"), cache)
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def truncated_copy(source: Path, target: Path) -> Path:
    """The first half of a PNG: its header reads, its pixels do not."""
    raw = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw[: len(raw) // 2])
    return target


# --------------------------------------------------------------------------- labels agree with their numbers


def test_a_written_probability_stays_on_its_side_of_the_threshold():
    threshold = 0.00027123456
    below = 0.00027123451
    assert float(f"{below:.6g}") >= threshold  # six significant digits alone would cross the threshold
    assert written_probability(below, threshold) == 0.0002712345 < threshold  # the fewest digits that keep its side
    assert written_probability(threshold, threshold) >= threshold
    assert written_probability(0.123456789, 0.5) == 0.123457
    assert written_probability(1.23456789e-05, 0.5) == 1.23457e-05  # significant digits, not decimals


def test_rows_hold_the_path_the_threshold_and_labels_that_agree_with_them(tmp_path):
    paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", Path("rel") / "y.tif"]
    proba = np.array([0.00110599, 0.00027123451, 0.0002712346])
    pred = Predictions(paths=paths, proba=proba, members={}, notes=["", "", "resized 10x10 to 96x96"])
    rows = prediction_rows(pred, ("Normal", "atypical"), 0.00027123456, "pooled",
                           warnings={paths[2]: "16-bit image"})
    assert [list(row) for row in rows] == [["Image", "Label", "Probability", "Threshold", "pooled", "Note"]] * 3
    assert [row["Image"] for row in rows] == [str(p) for p in paths]  # same base name, still told apart
    assert [row["Label"] for row in rows] == ["atypical", "Normal", "atypical"]
    for row in rows:
        assert row["Threshold"] == 0.00027123456
        assert (row["Probability"] >= row["Threshold"]) == (row["Label"] == "atypical")
    assert rows[2]["Note"] == "resized 10x10 to 96x96; warning: 16-bit image"


# --------------------------------------------------------------------------- what the model was trained on


def test_training_records_the_bit_depths_and_channel_counts_of_its_images(pooled_model):
    config = json.loads((pooled_model / "model.json").read_text())
    assert config["source_images"] == {"bit_depths": [8], "channel_counts": [3], "n_images": 6}
    assert config["read"]["channels"] is None


def test_a_16_bit_tiff_of_an_8_bit_trained_model_is_predicted_with_a_warning(pooled_model, data, cache, tmp_path):
    png = data / "images" / "img00.png"
    pixels = np.asarray(Image.open(png)).astype(np.uint16) * 257
    tiff = tmp_path / "img00_16bit.tif"
    tifffile.imwrite(tiff, np.moveaxis(pixels, -1, 0), photometric="minisblack")  # 3-channel uint16, channels first
    warned: list[str] = []
    rows = predict(pooled_model, [png, tiff], tmp_path / "p.csv", cache, warn=warned.append)
    assert rows[0]["Note"] == ""
    assert rows[1]["Note"].startswith("warning: 16-bit image, the model was trained on 8-bit images")
    assert read_rows(tmp_path / "p.csv")[1]["Note"] == rows[1]["Note"]
    assert warned == [f"{tiff}: {rows[1]['Note'].removeprefix('warning: ')}"]


def test_an_image_of_other_channels_is_refused_unless_channels_are_chosen(pooled_model, data, cache, tmp_path):
    grey = tmp_path / "grey.png"
    Image.open(data / "images" / "img00.png").convert("L").save(grey)
    out = tmp_path / "p.csv"
    with pytest.raises(InputError, match=r"grey\.png: image has 1 channel\(s\), the model was trained on images of 3 "
                                         r"channel\(s\).*--channels"):
        predict(pooled_model, [data / "images" / "img01.png", grey], out, cache)
    assert not out.exists()
    rows = predict(pooled_model, [grey], out, cache, channels=(0, 0, 0))
    assert rows[0]["Label"] in ("Mitosis", "Normal") and rows[0]["Note"] == ""
    # R = G = B from the one channel is exactly what the default grey rule reads.
    model = MitoscopeModel.load(pooled_model)
    model.choose_channels((0, 0, 0))
    expected = model.predict_paths([grey], cache=cache).proba[0]
    assert float(rows[0]["Probability"]) == pytest.approx(expected, rel=1e-5)


def test_a_model_saved_without_the_record_predicts_as_before(pooled_model, data, cache, tmp_path):
    old = tmp_path / "old-model"
    shutil.copytree(pooled_model, old)
    config = json.loads((old / "model.json").read_text())
    del config["source_images"]
    (old / "model.json").write_text(json.dumps(config))
    grey = tmp_path / "grey.png"
    Image.open(data / "images" / "img00.png").convert("L").save(grey)
    warned: list[str] = []
    rows = predict(old, [grey], tmp_path / "p.csv", cache, warn=warned.append)
    assert rows[0]["Label"] in ("Mitosis", "Normal") and rows[0]["Note"] == "" and warned == []


# --------------------------------------------------------------------------- batches


def test_images_of_the_same_name_in_two_folders_get_their_own_rows(pooled_model, data, cache, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    shutil.copy(data / "images" / "img00.png", tmp_path / "a" / "scene.png")
    shutil.copy(data / "images" / "img01.png", tmp_path / "b" / "scene.png")
    rows = predict(pooled_model, [tmp_path / "a", tmp_path / "b" / "scene.png"], tmp_path / "p.csv", cache)
    assert [row["Image"] for row in rows] == [str(tmp_path / "a" / "scene.png"), str(tmp_path / "b" / "scene.png")]
    assert rows[0]["Probability"] != rows[1]["Probability"]


@pytest.mark.parametrize("serve", [True, False])
def test_skip_bad_goes_past_a_truncated_image_and_lists_it(serve, pooled_model, data, cache, tmp_path):
    images = sorted((data / "images").glob("*.png"))
    bad = truncated_copy(images[0], tmp_path / "in" / "broken.png")
    inputs = [images[1], bad, images[2]]
    out = tmp_path / "p.csv"
    with pytest.raises(InputError, match=r"broken\.png: cannot decode image, the file is truncated"):
        predict(pooled_model, inputs, out, None, serve=serve)
    assert not out.exists()

    warned: list[str] = []
    rows = predict(pooled_model, inputs, out, None, serve=serve, skip_bad=True, warn=warned.append)
    written = read_rows(out)
    assert [row["Image"] for row in written] == [str(p) for p in inputs]  # the order given
    assert written[1]["Label"] == written[1]["Probability"] == written[1]["Threshold"] == written[1]["pooled"] == ""
    assert written[1]["Note"].startswith(f"not predicted: {bad}: cannot decode image")
    assert all(row["Label"] in ("Mitosis", "Normal") for row in (written[0], written[2]))
    assert warned == [f"skipped {written[1]['Note'].removeprefix('not predicted: ')}"]
    # The good images' answers are those of a run without the bad one.
    alone = predict(pooled_model, [images[1], images[2]], tmp_path / "alone.csv", cache)
    assert [rows[0]["Probability"], rows[2]["Probability"]] == [row["Probability"] for row in alone]


def test_skip_bad_also_skips_what_the_header_check_refuses(pooled_model, data, cache, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    grey = tmp_path / "grey.png"
    Image.open(data / "images" / "img00.png").convert("L").save(grey)
    rows = predict(pooled_model, [empty, data / "images" / "img00.png", grey], tmp_path / "p.csv", cache, skip_bad=True)
    assert [row["Label"] == "" for row in rows] == [True, False, True]
    assert "file is empty" in rows[0]["Note"] and "1 channel(s)" in rows[2]["Note"]

    with pytest.raises(InputError, match=r"none of the 2 images could be predicted; the first: .*empty\.png"):
        predict(pooled_model, [empty, grey], tmp_path / "none.csv", cache, skip_bad=True)
    assert not (tmp_path / "none.csv").exists()


def test_an_image_its_header_refuses_is_said_before_the_model_loads(pooled_model, data, tmp_path, monkeypatch):
    import mitoscope.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(mitoscope.models, "load_model", no_loading)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    grey = tmp_path / "grey.png"
    Image.open(data / "images" / "img00.png").convert("L").save(grey)
    for bad, words in ((empty, "file is empty"), (grey, "1 channel(s)"), (tmp_path / "ghost.png", "ghost.png")):
        with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            predict(pooled_model, [data / "images" / "img00.png", bad], tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_heatmaps_of_a_head_without_window_scores_fail_before_any_extraction(data, cache, tmp_path, monkeypatch):
    model_dir = train(data, data / "labels.csv", tmp_path / "forest", config_for("forest"), cache).model_dir

    def no_work(*args, **kwargs):
        pytest.fail("features were extracted")

    monkeypatch.setattr("mitoscope.window_model.extract_dataset", no_work)
    monkeypatch.setattr("mitoscope.inference.extract_dataset", no_work)
    out = tmp_path / "p.csv"
    with pytest.raises(InputError, match=r"forest head\) gives no window scores.*attention, pooled"):
        predict(model_dir, [data / "images"], out, cache, heatmaps_dir=tmp_path / "maps")
    assert not out.exists() and not (tmp_path / "maps").exists()


def test_heatmap_files_that_would_collide_are_refused_before_any_extraction(pooled_model, data, cache, tmp_path,
                                                                            monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(data / "images" / "img00.png", tmp_path / name / "scene.png")
    monkeypatch.setattr("mitoscope.window_model.extract_dataset", lambda *a, **k: pytest.fail("features were extracted"))
    with pytest.raises(InputError, match=r"scene\.png: has the same name stem as"):
        predict(pooled_model, [tmp_path / "a", tmp_path / "b"], tmp_path / "p.csv", cache, heatmaps_dir=tmp_path / "m")


# --------------------------------------------------------------------------- the served path


def test_the_served_model_skips_a_bad_image_too(tmp_path, monkeypatch):
    """Served (no PyTorch at prediction) on the tiny backbone's own input size."""
    pytest.importorskip("openvino")
    from mitoscope.inference import ServedModel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    write_blobs(data, 2, size=160, blob=24)
    config = TrainConfig(head="pooled", backbone="test_efficientnet", pretrained=False, window=160, cv=0, device="cpu")
    model_dir = train(data, data / "labels.csv", tmp_path / "model", config).model_dir
    served = ServedModel.load(model_dir)
    images = sorted((data / "images").glob("*.png"))
    bad = truncated_copy(images[0], tmp_path / "broken.png")
    pred = served.predict_paths([images[1], bad, images[2]], skip_bad=True)
    assert pred.paths == [images[1], images[2]] and pred.proba.shape == (2,)
    assert list(pred.skipped) == [bad] and "cannot decode image" in pred.skipped[bad]
    with pytest.raises(InputError, match="broken.png"):
        served.predict_paths([images[1], bad])
