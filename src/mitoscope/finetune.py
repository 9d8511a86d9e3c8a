"""End-to-end fine-tuning of a pretrained CNN on whole images (the write-up's Round-2 classifier).

The SOFTEC AIC'24 Round-2 model is an ImageNet EfficientNet-B4 fine-tuned on the whole
images resized to 512 x 512, in two phases:

1. **head** - a new classification head is trained on the frozen pretrained base. The base
   stays exactly as it was: its parameters are frozen *and* its BatchNorm layers are kept in
   eval mode, so their running statistics do not drift either.
2. **full** - the base is unfrozen (all of it, or the last N blocks, as timm's coarse
   ``group_matcher`` groups them: for EfficientNets the last N of ``model.blocks``, with
   ``conv_head``/``bn2`` going with the last block) and trained with the head at a lower
   learning rate. Frozen parts keep their BatchNorm in eval mode.

Each phase keeps the checkpoint of its best validation epoch (validation loss or AUC) and
reloads it at its end; early stopping ends a phase that stops improving. The validation
images are a stratified (and, when the labels CSV has a ``group``/``slide`` column,
grouped) split of the training images (``val_fraction``). The decision threshold is the
max-F1 one on the validation predictions, or on the out-of-fold predictions with ``cv``.

**Pre-training stage** (optional, ``pretrain_data``). The write-up first adapted the base to
microscopy on the Round-1 images, far larger than 512 px: each is cut into ``tile``-sized
tiles (``tile_overlap``, the grid of :func:`mitoscope.tiling.make_grid`), each tile resized
to ``size`` and labelled with its image's label; both phases run on the tiles, then the
main stage (both phases again) trains on ``DATA_DIR`` starting from the adapted network,
head included. Labelling tiles with their image's label is *noisy for Mitosis images*:
a Mitosis image holds a few mitotic cells, so most of its tiles show none and are
nonetheless called Mitosis. ``negatives_only_tiles`` avoids that: tiles are cut from Normal
images only (every tile of a Normal image is truly normal), and Mitosis images enter whole,
resized to ``size``. The pre-training images must not be among ``DATA_DIR``'s (checked).
With ``cv`` the pre-training runs once, before the folds (it never sees ``DATA_DIR``).

**Augmentation** (``mitoscope.augment``): flips, quarter turns, small zoom, brightness and
contrast, and H&E stain jitter in HED space (on by default; switch it off for fluorescence).
Class imbalance: ``balance="pos_weight"`` weights the positive class's loss by
negatives/positives, ``"sampler"`` draws balanced batches instead.

**Frozen-trunk cache** (``trunk_cache``; on by default with ``--unfreeze N``, off with
``all``). No phase ever trains the part of the backbone before the first module that
``--unfreeze N`` unfreezes (for EfficientNets: ``conv_stem``, ``bn1`` and ``blocks[:k]``), so
it runs once per training image and *view*, in eval mode, before training, and both phases
train on the cached maps: the top of the backbone and the head see exactly what they would
see from images, at a fraction of the cost (on CPU at 512 px, ~3 s instead of ~10-17 s per
batch of 8 with ``tf_efficientnet_lite0``). A view is one of the 8 flips/quarter turns of the
square (``trunk_views`` of them, a random one per image and epoch), each with its own draw of
the zoom, brightness/contrast and stain jitter when those are on. Validation uses the image
as it is (its 8 symmetries with ``tta``). The cache takes ``views x images x C x h x w x 4``
bytes (120 images, 9 views, lite0 with ``--unfreeze 2``: 0.5 GB) and is refused beyond
``trunk_cache_gb``; it is shared by the cross-validation folds and the final fit. The saved
model is the whole network, as without the cache.

**Pooling**: ``avg`` (the write-up: global average pooling, dropout, one logit) or
``attention`` (gated-attention MIL over the positions of the final feature map). Both give a
per-position heatmap at prediction time: the attention weights (they sum to 1), or for
``avg`` the class-activation map (the head applied at each position; their mean is the
logit). Position ``(i, j)`` is reported as the cell ``image_size / map_size`` it covers,
mapped back to the image as read (the receptive field is larger than the cell).

**Hardware** (Lightning): mixed precision on GPU (``precision="16-mixed"``/``"bf16-mixed"``,
``"auto"`` picks bf16 where supported; CPU runs in 32-bit), gradient accumulation
(``accumulate``), and multi-GPU / multi-node DDP through Lightning's own ``ddp`` strategy,
chosen when ``devices > 1`` or ``num_nodes > 1``. ``batch_size`` is per device: the
effective batch is ``batch_size x devices x num_nodes x accumulate``.

Two GPUs on one machine::

    mitoscope finetune scenes/ --labels scenes/labels.csv --out model/ --devices 2

Lightning starts the second process itself by running the same command again (with
``LOCAL_RANK=1``): every process reads the images and trains its share of each batch; only
rank 0 writes the model. From Python, run the training from a script (not a notebook) for
the same reason.

A SLURM cluster (2 nodes x 4 GPUs); Lightning recognises SLURM from its environment
(``SLURM_NTASKS``, ``SLURM_PROCID``, ...) and takes the ranks and the main address from it::

    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8
    srun mitoscope finetune scenes/ --labels scenes/labels.csv --out /shared/model \\
        --devices 4 --num-nodes 2 --workers 6 --cache-dir /shared/cache

``--devices`` must equal ``--ntasks-per-node`` and ``--num-nodes`` ``--nodes``. The
checkpoints live in a work folder next to ``--out`` (``.NAME.finetune-work``, removed at the
end), which every rank reads: ``--out`` must be on a filesystem all nodes share.

Python API::

    from mitoscope.finetune import FineTuneConfig, finetune, FineTunedModel
    result = finetune("scenes/", "scenes/labels.csv", "model/", FineTuneConfig(size=512, pool="attention"))
    model = FineTunedModel.load("model/")
    pred = model.predict_paths(["new.png"], with_window_scores=True)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io as stdio
import logging
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import ModelDescription, read_model_config, write_model_dir
from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .augment import AugmentConfig, augment_batch, dihedral, invert_dihedral
from .backbones import Backbone, create_backbone
from .defaults import DEFAULT_FINETUNE_BACKBONE, OFFLINE_ALTERNATIVE
from .errors import InputError, ModelError, WeightsUnavailableError
from .evaluation import best_f1_threshold, compute_metrics, cross_validate, fit_warnings, write_report
from .features import FeatureCache, file_sha256, pick_device, resize_image
from .heads import _GatedAttentionNetwork
from .io import LabelledImages, ReadOptions, SourceProfile, load_labelled_images, read_image
from .options import (ACCELERATORS, BALANCES, BATCHNORMS, MONITORS, POOLS, PRECISIONS, SCHEDULES, check_choice,
                      check_file)
from .tiling import crop_windows, make_grid, validate_tiling

logger = logging.getLogger(__name__)

__all__ = [
    "FineTuneConfig",
    "FineTuneNetwork",
    "FineTuneResult",
    "FineTunedModel",
    "FineTuner",
    "ImageStore",
    "TrunkCache",
    "TrunkSplit",
    "TrunkView",
    "build_trunk_cache",
    "finetune",
    "fit_phase",
    "plan_trunk_views",
    "position_boxes",
    "resolve_trunk_split",
    "set_trainable",
    "tile_boxes",
    "trunk_split",
    "validation_split",
]

NETWORK_FILE = "network.safetensors"
HEAD_NAME = "finetuned"
# The choices of pool, monitor, balance, schedule, precision and accelerator: mitoscope.options.
# --schedule onecycle: each phase warms up over its first WARMUP_FRACTION of steps, then anneals.
WARMUP_FRACTION = 0.15
# The 8 symmetries of the square used by test-time augmentation: (quarter turns, flip).
TTA_TRANSFORMS = tuple((k, flip) for flip in (False, True) for k in range(4))

# (stage description, done, total), as everywhere in the package
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_unfreeze(value: str | int) -> str | int:
    """``"all"`` or a positive number of blocks (timm's coarse parameter groups)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        blocks = int(value)
    except (TypeError, ValueError):
        blocks = 0
    if blocks < 1 or isinstance(value, bool):
        raise InputError(f"--unfreeze expects 'all' or a positive number of blocks, got {value!r}")
    return blocks


def parse_devices(value: str | int) -> str | int:
    """``"auto"``, a device count, or a comma-separated list of device indices (Lightning's forms)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1 and value != -1:
            raise InputError(f"--devices expects a positive count, -1, 'auto' or a list like 0,1; got {value}")
        return value
    text = str(value).strip()
    if text == "auto":
        return text
    if text.lstrip("-").isdigit():
        return parse_devices(int(text))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        return ",".join(parts) + ("," if len(parts) == 1 else "")
    raise InputError(f"--devices expects a positive count, -1, 'auto' or a list like 0,1; got {value!r}")


@dataclass(frozen=True)
class FineTuneConfig:
    """Everything ``mitoscope finetune`` can be told; :meth:`validate` checks it before any work."""

    backbone: str = DEFAULT_FINETUNE_BACKBONE
    weights: str | None = None
    pretrained: bool = True
    size: int = 512
    pool: str = "avg"
    dropout: float = 0.3
    attention_hidden: int = 0  # 0: attention straight on the backbone's features (no encoder layer)
    attention_dim: int = 128
    epochs_head: int = 5
    epochs_full: int = 20
    lr_head: float = 1e-3
    lr_full: float = 1e-4
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    # "frozen": BatchNorm layers keep their ImageNet statistics and scale/shift while the layers
    # around them train (Keras' fine-tuning recipe, which the write-up used). Trained on small
    # batches they drifted until the final feature map went dead and the output constant.
    batchnorm: str = "frozen"
    gradient_clip: float = 1.0  # largest gradient norm per step; 0 turns clipping off
    unfreeze: str | int = "all"
    batch_size: int = 16
    accumulate: int = 1
    precision: str = "auto"
    accelerator: str = "auto"
    devices: str | int = 1
    num_nodes: int = 1
    workers: int | None = None
    val_fraction: float = 0.2
    monitor: str = "loss"
    patience: int = 5
    balance: str = "pos_weight"
    cv: int = 0
    seed: int = 0
    positive: str | None = None
    channels: tuple[int, int, int] | None = None
    tta: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain_data: str | None = None
    pretrain_labels: str | None = None
    tile: int = 1600
    tile_overlap: float = 0.25
    negatives_only_tiles: bool = False
    trunk_cache: bool | None = None  # None: on whenever --unfreeze N leaves a frozen trunk to cache
    trunk_views: int = 8
    trunk_cache_gb: float = 8.0
    progress_bar: bool = False

    def validate(self) -> "FineTuneConfig":
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

        check_choice("--pool", self.pool, POOLS)
        check_choice("--monitor", self.monitor, MONITORS)
        check_choice("--balance", self.balance, BALANCES)
        check_choice("--accelerator", self.accelerator, ACCELERATORS)
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise InputError(f"--accelerator {self.accelerator}: no CUDA GPU is visible here; use --accelerator cpu")
        check_choice("--precision", str(self.precision), PRECISIONS)
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)):
            raise InputError(f"--size must be an integer number of pixels, got {self.size!r}")
        for name in ("epochs_head", "epochs_full", "accumulate", "batch_size", "num_nodes", "patience",
                     "attention_hidden", "attention_dim"):
            positive_int(name, 0 if name.startswith("epochs") or name == "attention_hidden" else 1)
        check_choice("--batchnorm", self.batchnorm, BATCHNORMS)
        if isinstance(self.gradient_clip, bool) or not isinstance(self.gradient_clip, (int, float)) \
                or not self.gradient_clip >= 0:
            raise InputError(f"--gradient-clip must be a gradient norm >= 0 (0: off), got {self.gradient_clip!r}")
        check_choice("--schedule", self.schedule, SCHEDULES)
        if self.epochs_head + self.epochs_full < 1:
            raise InputError("--epochs-head and --epochs-full are both 0: nothing to train")
        for name in ("lr_head", "lr_full"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise InputError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise InputError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise InputError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction!r}")
        if self.cv != 0 and (isinstance(self.cv, bool) or self.cv < 2):
            raise InputError(f"--cv must be 0 (no cross-validation) or at least 2, got {self.cv}")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"--workers must be >= 0, got {self.workers}")
        unfreeze = parse_unfreeze(self.unfreeze)
        parse_devices(self.devices)
        if self.trunk_cache not in (None, True, False):
            raise InputError(f"trunk_cache must be True, False or None (automatic), got {self.trunk_cache!r}")
        if self.trunk_cache and unfreeze == "all":
            raise InputError("--trunk-cache needs --unfreeze N: with --unfreeze all every layer trains, "
                             "so no frozen trunk is left to cache")
        positive_int("trunk_views")
        if isinstance(self.trunk_cache_gb, bool) or not isinstance(self.trunk_cache_gb, (int, float)) \
                or not self.trunk_cache_gb > 0:
            raise InputError(f"--trunk-cache-gb must be a positive number of gigabytes, got {self.trunk_cache_gb!r}")
        check_file(self.weights, "weights file")
        if self.pretrain_labels is not None and self.pretrain_data is None:
            raise InputError("--pretrain-labels was given without --pretrain-data")
        if self.pretrain_data is not None:
            if not isinstance(self.tile, (int, np.integer)) or self.tile < 32:
                raise InputError(f"--tile must be an integer of at least 32 pixels, got {self.tile!r}")
            validate_tiling(int(self.tile), float(self.tile_overlap))
        self.read_options  # noqa: B018 - validates --channels
        return replace(self, unfreeze=parse_unfreeze(self.unfreeze), devices=parse_devices(self.devices))

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(channels=self.channels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["augment"] = self.augment.to_dict()
        return data


# --------------------------------------------------------------------------------------------
# Images held in memory, resized to the training size
# --------------------------------------------------------------------------------------------


def tile_boxes(height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """(N, 4) ``[x0, y0, x1, y1]`` tiles covering an image (``tiling.make_grid``'s grid)."""
    return make_grid(height, width, tile, overlap).boxes()


def _read_ahead(paths: Sequence[Path], work: Callable[[Path], Any], progress: Progress | None, stage: str) -> list[Any]:
    """``work(path)`` for every path, in order, the next one running on a thread meanwhile."""
    results: list[Any] = []
    if progress:
        progress(stage, 0, len(paths))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(work, paths[0]) if paths else None
        for index in range(len(paths)):
            result = pending.result()
            if index + 1 < len(paths):
                pending = pool.submit(work, paths[index + 1])
            results.append(result)
            if progress:
                progress(stage, index + 1, len(paths))
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


# --------------------------------------------------------------------------------------------
# The network: a timm backbone's feature map, then average or attention pooling
# --------------------------------------------------------------------------------------------


class AveragePoolHead(nn.Module):
    """Global average pooling -> dropout -> one logit (the write-up's head)."""

    def __init__(self, n_features: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_features, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(maps.mean(dim=(2, 3)))).squeeze(-1)

    def position_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, h, w) class-activation map: the head at each position; its mean is the logit."""
        weight = self.classifier.weight[0].to(maps.dtype)
        return torch.einsum("bchw,c->bhw", maps, weight) + self.classifier.bias.to(maps.dtype)


class FineTuneNetwork(nn.Module):
    """A timm backbone (``num_classes=0``) whose final feature map is pooled into one logit."""

    def __init__(self, backbone: nn.Module, pool: str = "avg", dropout: float = 0.3,
                 attention_hidden: int = 0, attention_dim: int = 128) -> None:
        super().__init__()
        check_choice("pool", pool, POOLS)
        self.backbone = backbone
        self.pool = pool
        n_features = int(backbone.num_features)
        if pool == "avg":
            self.head: nn.Module = AveragePoolHead(n_features, dropout)
        else:
            # The same gated-attention MIL network as the window-feature AttentionHead; its
            # standardisation buffers stay at 0/1 here (feature maps come out of BatchNorm).
            self.head = _GatedAttentionNetwork(n_features, attention_hidden, attention_dim, dropout)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)

    def pool_logits(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of final feature maps (B, C, h, w)."""
        if self.pool == "avg":
            return self.head(maps)
        return self.head(maps.flatten(2).transpose(1, 2))[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool_logits(self.feature_map(images))

    def forward_from_trunk(self, maps: torch.Tensor, split: "TrunkSplit") -> torch.Tensor:
        """Logits (B,) of trunk maps (what ``split.trunk`` gives): the rest of the network."""
        return self.pool_logits(split.top(self.backbone, maps))

    def forward_positions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,) and per-position scores (B, h, w): attention weights, or the CAM for ``avg``."""
        maps = self.feature_map(images)
        if self.pool == "avg":
            return self.head(maps), self.head.position_scores(maps)
        logits, _, weights = self.head(maps.flatten(2).transpose(1, 2))
        return logits, weights.view(maps.shape[0], maps.shape[2], maps.shape[3])


def build_network(config: FineTuneConfig, pretrained: bool | None = None) -> tuple[FineTuneNetwork, Backbone]:
    """The backbone with its pretrained weights and a new head (initialised from ``config.seed``)."""
    pretrained = config.pretrained if pretrained is None else pretrained
    try:
        backbone = create_backbone(config.backbone, weights=config.weights, pretrained=pretrained)
    except WeightsUnavailableError as exc:
        message = str(exc)
        if OFFLINE_ALTERNATIVE not in message:
            message += f"; offline, use --backbone {OFFLINE_ALTERNATIVE} (its weights are embedded)"
        raise WeightsUnavailableError(message) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = FineTuneNetwork(backbone.model, config.pool, config.dropout, config.attention_hidden,
                                  config.attention_dim)
    return network, backbone


def check_input_size(network: FineTuneNetwork, name: str, size: int) -> tuple[int, int]:
    """Check that the network takes ``size`` x ``size`` images; return its feature-map shape.

    The size must be at least 32 and a multiple of the backbone's total stride (32 for
    EfficientNets), so that the feature map tiles the image exactly; a dry forward pass on a
    zero image catches anything else the backbone cannot take.
    """
    info = getattr(network.backbone, "feature_info", None)
    stride = int(info[-1]["reduction"]) if info else 32
    if size < 32 or size % stride:
        raise InputError(
            f"--size {size} does not suit backbone {name}: expected at least 32 and a multiple of its "
            f"stride {stride} (e.g. {max(32, stride, round(size / stride) * stride)})"
        )
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            maps = network.feature_map(torch.zeros(1, 3, size, size))
            if maps.ndim == 4:
                network(torch.zeros(1, 3, size, size))
    except Exception as exc:  # the backbone's own complaint, in one line
        raise InputError(
            f"backbone {name} cannot take {size}x{size} images ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    finally:
        network.train(was_training)
    if maps.ndim != 4:
        raise InputError(
            f"backbone {name} gives a sequence of tokens, not a 2-D feature map, at --size {size}: "
            f"fine-tuning needs a CNN (e.g. efficientnet_b4 or {OFFLINE_ALTERNATIVE})"
        )
    return int(maps.shape[2]), int(maps.shape[3])


def set_trainable(network: FineTuneNetwork, unfreeze: str | int | None, batchnorm: str = "frozen") -> list[str]:
    """Freeze the backbone except ``unfreeze`` (None: nothing, "all", or the last N timm groups).

    The head always trains. Returns the names of the backbone parameters left trainable.
    Groups are timm's coarse ``group_matcher`` groups (stem, then one per stage; for
    EfficientNets ``conv_head``/``bn2`` belong to the last stage). With ``batchnorm="frozen"``
    the BatchNorm layers of the unfrozen part stay frozen too, so that training keeps them in
    eval mode (their running statistics do not move either).
    """
    backbone = network.backbone
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    for parameter in network.head.parameters():
        parameter.requires_grad_(True)
    wanted = unfrozen_parameter_names(backbone, unfreeze)
    if batchnorm == "frozen":
        wanted -= {f"{module_name}.{name}" if module_name else name
                   for module_name, module in backbone.named_modules()
                   if isinstance(module, nn.modules.batchnorm._BatchNorm)
                   for name, _ in module.named_parameters(recurse=False)}
    for name, parameter in backbone.named_parameters():
        if name in wanted:
            parameter.requires_grad_(True)
    return [name for name, _ in backbone.named_parameters() if name in wanted]


def unfrozen_parameter_names(backbone: nn.Module, unfreeze: str | int | None) -> set[str]:
    """Names of the backbone parameters that ``unfreeze`` trains (see :func:`set_trainable`)."""
    from timm.models import group_parameters

    if unfreeze is None:
        return set()
    if unfreeze == "all":
        return {name for name, _ in backbone.named_parameters()}
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    chosen = sorted(groups)[-int(unfreeze):]
    return {name for group in chosen for name in groups[group]}


def _trainable_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Frozen-trunk cache: the frozen first part of the backbone runs once per image and view
# --------------------------------------------------------------------------------------------


def backbone_chain(backbone: nn.Module) -> tuple[str, ...] | None:
    """The modules ``forward_features`` runs one after the other, or None for an architecture
    this does not know how to cut (timm EfficientNet, MobileNetV3 and ResNet are known)."""
    kind = type(backbone).__name__
    if kind in ("EfficientNet", "MobileNetV3") and isinstance(getattr(backbone, "blocks", None), nn.Sequential):
        stages = tuple(f"blocks.{i}" for i in range(len(backbone.blocks)))
        return ("conv_stem", "bn1", *stages, *(("conv_head", "bn2") if kind == "EfficientNet" else ()))
    if kind == "ResNet":
        return ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return None


@dataclass(frozen=True)
class TrunkSplit:
    """A backbone cut in two: ``chain[:cut]`` (the frozen trunk), then ``chain[cut:]`` (the top)."""

    chain: tuple[str, ...]
    cut: int

    @staticmethod
    def _run(backbone: nn.Module, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        for name in names:
            x = backbone.get_submodule(name)(x)
        return x

    def trunk(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self._run(backbone, images, self.chain[:self.cut])

    def top(self, backbone: nn.Module, maps: torch.Tensor) -> torch.Tensor:
        return self._run(backbone, maps, self.chain[self.cut:])

    @property
    def first_trained(self) -> str | None:
        return self.chain[self.cut] if self.cut < len(self.chain) else None


def trunk_split(network: FineTuneNetwork, unfreeze: str | int) -> TrunkSplit:
    """The cut before the first backbone module that ``unfreeze`` trains; InputError when there is none.

    The chain of modules is checked against ``forward_features`` on a small random image,
    so a cut never computes anything the whole network would not.
    """
    backbone = network.backbone
    name = type(backbone).__name__
    chain = backbone_chain(backbone)
    if chain is None:
        raise InputError(f"backbone {name} cannot be cut into a frozen trunk and a trained top "
                         "(known: EfficientNet, MobileNetV3, ResNet)")
    if unfreeze == "all":
        raise InputError("with --unfreeze all every layer trains, so no frozen trunk is left to cache")
    trained = unfrozen_parameter_names(backbone, unfreeze)
    cut = 0
    for module_name in chain:
        parameters = {f"{module_name}.{p}" for p, _ in backbone.get_submodule(module_name).named_parameters()}
        if parameters & trained:
            break
        cut += 1
    if cut == 0:
        raise InputError(f"--unfreeze {unfreeze} trains the first layer of {name}, so no frozen trunk is left to cache")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            whole = backbone.forward_features(probe)
            chained = TrunkSplit._run(backbone, probe, chain)
    except Exception as exc:  # the backbone's own complaint, in one line
        raise InputError(f"backbone {name} cannot be cut: a 64 px probe failed "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    finally:
        backbone.train(was_training)
    if whole.shape != chained.shape or not torch.allclose(whole, chained, rtol=1e-4, atol=1e-5):
        raise InputError(f"backbone {name}: its forward_features is not the chain of its stages, so it cannot be cut")
    return TrunkSplit(chain, cut)


def resolve_trunk_split(network: FineTuneNetwork, config: FineTuneConfig) -> TrunkSplit | None:
    """The trunk to cache under ``config``: asked for (``trunk_cache=True``: InputError when impossible),
    automatic (``None``: whenever ``--unfreeze N`` allows it), or refused (``False``)."""
    if config.trunk_cache is False or config.unfreeze == "all":
        return None
    try:
        return trunk_split(network, config.unfreeze)
    except InputError as exc:
        if config.trunk_cache:
            raise InputError(f"--trunk-cache: {exc}; drop --trunk-cache") from None
        logger.info("no trunk cache: %s", exc)
        return None


@dataclass(frozen=True)
class TrunkView:
    """One cached view of an image: ``turns`` quarter turns after an optional left-right ``flip``,
    then, when ``draw`` is not None, that draw of the photometric and scale jitter."""

    turns: int
    flip: bool
    draw: int | None = None


def _jitters(augment: AugmentConfig | None) -> bool:
    if augment is None:
        return False
    stain = augment.stain_jitter and (augment.stain_sigma > 0 or augment.stain_bias > 0)
    return bool(stain or augment.scale > 0 or augment.brightness > 0 or augment.contrast > 0)


def plan_trunk_views(augment: AugmentConfig | None, n_views: int, tta: bool) -> tuple[list[TrunkView], list[int], list[int]]:
    """The distinct views to cache, the ones training draws from, and the ones validation averages.

    Training views cycle through the symmetries ``augment`` allows (all 8 with flips and
    quarter turns), each with its own jitter draw when photometric or scale jitter is on.
    Validation sees the image as it is, or its 8 symmetries with ``tta``; a view needed by
    both is cached once.
    """
    allowed = {(0, False)}
    if augment is not None and augment.rot90:
        allowed |= {(k, False) for k in range(4)}
    if augment is not None and augment.flips:
        allowed |= {(0, True), (2, True), (2, False)}  # left-right, up-down and their product
        if augment.rot90:
            allowed |= set(TTA_TRANSFORMS)
    symmetries = [t for t in TTA_TRANSFORMS if t in allowed]
    jitter = _jitters(augment)
    if not jitter and n_views > len(symmetries):
        raise InputError(
            f"--trunk-views {n_views}: without photometric or scale jitter the augmentation gives only "
            f"{len(symmetries)} distinct views of an image; use --trunk-views {len(symmetries)} or fewer"
        )
    training = [TrunkView(*symmetries[i % len(symmetries)], i if jitter else None) for i in range(n_views)]
    evaluation = [TrunkView(k, flip) for k, flip in (TTA_TRANSFORMS if tta else TTA_TRANSFORMS[:1])]
    views: list[TrunkView] = []
    for view in training + evaluation:
        if view not in views:
            views.append(view)
    return views, [views.index(v) for v in training], [views.index(v) for v in evaluation]


@dataclass
class TrunkCache:
    """Trunk maps of every image for every view, what both phases train on instead of images.

    ``maps[r, i]`` is the trunk's output for view ``views[r]`` of image ``i``; training draws
    a random row of ``train_rows`` per image and epoch, validation averages the probabilities
    over ``eval_rows``.
    """

    split: TrunkSplit
    views: list[TrunkView]
    train_rows: list[int]
    eval_rows: list[int]
    maps: torch.Tensor  # (len(views), n_images, C, h, w) float32, on the CPU

    @property
    def nbytes(self) -> int:
        return int(self.maps.numel() * self.maps.element_size())

    def describe(self) -> dict[str, Any]:
        return {
            "trunk": list(self.split.chain[:self.split.cut]), "first_trained": self.split.first_trained,
            "views": [asdict(v) for v in self.views], "train_rows": self.train_rows, "eval_rows": self.eval_rows,
            "map_shape": list(self.maps.shape[2:]), "n_images": int(self.maps.shape[1]), "bytes": self.nbytes,
        }


def trunk_map_shape(network: FineTuneNetwork, split: TrunkSplit, size: int) -> tuple[int, int, int]:
    """(C, h, w) of the trunk's output for a ``size`` x ``size`` image."""
    backbone = network.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            maps = split.trunk(backbone, torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
    finally:
        backbone.train(was_training)
    return tuple(int(v) for v in maps.shape[1:])  # type: ignore[return-value]


def check_trunk_budget(n_views: int, n_images: int, map_shape: Sequence[int], budget_gb: float, source: str) -> int:
    """Bytes the cache will take; InputError when over ``budget_gb``."""
    needed = 4 * n_views * n_images * int(np.prod(map_shape))
    if needed > budget_gb * 1e9:
        raise InputError(
            f"{source}: the trunk cache would take {needed / 1e9:.1f} GB ({n_views} views x {n_images} images x "
            f"{'x'.join(map(str, map_shape))} float32), over --trunk-cache-gb {budget_gb:g}; use fewer "
            f"--trunk-views, a smaller --size, a larger --trunk-cache-gb or --no-trunk-cache"
        )
    return needed


def _cache_device(config: FineTuneConfig) -> torch.device:
    """The GPU this process trains on (each DDP rank builds its own cache), or the CPU."""
    if not _on_gpu(config):
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if isinstance(config.devices, str) and config.devices != "auto":
        ids = [int(d) for d in config.devices.split(",") if d]
        return torch.device("cuda", ids[rank % len(ids)])
    return torch.device("cuda", rank % max(1, torch.cuda.device_count()))


def build_trunk_cache(
    network: FineTuneNetwork,
    split: TrunkSplit,
    images: np.ndarray,
    config: FineTuneConfig,
    mean: Sequence[float],
    std: Sequence[float],
    progress: Progress | None = None,
    stage: str = "caching trunk maps",
    source: str = "images",
) -> TrunkCache:
    """Run the frozen trunk (eval mode) once per image and view of (N, S, S, 3) uint8 ``images``.

    Jitter draws are seeded by (``config.seed``, view, first image of the batch), so a rerun
    caches the same maps. InputError when the cache would exceed ``config.trunk_cache_gb``.
    """
    views, train_rows, eval_rows = plan_trunk_views(config.augment, config.trunk_views, config.tta)
    map_shape = trunk_map_shape(network, split, images.shape[1])
    needed = check_trunk_budget(len(views), len(images), map_shape, config.trunk_cache_gb, source)
    stage = f"{stage} ({len(views)} views, {needed / 1e9:.2f} GB)"
    device = _cache_device(config)
    backbone = network.backbone
    was_training = backbone.training
    backbone.eval().to(device).to(memory_format=torch.channels_last)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    # Geometry comes from the view itself; the jitter draw adds the rest of the augmentation.
    jitter = None if config.augment is None else replace(config.augment, flips=False, rot90=False)
    maps = torch.empty((len(views), len(images), *map_shape), dtype=torch.float32)
    step = max(1, int(config.batch_size))
    total = len(views) * len(images)
    if progress:
        progress(stage, 0, total)
    try:
        with torch.no_grad():
            for row, view in enumerate(views):
                for start in range(0, len(images), step):
                    batch = torch.from_numpy(np.ascontiguousarray(images[start:start + step])).to(device)
                    x = dihedral(batch.permute(0, 3, 1, 2).float() / 255.0, view.turns, view.flip)
                    if view.draw is not None and jitter is not None:
                        seed = np.random.SeedSequence([config.seed, view.draw, start]).generate_state(1)[0]
                        x = augment_batch(x, jitter, torch.Generator().manual_seed(int(seed)))
                    x = ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
                    maps[row, start:start + len(x)] = split.trunk(backbone, x).float().cpu()
                    if progress:
                        progress(stage, row * len(images) + start + len(x), total)
    finally:
        backbone.train(was_training)
        if device.type != "cpu":
            backbone.cpu()
    cache = TrunkCache(split, views, train_rows, eval_rows, maps)
    logger.info("%s: trunk cache of %d views x %d images, %.2f GB (training cut before %s)", source, len(views),
                len(images), cache.nbytes / 1e9, split.first_trained)
    return cache


def _mean_probability_logit(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) logit of the mean probability over the V views (TTA), stably."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    log_views = math.log(logits.shape[1])
    log_p = torch.logsumexp(F.logsigmoid(logits), dim=1) - log_views
    log_q = torch.logsumexp(F.logsigmoid(-logits), dim=1) - log_views
    return log_p - log_q


class _TrunkDataset(torch.utils.data.Dataset):
    """Cached trunk maps of ``indices``: a random one of ``rows`` per item (training), or all of
    them stacked, (V, C, h, w), for validation."""

    def __init__(self, cache: TrunkCache, rows: Sequence[int], y: np.ndarray, indices: np.ndarray,
                 random_view: bool) -> None:
        self.maps = cache.maps
        self.rows = list(rows)
        self.y = np.asarray(y, dtype=np.float32)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.random_view = random_view

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.indices[item])
        if self.random_view:  # the global generator: seeded by seed_everything, new draws every epoch
            maps = self.maps[self.rows[int(torch.randint(len(self.rows), ()))], index]
        else:
            maps = self.maps[self.rows, index]
        return maps, torch.tensor(self.y[index])


@torch.no_grad()
def predict_trunk_cache(network: FineTuneNetwork, cache: TrunkCache, indices: np.ndarray, device: torch.device,
                        batch_size: int = 16) -> np.ndarray:
    """Probabilities of ``indices`` from their cached evaluation views (the mean over views with TTA)."""
    network.eval().to(device).to(memory_format=torch.channels_last)
    out = []
    for start in range(0, len(indices), batch_size):
        chosen = torch.as_tensor(np.asarray(indices[start:start + batch_size], dtype=np.int64))
        maps = torch.stack([cache.maps[row, chosen] for row in cache.eval_rows]).to(device)  # (V, B, C, h, w)
        views, batch = maps.shape[:2]
        flat = maps.transpose(0, 1).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = network.forward_from_trunk(flat, cache.split)
        probabilities = torch.sigmoid(logits.double().view(batch, views)).mean(dim=1)
        out.append(probabilities.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


def _lightning() -> Any:
    import lightning as L

    return L


def _binary_auc(y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, proba)) if np.unique(y).size == 2 else float("nan")


def _make_module_class() -> type:
    L = _lightning()

    class FineTuneModule(L.LightningModule):
        """One phase of training: weighted BCE, augmentation on the device, epoch metrics and history.

        With ``split`` the batches are cached trunk maps (augmented before the trunk), not images:
        training batches (B, C, h, w), validation batches (B, V, C, h, w) whose V views' probabilities
        are averaged. The whole ``network`` stays the module's state, so checkpoints are whole networks.
        """

        def __init__(self, network: FineTuneNetwork, rates: dict[str, float], pos_weight: float,
                     augment: AugmentConfig | None, mean: Sequence[float], std: Sequence[float],
                     weight_decay: float = 0.0, seed: int = 0, tag: dict[str, Any] | None = None,
                     split: TrunkSplit | None = None, schedule: str = "onecycle") -> None:
            super().__init__()
            self.network = network
            self.split = split
            self.rates = {name: float(rate) for name, rate in rates.items()}
            self.schedule = schedule
            self.weight_decay = float(weight_decay)
            self.augment = augment
            self.seed = int(seed)
            self.tag = dict(tag or {})
            # Not persistent: checkpoints hold the network's weights only.
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pos_weight", torch.tensor(float(pos_weight)), persistent=False)
            self.history: list[dict[str, Any]] = []
            self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"train": [], "val": []}
            self._val_metrics: dict[str, float] = {}
            self._batches_seen = 0

        def train(self, mode: bool = True) -> "FineTuneModule":
            super().train(mode)
            if mode:
                # Frozen parts stay in eval mode: BatchNorm statistics and dropout of a frozen
                # part must not change what it computes.
                for module in self.network.backbone.modules():
                    parameters = list(module.parameters())
                    if parameters and not any(p.requires_grad for p in parameters):
                        module.eval()
            return self

        def on_fit_start(self) -> None:
            # NHWC: faster on tensor cores, and on CPU the backward of depthwise convolutions
            # (EfficientNets) is ~20x faster than in NCHW.
            self.network.to(memory_format=torch.channels_last)

        def configure_optimizers(self) -> Any:
            # One group per part: the pretrained layers (when unfrozen) at the phase's low rate,
            # the new head at its own rate.
            parts = {"backbone": self.network.backbone, "head": self.network.head}
            groups = [{"params": [p for p in parts[name].parameters() if p.requires_grad], "lr": rate, "name": name}
                      for name, rate in self.rates.items()]
            optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.weight_decay)
            if self.schedule == "constant":
                return optimizer
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=max(1, int(self.trainer.estimated_stepping_batches)), pct_start=WARMUP_FRACTION,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            images, targets = batch
            if self.split is not None:  # trunk maps: augmented and normalised before the trunk
                return (images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images), targets
            x = images.float() / 255.0
            if self.trainer.training and self.augment is not None:
                # A seed per (seed, rank, batch): reproducible, and different on every rank.
                state = np.random.SeedSequence([self.seed, self.global_rank, self._batches_seen]).generate_state(1)
                self._batches_seen += 1
                x = augment_batch(x, self.augment, torch.Generator().manual_seed(int(state[0])))
            x = (x - self.mean) / self.std
            return x.contiguous(memory_format=torch.channels_last), targets

        def _logits(self, x: torch.Tensor) -> torch.Tensor:
            if self.split is None:
                return self.network(x).float()
            if x.ndim == 5:  # validation: every evaluation view of each image
                batch, views = x.shape[:2]
                flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                logits = self.network.forward_from_trunk(flat, self.split).float().view(batch, views)
                return _mean_probability_logit(logits)
            return self.network.forward_from_trunk(x, self.split).float()

        def _step(self, batch: Any, split: str) -> torch.Tensor:
            images, targets = batch
            logits = self._logits(images)
            losses = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
            self._outputs[split].append((logits.detach(), targets.detach(), losses.detach()))
            return losses.mean()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self._step(batch, "train")

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._step(batch, "val")

        def _epoch_metrics(self, split: str) -> dict[str, float]:
            outputs = self._outputs[split]
            self._outputs[split] = []
            if not outputs:
                return {}
            logits, targets, losses = (torch.cat(parts) for parts in zip(*outputs))
            if self.trainer.world_size > 1:  # every rank saw a share: gather them all
                logits, targets, losses = (self.all_gather(t).flatten() for t in (logits, targets, losses))
            proba = torch.sigmoid(logits).cpu().numpy()
            y = (targets > 0.5).cpu().numpy().astype(np.int64)
            return {
                f"{split}_loss": float(losses.mean()),
                f"{split}_accuracy": float(np.mean((proba >= 0.5) == (y == 1))),
                f"{split}_auc": _binary_auc(y, proba),
                # The spread of the outputs: near 0 when the network collapsed to a constant.
                f"{split}_logit_sd": float(logits.float().std()) if len(logits) > 1 else float("nan"),
            }

        def on_validation_epoch_end(self) -> None:
            self._val_metrics = self._epoch_metrics("val")
            # Every rank computed the same numbers from the gathered predictions: no sync needed.
            self.log_dict({k: v for k, v in self._val_metrics.items()}, prog_bar=True)

        def on_train_epoch_end(self) -> None:
            metrics = self._epoch_metrics("train")
            self.log_dict(metrics, prog_bar=False)
            # The learning rate at the epoch's end: of the backbone when it trains, else of the head.
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.history.append({**self.tag, "epoch": self.current_epoch + 1, "lr": lr, **metrics, **self._val_metrics})
            self._val_metrics = {}

    return FineTuneModule


def _phase_bar(label: str) -> Any:
    """Lightning's tqdm bar (it shows the ETA of the epoch), titled with the stage and phase."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class PhaseBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(f"{label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    return PhaseBar()


@dataclass(frozen=True)
class Phase:
    """One phase: which part trains, for how many epochs, at which learning rate."""

    name: str  # "head" or "full"
    epochs: int
    lr: float  # of the backbone's unfrozen layers, and of the head when head_lr is None
    unfreeze: str | int | None  # None: the head only
    head_lr: float | None = None

    @property
    def learning_rates(self) -> dict[str, float]:
        """Peak learning rate of each optimizer group that this phase trains."""
        rates = {} if self.unfreeze is None else {"backbone": self.lr}
        rates["head"] = self.lr if self.head_lr is None else self.head_lr
        return rates


@dataclass
class PhaseResult:
    name: str
    best_path: str
    best_epoch: int
    best_score: float
    epochs_run: int
    lr: float
    n_trainable: int
    history: list[dict[str, Any]]
    learning_rates: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def quiet_lightning(quiet: bool, ignore: Sequence[str] = ()) -> Iterator[None]:
    """Silence Lightning's start-up chatter (devices found, tips), its data-loader hints and the
    warnings matching the ``ignore`` patterns."""
    _lightning()  # its first import sets its loggers to INFO: import first, then lower them
    names = ("lightning.pytorch", "lightning.fabric")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        if quiet:
            for name in names:
                logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=r".*all_gather is deprecated.*")
            # Frozen parts are in eval mode on purpose (see FineTuneModule.train).
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
            for pattern in ignore:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _on_gpu(config: FineTuneConfig) -> bool:
    if config.accelerator == "cpu":
        return False
    return config.accelerator in ("gpu", "cuda") or torch.cuda.is_available()


def resolve_precision(config: FineTuneConfig) -> str:
    """Lightning's precision: bf16/16-bit mixed on GPU ("auto" picks), 32-bit on CPU."""
    precision = str(config.precision)
    gpu = _on_gpu(config)
    if precision == "auto":
        if not gpu:
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if precision in ("32", "32-true"):
        return "32-true"
    if not gpu:
        raise InputError(f"--precision {precision} needs a GPU; on CPU use --precision 32 (or auto)")
    return precision


def _strategy(config: FineTuneConfig) -> str:
    devices = config.devices
    several = (isinstance(devices, int) and (devices > 1 or devices == -1)) or (
        isinstance(devices, str) and devices not in ("auto",) and len([d for d in devices.split(",") if d]) > 1)
    return "ddp" if several or config.num_nodes > 1 else "auto"


def _workers(config: FineTuneConfig) -> int:
    if config.workers is not None:
        return int(config.workers)
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if _on_gpu(config) else 0


def make_trainer(config: FineTuneConfig, max_epochs: int, callbacks: Sequence[Any], work_dir: Path) -> Any:
    """A Lightning Trainer for one phase; a setting this machine cannot honour is an InputError."""
    L = _lightning()
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(
            max_epochs=max_epochs,
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=_strategy(config),
            precision=resolve_precision(config),
            accumulate_grad_batches=config.accumulate,
            gradient_clip_val=config.gradient_clip or None,
            gradient_clip_algorithm="norm",
            callbacks=list(callbacks),
            logger=False,  # the history is kept by the module itself: no log files anywhere
            enable_model_summary=False,
            enable_progress_bar=config.progress_bar,
            default_root_dir=work_dir,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
    except MisconfigurationException as exc:  # e.g. more --devices than this machine has
        raise InputError(
            f"cannot train with --accelerator {config.accelerator} --devices {config.devices} "
            f"--num-nodes {config.num_nodes} here: {' '.join(str(exc).split())[:300]}"
        ) from None


def fit_phase(
    network: FineTuneNetwork,
    images: np.ndarray,
    y: np.ndarray,
    train_indices: np.ndarray,
    val_indices: np.ndarray,
    phase: Phase,
    config: FineTuneConfig,
    work_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    tag: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    trunk: TrunkCache | None = None,
) -> PhaseResult:
    """Train one phase with Lightning, then reload its best checkpoint into ``network``.

    With ``trunk`` the phase trains on its cached trunk maps (``images`` is not used): the top
    of the backbone and the head see exactly what they would see from the whole network.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    set_trainable(network, phase.unfreeze, config.batchnorm)
    y = np.asarray(y, dtype=np.int64)
    train_y = y[train_indices]
    n_pos, n_neg = int(train_y.sum()), int(len(train_y) - train_y.sum())
    pos_weight = n_neg / max(n_pos, 1) if config.balance == "pos_weight" else 1.0
    if trunk is not None:  # the cache holds what the trunk computed: it must not train
        frozen = [network.backbone.get_submodule(name) for name in trunk.split.chain[:trunk.split.cut]]
        if any(p.requires_grad for module in frozen for p in module.parameters()):
            raise InputError(f"phase {phase.name}: --unfreeze {phase.unfreeze} trains part of the cached trunk")
    module = _make_module_class()(
        network, phase.learning_rates, pos_weight, None if trunk is not None else config.augment, mean, std,
        config.weight_decay, seed=config.seed, tag={**(tag or {}), "phase": phase.name},
        split=None if trunk is None else trunk.split, schedule=config.schedule,
    )
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if config.balance == "sampler":
        weights = np.where(train_y == 1, 1.0 / max(n_pos, 1), 1.0 / max(n_neg, 1))
        sampler = torch.utils.data.WeightedRandomSampler(weights.tolist(), len(train_y), replacement=True, generator=generator)
    workers = 0 if trunk is not None else _workers(config)  # cached maps need no loading work
    loader_args = {"num_workers": workers, "pin_memory": _on_gpu(config), "persistent_workers": workers > 0}
    if trunk is not None:
        train_set: torch.utils.data.Dataset = _TrunkDataset(trunk, trunk.train_rows, y, train_indices, True)
        val_set: torch.utils.data.Dataset = _TrunkDataset(trunk, trunk.eval_rows, y, val_indices, False)
    else:
        train_set, val_set = _ArrayDataset(images, y, train_indices), _ArrayDataset(images, y, val_indices)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=sampler is None,
        sampler=sampler, generator=generator if sampler is None else None,
        # A last batch of one image would break BatchNorm in training mode at small feature maps.
        drop_last=len(train_indices) > config.batch_size, **loader_args,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, shuffle=False, **loader_args)

    monitor = f"val_{config.monitor}"
    checkpoint = ModelCheckpoint(
        dirpath=work_dir, filename=f"{phase.name}-{{epoch}}", monitor=monitor, mode=MONITORS[config.monitor],
        save_top_k=1, save_weights_only=True, auto_insert_metric_name=False,
    )
    stopper = EarlyStopping(monitor=monitor, mode=MONITORS[config.monitor], patience=config.patience)
    bars = [_phase_bar(f"{(tag or {}).get('stage', '')} {phase.name}".strip())] if config.progress_bar else []
    with quiet_lightning(True):  # the progress bar (with its ETA) is a callback: it stays
        trainer = make_trainer(config, phase.epochs, [checkpoint, stopper, *bars, *callbacks], work_dir)
        trainer.fit(module, train_loader, val_loader)
    if not checkpoint.best_model_path:
        raise InputError(f"phase {phase.name}: no validation epoch finished, so there is no best checkpoint to keep")
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(saved["state_dict"])
    trainer.strategy.barrier()  # every rank has read the checkpoint before rank 0 may delete it
    best_epoch = int(saved["epoch"]) + 1
    score = checkpoint.best_model_score
    logger.info("%s phase %s: best epoch %d of %d (%s %.4f)", (tag or {}).get("stage", ""), phase.name, best_epoch,
                trainer.current_epoch, monitor, float(score) if score is not None else float("nan"))
    network.train(False)
    return PhaseResult(
        name=phase.name, best_path=str(checkpoint.best_model_path), best_epoch=best_epoch,
        best_score=float(score) if score is not None else float("nan"), epochs_run=len(module.history),
        lr=phase.lr, n_trainable=sum(p.numel() for p in network.parameters() if p.requires_grad),
        history=module.history, learning_rates=phase.learning_rates,
    )


# --------------------------------------------------------------------------------------------
# Inference on resized uint8 images
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def forward_images(
    network: FineTuneNetwork,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    tta: bool = False,
    positions: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (B,) of (B, S, S, 3) uint8 images and, with ``positions``, (B, h, w) maps.

    Test-time augmentation averages the probabilities (and the maps, turned back) over the
    8 flips and quarter turns of the square.
    """
    # NHWC on CPU too: depthwise convolutions run much faster (and the same on every call).
    network.eval().to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    transforms = TTA_TRANSFORMS if tta else ((0, False),)
    proba_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    maps_sum = None
    for k, flip in transforms:
        view = dihedral(x, k, flip).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if positions:
                logits, maps = network.forward_positions(view)
            else:
                logits, maps = network(view), None
        proba_sum += torch.sigmoid(logits.double())
        if maps is not None:
            maps = invert_dihedral(maps.double(), k, flip)
            maps_sum = maps if maps_sum is None else maps_sum + maps
    proba = (proba_sum / len(transforms)).cpu().numpy()
    maps_out = None if maps_sum is None else (maps_sum / len(transforms)).cpu().numpy()
    return proba, maps_out


def predict_arrays(network: FineTuneNetwork, images: np.ndarray, indices: np.ndarray, mean: Sequence[float],
                   std: Sequence[float], device: torch.device, tta: bool, batch_size: int = 16) -> np.ndarray:
    """Probabilities of ``images[indices]`` in batches."""
    network.to(device)
    out = [forward_images(network, images[indices[i:i + batch_size]], mean, std, device, tta)[0]
           for i in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def position_boxes(image_size: tuple[int, int], map_shape: tuple[int, int]) -> np.ndarray:
    """(h*w, 4) int64 ``[x0, y0, x1, y1]``: the cell of each feature-map position, row-major,
    in the coordinates of the image as read (cell = image size / map size); they tile the image."""
    height, width = image_size
    rows, cols = map_shape
    ys = np.round(np.arange(rows + 1) * height / rows).astype(np.int64)
    xs = np.round(np.arange(cols + 1) * width / cols).astype(np.int64)
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    return np.stack([xs[xx], ys[yy], xs[xx + 1], ys[yy + 1]], axis=1)


# --------------------------------------------------------------------------------------------
# The estimator: two phases on images held in memory
# --------------------------------------------------------------------------------------------


class FineTuner:
    """Two-phase fine-tuning as a scikit-learn style estimator over image indices.

    ``fit(indices, y)`` trains a copy of ``network`` on ``images[indices]`` (the arrays of an
    :class:`ImageStore`) with an inner validation split; ``predict_proba(indices)`` gives the
    (n, 2) class probabilities. Indices stand for images so that
    :func:`mitoscope.evaluation.cross_validate` can drive it like any head.
    ``trunk_cache``: the frozen trunk's maps of every image of ``images`` (shared by the
    cross-validation folds; the trunk is the same in all of them); without one, ``fit`` builds
    it when ``config`` asks for a cache (:func:`resolve_trunk_split`).
    Learned state: ``network_``, ``history_``, ``phases_``, ``val_indices_``, ``val_proba_``,
    ``trunk_cache_`` (None when training ran on images).
    """

    def __init__(self, network: FineTuneNetwork, config: FineTuneConfig, images: np.ndarray, y: np.ndarray,
                 groups: np.ndarray | None, mean: Sequence[float], std: Sequence[float], work_dir: Path,
                 stage: str = "main", callbacks: Sequence[Any] = (), trunk_cache: TrunkCache | None = None) -> None:
        self.network = network
        self.config = config
        self.images = images
        self.y = np.asarray(y, dtype=np.int64)
        self.groups = None if groups is None else np.asarray(groups)
        self.mean = list(mean)
        self.std = list(std)
        self.work_dir = Path(work_dir)
        self.stage = stage
        self.callbacks = list(callbacks)
        self.trunk_cache = trunk_cache

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if not _on_gpu(self.config) else pick_device(None)

    def fit(self, indices: Sequence[int], y: Sequence[int] | None = None) -> "FineTuner":
        L = _lightning()
        indices = np.asarray(list(indices), dtype=np.int64)
        if y is not None and not np.array_equal(np.asarray(y, dtype=np.int64), self.y[indices]):
            raise InputError(f"{self.stage}: labels passed to fit differ from those of the images")
        config = self.config
        train_pos, val_pos = validation_split(self.y[indices], None if self.groups is None else self.groups[indices],
                                              config.val_fraction, config.seed, source=self.stage)
        train_indices, val_indices = indices[train_pos], indices[val_pos]
        cache = self.trunk_cache
        if cache is None:
            split = resolve_trunk_split(self.network, config)
            if split is not None:
                cache = build_trunk_cache(self.network, split, self.images, config, self.mean, self.std,
                                          source=self.stage)
        if cache is not None and cache.maps.shape[1] != len(self.images):
            raise InputError(f"{self.stage}: the trunk cache holds {cache.maps.shape[1]} images, expected "
                             f"{len(self.images)} (one per image of the store)")
        L.seed_everything(config.seed, workers=True, verbose=False)
        network = copy.deepcopy(self.network)
        phases = [Phase("head", config.epochs_head, config.lr_head, None),
                  Phase("full", config.epochs_full, config.lr_full, config.unfreeze, head_lr=config.lr_head)]
        results = []
        for phase in phases:
            if phase.epochs < 1:
                continue
            results.append(fit_phase(
                network, self.images, self.y, train_indices, val_indices, phase, config,
                self.work_dir / phase.name, self.mean, self.std, tag={"stage": self.stage}, callbacks=self.callbacks,
                trunk=cache,
            ))
        set_trainable(network, None)
        network.eval()
        self.network_ = network
        self.phases_ = results
        self.history_ = [row for result in results for row in result.history]
        self.train_indices_ = train_indices
        self.val_indices_ = val_indices
        self.trunk_cache_ = cache
        if cache is not None:  # the same network end to end, without running the trunk again
            self.val_proba_ = predict_trunk_cache(network, cache, val_indices, self.device, config.batch_size)
        else:
            self.val_proba_ = predict_arrays(network, self.images, val_indices, self.mean, self.std, self.device,
                                             config.tta, config.batch_size)
        network.cpu()
        return self

    def predict_proba(self, indices: Sequence[int]) -> np.ndarray:
        if not hasattr(self, "network_"):
            raise ModelError("FineTuner is not fitted yet: call fit first")
        indices = np.asarray(list(indices), dtype=np.int64)
        proba = predict_arrays(self.network_, self.images, indices, self.mean, self.std, self.device,
                               self.config.tta, self.config.batch_size)
        self.network_.cpu()
        return np.column_stack([1.0 - proba, proba])


# --------------------------------------------------------------------------------------------
# The saved model
# --------------------------------------------------------------------------------------------


class FineTunedModel(ModelDescription):
    """A fine-tuned network with its classes, threshold and preprocessing; what ``load_model`` returns
    for ``"kind": "finetuned"``."""

    def __init__(self, config: dict[str, Any], network: FineTuneNetwork) -> None:
        self.config = config
        self.network = network.eval()

    @property
    def size(self) -> int:
        return int(self.config["image_size"])

    @property
    def tta(self) -> bool:
        return bool(self.config.get("tta", False))

    @property
    def map_shape(self) -> tuple[int, int]:
        return tuple(self.config["network"]["feature_map"])

    @property
    def gives_window_scores(self) -> bool:
        return True  # attention weights, or the class-activation map of avg pooling

    def _read(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        image = read_image(path, self.read_options)
        return resize_image(image, (self.size, self.size)), image.shape[:2]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        cache: Any = None,
        progress: Progress | None = None,
        batch_size: int = 16,
        device: str | None = None,
        with_window_scores: bool = False,
        tta: bool | None = None,
        engine: str = "auto",
        skip_bad: bool = False,
    ) -> Any:
        """Predict image files (any size: each is resized to the training size).

        A fine-tuned network runs in PyTorch: ``engine`` may be "auto" or "torch".

        ``cache`` is accepted for the pipeline's sake and unused (no window features here).
        ``tta`` overrides the model's stored test-time-augmentation setting. With
        ``with_window_scores`` every image gets one score per feature-map position
        (attention weights, or the class-activation map for ``avg`` pooling) and ``boxes``
        the cells they stand for. With ``skip_bad`` an image that cannot be read is left out and
        listed in the result's ``skipped`` instead of raising InputError.
        """
        from .predictions import Predictions

        if engine not in ("auto", "torch"):
            raise InputError(f"engine {engine} runs window-feature models; a fine-tuned network runs in PyTorch "
                             "(engine auto or torch)")
        skipped: dict[Path, str] = {}

        def skip(path: Path, error: InputError) -> None:
            if not skip_bad:
                raise error
            skipped[path] = str(error)

        paths = [Path(p) for p in paths]
        for path in paths:
            if not path.is_file():
                skip(path, InputError(f"{path}: image file not found"))
        paths = [path for path in paths if path not in skipped]
        use_tta = self.tta if tta is None else bool(tta)
        torch_device = pick_device(device)
        self.network.to(torch_device)
        mean, std = self.config["backbone"]["mean"], self.config["backbone"]["std"]
        proba: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            if batch:
                p, m = forward_images(self.network, np.stack(batch), mean, std, torch_device, use_tta, with_window_scores)
                proba.append(p)
                if m is not None:
                    maps.extend(m)
                batch.clear()

        def step(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
            return self._read(path)

        if progress:
            progress("predicting", 0, len(paths))
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(step, paths[0]) if paths else None
            for index in range(len(paths)):
                try:
                    array, image_size = pending.result()
                except InputError as error:
                    skip(paths[index], error)
                    array = None
                if index + 1 < len(paths):
                    pending = pool.submit(step, paths[index + 1])
                if array is not None:
                    batch.append(array)
                    sizes.append((int(image_size[0]), int(image_size[1])))
                    if len(batch) >= batch_size:
                        flush()
                if progress:
                    progress("predicting", index + 1, len(paths))
        flush()
        paths = [path for path in paths if path not in skipped]
        self.network.cpu()
        size = self.size
        notes = ["" if s == (size, size) else f"resized {s[1]}x{s[0]} to {size}x{size}" for s in sizes]
        scores = [m.ravel().astype(np.float64) for m in maps] if with_window_scores else None
        return Predictions(
            paths=paths,
            proba=np.concatenate(proba) if proba else np.zeros(0),
            members={},
            notes=notes,
            window_scores=scores,
            boxes=[position_boxes(s, self.map_shape) for s in sizes],
            image_sizes=sizes,
            skipped=skipped,
        )

    def predict(self, paths: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]]:
        """One row per image: Image, Label, Probability, finetuned, Note (as the window-feature models)."""
        from .predictions import prediction_rows

        return prediction_rows(self.predict_paths(paths, **kwargs), self.classes, self.threshold, self.config["head"]["name"])

    def save(self, out_dir: str | Path, extra_files: Callable[[Path], list[str]] | None = None,
             overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        config = {k: v for k, v in self.config.items() if not k.startswith("_")}

        def write(tmp: Path) -> list[str]:
            with atomic_path(tmp / NETWORK_FILE) as target:
                save_file(_trainable_state(self.network), str(target))
            names = [NETWORK_FILE]
            if extra_files:
                names += extra_files(tmp)
            return names

        model_dir = write_model_dir(out_dir, config, write, overwrite=overwrite)
        self.config = {**config, "_model_dir": str(Path(model_dir).resolve())}
        return Path(model_dir)

    @classmethod
    def load(cls, model_dir: str | Path) -> "FineTunedModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        path = model_dir / "model.json"
        if config.get("kind") != "finetuned":
            raise ModelError(f"{path}: model kind {config.get('kind')!r} is not a fine-tuned network")
        for key in ("backbone", "network", "image_size", "read"):
            if key not in config:
                raise ModelError(f"{path}: incomplete fine-tuned model description: key {key!r} is missing")
        net = config["network"]
        file = model_dir / net.get("file", NETWORK_FILE)
        name = config["backbone"]["name"]
        try:
            backbone = create_backbone(name, pretrained=False)
            network = FineTuneNetwork(backbone.model, net["pool"], float(net.get("dropout", 0.0)),
                                      int(net.get("attention_hidden", 256)), int(net.get("attention_dim", 128)))
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: cannot rebuild the network {name!r} ({type(exc).__name__}: {exc})") from None
        try:
            state = load_file(str(file))
            network.load_state_dict(state, strict=True)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file}: cannot read the network weights ({exc})") from None
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:240]
            raise ModelError(
                f"{file}: weights do not fit {name} with {net['pool']} pooling (a different architecture?): {first}"
            ) from None
        config["_model_dir"] = str(model_dir.resolve())
        return cls(config, network.eval())


# --------------------------------------------------------------------------------------------
# History: CSV, JSON, plot
# --------------------------------------------------------------------------------------------

HISTORY_COLUMNS = ("stage", "phase", "epoch", "lr", "train_loss", "train_accuracy", "train_auc", "train_logit_sd",
                   "val_loss", "val_accuracy", "val_auc", "val_logit_sd")


def history_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_COLUMNS})
    return buffer.getvalue()


def plot_history(rows: Sequence[dict[str, Any]], phases: Sequence[tuple[str, PhaseResult]], path: Path) -> Path:
    """Loss, accuracy and AUC per epoch (training and validation) across stages and phases."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes_row = figure.subplots(1, 3)
    x = np.arange(1, len(rows) + 1)
    for axes, metric in zip(axes_row, ("loss", "accuracy", "auc")):
        for split, style in (("train", "-"), ("val", "--")):
            values = [np.nan if r.get(f"{split}_{metric}") is None else r[f"{split}_{metric}"] for r in rows]
            axes.plot(x, values, style, marker="o", markersize=3, label=f"{'training' if split == 'train' else 'validation'}")
        start = 0
        for label, result in phases:
            if start:
                axes.axvline(start + 0.5, color="grey", linewidth=0.8)
            axes.annotate(label, (start + 1, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=7, color="grey")
            best = start + result.best_epoch
            if 1 <= best <= len(rows):
                value = rows[best - 1].get(f"val_{metric}")
                if value is not None:
                    axes.plot([best], [value], marker="*", markersize=11, color="tab:red",
                              label="best epoch (kept)" if start == 0 else None)
            start += result.epochs_run
        axes.set_xlabel("epoch (all phases)")
        axes.set_ylabel(metric)
        axes.legend(fontsize=8)
    figure.suptitle("fine-tuning history: head on the frozen base, then the unfrozen base")
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------
# The whole procedure
# --------------------------------------------------------------------------------------------


@dataclass
class FineTuneResult:
    model: FineTunedModel | None  # None on DDP ranks other than 0
    cv_metrics: dict[str, Any] | None
    model_dir: Path | None
    history: list[dict[str, Any]]
    validation_metrics: dict[str, Any] | None
    # What to know before trusting the model: see mitoscope.evaluation.fit_warnings.
    warnings: list[str] = field(default_factory=list)


def _work_dir(out_dir: Path) -> Path:
    # Next to the output (same filesystem, shared by every DDP rank), never in the cwd.
    return out_dir.parent / f".{out_dir.name}.finetune-work"


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir}: output folder exists and is not empty (choose another --out or pass --overwrite)")


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


def finetune(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    config: FineTuneConfig = FineTuneConfig(),
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> FineTuneResult:
    """Fine-tune (optionally pre-train on tiles, optionally cross-validate) and save the model.

    Every check that can fail (options, labels, weights, image size, output folder) runs
    before any training. The model folder is written atomically at the end by DDP rank 0.
    """
    config = config.validate()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    data = load_labelled_images(data_dir, labels_csv, config.positive)
    source = str(labels_csv or data_dir)
    groups = None if data.groups is None else np.asarray(data.groups)
    counts = np.bincount(data.y, minlength=2)
    if config.cv and counts.min() < config.cv:
        raise InputError(
            f"{source}: {config.cv}-fold cross-validation needs at least {config.cv} images of each class, got "
            f"{counts.tolist()} ({', '.join(data.classes)}); lower --cv"
        )
    if config.cv and groups is not None and np.unique(groups).size < config.cv:
        raise InputError(f"{source}: {config.cv}-fold grouped cross-validation needs at least {config.cv} groups, "
                         f"got {np.unique(groups).size}; lower --cv")
    validation_split(data.y, groups, config.val_fraction, config.seed, source)  # fails now rather than after hours
    sources = SourceProfile.from_paths(data.paths, config.read_options)  # headers only: an unreadable one fails now
    with quiet_lightning(True):
        make_trainer(config, 1, [], Path(os.devnull))  # devices, precision: checked now, not after the images are read
    network, backbone = build_network(config)
    map_shape = check_input_size(network, config.backbone, config.size)
    mean, std = list(backbone.data_config["mean"]), list(backbone.data_config["std"])
    split = resolve_trunk_split(network, config)
    if split is not None:  # the cache of the training images must fit: say so now, not after reading them
        n_views = len(plan_trunk_views(config.augment, config.trunk_views, config.tta)[0])
        check_trunk_budget(n_views, len(data.paths), trunk_map_shape(network, split, config.size),
                           config.trunk_cache_gb, source)

    store = ImageStore(config.size, config.read_options, cache_dir)
    work = _work_dir(out_dir)
    # Checkpoints of an interrupted run must not mix with ours. Every DDP rank runs this before
    # its first fit, and no rank writes a checkpoint before all of them have joined that fit.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    is_zero = True
    try:
        pretrain_summary = None
        stage_phases: list[tuple[str, PhaseResult]] = []
        history: list[dict[str, Any]] = []
        if config.pretrain_data is not None:
            pre_images, pre_y, pre_groups, pretrain_summary = _load_pretrain_set(config, store, data, progress)
            pre_cache = None if split is None else build_trunk_cache(
                network, split, pre_images, config, mean, std, progress, "caching pre-training trunk maps",
                str(config.pretrain_labels or config.pretrain_data))
            tuner = FineTuner(network, config, pre_images, pre_y, pre_groups, mean, std, work / "pretrain",
                              stage="pretrain", callbacks=callbacks, trunk_cache=pre_cache)
            tuner.fit(np.arange(len(pre_y)), pre_y)
            network = tuner.network_
            history += tuner.history_
            stage_phases += [(f"pretrain/{r.name}", r) for r in tuner.phases_]
            pretrain_summary["phases"] = [_phase_summary(r) for r in tuner.phases_]
            pretrain_summary["trunk_cache"] = None if pre_cache is None else pre_cache.describe()
            del pre_images, pre_cache, tuner

        images, _, _ = store.load(data.paths, None, 0.0, progress, "reading images")
        # One cache for the folds and the final fit: the trunk is frozen, the same in all of them.
        trunk_cache = None if split is None else build_trunk_cache(network, split, images, config, mean, std,
                                                                   progress, "caching trunk maps", source)
        cv_result = None
        fold_histories: list[list[dict[str, Any]]] = []
        if config.cv:
            tuners: list[FineTuner] = []

            def new_tuner() -> FineTuner:
                fold = len(tuners) + 1
                tuners.append(FineTuner(network, config, images, data.y, groups, mean, std, work / f"fold{fold}",
                                        stage=f"fold {fold}", callbacks=callbacks, trunk_cache=trunk_cache))
                return tuners[-1]

            cv_result = cross_validate(
                new_tuner, list(range(len(data.y))), data.y, n_splits=config.cv, seed=config.seed, groups=groups,
                classes=data.classes,
                progress=(lambda done, total: progress("cross-validation folds", done, total)) if progress else None,
            )
            fold_histories = [tuner.history_ for tuner in tuners]
        final = FineTuner(network, config, images, data.y, groups, mean, std, work / "final", stage="main",
                          callbacks=callbacks, trunk_cache=trunk_cache).fit(np.arange(len(data.y)), data.y)
        history += final.history_
        stage_phases += [(r.name if config.pretrain_data is None else f"main/{r.name}", r) for r in final.phases_]
        val_y = data.y[final.val_indices_]
        if cv_result is not None:
            threshold = float(cv_result.threshold)
            rule = f"max F1 on {config.cv}-fold cross-validated out-of-fold predictions"
        else:
            threshold = best_f1_threshold(val_y, final.val_proba_)
            rule = "max F1 on the validation split's predictions"
        validation_metrics = compute_metrics(val_y, final.val_proba_, threshold, data.classes)
        held_out = ((data.y, cv_result.oof_proba, f"{config.cv}-fold cross-validation (out-of-fold)") if cv_result
                    else (val_y, final.val_proba_, "validation split"))
        training_warnings = fit_warnings(
            *held_out[:2], threshold, data.classes, held_out[2],
            epochs=[(f"fine-tuning phase {label}", r.best_epoch, r.epochs_run) for label, r in stage_phases])
        for warning in training_warnings:
            logger.info("warning: %s", warning)
        validation_metrics["notes"].append(
            "validation split of the final fit: it also chose the best checkpoints (and the threshold without --cv), "
            "so these numbers are optimistic"
        )
        is_zero = _is_global_zero()
        model_config = {
            "kind": "finetuned",
            "backbone": {**backbone.describe(), "note": "weights_* describe the pretrained weights fine-tuning "
                         f"started from; the fine-tuned weights are {NETWORK_FILE}"},
            "network": {
                "file": NETWORK_FILE, "pool": config.pool, "dropout": config.dropout,
                "attention_hidden": config.attention_hidden, "attention_dim": config.attention_dim,
                "feature_map": list(map_shape),
            },
            "image_size": config.size,
            "read": config.read_options.to_dict(),
            "source_images": sources.to_dict(),
            "classes": list(data.classes),
            "positive": data.classes[1],
            "threshold": threshold,
            "threshold_rule": rule,
            "tta": config.tta,
            "augment": config.augment.to_dict(),
            # The instances: positions of the final feature map (32 px cells of the resized image).
            "head": {"name": HEAD_NAME, "pool": config.pool, "instances": "feature_map_positions"},
            "training": {
                "data": str(data_dir), "labels": str(labels_csv) if labels_csv else None,
                "n_images": len(data.paths),
                "n_per_class": dict(zip(data.classes, counts.tolist())),
                "grouped": groups is not None,
                "n_train": int(len(final.train_indices_)), "n_validation": int(len(final.val_indices_)),
                "cv_folds": config.cv,
                "phases": [_phase_summary(r) for r in final.phases_],
                "pretrain": pretrain_summary,
                "trunk_cache": None if trunk_cache is None else trunk_cache.describe(),
                "settings": {k: v for k, v in config.to_dict().items() if k not in ("progress_bar",)},
                "precision": resolve_precision(config),
                "warnings": training_warnings,
            },
        }
        model = FineTunedModel(model_config, final.network_)
        if not is_zero:
            return FineTuneResult(None, cv_result.metrics if cv_result else None, None, history, validation_metrics,
                                  training_warnings)

        def extra(tmp: Path) -> list[str]:
            atomic_write_text(tmp / "history.csv", history_csv(history))
            atomic_write_json(tmp / "history.json", {
                "rows": history, "phases": [{"label": label, **_phase_summary(r)} for label, r in stage_phases],
                "cv_folds": fold_histories, "validation": validation_metrics,
            })
            plot_history(history, stage_phases, tmp / "training_curves.png")
            names = ["history.csv", "history.json", "training_curves.png"]
            if cv_result is not None:
                write_report(tmp, cv_result.metrics, data.y, cv_result.oof_proba, data.classes, extra={
                    "evaluation": f"{config.cv}-fold {'grouped ' if groups is not None else ''}cross-validation of the "
                                  f"whole two-phase fine-tuning, out-of-fold predictions",
                    "per_fold": cv_result.per_fold, "warnings": training_warnings,
                })
                names += ["metrics.json", "roc.png", "confusion_matrix.png"]
            return names

        model_dir = model.save(out_dir, extra, overwrite=overwrite)
        return FineTuneResult(model, cv_result.metrics if cv_result else None, model_dir, history, validation_metrics,
                              training_warnings)
    finally:
        if is_zero:
            shutil.rmtree(work, ignore_errors=True)


def _phase_summary(result: PhaseResult) -> dict[str, Any]:
    return {"phase": result.name, "lr": result.lr, "learning_rates": result.learning_rates, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "best_score": result.best_score, "n_trainable_parameters": result.n_trainable}


def _is_global_zero() -> bool:
    # After Lightning's DDP launch every process has RANK (or SLURM_PROCID) set; alone, we are rank 0.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


