"""Training: one phase in Lightning (:func:`fit_phase`), and both phases as an estimator (:class:`FineTuner`).

Two phases, as in the write-up's Round-2 model:

1. **head** - a new classification head is trained on the frozen pretrained base. The base
   stays exactly as it was: its parameters are frozen *and* its BatchNorm layers are kept in
   eval mode, so their running statistics do not drift either.
2. **full** - the base is unfrozen (all of it, or the last N blocks: :func:`.network.set_trainable`)
   and trained with the head; the pretrained layers at the lower ``lr_full``, the new head at
   ``lr_head``.

Each phase keeps the checkpoint of its best validation epoch (validation loss or AUC) and
reloads it at its end; early stopping ends a phase that stops improving. The validation
images are a stratified (and, with groups, grouped) split of the training images
(``val_fraction``).

**Hardware** (Lightning): mixed precision on GPU (``precision="16-mixed"``/``"bf16-mixed"``,
``"auto"`` picks bf16 where supported; CPU runs in 32-bit), gradient accumulation
(``accumulate``), and multi-GPU / multi-node DDP through Lightning's own ``ddp`` strategy,
chosen when ``devices > 1`` or ``num_nodes > 1``. ``batch_size`` is per device: the
effective batch is ``batch_size x devices x num_nodes x accumulate``.

Lightning is imported when training starts, not when this module is.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import lightning_setup
from ..atomic import atomic_path
from ..errors import InputError, ModelError
from ..features import pick_device
from ..lightning_setup import on_gpu, quiet_lightning, resolve_precision
from ..options import MONITORS
from .config import FineTuneConfig
from .data import validation_split
from .inference import predict_arrays
from .network import FineTuneNetwork, set_trainable
from .trunk import TrunkCache, build_trunk_cache, predict_trunk_cache, resolve_trunk_split

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last"
DONE_FILE = "done.pt"
RESTART_SEED_STEP = 1000  # attempt k of a restarted phase runs from seed + k * this


def _phase_folder(name: str, attempt: int) -> str:
    return name if attempt == 0 else f"{name}-restart{attempt + 1}"


def _checkpoint_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1)) + 1


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
    # with --restarts N: every attempt of this phase (seed, best epoch and score, kept or not)
    restarts: list[dict[str, Any]] = field(default_factory=list)


def make_trainer(config: FineTuneConfig, max_epochs: int, callbacks: Sequence[Any], work_dir: Path) -> Any:
    """A Lightning Trainer for one phase; a setting this machine cannot honour is an InputError."""
    return lightning_setup.make_trainer(
        config, "train", resolve_precision(config), config.progress_bar, callbacks, work_dir,
        max_epochs=max_epochs,
        accumulate_grad_batches=config.accumulate,
        gradient_clip_val=config.gradient_clip or None,
        gradient_clip_algorithm="norm",
        # no logger: the history is kept by the module itself, no log files anywhere
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


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

    from .module import FineTuneDataModule, FineTuneModule, PhaseBar

    set_trainable(network, phase.unfreeze, config.batchnorm)
    y = np.asarray(y, dtype=np.int64)
    train_y = y[train_indices]
    n_pos, n_neg = int(train_y.sum()), int(len(train_y) - train_y.sum())
    pos_weight = n_neg / max(n_pos, 1) if config.balance == "pos_weight" else 1.0
    if trunk is not None:  # the cache holds what the trunk computed: it must not train
        frozen = [network.backbone.get_submodule(name) for name in trunk.split.chain[:trunk.split.cut]]
        if any(p.requires_grad for module in frozen for p in module.parameters()):
            raise InputError(f"phase {phase.name}: --unfreeze {phase.unfreeze} trains part of the cached trunk")
    module = FineTuneModule(
        network, phase.learning_rates, pos_weight, None if trunk is not None else config.augment, mean, std,
        config.weight_decay, seed=config.seed, tag={**(tag or {}), "phase": phase.name},
        split=None if trunk is None else trunk.split, schedule=config.schedule, guard=config.guard,
    )
    data = FineTuneDataModule(images, y, train_indices, val_indices, config, trunk)
    # Lightning never puts the model in training mode itself: it keeps the modes the modules come in
    # with (and restores them after each validation). So they are set here, for every phase: the
    # parts that train in training mode (dropout, drop-path, BatchNorm with --batchnorm train), the
    # frozen parts in eval mode (FineTuneModule.train). Before this, phase 2 inherited the eval mode
    # phase 1 ends in, and trained without dropout; and a phase reloaded by a resumed run did not.
    module.train(True)

    monitor = f"val_{config.monitor}"
    checkpoint = ModelCheckpoint(
        dirpath=work_dir, filename=f"{phase.name}-{{epoch}}", monitor=monitor, mode=MONITORS[config.monitor],
        save_top_k=1, save_weights_only=True, auto_insert_metric_name=False,
    )
    # The whole state after every epoch (weights, optimizer, schedule, early stopping, history,
    # random state), saved at the epoch's validation end: a killed run resumes from here.
    last = ModelCheckpoint(dirpath=work_dir, filename=LAST_CHECKPOINT, save_top_k=1, monitor=None,
                           save_on_train_epoch_end=False, save_weights_only=False, enable_version_counter=False)
    resume_from = work_dir / f"{LAST_CHECKPOINT}.ckpt"
    # checked at validation end, with the checkpoints: a resumed run restarts after that point
    stopper = EarlyStopping(monitor=monitor, mode=MONITORS[config.monitor], patience=config.patience,
                            check_on_train_epoch_end=False)
    bars = [PhaseBar(f"{(tag or {}).get('stage', '')} {phase.name}".strip())] if config.progress_bar else []
    # The progress bar (with its ETA) is a callback: it stays. The module augments the batches
    # once on the device, the data module only loads them: Lightning warns about that needlessly.
    with quiet_lightning(True, ignore=(r".*overridden `on_after_batch_transfer` in `LightningModule`.*",)):
        trainer = make_trainer(config, phase.epochs, [checkpoint, last, stopper, *bars, *callbacks], work_dir)
        if resume_from.is_file():
            logger.warning("%s phase %s: resuming after epoch %d (%s)", (tag or {}).get("stage", ""), phase.name,
                           _checkpoint_epoch(resume_from), resume_from)
        trainer.fit(module, datamodule=data, ckpt_path=resume_from if resume_from.is_file() else None)
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


def _is_global_zero() -> bool:
    # After Lightning's DDP launch every process has RANK (or SLURM_PROCID) set; alone, we are rank 0.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


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
        return torch.device("cpu") if not on_gpu(self.config) else pick_device(None)

    def fit(self, indices: Sequence[int], y: Sequence[int] | None = None) -> "FineTuner":
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
        network = copy.deepcopy(self.network)
        phases = [Phase("head", config.epochs_head, config.lr_head, None),
                  Phase("full", config.epochs_full, config.lr_full, config.unfreeze, head_lr=config.lr_head)]
        results = []
        last = max(index for index, phase in enumerate(phases) if phase.epochs >= 1)
        for index, phase in enumerate(phases):
            if phase.epochs < 1:
                continue
            # The last phase runs config.restarts times from the same start (other seeds: data order,
            # dropout); the attempt with the best validation score is kept.
            attempts = config.restarts if index == last else 1
            start = copy.deepcopy(network.state_dict()) if attempts > 1 else None
            tried: list[tuple[PhaseResult, dict[str, torch.Tensor]]] = []
            for attempt in range(attempts):
                if attempt:
                    network.load_state_dict(start)
                seeded = config if not attempt else replace(config, seed=config.seed + RESTART_SEED_STEP * attempt)
                result = self._run_phase(network, phase, index, seeded, self.work_dir / _phase_folder(phase.name, attempt),
                                         train_indices, val_indices, cache)
                tried.append((result, copy.deepcopy(network.state_dict()) if attempts > 1 else {}))
            if attempts > 1:
                sign = 1.0 if MONITORS[config.monitor] == "min" else -1.0  # lower is better after the sign
                kept = int(np.argmin([sign * r.best_score if np.isfinite(r.best_score) else np.inf for r, _ in tried]))
                network.load_state_dict(tried[kept][1])
                result = replace(tried[kept][0], restarts=[
                    {"attempt": k + 1, "seed": config.seed + RESTART_SEED_STEP * k, "best_epoch": r.best_epoch,
                     "best_score": r.best_score, "kept": k == kept,
                     "guard": [row["guard"] for row in r.history if row.get("guard")]}
                    for k, (r, _) in enumerate(tried)])
                if kept:
                    logger.info("%s phase %s: attempt %d of %d kept (validation %s %.4f)", self.stage, phase.name,
                                kept + 1, attempts, config.monitor, result.best_score)
            results.append(result)
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

    def _run_phase(self, network: FineTuneNetwork, phase: Phase, index: int, config: FineTuneConfig,
                   phase_dir: Path, train_indices: np.ndarray, val_indices: np.ndarray,
                   cache: TrunkCache | None) -> PhaseResult:
        """One phase (or one attempt of it) in ``phase_dir``; one finished by an earlier,
        interrupted run of the same command is reloaded from there instead."""
        L = lightning_setup.import_lightning()
        done = phase_dir / DONE_FILE
        if done.is_file():
            saved = torch.load(done, map_location="cpu", weights_only=True)
            network.load_state_dict(saved["state_dict"])
            logger.warning("%s phase %s: done by an earlier run, its best epoch reloaded (%s)", self.stage,
                           phase.name, done)
            return PhaseResult(**saved["result"])
        # Each phase from its own seed: a resumed run's phase starts where an uninterrupted one's does.
        L.seed_everything(config.seed + index, workers=True, verbose=False)
        result = fit_phase(network, self.images, self.y, train_indices, val_indices, phase, config, phase_dir,
                           self.mean, self.std, tag={"stage": self.stage}, callbacks=self.callbacks, trunk=cache)
        if _is_global_zero():
            with atomic_path(done) as temp:
                torch.save({"state_dict": network.state_dict(), "result": asdict(result)}, temp)
        return result

    def predict_proba(self, indices: Sequence[int]) -> np.ndarray:
        if not hasattr(self, "network_"):
            raise ModelError("FineTuner is not fitted yet: call fit first")
        indices = np.asarray(list(indices), dtype=np.int64)
        proba = predict_arrays(self.network_, self.images, indices, self.mean, self.std, self.device,
                               self.config.tta, self.config.batch_size)
        self.network_.cpu()
        return np.column_stack([1.0 - proba, proba])
