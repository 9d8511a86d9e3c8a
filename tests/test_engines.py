"""The backbone engines: OpenVINO and ONNX Runtime must give PyTorch's features, export once, and fail clearly."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from mitoscope import engines  # noqa: E402
from mitoscope.engines import (NeedsPyTorch, OnnxRunner, OpenVinoRunner, TorchRunner, make_runner,  # noqa: E402
                               resolve_engine, served_engine)
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
    with pytest.raises(InputError, match="unknown engine 'tensorrt': expected one of auto, torch, openvino, "
                                         "onnxruntime, openvino-bf16"):
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


def test_openvino_throughput_mode_gives_the_same_numbers_as_one_batch_at_a_time(tiny_backbone, tmp_path):
    """Many small inputs (cell crops) run as several batches at once, in f32, in order."""
    import openvino.properties.hint as hints

    path = engines.export_onnx(tiny_backbone, tmp_path)
    one_at_a_time = OpenVinoRunner(path, batch=4, cache_dir=tmp_path / "compiled")
    at_once = engines.open_exported(path, "openvino", throughput=True)
    images = np.random.default_rng(2).standard_normal((23, 3, 64, 64)).astype(np.float32)
    for count in (23, 8, 3, 1):  # a padded last batch, whole batches, fewer than one batch
        expected = one_at_a_time.pooled(images[:count])
        got = at_once.pooled(images[:count])
        assert got.shape == expected.shape == (count, tiny_backbone.num_features)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(got[0], at_once.pooled(images[1:2])[0])  # each input its own row
    compiled = at_once._request((8, 3, 64, 64))[0].get_compiled_model()
    assert str(compiled.get_property(hints.performance_mode)).split(".")[-1] == "THROUGHPUT"
    assert compiled.get_property(hints.inference_precision).get_type_name() == "f32"


def test_the_export_is_made_once_per_weights_and_reused(tiny_backbone, tmp_path, monkeypatch):
    first = make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and tiny_backbone.weights_id[:16] in files[0].name
    # beside it the verdict of each engine auto may use, and no temporary files
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".onnx") == sorted(
        f"{files[0].stem}.{runtime}-{version(runtime)}-f32.json" for runtime in ("onnxruntime", "openvino"))

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


def test_an_engine_that_disagrees_with_pytorch_is_refused_and_stays_refused(tiny_backbone, tmp_path, monkeypatch):
    real = OnnxRunner.feature_map
    monkeypatch.setattr(OnnxRunner, "feature_map", lambda self, images: real(self, images) + 0.5)
    with pytest.raises(InputError, match=r"engine onnxruntime cannot run test_efficientnet: its features differ from "
                                         r"PyTorch's on a probe image: relative error [\d.e+-]+, expected at most 0\.001"):
        make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)
    monkeypatch.undo()  # the verdict is remembered: still refused without a new check
    with pytest.raises(InputError, match="engine onnxruntime cannot run .*delete it to check again"):
        make_runner(tiny_backbone, torch.device("cpu"), "onnxruntime", tmp_path)


def test_an_engine_failing_its_check_does_not_disable_the_other(tiny_backbone, tmp_path, monkeypatch, caplog):
    checked = []
    real = engines._probe_error

    def openvino_fails(runner, backbone):
        checked.append(runner.name)
        return 0.5 if runner.name == "openvino" else real(runner, backbone)

    monkeypatch.setattr(engines, "_probe_error", openvino_fails)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="mitoscope.engines"):
        runner = make_runner(tiny_backbone, cpu, "auto", tmp_path)
    assert isinstance(runner, OnnxRunner)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "openvino cannot run test_efficientnet" in warnings[0]
    assert "relative error 0.5" in warnings[0] and warnings[0].endswith("; using onnxruntime")
    assert isinstance(make_runner(tiny_backbone, cpu, "onnxruntime", tmp_path), OnnxRunner)
    with pytest.raises(InputError, match=r"^engine openvino cannot run test_efficientnet: .*relative error 0\.5, "
                                         r"expected at most 0\.001 \(openvino "):
        make_runner(tiny_backbone, cpu, "openvino", tmp_path)
    assert sorted(checked) == ["onnxruntime", "openvino"]  # each checked once: the verdicts are remembered
    export = engines.onnx_path(tiny_backbone.name, tiny_backbone.weights_id, tmp_path)
    record = json.loads(engines.verdict_path(export, "openvino").read_text())
    assert record["relative_error"] == 0.5 and record["precision"] == "f32"
    assert record["runtime_version"] == version("openvino")
    # without PyTorch (serving) the same verdicts decide
    assert served_engine(export, "auto") == "onnxruntime"
    with pytest.raises(InputError, match="engine openvino cannot run .*relative error 0.5"):
        served_engine(export, "openvino")


def test_a_rejected_verdict_is_remembered_and_not_checked_again(tiny_backbone, tmp_path, monkeypatch):
    calls = []

    def always_off(runner, backbone):
        calls.append(runner.name)
        return 0.25

    monkeypatch.setattr(engines, "_probe_error", always_off)
    cpu = torch.device("cpu")
    for _ in range(2):
        with pytest.raises(InputError, match="engine onnxruntime cannot run test_efficientnet: .*relative error 0.25"):
            make_runner(tiny_backbone, cpu, "onnxruntime", tmp_path)
    assert sorted(calls) == ["onnxruntime", "openvino"]  # made with the export, never again
    assert isinstance(make_runner(tiny_backbone, cpu, "auto", tmp_path), TorchRunner)  # all rejected: PyTorch
    assert len(calls) == 2
    export = engines.onnx_path(tiny_backbone.name, tiny_backbone.weights_id, tmp_path)
    with pytest.raises(NeedsPyTorch, match="openvino cannot run .*onnxruntime cannot run"):
        served_engine(export, "auto")


def test_a_runtime_that_fails_on_the_probe_is_rejected_with_its_error(tiny_backbone, tmp_path, monkeypatch):
    def broken(self, images):
        raise RuntimeError("Cannot compile: unsupported operation Foo")

    monkeypatch.setattr(OpenVinoRunner, "feature_map", broken)
    runner = make_runner(tiny_backbone, torch.device("cpu"), "auto", tmp_path)
    assert isinstance(runner, OnnxRunner)
    with pytest.raises(InputError, match=r"engine openvino cannot run test_efficientnet: it failed on a probe image "
                                         r"\(RuntimeError: Cannot compile: unsupported operation Foo\)"):
        make_runner(tiny_backbone, torch.device("cpu"), "openvino", tmp_path)


def test_a_model_less_backbone_needs_a_passed_verdict(tiny_backbone, tmp_path):
    from mitoscope.backbones import described_backbone

    export = engines.export_onnx(tiny_backbone, tmp_path)  # exported, no engine checked yet
    described = described_backbone(tiny_backbone.describe())
    with pytest.raises(NeedsPyTorch, match="engine openvino has not been checked against PyTorch"):
        make_runner(described, torch.device("cpu"), "auto", tmp_path)
    with pytest.raises(NeedsPyTorch, match="engine openvino has not been checked against PyTorch"):
        served_engine(export, "auto")
    make_runner(tiny_backbone, torch.device("cpu"), "openvino", tmp_path)  # checks openvino
    assert isinstance(make_runner(described, torch.device("cpu"), "auto", tmp_path), OpenVinoRunner)
    assert served_engine(export, "auto") == "openvino"


def compiled_precision(runner: OpenVinoRunner) -> str:
    import openvino.properties.hint as hints

    request = runner._request((1, 3, 64, 64))
    return request.get_compiled_model().get_property(hints.inference_precision).get_type_name()


def test_openvino_computes_in_f32_unless_bf16_is_asked_for(tiny_backbone, tmp_path):
    """OpenVINO picks bf16 by itself on CPUs that have it: the compiled model must say f32."""
    import openvino as ov
    import openvino.properties.device as device

    path = engines.export_onnx(tiny_backbone, tmp_path)
    assert compiled_precision(OpenVinoRunner(path, cache_dir=tmp_path / "compiled")) == "f32"
    assert compiled_precision(engines.open_exported(path, "openvino")) == "f32"
    if "BF16" not in ov.Core().get_property("CPU", device.capabilities):
        pytest.skip("this CPU has no bf16 support (OpenVINO's CPU capabilities lack BF16): bf16 runs in f32")
    bf16 = engines.open_exported(path, "openvino-bf16")
    assert bf16.name == "openvino-bf16" and bf16.precision == "bf16"
    assert compiled_precision(bf16) == "bf16"


def test_the_bf16_engine_is_checked_on_its_own_tolerance_and_cached_under_its_own_key(tiny_backbone, tmp_path):
    runner = make_runner(tiny_backbone, torch.device("cpu"), "openvino-bf16", tmp_path)
    assert isinstance(runner, OpenVinoRunner) and runner.precision == "bf16"
    export = engines.onnx_path(tiny_backbone.name, tiny_backbone.weights_id, tmp_path)
    verdict = engines.remembered_verdict(export, "openvino-bf16")
    assert verdict.passed and verdict.tolerance == engines.PROBE_TOLERANCE["bf16"]
    assert verdict.path.name.endswith(f".openvino-{version('openvino')}-bf16.json")
    assert engines.remembered_verdict(export, "openvino").path != verdict.path  # f32 has its own verdict
    assert resolve_engine("auto", "cpu") != "openvino-bf16"  # only when asked
    prints = {engine: FeatureExtractor(tiny_backbone, 160, 0.5, 8, "cpu", engine=engine).fingerprint()
              for engine in ("torch", "openvino", "onnxruntime", "openvino-bf16")}
    assert prints["torch"] == prints["openvino"] == prints["onnxruntime"]
    assert prints["openvino-bf16"] == {**prints["torch"], "precision": "bf16"}


def test_the_default_onnx_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert engines.default_onnx_dir() == tmp_path / "mitoscope" / "onnx"


def test_openvino_keeps_only_the_most_recent_compiled_shapes_on_disk(tiny_backbone, tmp_path):
    path = engines.export_onnx(tiny_backbone, tmp_path)
    runner = OpenVinoRunner(path, cache_dir=tmp_path / "compiled", keep_on_disk=2)
    for width in (64, 96, 128):
        runner.feature_map(np.zeros((1, 3, 64, width), np.float32))
    assert len(list((tmp_path / "compiled").glob("*.blob"))) == 2
