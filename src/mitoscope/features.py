"""Window features of whole images with PyTorch (training, GPUs, resized windows).

Each window is resized to the backbone's input size, normalised with the backbone's own
data config and passed through the backbone in batches under ``torch.inference_mode``.
When the backbone runs from its ONNX export on the CPU and windows need no resizing, the
work goes to :class:`mitoscope.array_features.ArrayExtractor` (numpy, the same arithmetic).
The feature cache lives in :mod:`mitoscope.cache` (re-exported here).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .array_features import EXTRACTION_MODES, ArrayExtractor, box_sample_weights, box_weight_entries, embed_images
from .atomic import sha256_file as file_sha256
from .backbones import Backbone
from .cache import (CACHE_FORMAT, FeatureCache, ImageFeatures, ProgressCallback, cache_settings, default_cache_dir,
                    extract_dataset, extractor_fingerprint, open_cache, read_metadata)
from .engines import BackboneRunner, engine_precision, make_runner, resolve_engine
from .errors import InputError
from .tiling import WindowGrid, make_grid, validate_tiling

__all__ = ["CACHE_FORMAT", "EXTRACTION_MODES", "FeatureCache", "FeatureExtractor", "ImageFeatures", "ProgressCallback",
           "box_average", "cache_settings", "default_cache_dir", "extract_dataset", "file_sha256", "open_cache",
           "pick_device", "read_metadata", "resize_image"]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``size`` = (H, W) with area-aware antialiasing."""
    if image.shape[:2] == tuple(size):
        return image
    # "W": torch warns on read-only arrays (e.g. np.asarray of a PIL image); copy only then.
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    out = F.interpolate(tensor, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class FeatureExtractor:
    """Turns an RGB uint8 image into one backbone feature vector per sliding window."""

    def __init__(
        self,
        backbone: Backbone,
        window: int = 224,
        overlap: float = 0.5,
        batch_size: int = 32,
        device: str | None = None,
        mode: str = "windows",
        engine: str = "auto",
    ) -> None:
        validate_tiling(window, overlap)
        if mode not in EXTRACTION_MODES:
            raise InputError(f"unknown extraction mode {mode!r}: expected one of {', '.join(EXTRACTION_MODES)}")
        self.mode = mode
        self.backbone = backbone
        self.window = int(window)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.device = pick_device(device)
        # None for a backbone that only runs from its ONNX export (see engines.py).
        self.model = (None if backbone.model is None
                      else backbone.model.to(self.device).eval().to(memory_format=torch.channels_last))
        cfg = backbone.data_config
        self.input_size = backbone.input_size
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1) * 255.0
        self.engine = resolve_engine(engine, self.device)
        self._engine_asked = engine
        self._runner: BackboneRunner | None = None

    @property
    def runner(self) -> BackboneRunner:
        """What runs the backbone (made on first use: an ONNX export or session costs time)."""
        if self._runner is None:
            self._runner = make_runner(self.backbone, self.device, self._engine_asked)
            self.engine = self._runner.name  # "auto" may have fallen back to torch
        return self._runner

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.backbone.data_config
        # The engine asked for, not the runner: a fingerprint must not open a session. Only a
        # named openvino-bf16 computes in bf16 (auto never picks it, nor falls back to it).
        return extractor_fingerprint(self.backbone.name, self.backbone.weights_id, self.input_size, self.window,
                                     self.overlap, self.mode, cfg["mean"], cfg["std"], engine_precision(self.engine))

    def _array_extractor(self) -> ArrayExtractor | None:
        """The numpy path, when the backbone runs exported and windows keep their size."""
        if self.runner.name == "torch" or self.window != self.input_size:
            return None
        cfg = self.backbone.data_config
        return ArrayExtractor(self.runner, self.window, self.overlap, self.input_size, cfg["mean"], cfg["std"],
                              self.batch_size, self.mode)

    def _run(self, output: str, batch: torch.Tensor) -> torch.Tensor:
        """The runner's ``pooled`` or ``feature_map`` of a tensor batch (exported runners take numpy)."""
        run = getattr(self.runner, output)
        if self.runner.name == "torch":
            return run(batch)
        return torch.from_numpy(np.asarray(run(batch.float().cpu().contiguous().numpy())))

    def prepare(self, windows: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(windows).to(self.device).permute(0, 3, 1, 2).float()
        if batch.shape[-1] != self.input_size:
            batch = F.interpolate(batch, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """(N, w, w, 3) uint8 -> (N, D) float32."""
        out = []
        for start in range(0, len(windows), self.batch_size):
            batch = self.prepare(np.ascontiguousarray(windows[start : start + self.batch_size]))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out.append(self._run("pooled", batch).float().cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def embed_fullconv(self, padded: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One fully-convolutional pass over a stack of (B, H, W, 3) images padded to one size;
        each window's vector is the average of the final feature map under its box (RoIAlign),
        instead of re-computing overlapping windows."""
        scale = self.input_size / self.window
        batch = torch.from_numpy(np.ascontiguousarray(padded)).to(self.device).permute(0, 3, 1, 2).float()
        if scale != 1.0:
            size = (int(round(batch.shape[-2] * scale)), int(round(batch.shape[-1] * scale)))
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True)
        batch = ((batch - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            fmap = self._run("feature_map", batch).float()
        if fmap.ndim != 4:
            raise InputError(f"backbone {self.backbone.name} has no spatial feature map: use --extraction windows")
        stride = batch.shape[-1] / fmap.shape[-1]
        out = []
        for index, image_boxes in enumerate(boxes):
            boxes_t = torch.as_tensor(image_boxes, dtype=torch.float32, device=fmap.device) * scale
            out.append(box_average(fmap[index : index + 1], boxes_t, 1.0 / stride).cpu().numpy().astype(np.float32))
        return out

    def embed_many(self, images: Sequence[np.ndarray], grids: Sequence[WindowGrid]) -> list[np.ndarray]:
        """Window features of several images on their grids, sharing batches
        (:func:`mitoscope.array_features.embed_images`)."""
        arrays = self._array_extractor()
        if arrays is not None:
            return arrays.embed_many(images, grids)
        return embed_images(images, grids, self.mode, self.batch_size, self.embed_windows, self.embed_fullconv)

    def extract(self, image: np.ndarray, resize_to: tuple[int, int] | None = None) -> ImageFeatures:
        return self.extract_many([image], resize_to)[0]

    def extract_many(self, images: Sequence[np.ndarray],
                     resize_to: tuple[int, int] | None = None) -> list[ImageFeatures]:
        """Features of several images (each resized to ``resize_to`` first when given), their
        windows sharing backbone batches; each image's are :meth:`extract`'s (to float32 rounding)."""
        works = [resize_image(image, resize_to) if resize_to else image for image in images]
        grids = [make_grid(work.shape[0], work.shape[1], self.window, self.overlap) for work in works]
        out = []
        for image, work, grid, features in zip(images, works, grids, self.embed_many(works, grids)):
            height, width = image.shape[:2]
            boxes = grid.boxes().astype(np.float64)
            if resize_to:  # report windows where they lie in the image as read
                boxes *= np.array([width / work.shape[1], height / work.shape[0]] * 2)
            out.append(ImageFeatures(features=features, boxes=np.round(boxes).astype(np.int64), grid_shape=grid.shape,
                                     image_size=(height, width)))
        return out


def box_average(fmap: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, samples: int = 4) -> torch.Tensor:
    """(N, C) average of a (1, C, h, w) feature map over N boxes ``[x0, y0, x1, y1]`` (input pixels).

    The same numbers as torchvision's ``roi_align(output_size=1, sampling_ratio=samples,
    aligned=True)``: the mean of ``samples`` x ``samples`` bilinear samples spread over each box,
    edges clamped. The weights are :func:`mitoscope.array_features.box_sample_weights` (shared
    with the numpy path), applied as one sparse (N, h*w) x (h*w, C) product on the map's device,
    so memory and work grow with the boxes, not with boxes x map size. No torchvision: predict
    would import it (and through it torch._dynamo), which costs seconds at start-up.
    """
    channels, height, width = fmap.shape[-3:]
    weight_y, weight_x = box_sample_weights(boxes.detach().cpu().numpy(), spatial_scale, height, width, samples)
    rows, columns, values = box_weight_entries(weight_y, weight_x)
    dtype = fmap.dtype if fmap.dtype in (torch.float32, torch.float64) else torch.float32  # sparse mm's dtypes
    indices = torch.from_numpy(np.stack([rows, columns])).to(fmap.device)
    weights = torch.sparse_coo_tensor(indices, torch.from_numpy(values).to(fmap.device, dtype),
                                      (len(weight_y), height * width), is_coalesced=True, check_invariants=False)
    flat = fmap.reshape(channels, height * width).to(dtype)  # fmap[0], positions as columns
    return torch.sparse.mm(weights, flat.t()).to(fmap.dtype)
