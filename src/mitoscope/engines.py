"""Running a frozen backbone for feature extraction: PyTorch, or its ONNX export on the CPU.

On this project's 2-core CPU (measured by ``benchmarks/speed.py``) OpenVINO runs the exported
EfficientNet about 3x faster than PyTorch eager and ONNX Runtime about 2x, so ``engine="auto"``
picks, on the CPU, OpenVINO if it is installed, else ONNX Runtime; on a GPU, PyTorch.

The backbone is exported once to ONNX (its ``forward_features`` and its pooled vector, with
dynamic batch, height and width) into ``$XDG_CACHE_HOME/mitoscope/onnx`` (or ``folder``),
under a name that holds the backbone's name, the sha256 of its weights and the torch
version, written atomically after every installed runtime's output was checked against
PyTorch's on a probe image; a mismatch or a failed export makes ``auto`` fall back to
PyTorch (logged) and an explicit engine raise. A saved model whose backbone already has an
export runs from it without PyTorch at all (see :mod:`mitoscope.inference`). Features of the
engines agree to float32 rounding, so the feature cache does not key on the engine; its
provenance records it.

The exported runners take and return numpy arrays; :class:`TorchRunner` takes and returns
tensors. Nothing here imports PyTorch until a PyTorch runner or an export is made.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .atomic import atomic_path
from .defaults import cache_home
from .errors import InputError

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

__all__ = ["ENGINES", "EXPORTED_ENGINES", "BackboneRunner", "OnnxRunner", "OpenVinoRunner", "TorchRunner",
           "available_cpus", "default_onnx_dir", "export_onnx", "make_runner", "onnx_path", "open_exported",
           "resolve_engine"]

logger = logging.getLogger(__name__)

EXPORTED_ENGINES = ("openvino", "onnxruntime")  # in the order "auto" prefers them
ENGINES = ("auto", "torch", *EXPORTED_ENGINES)
OPSET = 17
# Largest difference allowed between an engine and PyTorch on the probe, relative to the largest value.
PROBE_TOLERANCE = 1e-3


class BackboneRunner(Protocol):
    name: str

    def pooled(self, images: Any) -> Any:
        """(B, 3, H, W) normalised images -> (B, D) pooled feature vectors."""

    def feature_map(self, images: Any) -> Any:
        """(B, 3, H, W) normalised images -> the final feature map (B, C, h, w)."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TorchRunner:
    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model

    def pooled(self, images: "torch.Tensor") -> "torch.Tensor":
        return self.model(images)

    def feature_map(self, images: "torch.Tensor") -> "torch.Tensor":
        return self.model.forward_features(images)


def default_onnx_dir() -> Path:
    return cache_home() / "onnx"


def _torch_version() -> str:
    try:  # from the installed metadata: naming an export must not import torch
        return version("torch").split("+")[0]
    except PackageNotFoundError:
        return "none"


def onnx_path(name: str, weights_id: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Where the export of backbone ``name`` with weights sha256 ``weights_id`` lives."""
    folder = Path(folder) if folder is not None else default_onnx_dir()
    return folder / f"{name}-{weights_id[:16]}-torch{_torch_version()}-opset{OPSET}.onnx"


def export_onnx(backbone: "Backbone", folder: str | os.PathLike[str] | None = None) -> Path:
    """The backbone's ONNX file: exported and checked against PyTorch now, unless an export
    of the same weights exists. A failed export or check leaves no file behind."""
    path = onnx_path(backbone.name, backbone.weights_id, folder)
    if path.is_file():
        return path
    if backbone.model is None:
        raise InputError(f"no ONNX export of {backbone.name} (weights {backbone.weights_id[:12]}) at {path}, "
                         "and no model to export it from")
    import torch
    from torch import nn

    class FeaturesAndPooled(nn.Module):
        """What is exported: the feature map and the backbone's own pooling of it."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = self.model.forward_features(images)
            return maps, self.model.forward_head(maps, pre_logits=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    model = FeaturesAndPooled(backbone.model).eval().cpu()
    probe = torch.zeros(1, 3, backbone.input_size, backbone.input_size)
    with atomic_path(path) as temp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(
                model, (probe,), str(temp), input_names=["images"], output_names=["maps", "pooled"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}}, opset_version=OPSET, dynamo=False,
            )
        for engine in EXPORTED_ENGINES:  # every runtime that may run this file later
            if find_spec(engine):
                _check_against_torch(open_exported(temp, engine), backbone)
    logger.info("exported %s to %s", backbone.name, path)
    return path


class OnnxRunner:
    """An exported backbone in an ONNX Runtime CPU session with ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or available_cpus())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        return self.session.run([output], {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def pooled(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "pooled")

    def feature_map(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "maps")


class OpenVinoRunner:
    """An exported backbone compiled by OpenVINO for the CPU, one static input shape at a time.

    A static shape compiles in under a second and its first run is about twice as fast as a
    dynamic-shape model's (measured: 2.5 s vs 4.4 s for a 3840x2160 image here). Batches run
    ``batch`` images at a time (8 was fastest here; larger batches fall out of the cache), a
    short last batch is padded to the compiled shape rather than compiled again, and compiled
    shapes are kept (the last ``keep``) and cached on disk under ``cache_dir``: a 3840x2160
    image then compiles in 0.35 s instead of 0.7 s. Each cached shape takes about 14 MB, so
    only the ``keep_on_disk`` most recently compiled stay there (whole-image passes over
    images of many sizes would otherwise fill the disk).
    """

    name = "openvino"

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, batch: int = 8,
                 cache_dir: str | os.PathLike[str] | None = None, keep: int = 4, keep_on_disk: int = 16) -> None:
        import openvino as ov

        self.path = Path(path)
        self.core = ov.Core()
        self.threads = int(threads or available_cpus())
        self.batch = int(batch)
        self.keep = int(keep)
        self.keep_on_disk = int(keep_on_disk)
        cache = Path(cache_dir) if cache_dir is not None else cache_home() / "openvino"
        self.cache_dir: Path | None = cache
        try:
            cache.mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache)})
        except OSError as exc:  # a read-only cache costs compile time, never the result
            logger.warning("cannot use %s for compiled models (%s)", cache, exc)
            self.cache_dir = None
        self.model = self.core.read_model(str(self.path))
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _request(self, shape: tuple[int, ...]) -> Any:
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            return self._compiled[shape]
        model = self.model.clone()
        model.reshape({"images": list(shape)})
        compiled = self.core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_NUM_THREADS": self.threads})
        self._compiled[shape] = compiled.create_infer_request()
        while len(self._compiled) > self.keep:
            self._compiled.popitem(last=False)
        self._prune_disk_cache()
        return self._compiled[shape]

    def _prune_disk_cache(self) -> None:
        if self.cache_dir is None:
            return
        blobs = []
        for blob in self.cache_dir.glob("*.blob"):
            try:
                blobs.append((blob.stat().st_mtime, blob))
            except OSError:  # removed meanwhile by another process
                continue
        for _, blob in sorted(blobs, reverse=True)[self.keep_on_disk:]:
            blob.unlink(missing_ok=True)  # another process that wanted it compiles again

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Compile now for inputs of ``shape`` (the first batch of a run), e.g. while other work waits."""
        self._request((min(int(shape[0]), self.batch), *(int(v) for v in shape[1:])))

    def _run(self, images: np.ndarray, output: str) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        count = len(images)
        step = self.batch if count > self.batch else count
        out = []
        for start in range(0, count, step):
            chunk = images[start : start + step]
            if len(chunk) < step:  # pad the short last batch: one compiled shape per size
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            result = self._request(chunk.shape).infer({"images": chunk})
            out.append(np.asarray(result[output])[: count - start])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def pooled(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "pooled")

    def feature_map(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, "maps")


def open_exported(path: str | os.PathLike[str], engine: str, threads: int | None = None) -> OnnxRunner | OpenVinoRunner:
    """A runner for an ONNX file in ``engine`` (one of :data:`EXPORTED_ENGINES`)."""
    if engine == "openvino":
        return OpenVinoRunner(path, threads)
    if engine == "onnxruntime":
        return OnnxRunner(path, threads)
    raise InputError(f"unknown exported engine {engine!r}: expected one of {', '.join(EXPORTED_ENGINES)}")


def _check_against_torch(runner: OnnxRunner | OpenVinoRunner, backbone: "Backbone") -> None:
    import torch

    size = backbone.input_size
    probe = torch.randn(2, 3, size, size + 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone.model.forward_features(probe.contiguous(memory_format=torch.channels_last)).float().numpy()
    got = np.asarray(runner.feature_map(probe.numpy()))
    scale = float(np.abs(expected).max()) or 1.0
    error = float(np.abs(got - expected).max()) / scale if got.shape == expected.shape else float("inf")
    if not error <= PROBE_TOLERANCE:
        raise InputError(f"{runner.name}'s {backbone.name} differs from PyTorch's on a probe image "
                         f"(relative error {error:.2g}, shapes {tuple(got.shape)} vs {tuple(expected.shape)})")


def resolve_engine(engine: str, device: Any) -> str:
    """The engine ``engine`` means on ``device`` (a torch.device or its name)."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if engine in EXPORTED_ENGINES and device_type != "cpu":
        raise InputError(f"engine {engine} runs on the CPU only, but the device is {device}; use engine torch")
    if engine != "auto":
        return engine
    if device_type != "cpu":
        return "torch"
    # Found, not imported: cheap. onnx is what the exporter needs.
    for candidate in EXPORTED_ENGINES:
        if find_spec("onnx") and find_spec(candidate):
            return candidate
    return "torch"


def make_runner(backbone: "Backbone", device: Any, engine: str = "auto",
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
        return open_exported(export_onnx(backbone, folder), chosen)
    except Exception as exc:  # export or runtime trouble: say what, then fall back or stop
        reason = " ".join(str(exc).split())[:300]
        if engine != "auto" or backbone.model is None:
            raise InputError(f"engine {chosen} cannot run {backbone.name}: {reason}") from None
        logger.warning("%s cannot run %s (%s); using PyTorch", chosen, backbone.name, reason)
        return TorchRunner(backbone.model)
