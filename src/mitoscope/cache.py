"""The feature cache: one safetensors file per image and extraction settings, written atomically.

An entry is keyed by the image file's bytes, the extractor (backbone, weights hash, tiling,
input size) and the reading options; its provenance sits in the file's metadata, so an
interrupted run resumes and never reads a half-written entry. Nothing here imports PyTorch:
prediction from an exported backbone uses the cache without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import __version__
from .atomic import atomic_path, sha256_file as file_sha256
from .defaults import cache_home
from .errors import InputError, MitoscopeError
from .io import ReadOptions, present_images, read_image
from .readahead import ReadAhead
from .tiling import make_grid

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


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


class WindowExtractor(Protocol):
    """What :func:`extract_dataset` needs of an extractor."""

    engine: str
    window: int
    overlap: float
    batch_size: int  # windows per backbone batch

    def fingerprint(self) -> dict[str, Any]: ...

    def extract_many(self, images: Sequence[np.ndarray],
                     resize_to: tuple[int, int] | None = None) -> list[ImageFeatures]: ...


def extractor_fingerprint(name: str, weights_id: str, input_size: int, window: int, overlap: float, mode: str,
                          mean: Sequence[float], std: Sequence[float], precision: str = "f32") -> dict[str, Any]:
    """What makes an extractor's features what they are: the engine does not (they agree to float32
    rounding, see engines.py), the precision it computes in does (bf16 features get their own key)."""
    precision_key = {} if precision == "f32" else {"precision": precision}  # f32 keys stay as they were
    return {
        "backbone": name,
        "weights_sha256": weights_id,
        "input_size": int(input_size),
        "window": int(window),
        "overlap": float(overlap),
        "mode": mode,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        **precision_key,
    }


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
            stored = meta.get("content_sha256")
            if stored is not None and stored != _content_sha256(feats.features, feats.boxes):
                raise ValueError("its bytes do not match the sha256 written with them (damaged on disk)")
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
            "content_sha256": _content_sha256(feats.features, feats.boxes),
        }
        with atomic_path(path) as tmp:
            save_file(
                {"features": np.ascontiguousarray(feats.features), "boxes": np.ascontiguousarray(feats.boxes)},
                str(tmp),
                metadata=metadata,
            )
        return path


def _content_sha256(features: np.ndarray, boxes: np.ndarray) -> str:
    """The sha256 of an entry's arrays (shape, dtype and bytes): a flipped bit on disk changes it."""
    digest = hashlib.sha256()
    for array in (features, boxes):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    extractor: WindowExtractor,
    read_options: ReadOptions | None = None,
    cache: FeatureCache | None = None,
    resize_to: tuple[int, int] | None = None,
    progress: ProgressCallback | None = None,
    read: Callable[[Path, ReadOptions], np.ndarray] = read_image,
    skipped: dict[Path, str] | None = None,
) -> list[ImageFeatures]:
    """Features of every image, from the cache when present.

    The others go to the backbone in groups: consecutive images whose windows fit one batch
    together (``extractor.batch_size`` windows, e.g. 32 single-window crops) are extracted by one
    ``extractor.extract_many`` call, so small images share backbone batches instead of running
    one forward each; an image with more windows is a group of its own. Reading (``read``)
    runs ahead on a thread, as many images as the last group held. Each entry is written as
    soon as its group is done (the images read before one that cannot be read too), so an
    interrupted run resumes from there. An image that cannot be read raises InputError; with
    ``skipped`` (a dict) it is recorded there instead (path -> the error's message) and left out
    of the list returned.
    """
    read_options = read_options or ReadOptions()
    settings = cache_settings(extractor.fingerprint(), read_options, resize_to)
    paths = [Path(p) for p in paths]
    results: list[ImageFeatures | None] = [None] * len(paths)
    todo: list[tuple[int, str | None]] = []

    def skip(path: Path, error: InputError) -> None:
        if skipped is None:
            raise error
        skipped[path] = str(error)

    # a missing file is said before any work (or, with skipped, listed there)
    _, missing = present_images(paths, skip_bad=skipped is not None)
    if skipped is not None:
        skipped.update(missing)
    for index, path in enumerate(paths):
        if path in missing:
            continue
        key = FeatureCache.key(file_sha256(path), settings) if cache else None
        cached = cache.load(key) if cache and key else None
        if cached is not None:
            # The same limit as reading, so a warm cache never lets an image through that a cold one refuses.
            height, width = cached.image_size
            if height * width > read_options.max_pixels:
                skip(path, InputError(
                    f"{path}: image is {width}x{height} = {height * width:,} pixels, over the limit of "
                    f"{read_options.max_pixels:,} pixels (max_pixels; raise it only for files you trust)"
                ))
                continue
            results[index] = cached
        else:
            todo.append((index, key))
    done = len(paths) - len(todo)
    if progress:
        progress(done, len(paths))

    def extract(group: list[tuple[int, str | None, np.ndarray]]) -> None:
        nonlocal done
        if not group:
            return
        for (index, key, _), feats in zip(group, extractor.extract_many([image for *_, image in group], resize_to)):
            if cache and key:
                provenance = {"image": str(paths[index]), "mitoscope": __version__, "engine": extractor.engine,
                              **settings}
                try:
                    cache.save(key, feats, provenance)
                except OSError as exc:  # a full or read-only cache costs time, never the result
                    logger.warning("cannot write feature cache entry under %s (%s)", cache.root, exc)
            results[index] = feats
        done += len(group)
        if progress:
            progress(done, len(paths))

    capacity = max(1, int(extractor.batch_size))
    group: list[tuple[int, str | None, np.ndarray]] = []
    group_windows = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        reads = ReadAhead(pool, [paths[index] for index, _ in todo], lambda path: read(path, read_options))
        try:
            for index, key in todo:
                try:
                    image = reads.next()
                except MitoscopeError as error:
                    if skipped is None or not isinstance(error, InputError):
                        extract(group)  # the images read before this one keep their entries
                        raise
                    skipped[paths[index]] = str(error)
                    done += 1
                    if progress:
                        progress(done, len(paths))
                    continue
                height, width = resize_to or image.shape[:2]
                windows = make_grid(height, width, extractor.window, extractor.overlap).n_windows
                if group and group_windows + windows > capacity:
                    reads.ahead = len(group)  # decode about the next group while the backbone runs this one
                    reads.top_up()
                    extract(group)
                    group, group_windows = [], 0
                group.append((index, key, image))
                group_windows += windows
            extract(group)
        finally:
            reads.cancel()
    return [r for r in results if r is not None]


def open_cache(cache_dir: str | Path | None, use_cache: bool = True) -> FeatureCache | None:
    if not use_cache:
        return None
    return FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir())
