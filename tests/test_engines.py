"""The backbone engines: ONNX Runtime must give PyTorch's features, export once, and fail clearly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from mitoscope import engines  # noqa: E402
from mitoscope.engines import OnnxRunner, TorchRunner, make_runner, resolve_engine  # noqa: E402
from mitoscope.errors import InputError  # noqa: E402
from mitoscope.features import FeatureExtractor  # noqa: E402


def scene(seed: int = 0, size: tuple[int, int] = (150, 230)) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["windows", "fullconv"])
def test_onnxruntime_gives_the_features_of_pytorch(tiny_backbone, tmp_path, mode):
    image = scene()
    expected = FeatureExtractor(tiny_backbone, 64, 0.5, 8, "cpu", mode=mode, engine="torch").extract(image)
    fast = FeatureExtractor(tiny_backbone, 64, 0.5, 8, "cpu", mode=mode, engine="onnxruntime")
    got = fast.extract(image)
    assert fast.engine == "onnxruntime" and isinstance(fast.runner, OnnxRunner)
    assert got.features.shape == expected.features.shape == (expected.boxes.shape[0], tiny_backbone.num_features)
    np.testing.assert_array_equal(got.boxes, expected.boxes)
    scale = np.abs(expected.features).max()
    assert np.abs(got.features - expected.features).max() <= 1e-4 * scale
    assert not np.allclose(got.features[0], got.features[-1])  # real, different features per window


def test_auto_picks_onnxruntime_on_the_cpu_and_pytorch_elsewhere():
    assert resolve_engine("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(InputError, match="CPU only.*use engine torch"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown engine 'tensorrt': expected one of auto, torch, onnxruntime"):
        resolve_engine("tensorrt", torch.device("cpu"))


def test_the_export_is_made_once_per_weights_and_reused(tiny_backbone, tmp_path, monkeypatch):
    first = make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and tiny_backbone.weights_id[:16] in files[0].name
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".onnx"]  # no temporary files left behind

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again although the export of these weights exists")

    monkeypatch.setattr(torch.onnx, "export", no_second_export)
    again = make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(first.pooled(x), again.pooled(x))


def test_a_failed_export_falls_back_to_pytorch_under_auto_and_is_an_error_when_asked(tiny_backbone, tmp_path,
                                                                                     monkeypatch, caplog):
    def broken_export(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'weird_op' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with caplog.at_level(logging.WARNING, logger="mitoscope.engines"):
        runner = make_runner(tiny_backbone, torch.device("cpu"), "auto", tmp_path)
    assert isinstance(runner, TorchRunner)
    assert "weird_op" in caplog.text and "using PyTorch" in caplog.text
    with pytest.raises(InputError, match="engine onnxruntime cannot run test_efficientnet: .*weird_op"):
        make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    assert not list(tmp_path.iterdir())  # the failed export left nothing behind


def test_an_export_that_disagrees_with_pytorch_is_refused(tiny_backbone, tmp_path, monkeypatch):
    real = OnnxRunner.feature_map
    monkeypatch.setattr(OnnxRunner, "feature_map", lambda self, images: real(self, images) + 0.5)
    with pytest.raises(InputError, match="differs from PyTorch's on a probe image"):
        make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    assert isinstance(make_runner(tiny_backbone, torch.device("cpu"), "auto", tmp_path), TorchRunner)


def test_the_default_onnx_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert engines.default_onnx_dir() == tmp_path / "mitoscope" / "onnx"
