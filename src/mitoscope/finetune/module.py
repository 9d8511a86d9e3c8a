"""One phase of training in Lightning: the module (loss, augmentation on the device, epoch
metrics and history) and the data module (the phase's training and validation loaders).

Importing this module imports Lightning (seconds): :mod:`.training` imports it only when a
phase runs, so that ``import mitoscope.finetune`` stays free of Lightning.
"""

from __future__ import annotations

import copy
import logging
import random

from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar

from ..augment import AugmentConfig, augment_batch
from ..lightning_setup import loader_workers, on_gpu
from .config import DEAD_MAP_LR_FACTOR, DEAD_MAP_SHARE, HEALTHY_MAP_SHARE, WARMUP_FRACTION, FineTuneConfig
from .data import _ArrayDataset
from .network import FineTuneNetwork
from .trunk import TrunkCache, TrunkSplit, _mean_probability_logit, _TrunkDataset


logger = logging.getLogger(__name__)


def _binary_auc(y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, proba)) if np.unique(y).size == 2 else float("nan")


class FineTuneModule(L.LightningModule):
    """One phase of training: weighted BCE, augmentation on the device, epoch metrics and history.

    With ``split`` the batches are cached trunk maps (augmented before the trunk), not images:
    training batches (B, C, h, w), validation batches (B, V, C, h, w) whose V views' probabilities
    are averaged. The whole ``network`` stays the module's state, so checkpoints are whole networks.
    """

    def __init__(self, network: FineTuneNetwork, rates: dict[str, float], pos_weight: float,
                 augment: AugmentConfig | None, mean: Sequence[float], std: Sequence[float],
                 weight_decay: float = 0.0, seed: int = 0, tag: dict[str, Any] | None = None,
                 split: TrunkSplit | None = None, schedule: str = "onecycle", guard: bool = True) -> None:
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
        # The dead-map guard (see _guard): live share of the final feature map per training batch,
        # the phase's first epoch's share, and the state after the last healthy epoch.
        self.guard = bool(guard)
        self._live: list[torch.Tensor] = []
        self._live_reference: float | None = None
        self._healthy: dict[str, Any] | None = None

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What a resumed phase needs to go on exactly as if it had not stopped: the epochs' history,
        # the augmentation's batch counter and the random states (dropout; the data order, drawn
        # from the data module's generator). Plain types and tensors only: it loads with weights_only.
        datamodule = getattr(self.trainer, "datamodule", None)
        checkpoint["mitoscope"] = {
            "history": self.history, "batches_seen": self._batches_seen, "epoch": int(self.current_epoch),
            "live_reference": self._live_reference, "healthy": self._healthy,
            "torch_rng": torch.get_rng_state(), "numpy_rng": _numpy_state(), "python_rng": _python_state(),
            "data_rng": datamodule.generator.get_state() if datamodule is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mitoscope")
        if state is None:  # a weights-only checkpoint (the best epoch's): nothing to resume
            return
        self.history = list(state["history"])
        self._batches_seen = int(state["batches_seen"])
        self._live_reference = state.get("live_reference")
        self._healthy = state.get("healthy")
        # The random states are set when the next epoch starts: Lightning's restart in between
        # (it revisits the saved epoch, and makes a loader iterator for it) draws from them.
        self._resume_rng = state

    def on_train_epoch_start(self) -> None:
        state = getattr(self, "_resume_rng", None)
        if state is not None and self.current_epoch == state["epoch"] + 1:
            torch.set_rng_state(state["torch_rng"])
            _set_numpy_state(state["numpy_rng"])
            _set_python_state(state["python_rng"])
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and state["data_rng"] is not None:
                datamodule.generator.set_state(state["data_rng"])
            self._resume_rng = None

    def on_fit_start(self) -> None:
        # NHWC: faster on tensor cores, and on CPU the backward of depthwise convolutions
        # (EfficientNets) is far faster than in NCHW (README, "Speed").
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
        if self.split is not None and x.ndim == 5:  # validation: every evaluation view of each image
            batch, views = x.shape[:2]
            flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            logits = self.network.forward_from_trunk(flat, self.split).float().view(batch, views)
            return _mean_probability_logit(logits)
        maps = self.network.feature_map(x) if self.split is None else self.split.top(self.network.backbone, x)
        if self.training:
            self._live.append((maps.detach() > 0).float().mean())
        return self.network.pool_logits(maps).float()

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
        # The epoch's history row is made here, at its end (validation runs after the epoch's last
        # training batch): the checkpoints saved at validation end then hold it, and a run resumed
        # from one goes on with the next epoch.
        metrics = self._epoch_metrics("train")
        self.log_dict(metrics, prog_bar=False)
        # The learning rate at the epoch's end: of the backbone when it trains, else of the head.
        lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        live = torch.stack(self._live).mean() if self._live else torch.tensor(float("nan"), device=self.device)
        self._live = []
        if self.trainer.world_size > 1:  # every rank must take the guard's decision on the same number
            live = self.all_gather(live).mean()
        live = float(live)
        row = {**self.tag, "epoch": self.current_epoch + 1, "lr": lr, **metrics, "train_live_share": live,
               **self._val_metrics}
        row["guard"] = self._guard(live)
        self.history.append(row)
        self._val_metrics = {}

    def _guard(self, live: float) -> str:
        """The dead-map guard. With BatchNorm frozen, the unfrozen layers can push the final feature
        map below 0 everywhere; after ReLU6 a dead unit gets no gradient and never recovers, and the
        output goes constant (measured: README, "Why phase 2 collapsed"). So the share of the map
        above 0 is watched: an epoch that leaves less than DEAD_MAP_SHARE of the phase's first
        epoch's share is undone (weights and optimizer back to the end of the last epoch that kept
        HEALTHY_MAP_SHARE of it) and the backbone's learning rate is cut by DEAD_MAP_LR_FACTOR for
        the rest of the phase. Phases that train no backbone layer are not watched. It runs at
        validation end, so the checkpoints saved then hold the restored state."""
        if not self.guard or "backbone" not in self.rates or not np.isfinite(live):
            return ""
        if self._live_reference is None:
            self._live_reference = live
        if live >= HEALTHY_MAP_SHARE * self._live_reference:
            self._healthy = {"network": copy.deepcopy(self.network.state_dict()),
                             "optimizer": copy.deepcopy(self.trainer.optimizers[0].state_dict()),
                             "epoch": self.current_epoch + 1}
            return ""
        if live >= DEAD_MAP_SHARE * self._live_reference or self._healthy is None:
            return ""
        self.network.load_state_dict(self._healthy["network"])
        optimizer = self.trainer.optimizers[0]
        optimizer.load_state_dict(self._healthy["optimizer"])
        for group in optimizer.param_groups:
            if group.get("name") == "backbone":
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                    if key in group:
                        group[key] *= DEAD_MAP_LR_FACTOR
        message = (f"the final feature map was dying (share above 0: {live:.4f}, against {self._live_reference:.4f} "
                   f"in the phase's first epoch): back to the end of epoch {self._healthy['epoch']}, backbone "
                   f"learning rate x{DEAD_MAP_LR_FACTOR:.3g} from here on")
        logger.warning("%s phase %s epoch %d: %s", self.tag.get("stage", ""), self.tag.get("phase", ""),
                       self.current_epoch + 1, message)
        return f"epoch {self.current_epoch + 1}: {message}"


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached"]))


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


class FineTuneDataModule(L.LightningDataModule):
    """The loaders of one phase: training (shuffled, or balanced by a sampler with ``balance="sampler"``)
    and validation, of ``images[indices]`` or, with ``trunk``, of their cached trunk maps."""

    def __init__(self, images: np.ndarray, y: np.ndarray, train_indices: np.ndarray, val_indices: np.ndarray,
                 config: FineTuneConfig, trunk: TrunkCache | None = None) -> None:
        super().__init__()
        y = np.asarray(y, dtype=np.int64)
        train_y = y[train_indices]
        n_pos, n_neg = int(train_y.sum()), int(len(train_y) - train_y.sum())
        self.batch_size = config.batch_size
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = None
        if config.balance == "sampler":
            weights = np.where(train_y == 1, 1.0 / max(n_pos, 1), 1.0 / max(n_neg, 1))
            self.sampler = torch.utils.data.WeightedRandomSampler(weights.tolist(), len(train_y), replacement=True,
                                                                  generator=self.generator)
        workers = 0 if trunk is not None else loader_workers(config)  # cached maps need no loading work
        self.loader_args = {"num_workers": workers, "pin_memory": on_gpu(config), "persistent_workers": workers > 0}
        if trunk is not None:
            self.train_set: torch.utils.data.Dataset = _TrunkDataset(trunk, trunk.train_rows, y, train_indices, True)
            self.val_set: torch.utils.data.Dataset = _TrunkDataset(trunk, trunk.eval_rows, y, val_indices, False)
        else:
            self.train_set, self.val_set = _ArrayDataset(images, y, train_indices), _ArrayDataset(images, y, val_indices)
        # A last batch of one image would break BatchNorm in training mode at small feature maps.
        self.drop_last = len(train_indices) > config.batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            generator=self.generator if self.sampler is None else None, drop_last=self.drop_last, **self.loader_args,
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, **self.loader_args)


class PhaseBar(TQDMProgressBar):
    """Lightning's tqdm bar (it shows the ETA of the epoch), titled with the stage and phase."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.phase_label = label

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(
            f"{self.phase_label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
