"""What ``mitoscope finetune`` can be told (:class:`FineTuneConfig`) and its checks. What it asks
of this machine (GPU or CPU, precision, DDP strategy, loader workers) is read from its
``accelerator``, ``devices``, ``num_nodes``, ``workers`` and ``precision`` by
:mod:`mitoscope.lightning_setup`, as ``extract``'s are.

The choices of pool, monitor, balance, schedule, precision and accelerator live in
:mod:`mitoscope.options`, shared with the command line so that a bad one is refused before
PyTorch loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..augment import AugmentConfig
from ..defaults import DEFAULT_FINETUNE_BACKBONE
from ..errors import InputError
from ..io import ReadOptions
from ..lightning_setup import check_accelerator, parse_devices
from ..options import BALANCES, BATCHNORMS, MONITORS, POOLS, PRECISIONS, SCHEDULES, check_choice, check_file
from ..tiling import validate_tiling

# --schedule onecycle: each phase warms up over its first WARMUP_FRACTION of steps, then anneals.
WARMUP_FRACTION = 0.15
# The dead-map guard (FineTuneModule._guard): an epoch that leaves the final feature map with less than
# DEAD_MAP_SHARE of the live share of the phase's first epoch is undone back to the last epoch that kept
# at least HEALTHY_MAP_SHARE of it, and the backbone's rate is multiplied by DEAD_MAP_LR_FACTOR.
DEAD_MAP_SHARE = 0.1
HEALTHY_MAP_SHARE = 0.5
DEAD_MAP_LR_FACTOR = 1 / 3


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
    # Undo an epoch in which the final feature map's units die, and go on at a lower rate
    # (FineTuneModule._guard): with frozen BatchNorm, the peak rate could still kill them all.
    guard: bool = True
    # The last phase run this many times from the same start with other seeds; the attempt with the
    # best validation score is kept.
    restarts: int = 1
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
        check_accelerator(self.accelerator)
        check_choice("--precision", str(self.precision), PRECISIONS)
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)):
            raise InputError(f"--size must be an integer number of pixels, got {self.size!r}")
        for name in ("epochs_head", "epochs_full", "accumulate", "batch_size", "num_nodes", "patience",
                     "attention_hidden", "attention_dim", "restarts"):
            positive_int(name, 0 if name.startswith("epochs") or name == "attention_hidden" else 1)
        check_choice("--batchnorm", self.batchnorm, BATCHNORMS)
        if isinstance(self.gradient_clip, bool) or not isinstance(self.gradient_clip, (int, float)) \
                or not self.gradient_clip >= 0:
            raise InputError(f"--gradient-clip must be a gradient norm >= 0 (0: off), got {self.gradient_clip!r}")
        if not isinstance(self.guard, bool):
            raise InputError(f"guard must be True or False, got {self.guard!r}")
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
