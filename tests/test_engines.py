"""The backbone engines: OpenVINO and ONNX Runtime must give PyTorch's features, export once, and fail clearly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from mitoscope import engines  # noqa: E402
from mitoscope.engines import OnnxRunner, OpenVinoRunner, TorchRunner, make_runner, resolve_engine  # noqa: E402
from mitoscope.errors import InputError  # noqa: E402
from mitoscope.features import FeatureExtractor  # noqa: E402


def scene(seed: int = 0, size: tuple[int, int] = (150, 230)) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


RUNNERS = {"onnxruntime": OnnxRunner, "openvino": OpenVinoRunner}


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("mode", ["windows", "fullconv"])
@pytest.mark.parametrize("window", [64, 160])
def test_exported_engines_give_the_features_of_pytorch(tiny_backbone, mode, engine, window):
    """64 px windows are resized to the backbone's 160 px in PyTorch before the engine runs;
    160 px windows go through the numpy path (mitoscope.array_features) end to end."""
    image = scene(size=(150, 230) if window == 64 else (250, 410))
    expected = FeatureExtractor(tiny_backbone, window, 0.5, 8, "cpu", mode=mode, engine="torch").extract(image)
    fast = FeatureExtractor(tiny_backbone, window, 0.5, 8, "cpu", mode=mode, engine=engine)
    assert (fast._array_extractor() is not None) == (window == tiny_backbone.input_size)
    got = fast.extract(image)
    assert fast.engine == engine and isinstance(fast.runner, RUNNERS[engine])
    assert got.features.shape == expected.features.shape == (expected.boxes.shape[0], tiny_backbone.num_features)
    np.testing.assert_array_equal(got.boxes, expected.boxes)
    scale = np.abs(expected.features).max()
    assert np.abs(got.features - expected.features).max() <= 1e-4 * scale
    assert not np.allclose(got.features[0], got.features[-1])  # real, different features per window


def test_auto_picks_openvino_on_the_cpu_then_onnxruntime_and_pytorch_elsewhere(monkeypatch):
    assert resolve_engine("auto", torch.device("cpu")) == "openvino"
    assert resolve_engine("auto", "cpu") == "openvino"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(InputError, match="engine onnxruntime runs on the CPU only.*use engine torch"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown engine 'tensorrt': expected one of auto, torch, openvino, onnxruntime"):
        resolve_engine("tensorrt", torch.device("cpu"))
    real_find_spec = engines.find_spec
    monkeypatch.setattr(engines, "find_spec", lambda name: None if name == "openvino" else real_find_spec(name))
    assert resolve_engine("auto", "cpu") == "onnxruntime"


def test_openvino_pads_a_short_last_batch_instead_of_compiling_another_shape(tiny_backbone, tmp_path):
    path = engines.export_onnx(tiny_backbone, tmp_path)
    runner = OpenVinoRunner(path, batch=4, cache_dir=tmp_path / "compiled")
    reference = OnnxRunner(path)
    images = np.random.default_rng(1).standard_normal((7, 3, 64, 64)).astype(np.float32)
    got = runner.pooled(images)
    assert got.shape == (7, tiny_backbone.num_features)
    assert list(runner._compiled) == [(4, 3, 64, 64)]  # 4 + 3 padded to 4: one compiled shape
    np.testing.assert_allclose(got, reference.pooled(images), rtol=1e-4, atol=1e-4 * np.abs(got).max())
    assert runner.pooled(images[:2]).shape == (2, tiny_backbone.num_features)  # alone: its own, smaller shape


def test_the_export_is_made_once_per_weights_and_reused(tiny_backbone, tmp_path, monkeypatch):
    first = make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and tiny_backbone.weights_id[:16] in files[0].name
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".onnx"]  # no temporary files left behind

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again although the export of these weights exists")

    monkeypatch.setattr(torch.onnx, "export", no_second_export)
    again = make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(first.pooled(x), again.pooled(x))


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


def test_openvino_keeps_only_the_most_recent_compiled_shapes_on_disk(tiny_backbone, tmp_path):
    path = engines.export_onnx(tiny_backbone, tmp_path)
    runner = OpenVinoRunner(path, cache_dir=tmp_path / "compiled", keep_on_disk=2)
    for width in (64, 96, 128):
        runner.feature_map(np.zeros((1, 3, 64, width), np.float32))
    assert len(list((tmp_path / "compiled").glob("*.blob"))) == 2
