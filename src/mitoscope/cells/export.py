"""The cell network outside PyTorch: its ONNX export (crop -> pooled features or logit) and
what runs it, in numpy. The saved model serves through it (:mod:`.model`), and training the
linear scorer computes the frozen features of every cell through it (:func:`exported_features`):
an exported engine runs this small network 2-3 times faster than PyTorch does on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .views import crop_views

logger = logging.getLogger(__name__)

# Frozen features through an exported engine must match PyTorch's on the probe crops within
# this, relative to the largest feature (OpenVINO f32 gives about 1e-5).
FEATURE_TOLERANCE = 1e-3


def probe_crops(size: int, n: int = 4) -> np.ndarray:
    """Fixed crops that check a served network against PyTorch (the same every time)."""
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def normalised_array(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(n, s, s, 3) uint8 -> (n, 3, s, s) float32, in numpy (the served path imports no PyTorch):
    (value / 255 - mean) / std, in float32, looked up in a table of the 256 values per channel."""
    values = np.arange(256, dtype=np.float32) / 255.0
    out = np.empty((crops.shape[0], crops.shape[3], *crops.shape[1:3]), dtype=np.float32)
    for channel in range(crops.shape[3]):
        table = (values - np.float32(mean[channel])) / np.float32(std[channel])
        out[:, channel] = table[crops[..., channel]]
    return out


def export_network(network: Any, size: int, path: Path, scorer: str) -> None:
    """The network as ONNX, any batch size: crop -> pooled features (linear scorer) or -> logit."""
    import warnings

    import torch

    from ..engines import OPSET

    class Served(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            if scorer == "linear":
                return self.inner.backbone.forward_features(images).mean(dim=(-2, -1))
            return self.inner(images).unsqueeze(-1)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # Output "pooled": the runners of mitoscope.engines read an export's pooled output.
        torch.onnx.export(Served(network.eval()), (torch.zeros(1, 3, size, size),), str(path), input_names=["images"],
                          output_names=["pooled"], dynamic_axes={"images": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)


def exported_features(network: Any, crops: np.ndarray, mean: Sequence[float], std: Sequence[float], views: int,
                      folder: str | Path, progress: Callable[[str, int, int], None] | None = None,
                      batch: int = 256) -> tuple[np.ndarray, str] | None:
    """The frozen network's pooled features of (n, s, s, 3) uint8 crops averaged over the first
    ``views`` views, computed by an exported engine (OpenVINO f32, else ONNX Runtime) from an
    export written to ``folder``: the numbers of :func:`mitoscope.cells.training.crop_features`
    within :data:`FEATURE_TOLERANCE`, and the engine's name. None when no engine is installed or
    none matches PyTorch on the probe crops (the caller then uses PyTorch)."""
    import torch

    from ..engines import auto_candidates, open_exported

    if not len(crops):
        return None
    size = int(crops.shape[1])
    path = Path(folder) / "features.onnx"
    probe = probe_crops(size)
    with torch.no_grad():
        expected = network.eval().backbone.forward_features(
            torch.from_numpy(normalised_array(probe, mean, std))).mean(dim=(-2, -1)).numpy()
    runner, name = None, ""
    for engine in auto_candidates():
        try:
            if not path.is_file():
                export_network(network, size, path, "linear")
            candidate = open_exported(path, engine, throughput=True)
            error = float(np.abs(np.asarray(candidate.pooled(normalised_array(probe, mean, std))) - expected).max())
        except Exception as exc:  # an engine that cannot run the export: the next one, or PyTorch
            logger.info("cell features: %s cannot run the export (%s)", engine, exc)
            continue
        if error <= FEATURE_TOLERANCE * max(float(np.abs(expected).max()), 1e-6):
            runner, name = candidate, engine
            break
        logger.info("cell features: %s differs from PyTorch by %.3g", engine, error)
    if runner is None:
        return None
    return engine_outputs(runner.pooled, crops, mean, std, views, batch, progress).astype(np.float32), name


def engine_outputs(run: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, mean: Sequence[float],
                   std: Sequence[float], views: int, batch: int = 256,
                   progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """What ``run`` (an exported engine's runner: normalised (n, 3, s, s) float32 -> (n, k)) gives
    for (n, s, s, 3) uint8 crops, averaged over the first ``views`` views, in float64; ``batch``
    crops at a time, each normalised once and its views taken after normalising (a permutation:
    the same numbers as normalising each view)."""
    parts = []
    for start in range(0, len(crops), batch):
        normalised = normalised_array(np.asarray(crops[start:start + batch]), mean, std)
        total = 0.0
        for view in range(views):
            total = total + np.asarray(run(crop_views(normalised, view, axes=(2, 3))), dtype=np.float64)
        parts.append(total / views)
        if progress:
            progress("cells: features", min(start + batch, len(crops)), len(crops))
    return np.concatenate(parts)
