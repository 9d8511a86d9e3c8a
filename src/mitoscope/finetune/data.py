"""Training images held in memory, resized to the training size, and how they are split.

:class:`ImageStore` reads each image (or, for pre-training, each of its ``tile``-sized
tiles: the grid of :func:`mitoscope.tiling.make_grid`) once and resizes it to ``size``;
:func:`validation_split` holds out a stratified (and, with groups, grouped) validation set.

**Pre-training set** (``pretrain_data``): the large Round-1 images are cut into tiles, each
labelled with its image's label. That label is *noisy for Mitosis images*: a Mitosis image
holds a few mitotic cells, so most of its tiles show none and are nonetheless called Mitosis.
``negatives_only_tiles`` avoids that: tiles are cut from Normal images only (every tile of a
Normal image is truly normal), and Mitosis images enter whole, resized to ``size``. The
pre-training images must not be among the training images (checked).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import InputError
from ..features import FeatureCache, file_sha256, resize_image
from ..io import LabelledImages, ReadOptions, load_labelled_images, read_image
from ..progress import Progress
from ..readahead import map_ahead
from ..tiling import crop_windows, make_grid
from .config import FineTuneConfig

logger = logging.getLogger(__name__)


def tile_boxes(height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """(N, 4) ``[x0, y0, x1, y1]`` tiles covering an image (``tiling.make_grid``'s grid)."""
    return make_grid(height, width, tile, overlap).boxes()


def _read_ahead(paths: Sequence[Path], work: Callable[[Path], Any], progress: Progress | None, stage: str) -> list[Any]:
    """``work(path)`` for every path, in order, the next one running on a thread meanwhile."""
    results: list[Any] = []
    if progress:
        progress(stage, 0, len(paths))
    for result in map_ahead(work, paths):
        results.append(result)
        if progress:
            progress(stage, len(results), len(paths))
    return results


class ImageStore:
    """Images (or their tiles) read once and resized to ``size`` x ``size``, as uint8 arrays.

    The arrays live in memory (``n x size x size x 3`` bytes: 2000 images at 512 px take
    1.5 GB). With ``cache_dir`` each image's resized copy is also kept on disk (one
    safetensors file per image, keyed by the file's bytes, the reading options, the size and
    the tiling, written atomically), so that a rerun does not decode large images again.
    """

    def __init__(self, size: int, read_options: ReadOptions, cache_dir: str | Path | None = None) -> None:
        self.size = int(size)
        self.read_options = read_options
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _settings(self, tile: int | None, overlap: float) -> dict[str, Any]:
        return {"kind": "resized-images", "size": self.size, "read": self.read_options.to_dict(),
                "tile": tile, "overlap": overlap if tile else None}

    def _compute(self, path: Path, tile: int | None, overlap: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        image = read_image(path, self.read_options)
        height, width = image.shape[:2]
        if tile is None:
            boxes = np.array([[0, 0, width, height]], dtype=np.int64)
            crops = [image]
        else:
            grid = make_grid(height, width, tile, overlap)
            boxes = grid.boxes()
            crops = list(crop_windows(image, grid))
        # C order explicitly: resize_image returns transposed views, and safetensors writes raw memory.
        arrays = np.ascontiguousarray(np.stack([resize_image(crop, (self.size, self.size)) for crop in crops]))
        return arrays, boxes, (height, width)

    def _load_one(self, path: Path, tile: int | None, overlap: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if self.cache_dir is None:
            return self._compute(path, tile, overlap)
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, save_file

        key = FeatureCache.key(file_sha256(path), self._settings(tile, overlap))
        entry = self.cache_dir / key[:2] / f"{key}.safetensors"
        if entry.is_file():
            try:
                stored = load_file(str(entry))
                return stored["images"], stored["boxes"], tuple(int(v) for v in stored["image_size"])
            except (SafetensorError, OSError, KeyError) as exc:  # a damaged entry is recomputed, not trusted
                logger.warning("%s: damaged cache entry ignored (%s)", entry, exc)
        arrays, boxes, image_size = self._compute(path, tile, overlap)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry) as temp:
            save_file({"images": arrays, "boxes": boxes, "image_size": np.asarray(image_size, dtype=np.int64)},
                      str(temp), metadata={"image": str(path)})
        return arrays, boxes, image_size

    def load(
        self,
        paths: Sequence[Path],
        tile: int | None = None,
        overlap: float = 0.0,
        progress: Progress | None = None,
        stage: str = "reading images",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Resized images (``tile=None``) or tiles: ``(arrays (M, S, S, 3), owner (M,), boxes (M, 4))``.

        ``owner[m]`` is the index in ``paths`` of the image array ``m`` comes from;
        ``boxes[m]`` where it lies in that image as read.
        """
        loaded = _read_ahead([Path(p) for p in paths], lambda p: self._load_one(p, tile, overlap), progress, stage)
        arrays = np.concatenate([a for a, _, _ in loaded]) if loaded else np.zeros((0, self.size, self.size, 3), np.uint8)
        owner = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, (a, _, _) in enumerate(loaded)]) if loaded else np.zeros(0, np.int64)
        boxes = np.concatenate([b for _, b, _ in loaded]) if loaded else np.zeros((0, 4), np.int64)
        return arrays, owner, boxes


class _ArrayDataset(torch.utils.data.Dataset):
    """(uint8 CHW image tensor, float target) pairs of ``images[indices]``."""

    def __init__(self, images: np.ndarray, y: np.ndarray, indices: np.ndarray) -> None:
        self.images = images
        self.y = np.asarray(y, dtype=np.float32)
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.indices[item]
        image = torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))
        return image, torch.tensor(self.y[index])


def validation_split(
    y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int, source: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (grouped when ``groups`` is given) (train, validation) positions; both hold both classes."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise InputError(
            f"{source}: a validation split needs at least 2 images of each class (one to train on, one to "
            f"validate on); got {counts.tolist()} (negative, positive)"
        )
    positions = np.arange(len(y))
    if groups is None:
        n_val = min(max(2, math.ceil(fraction * len(y))), len(y) - 2)
        train, val = train_test_split(positions, test_size=n_val, stratify=y, random_state=seed)
        return np.sort(train), np.sort(val)
    groups = np.asarray(groups)
    n_groups = np.unique(groups).size
    # Fewer, larger folds when few groups would leave a class out of the validation fold.
    groups_per_class = min(np.unique(groups[y == label]).size for label in (0, 1))
    for n_splits in range(min(max(2, round(1.0 / fraction)), groups_per_class, int(counts.min())), 1, -1):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for train, val in splitter.split(positions, y, groups):
            if np.unique(y[val]).size == 2 and np.unique(y[train]).size == 2:
                return np.sort(train), np.sort(val)
    raise InputError(
        f"{source}: cannot hold out a validation split of whole groups with both classes on each side "
        f"({n_groups} groups); it needs at least 2 groups holding each class"
    )


def _load_pretrain_set(config: FineTuneConfig, store: ImageStore, data: LabelledImages,
                       progress: Progress | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Tiles (and, with ``negatives_only_tiles``, whole positive images) of the pre-training set."""
    pre = load_labelled_images(config.pretrain_data, config.pretrain_labels, config.positive)
    overlap = {p.resolve() for p in pre.paths} & {p.resolve() for p in data.paths}
    if overlap:
        raise InputError(
            f"{config.pretrain_labels or config.pretrain_data}: {len(overlap)} pre-training image(s) are also training "
            f"images (e.g. {sorted(overlap)[0]}); the pre-training set must be separate"
        )
    tiled = [i for i in range(len(pre.paths)) if not (config.negatives_only_tiles and pre.y[i] == 1)]
    whole = [i for i in range(len(pre.paths)) if config.negatives_only_tiles and pre.y[i] == 1]
    arrays, owner, _ = store.load([pre.paths[i] for i in tiled], config.tile, config.tile_overlap, progress,
                                  "tiling pre-training images")
    parts, labels, groups = [arrays], [pre.y[tiled][owner]], [np.asarray(tiled)[owner]]
    if whole:
        whole_arrays, whole_owner, _ = store.load([pre.paths[i] for i in whole], None, 0.0, progress,
                                                  "reading pre-training positives")
        parts.append(whole_arrays)
        labels.append(pre.y[whole][whole_owner])
        groups.append(np.asarray(whole)[whole_owner])
    images = np.concatenate(parts)
    y = np.concatenate(labels).astype(np.int64)
    group_of = np.concatenate(groups).astype(str)  # a tile's group is its image: no image on both sides
    summary = {
        "data": str(config.pretrain_data), "labels": str(config.pretrain_labels) if config.pretrain_labels else None,
        "n_images": len(pre.paths), "tile": config.tile, "tile_overlap": config.tile_overlap,
        "negatives_only_tiles": config.negatives_only_tiles, "n_samples": int(len(y)),
        "n_per_class": dict(zip(pre.classes, np.bincount(y, minlength=2).tolist())),
    }
    return images, y, group_of, summary
