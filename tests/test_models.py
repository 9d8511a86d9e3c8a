"""Saved models through one door: the CSV rows of small models pinned (a window-head model served,
unserved and with an image off its grid; a tiny fine-tuned network), and ``model.json`` parsed and
every model file hashed once per ``predict``.

The pinned rows were recorded on the code before ``mitoscope.models`` existed; the refactor keeps them.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from blobs import write_blobs
from mitoscope.pipeline import TrainConfig, train
from mitoscope.predictions import predict

SIZE = 160  # the tiny backbone's own input size: one window per image, servable

# Image (base name), Label, Probability, Threshold, the head's column, Note
PINNED = {
    'pooled-served': [
        ["Image", "Label", "Probability", "Threshold", "pooled", "Note"],
        ["img00.png", "Mitosis", "0.994987", "0.5", "0.994987", ""],
        ["img01.png", "Normal", "0.00569581", "0.5", "0.00569581", ""],
        ["img02.png", "Mitosis", "0.992864", "0.5", "0.992864", ""],
        ["img03.png", "Normal", "0.00748884", "0.5", "0.00748884", ""],
        ["img04.png", "Mitosis", "0.993579", "0.5", "0.993579", ""],
        ["img05.png", "Normal", "0.00542017", "0.5", "0.00542017", ""],
    ],
    'pooled-unserved': [
        ["Image", "Label", "Probability", "Threshold", "pooled", "Note"],
        ["img00.png", "Mitosis", "0.994987", "0.5", "0.994987", ""],
        ["img01.png", "Normal", "0.00569581", "0.5", "0.00569581", ""],
        ["img02.png", "Mitosis", "0.992864", "0.5", "0.992864", ""],
        ["img03.png", "Normal", "0.00748884", "0.5", "0.00748884", ""],
        ["img04.png", "Mitosis", "0.993579", "0.5", "0.993579", ""],
        ["img05.png", "Normal", "0.00542017", "0.5", "0.00542017", ""],
    ],
    'forest-off-grid': [
        ["Image", "Label", "Probability", "Threshold", "forest", "Note"],
        ["img00.png", "Mitosis", "1.0", "0.5", "1.0", ""],
        ["img01.png", "Normal", "0.0", "0.5", "0.0", ""],
        ["big.png", "Mitosis", "1.0", "0.5", "1.0", "resized 200x200 to the training size 160x160"],
    ],
    'finetuned': [
        ["Image", "Label", "Probability", "Threshold", "finetuned", "Note"],
        ["scene_003_0000.png", "Mitosis", "0.838263", "0.5", "0.838263", ""],
        ["scene_003_0001.png", "Mitosis", "0.838263", "0.5", "0.838263", ""],
        ["scene_003_0002.png", "Mitosis", "0.838263", "0.5", "0.838263", ""],
        ["scene_003_0003.png", "Mitosis", "0.838263", "0.5", "0.838263", ""],
    ],
}


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return [rows[0]] + [[Path(row[0]).name] + row[1:] for row in rows[1:]]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("models-blobs")
    write_blobs(folder, 3, size=SIZE, blob=24)
    paths = sorted((folder / "images").glob("*.png"))
    big = folder / "big.png"
    Image.open(paths[0]).resize((200, 200)).save(big)  # off the forest's fixed 160x160 grid
    return folder, paths + [big]


def trained(tmp_path_factory, images, head: str, params: dict) -> Path:
    folder, _ = images
    config = TrainConfig(head=head, backbone="test_efficientnet", pretrained=False, window=SIZE, overlap=0.5,
                         cv=0, head_params=params, device="cpu", seed=0)
    return train(folder, folder / "labels.csv", tmp_path_factory.mktemp(f"models-{head}") / "model", config).model_dir


@pytest.fixture(scope="module")
def pooled_model(tmp_path_factory, images) -> Path:
    return trained(tmp_path_factory, images, "pooled", {})


@pytest.fixture(scope="module")
def forest_model(tmp_path_factory, images) -> Path:
    """A fixed-grid head: an image of another size is resized to the training size, in PyTorch."""
    return trained(tmp_path_factory, images, "forest", {"n_estimators": 5})


@pytest.fixture(scope="module")
def finetuned_model(tmp_path_factory) -> tuple[Path, list[Path]]:
    pytest.importorskip("lightning")
    import torch

    from mitoscope.finetune import FineTuneConfig, finetune
    from mitoscope.synthetic import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("models-ft") / "set"
    labels = make_synthetic_dataset(folder, n_images=8, size=(64, 64), cells=(3, 5), mitoses=(1, 1),
                                    cell_radius=(5, 7), seed=3)
    config = FineTuneConfig(backbone="test_efficientnet", pretrained=False, size=64, epochs_head=1, epochs_full=1,
                            batch_size=4, accelerator="cpu", seed=0, pool="attention")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = finetune(folder, labels, tmp_path_factory.mktemp("models-ft-model") / "model", config).model
    finally:
        torch.set_num_threads(threads)
    # Training is not bit-reproducible across runs: pinned weights and threshold instead of the trained ones.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in sorted(trained.network.state_dict().items()):
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(values + 0.5 if "running_var" in name else (values - 0.5) * 0.4)
    trained.config["threshold"] = 0.5
    out = trained.save(tmp_path_factory.mktemp("models-ft-pinned") / "model")
    from mitoscope.io import load_labelled_images

    return out, load_labelled_images(folder, labels).paths


def check_pinned(name: str, rows: list[list[str]]) -> None:
    if os.environ.get("MITOSCOPE_RECORD_PINS"):
        print(f"PIN {name} = {json.dumps(rows)}")
    assert rows == PINNED[name]


@pytest.mark.parametrize("serve", [True, False], ids=["served", "unserved"])
def test_a_window_head_model_writes_the_pinned_rows(pooled_model, images, tmp_path, serve):
    pytest.importorskip("openvino")
    _, paths = images
    predict(pooled_model, paths[:-1], tmp_path / "p.csv", serve=serve)
    check_pinned(f"pooled-{'served' if serve else 'unserved'}", csv_rows(tmp_path / "p.csv"))


def test_an_image_off_the_fixed_grid_is_resized_in_pytorch_as_pinned(forest_model, images, tmp_path):
    pytest.importorskip("openvino")
    _, paths = images
    predict(forest_model, paths[:2] + paths[-1:], tmp_path / "p.csv")
    check_pinned("forest-off-grid", csv_rows(tmp_path / "p.csv"))


def test_a_fine_tuned_model_writes_the_pinned_rows(finetuned_model, tmp_path):
    model_dir, paths = finetuned_model
    predict(model_dir, paths[:4], tmp_path / "p.csv")
    check_pinned("finetuned", csv_rows(tmp_path / "p.csv"))


# --------------------------------------------------------------------------- model.json read once, files hashed once


@pytest.fixture
def counted(monkeypatch):
    """Counts of model.json parses (``json.loads`` in mitoscope.artifacts) and of hashes by file name."""
    import types
    from collections import Counter

    import mitoscope.artifacts as artifacts

    counts: dict[str, Counter] = {"parsed": Counter(), "hashed": Counter()}
    real_hash, real_json = artifacts.sha256_file, artifacts.json

    def hashing(path, *args, **kwargs):
        counts["hashed"][Path(path).name] += 1
        return real_hash(path, *args, **kwargs)

    def loads(text, *args, **kwargs):
        counts["parsed"]["model.json"] += 1
        return real_json.loads(text, *args, **kwargs)

    monkeypatch.setattr(artifacts, "sha256_file", hashing)
    monkeypatch.setattr(artifacts, "json", types.SimpleNamespace(**{**vars(real_json), "loads": loads}))
    return counts


@pytest.mark.parametrize("case", ["served", "off-grid fallback", "unserved", "fine-tuned fallback"])
def test_one_predict_reads_model_json_once_and_hashes_each_file_once(case, request, images, counted, tmp_path,
                                                                     caplog):
    _, paths = images
    if case != "fine-tuned fallback":
        pytest.importorskip("openvino")
    model_dir, inputs, serve = {
        "served": lambda: (request.getfixturevalue("pooled_model"), paths[:2], True),
        "off-grid fallback": lambda: (request.getfixturevalue("forest_model"), paths[:1] + paths[-1:], True),
        "unserved": lambda: (request.getfixturevalue("pooled_model"), paths[:2], False),
        "fine-tuned fallback": lambda: (request.getfixturevalue("finetuned_model")[0],
                                        request.getfixturevalue("finetuned_model")[1][:2], True),
    }[case]()
    files = json.loads((model_dir / "model.json").read_text())["files"]
    counted["parsed"].clear()
    counted["hashed"].clear()
    with caplog.at_level("INFO", logger="mitoscope.predictions"):
        predict(model_dir, inputs, tmp_path / "p.csv", serve=serve)
    assert counted["parsed"]["model.json"] == 1
    assert dict(counted["hashed"]) == {name: 1 for name in files}
    assert ("full pipeline" in caplog.text) == (case.endswith("fallback"))


def test_the_predict_command_reads_model_json_once_too(pooled_model, images, counted, tmp_path):
    """The CLI reads the card first (to fail fast, before heavy imports) and hands it on."""
    pytest.importorskip("openvino")
    from typer.testing import CliRunner

    from mitoscope.cli import app

    _, paths = images
    files = json.loads((pooled_model / "model.json").read_text())["files"]
    counted["parsed"].clear()
    counted["hashed"].clear()
    result = CliRunner().invoke(app, ["predict", str(pooled_model), *map(str, paths[:2]), "--out",
                                      str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert counted["parsed"]["model.json"] == 1
    assert dict(counted["hashed"]) == {name: 1 for name in files}
