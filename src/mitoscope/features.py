"""Window features of whole images, and an on-disk cache so a head never re-extracts.

Each window is resized to the backbone's input size, normalised with the backbone's own
data config and passed through the backbone in batches under ``torch.inference_mode``.
The cache keys an entry by the image file's bytes, the extractor (backbone, weights hash,
tiling, input size) and the reading options; entries are single safetensors files written
atomically, with their provenance in the file's metadata, so an interrupted run resumes and
never reads a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import __version__
from .atomic import atomic_path, sha256_file as file_sha256
from .backbones import Backbone
from .defaults import cache_home
from .engines import BackboneRunner, make_runner, resolve_engine
from .errors import InputError
from .io import ReadOptions, read_image
from .tiling import crop_windows, make_grid, pad_to, validate_tiling

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
# windows: each window cropped and embedded on its own (the write-up's way, exact);
# fullconv: one pass over the whole image, window vectors pooled from the feature map (fast).
EXTRACTION_MODES = ("windows", "fullconv")


@dataclass
class ImageFeatures:
    """Window features of one image, in row-major grid order."""

    features: np.ndarray  # (N, D) float32
    boxes: np.ndarray  # (N, 4) int64 [x0, y0, x1, y1], full-resolution coordinates of the image as read
    grid_shape: tuple[int, int]
    image_size: tuple[int, int]  # (H, W) of the image as read

    @property
    def n_windows(self) -> int:
        return int(self.features.shape[0])


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
        return {
            "backbone": self.backbone.name,
            "weights_sha256": self.backbone.weights_id,
            "input_size": self.input_size,
            "window": self.window,
            "overlap": self.overlap,
            "mode": self.mode,
            "mean": [float(v) for v in self.backbone.data_config["mean"]],
            "std": [float(v) for v in self.backbone.data_config["std"]],
        }

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
                out.append(self.runner.pooled(batch).float().cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def embed_fullconv(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """One fully-convolutional pass over the whole image; each window's vector is the average
        of the final feature map under it (RoIAlign), instead of re-computing overlapping windows."""
        scale = self.input_size / self.window
        padded = pad_to(image, max(image.shape[0], self.window), max(image.shape[1], self.window))
        batch = torch.from_numpy(np.ascontiguousarray(padded)).to(self.device).permute(2, 0, 1)[None].float()
        if scale != 1.0:
            size = (int(round(batch.shape[-2] * scale)), int(round(batch.shape[-1] * scale)))
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True)
        batch = ((batch - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            fmap = self.runner.feature_map(batch).float()
        if fmap.ndim != 4:
            raise InputError(f"backbone {self.backbone.name} has no spatial feature map: use --extraction windows")
        stride = batch.shape[-1] / fmap.shape[-1]
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=fmap.device) * scale
        return box_average(fmap, boxes_t, 1.0 / stride).cpu().numpy().astype(np.float32, copy=False)

    def extract(self, image: np.ndarray, resize_to: tuple[int, int] | None = None) -> ImageFeatures:
        height, width = image.shape[:2]
        work = resize_image(image, resize_to) if resize_to else image
        grid = make_grid(work.shape[0], work.shape[1], self.window, self.overlap)
        if self.mode == "fullconv":
            features = self.embed_fullconv(work, grid.boxes())
        else:
            features = self.embed_windows(crop_windows(work, grid))
        boxes = grid.boxes().astype(np.float64)
        if resize_to:  # report windows where they lie in the image as read
            boxes *= np.array([width / work.shape[1], height / work.shape[0]] * 2)
        return ImageFeatures(
            features=features,
            boxes=np.round(boxes).astype(np.int64),
            grid_shape=grid.shape,
            image_size=(height, width),
        )


def box_average(fmap: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, samples: int = 4) -> torch.Tensor:
    """(N, C) average of a (1, C, h, w) feature map over N boxes ``[x0, y0, x1, y1]`` (input pixels).

    The same numbers as torchvision's ``roi_align(output_size=1, sampling_ratio=samples,
    aligned=True)``: the mean of ``samples`` x ``samples`` bilinear samples spread over each box,
    edges clamped. Written with ``grid_sample`` so that predict does not import torchvision
    (and through it torch._dynamo), which costs seconds at start-up.
    """
    height, width = fmap.shape[-2:]
    offsets = (torch.arange(samples, dtype=fmap.dtype, device=fmap.device) + 0.5) / samples
    start = boxes[:, :2] * spatial_scale - 0.5  # (N, 2) x, y in feature-map index coordinates
    size = (boxes[:, 2:] - boxes[:, :2]) * spatial_scale
    xs = start[:, 0:1] + offsets * size[:, 0:1]  # (N, S)
    ys = start[:, 1:2] + offsets * size[:, 1:2]
    # index coordinates -> grid_sample's [-1, 1] (align_corners=False: pixel centres at (2i + 1) / n - 1)
    gx = ((2 * xs + 1) / width - 1)[:, None, :].expand(-1, samples, -1)
    gy = ((2 * ys + 1) / height - 1)[:, :, None].expand(-1, -1, samples)
    grid = torch.stack([gx, gy], dim=-1).reshape(1, -1, 1, 2)  # (1, N*S*S, 1, 2)
    sampled = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(fmap.shape[1], len(boxes), samples * samples).mean(dim=2).transpose(0, 1)


def default_cache_dir() -> Path:
    return cache_home() / "features"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its provenance, for a feature-cache entry)."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > os.path.getsize(path) - 8:
            raise ValueError(f"header of {header_len} bytes is longer than the file")
        return json.loads(handle.read(header_len))["__metadata__"]


class FeatureCache:
    """Per-image feature files under ``root``, keyed by content and extraction settings."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(image_sha256: str, settings: dict[str, Any]) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, "image": image_sha256, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> ImageFeatures | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            meta = read_metadata(path)
            feats = ImageFeatures(
                features=tensors["features"],
                boxes=tensors["boxes"],
                grid_shape=tuple(int(v) for v in json.loads(meta["grid_shape"])),
                image_size=tuple(int(v) for v in json.loads(meta["image_size"])),
            )
            rows, cols = feats.grid_shape
            if (
                feats.features.dtype != np.float32
                or feats.features.ndim != 2
                or feats.boxes.dtype != np.int64
                or feats.boxes.shape != (feats.n_windows, 4)
                or feats.n_windows != rows * cols
            ):
                raise ValueError(
                    f"expected float32 features and int64 boxes for a {rows}x{cols} grid, got features "
                    f"{feats.features.dtype}{feats.features.shape} and boxes {feats.boxes.dtype}{feats.boxes.shape}"
                )
            return feats
        except (SafetensorError, KeyError, TypeError, ValueError, OSError) as exc:
            # Only a damaged disk gets here (writes are atomic): recompute rather than fail.
            logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None

    def save(self, key: str, feats: ImageFeatures, provenance: dict[str, Any]) -> Path:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "grid_shape": json.dumps(list(feats.grid_shape)),
            "image_size": json.dumps(list(feats.image_size)),
            "provenance": json.dumps(provenance, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(
                {"features": np.ascontiguousarray(feats.features), "boxes": np.ascontiguousarray(feats.boxes)},
                str(tmp),
                metadata=metadata,
            )
        return path


ProgressCallback = Callable[[int, int], None]


def cache_settings(fingerprint: dict[str, Any], read_options: ReadOptions,
                   resize_to: tuple[int, int] | None) -> dict[str, Any]:
    """The settings part of a cache key (with the file's sha256 it makes the key)."""
    return {
        "extractor": fingerprint,
        # max_pixels only guards decoding; the pixels, and so the features, do not depend on it.
        "read": {k: v for k, v in read_options.to_dict().items() if k != "max_pixels"},
        "resize_to": list(resize_to) if resize_to else None,
    }


def extract_dataset(
    paths: Sequence[Path],
    extractor: FeatureExtractor,
    read_options: ReadOptions | None = None,
    cache: FeatureCache | None = None,
    resize_to: tuple[int, int] | None = None,
    progress: ProgressCallback | None = None,
) -> list[ImageFeatures]:
    """Features of every image, from the cache when present; reading runs one image ahead."""
    read_options = read_options or ReadOptions()
    settings = cache_settings(extractor.fingerprint(), read_options, resize_to)
    paths = [Path(p) for p in paths]
    results: list[ImageFeatures | None] = [None] * len(paths)
    todo: list[tuple[int, str | None]] = []
    for index, path in enumerate(paths):
        if not path.is_file():
            raise InputError(f"{path}: image file not found")
        key = FeatureCache.key(file_sha256(path), settings) if cache else None
        cached = cache.load(key) if cache and key else None
        if cached is not None:
            # The same limit as reading, so a warm cache never lets an image through that a cold one refuses.
            height, width = cached.image_size
            if height * width > read_options.max_pixels:
                raise InputError(
                    f"{path}: image is {width}x{height} = {height * width:,} pixels, over the limit of "
                    f"{read_options.max_pixels:,} pixels (max_pixels; raise it only for files you trust)"
                )
            results[index] = cached
        else:
            todo.append((index, key))
    done = len(paths) - len(todo)
    if progress:
        progress(done, len(paths))
    # Decode the next image on a thread while the backbone works on this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read_image, paths[todo[0][0]], read_options) if todo else None
        for position, (index, key) in enumerate(todo):
            image = pending.result()
            if position + 1 < len(todo):
                pending = pool.submit(read_image, paths[todo[position + 1][0]], read_options)
            feats = extractor.extract(image, resize_to=resize_to)
            if cache and key:
                provenance = {"image": str(paths[index]), "mitoscope": __version__, "engine": extractor.engine, **settings}
                try:
                    cache.save(key, feats, provenance)
                except OSError as exc:  # a full or read-only cache costs time, never the result
                    logger.warning("cannot write feature cache entry under %s (%s)", cache.root, exc)
            results[index] = feats
            done += 1
            if progress:
                progress(done, len(paths))
    return [r for r in results if r is not None]
