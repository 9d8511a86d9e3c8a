"""Running a frozen backbone for feature extraction: PyTorch, or ONNX Runtime on the CPU.

On this project's 2-core CPU, ONNX Runtime runs the same EfficientNet 2-3x faster than
PyTorch eager (measured by ``benchmarks/speed.py``), so ``engine="auto"`` uses it whenever
the extraction runs on the CPU and ``onnxruntime`` is installed; on a GPU, PyTorch runs.

The backbone is exported once to ONNX (its ``forward_features`` and its pooled vector, with
dynamic batch, height and width) into ``$XDG_CACHE_HOME/mitoscope/onnx`` (or ``cache_dir``),
under a name that holds the backbone's name, the sha256 of its weights and the torch
version, written atomically after its output was checked against PyTorch's on a probe
image; a mismatch or a failed export makes ``auto`` fall back to PyTorch (logged) and an
explicit ``onnxruntime`` raise. A saved model whose backbone already has an export is run
from it without building the PyTorch model at all (predict then never imports timm). Features of both engines agree to float32 rounding,
so the feature cache does not key on the engine; its provenance records it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .backbones import Backbone
from .defaults import cache_home
from .errors import InputError

__all__ = ["ENGINES", "BackboneRunner", "OnnxRunner", "TorchRunner", "default_onnx_dir", "export_onnx", "make_runner",
           "onnx_path", "resolve_engine"]

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 17
# Largest difference allowed between the engines on the probe, relative to the largest value.
PROBE_TOLERANCE = 1e-3


class BackboneRunner(Protocol):
    name: str

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) pooled feature vectors."""

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> the final feature map (B, C, h, w)."""


class TorchRunner:
    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


class _FeaturesAndPooled(nn.Module):
    """What is exported: the feature map and the backbone's own pooling of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.forward_features(images)
        return maps, self.model.forward_head(maps, pre_logits=True)


def default_onnx_dir() -> Path:
    return cache_home() / "onnx"


def onnx_path(name: str, weights_id: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Where the export of backbone ``name`` with weights sha256 ``weights_id`` lives."""
    folder = Path(folder) if folder is not None else default_onnx_dir()
    return folder / f"{name}-{weights_id[:16]}-torch{torch.__version__.split('+')[0]}-opset{OPSET}.onnx"


def export_onnx(backbone: Backbone, folder: str | os.PathLike[str] | None = None) -> Path:
    """The backbone's ONNX file: exported and checked against PyTorch now, unless an export
    of the same weights exists. A failed export or check leaves no file behind."""
    path = onnx_path(backbone.name, backbone.weights_id, folder)
    if path.is_file():
        return path
    if backbone.model is None:
        raise InputError(f"no ONNX export of {backbone.name} (weights {backbone.weights_id[:12]}) at {path}, "
                         "and no model to export it from")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _FeaturesAndPooled(backbone.model).eval().cpu()
    probe = torch.zeros(1, 3, backbone.input_size, backbone.input_size)
    with atomic_path(path) as temp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                model, (probe,), str(temp), input_names=["images"], output_names=["maps", "pooled"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}}, opset_version=OPSET, dynamo=False,
            )
        _check_against_torch(OnnxRunner(temp), backbone)
    logger.info("exported %s to %s", backbone.name, path)
    return path


class OnnxRunner:
    """An exported backbone in an ONNX Runtime CPU session with ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _run(self, images: torch.Tensor, output: str) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().contiguous().numpy())
        return torch.from_numpy(self.session.run([output], {"images": array})[0])

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, "pooled")

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, "maps")


def _check_against_torch(runner: OnnxRunner, backbone: Backbone) -> None:
    size = backbone.input_size
    probe = torch.randn(2, 3, size, size + 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.model.forward_features(probe.contiguous(memory_format=torch.channels_last)).float()
    got = runner.feature_map(probe)
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    if not error <= PROBE_TOLERANCE:
        raise InputError(f"ONNX Runtime's {backbone.name} differs from PyTorch's on a probe image "
                         f"(relative error {error:.2g}, shapes {tuple(got.shape)} vs {tuple(expected.shape)})")


def resolve_engine(engine: str, device: torch.device) -> str:
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "onnxruntime" and device.type != "cpu":
        raise InputError(f"engine onnxruntime runs on the CPU only, but the device is {device}; use engine torch")
    if engine != "auto":
        return engine
    if device.type != "cpu":
        return "torch"
    from importlib.util import find_spec

    # onnx: the exporter needs it; onnxruntime runs the export. Found, not imported: cheap.
    return "onnxruntime" if find_spec("onnx") and find_spec("onnxruntime") else "torch"


def make_runner(backbone: Backbone, device: torch.device, engine: str = "auto",
                folder: str | os.PathLike[str] | None = None) -> BackboneRunner:
    """The runner for ``engine`` (see the module docstring for ``auto`` and its fallback).

    A model-less backbone (:func:`mitoscope.backbones.described_backbone`) runs only from an
    existing ONNX export; any trouble with it raises InputError.
    """
    chosen = resolve_engine(engine, device)
    if chosen == "torch":
        if backbone.model is None:
            raise InputError(f"backbone {backbone.name} is only described here (no model): it can run only "
                             "from its ONNX export")
        return TorchRunner(backbone.model)
    try:
        return OnnxRunner(export_onnx(backbone, folder))
    except Exception as exc:  # export or runtime trouble: say what, then fall back or stop
        reason = " ".join(str(exc).split())[:300]
        if engine == "onnxruntime" or backbone.model is None:
            raise InputError(f"engine onnxruntime cannot run {backbone.name}: {reason}") from None
        logger.warning("ONNX Runtime cannot run %s (%s); using PyTorch", backbone.name, reason)
        return TorchRunner(backbone.model)
