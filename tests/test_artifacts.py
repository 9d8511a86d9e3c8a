"""Saved models: atomic folders, verified hashes, and clear errors for every kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitoscope.artifacts import (
    FORMAT_VERSION,
    MODEL_FILE,
    check_out_dir,
    read_model_config,
    sha256_file,
    write_model_dir,
)
from mitoscope.errors import InputError, ModelError
from mitoscope.features import FeatureCache
from mitoscope.pipeline import MitoscopeModel, TrainConfig, load_model, train

WINDOW = 64


def make_dataset(folder: Path, n_per_class: int = 3) -> Path:
    """64x96 PNGs (two windows each); Mitosis images hold a bright square."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(2 * n_per_class):
        image = rng.integers(0, 60, (64, 96, 3), dtype=np.uint8)
        if i % 2 == 0:
            image[20:36, 30:46] = 250
        Image.fromarray(image).save(folder / "images" / f"img{i}.png")
        rows.append(f"img{i}.png,{'Mitosis' if i % 2 == 0 else 'Normal'}")
    (folder / "labels.csv").write_text("Image,Label\n" + "\n".join(rows) + "\n")
    return folder / "labels.csv"


def tiny_config(head: str = "pooled", **params) -> TrainConfig:
    return TrainConfig(head=head, backbone="test_efficientnet", pretrained=False, window=WINDOW, cv=0,
                       device="cpu", head_params=params)


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary model folders (``.name.xxxx``) or backups next to the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifacts-data")
    make_dataset(folder)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FeatureCache:
    return FeatureCache(tmp_path_factory.mktemp("artifacts-cache"))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, data, cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts-models")
    return {
        "pooled": train(data, data / "labels.csv", root / "pooled", tiny_config("pooled"), cache).model_dir,
        "ensemble": train(data, data / "labels.csv", root / "ensemble",
                          tiny_config("ensemble", max_epochs=3, n_estimators=10), cache).model_dir,
    }


@pytest.fixture()
def model_copy(saved_models, tmp_path):
    """A private copy of a saved model, free to damage."""

    def copy(head: str) -> Path:
        target = tmp_path / f"copy-{head}"
        shutil.copytree(saved_models[head], target)
        return target

    return copy


def edit_json(model_dir: Path, change) -> None:
    path = model_dir / MODEL_FILE
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------- write_model_dir


def payload(names: dict[str, bytes]):
    def write(tmp: Path) -> list[str]:
        for name, content in names.items():
            (tmp / name).write_bytes(content)
        return list(names)

    return write


def test_write_model_dir_lists_every_file_with_its_hash(tmp_path):
    out = write_model_dir(tmp_path / "m", {"kind": "test", "threshold": 0.4}, payload({"a.bin": b"abc", "b.bin": b"xyz"}))
    config = json.loads((out / MODEL_FILE).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["threshold"] == 0.4
    assert config["files"] == {"a.bin": sha256_file(out / "a.bin"), "b.bin": sha256_file(out / "b.bin")}
    assert config["versions"]["mitoscope"]
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_folder_and_no_temp_folder(tmp_path):
    def write(tmp: Path) -> list[str]:
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_model_dir(tmp_path / "m", {"kind": "test"}, write)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_previous_model(tmp_path):
    out = write_model_dir(tmp_path / "m", {"kind": "old"}, payload({"a.bin": b"old"}))

    def write(tmp: Path) -> list[str]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model_dir(out, {"kind": "new"}, write, overwrite=True)
    assert json.loads((out / MODEL_FILE).read_text())["kind"] == "old"
    assert (out / "a.bin").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_an_existing_folder_is_replaced_only_when_asked(tmp_path):
    out = write_model_dir(tmp_path / "m", {"kind": "old"}, payload({"a.bin": b"old"}))
    with pytest.raises(InputError, match=r"m: output folder exists and is not empty.*--overwrite"):
        write_model_dir(out, {"kind": "new"}, payload({"b.bin": b"new"}))
    assert (out / "a.bin").read_bytes() == b"old"
    write_model_dir(out, {"kind": "new"}, payload({"b.bin": b"new"}), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.bin", MODEL_FILE]
    assert json.loads((out / MODEL_FILE).read_text())["kind"] == "new"
    assert leftovers(tmp_path) == []
    # An empty folder is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    write_model_dir(tmp_path / "empty", {"kind": "x"}, payload({"a.bin": b"1"}))


def test_overwrite_never_wipes_a_folder_that_is_not_a_model(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    with pytest.raises(InputError, match=r"thesis: .*holds no model.json"):
        check_out_dir(precious, overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "months of work"


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(InputError, match="model: output exists and is a file"):
        check_out_dir(tmp_path / "model")


# --------------------------------------------------------------------------- train's output folder


def test_train_refuses_a_non_empty_out_before_any_work(tmp_path, data, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setattr("mitoscope.pipeline.create_backbone", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InputError, match="not empty"):
        train(data, data / "labels.csv", out, tiny_config())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_train_overwrites_a_previous_model_when_asked(tmp_path, data, cache, saved_models):
    out = tmp_path / "model"
    shutil.copytree(saved_models["pooled"], out)
    with pytest.raises(InputError, match="--overwrite"):
        train(data, data / "labels.csv", out, tiny_config(), cache)
    train(data, data / "labels.csv", out, tiny_config(C=0.5), cache, overwrite=True)
    assert json.loads((out / MODEL_FILE).read_text())["head"]["params"] == {"C": 0.5}
    assert leftovers(tmp_path) == []


def test_a_failed_train_leaves_no_model_folder_and_no_temp_folder(tmp_path, data, cache, monkeypatch):
    import mitoscope.window_model

    real_save_head = mitoscope.window_model.save_head

    def save_then_fail(head, directory, name):
        real_save_head(head, directory, name)  # files are on disk when the failure comes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mitoscope.window_model.save_head", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        train(data, data / "labels.csv", tmp_path / "out" / "model", tiny_config(), cache)
    assert not (tmp_path / "out" / "model").exists()
    assert leftovers(tmp_path / "out") == []


def test_a_bad_image_stops_train_before_anything_is_written(tmp_path, data, cache):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "images" / "img3.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"img3.png: file is empty"):
        train(bad, bad / "labels.csv", tmp_path / "model", tiny_config(), cache)
    assert not (tmp_path / "model").exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- damaged models


@pytest.mark.parametrize(
    "head, file",
    [("pooled", "head.skops"), ("ensemble", "head.dense.safetensors"), ("ensemble", "head.forest.skops"),
     ("pooled", "backbone.safetensors")],
)
def test_a_flipped_byte_is_a_model_error_naming_the_file(model_copy, head, file):
    model_dir = model_copy(head)
    target = model_dir / file
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=rf"{file}: file was changed or truncated .*sha256"):
        MitoscopeModel.load(model_dir)


@pytest.mark.parametrize("head, file", [("pooled", "head.skops"), ("ensemble", "head.dense.safetensors")])
def test_a_truncated_head_file_is_a_model_error(model_copy, head, file):
    model_dir = model_copy(head)
    target = model_dir / file
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ModelError, match=rf"{file}: file was changed or truncated"):
        load_model(model_dir)


def test_a_missing_head_file_is_a_model_error(model_copy):
    model_dir = model_copy("ensemble")
    (model_dir / "head.forest.skops").unlink()
    with pytest.raises(ModelError, match=r"head.forest.skops: file of the model is missing"):
        load_model(model_dir)


def test_a_missing_model_json_is_a_model_error(model_copy):
    model_dir = model_copy("pooled")
    (model_dir / MODEL_FILE).unlink()
    with pytest.raises(ModelError, match=r"copy-pooled: not a mitoscope model: model.json is missing"):
        load_model(model_dir)


def test_a_model_folder_that_does_not_exist_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere: not a model folder"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ['{"format_version": 1, "kind": ', "\x00\x01binary", ""])
def test_invalid_json_is_a_model_error(model_copy, text):
    model_dir = model_copy("pooled")
    (model_dir / MODEL_FILE).write_text(text)
    with pytest.raises(ModelError, match=r"model.json: not valid JSON"):
        load_model(model_dir)


def test_a_future_format_is_a_model_error(model_copy):
    model_dir = model_copy("pooled")
    edit_json(model_dir, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelError, match=rf"model format {FORMAT_VERSION + 1} is not supported.*expected {FORMAT_VERSION}"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("threshold"), "key 'threshold' is missing"),
        (lambda c: c.pop("format_version"), "no format_version"),
        (lambda c: c.update(files=["head.skops"]), "'files' must map"),
        (lambda c: c["files"].update({"../escape.bin": "0" * 64}), "'files' must map"),
        (lambda c: c.update(kind="mystery"), "kind 'mystery'"),
        (lambda c: c["head"].pop("spec"), "cannot load the head"),
    ],
)
def test_an_incomplete_description_is_a_model_error(model_copy, change, message):
    model_dir = model_copy("pooled")
    edit_json(model_dir, change)
    with pytest.raises(ModelError, match=message):
        MitoscopeModel.load(model_dir)


def test_backbone_weights_other_than_the_trained_ones_are_a_model_error(model_copy, data):
    model_dir = model_copy("pooled")
    edit_json(model_dir, lambda c: c["backbone"].update(weights_sha256="0" * 64))
    model = MitoscopeModel.load(model_dir)  # the head is fine; the backbone is checked when it is needed
    with pytest.raises(ModelError, match=r"model.json: backbone test_efficientnet weights here .* differ"):
        model.predict([data / "images" / "img0.png"])


def test_an_intact_copy_loads_and_predicts(model_copy, data):
    model_dir = model_copy("ensemble")
    config = read_model_config(model_dir)
    assert config["head"]["name"] == "ensemble"
    rows = load_model(model_dir).predict([data / "images" / "img0.png"])
    assert rows[0]["Label"] in {"Mitosis", "Normal"}
