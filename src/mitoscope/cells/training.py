"""Multiple-instance fine-tuning of the instance network from image labels alone.

An image is a bag of cell crops; it is Mitosis when its best-scoring cell is mitotic, so the
bag logit is the maximum of its instance logits. Every cell of a Normal image is a known
negative, so beside the bag loss every instance of a Normal bag is pushed down (hard-negative
emphasis: the highest-scoring interphase cells get the largest gradients). The frozen trunk
runs once per crop and view (a flip/quarter turn of the crop) before training; the epochs train
the top stages and the head on the cached maps. The epoch kept and the threshold come from a
held-out share of the images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import dihedral
from ..errors import InputError
from .config import CellTrainConfig
from .network import CellNetwork, freeze_for_training, set_batchnorm_eval, split_for

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


@dataclass
class Bags:
    """Crops of every image, one after the other: ``crops`` (N, s, s, 3) uint8 and ``offsets``
    (n_images + 1,) so that image i owns ``crops[offsets[i]:offsets[i+1]]``."""

    crops: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def normalise(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(n, s, s, 3) uint8 -> (n, 3, s, s) float, as the backbone was trained on."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


VIEWS = [(0, False), (1, False), (2, True), (3, True), (2, False), (1, True), (3, False), (0, True)]


def trunk_maps(network: CellNetwork, split: Any, crops: np.ndarray, views: int, mean: Sequence[float],
               std: Sequence[float], progress: Progress | None = None, batch: int = 256) -> torch.Tensor:
    """(views, N, C, h, w) float16 trunk maps of every crop under each view."""
    network.eval()
    out: torch.Tensor | None = None
    total = views * len(crops)
    done = 0
    with torch.no_grad():
        for v in range(views):
            turns, flip = VIEWS[v]
            for start in range(0, len(crops), batch):
                x = dihedral(normalise(crops[start:start + batch], mean, std), turns, flip)
                maps = split.trunk(network.backbone, x).to(torch.float16)
                if out is None:
                    out = torch.empty((views, len(crops), *maps.shape[1:]), dtype=torch.float16)
                out[v, start:start + len(maps)] = maps
                done += len(maps)
                if progress:
                    progress("cells: frozen trunk", done, total)
    assert out is not None
    return out


def bag_loss(logits: torch.Tensor, sizes: Sequence[int], labels: torch.Tensor, negative_weight: float,
             pseudo: Sequence[int] | None = None, positive_weight: float = 0.0) -> torch.Tensor:
    """Max-pooled bag BCE, plus the BCE of every instance of a Normal bag against 0 and, with
    ``pseudo`` (each bag's pseudo-positive instance, -1 for none), of those instances against 1."""
    parts = torch.split(logits, list(sizes))
    bag_logits = torch.stack([p.max() for p in parts])
    loss = F.binary_cross_entropy_with_logits(bag_logits, labels.float())
    negatives = [p for p, y in zip(parts, labels.tolist()) if y == 0]
    if negatives and negative_weight > 0:
        instances = torch.cat(negatives)
        loss = loss + negative_weight * F.binary_cross_entropy_with_logits(instances, torch.zeros_like(instances))
    if pseudo is not None and positive_weight > 0:
        chosen = [p[j] for p, j in zip(parts, pseudo) if j >= 0]
        if chosen:
            positives = torch.stack(chosen)
            loss = loss + positive_weight * F.binary_cross_entropy_with_logits(positives, torch.ones_like(positives))
    return loss


def pooled_features(network: CellNetwork, split: Any, maps: torch.Tensor, batch: int = 512) -> np.ndarray:
    """The frozen network's pooled features of every crop (first view), before any training."""
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, maps.shape[1], batch):
            out.append(split.top(network.backbone, maps[0, start:start + batch].float()).mean(dim=(-2, -1)).numpy())
    return np.concatenate(out)


def _subset(offsets: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance indices of ``images`` (in order) and their bags' offsets within them."""
    index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in images]) if len(images) else np.zeros(0, int)
    sizes = np.array([offsets[i + 1] - offsets[i] for i in images], dtype=np.int64)
    return index, np.concatenate([[0], np.cumsum(sizes)])


def _split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        val.extend(members[:int(round(fraction * len(members)))].tolist())
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def bag_scores(network: CellNetwork, split: Any, maps: torch.Tensor, offsets: np.ndarray,
               images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bag logits (max over instances, mean over the cached views) and instance logits of ``images``."""
    network.eval()
    bag, instances = [], []
    with torch.no_grad():
        for i in images:
            lo, hi = offsets[i], offsets[i + 1]
            if hi == lo:
                bag.append(-20.0)
                instances.append(np.zeros(0, dtype=np.float32))
                continue
            per_view = [network.logits_from_features(split.top(network.backbone, maps[v, lo:hi].float()))
                        for v in range(maps.shape[0])]
            logit = torch.stack(per_view).mean(0).numpy()
            instances.append(logit)
            bag.append(float(logit.max()))
    return np.asarray(bag), instances


def crop_features(network: CellNetwork, crops: np.ndarray, mean: Sequence[float], std: Sequence[float],
                  progress: Progress | None = None, batch: int = 256) -> np.ndarray:
    """The network's pooled features of (n, s, s, 3) uint8 crops (before its head)."""
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(crops), batch):
            maps = network.backbone.forward_features(normalise(crops[start:start + batch], mean, std))
            out.append(maps.mean(dim=(-2, -1)).float().numpy())
            if progress:
                progress("cells: features", min(start + batch, len(crops)), len(crops))
    return np.concatenate(out) if out else np.zeros((0, network.head.in_features), dtype=np.float32)


def train_linear(network: CellNetwork, bags: Bags, config: CellTrainConfig, mean: Sequence[float],
                 std: Sequence[float], progress: Progress | None = None) -> dict[str, Any]:
    """The linear scorer (:class:`~mitoscope.cells.bootstrap.LinearInstanceHead`) on the frozen
    network's features. With ``config.cv_folds`` it is cross-validated over every image (the
    out-of-fold bag probabilities come back, for the threshold and the metrics) and then fitted
    on all of them; else fitted on the training share, the held-out share's probabilities back."""
    from sklearn.model_selection import StratifiedKFold

    from .bootstrap import LinearInstanceHead

    labels = np.asarray(bags.labels)
    if len(np.unique(labels)) < 2:
        raise InputError(f"training needs images of both classes, got only {sorted(set(labels.tolist()))}")
    features = crop_features(network, bags.crops, mean, std, progress)

    def fit(images: np.ndarray) -> LinearInstanceHead:
        index, offsets = _subset(bags.offsets, images)
        return LinearInstanceHead(seed=config.seed).fit(features[index], bags.crops[index], offsets, labels[images])

    def bag_proba(head: LinearInstanceHead, images: np.ndarray) -> np.ndarray:
        index, offsets = _subset(bags.offsets, images)
        logits = head.decision_function(features[index], bags.crops[index])
        bag = np.array([logits[offsets[i]:offsets[i + 1]].max() if offsets[i + 1] > offsets[i] else -60.0
                        for i in range(len(images))])
        return 1 / (1 + np.exp(-bag))

    folds = min(config.cv_folds, int(np.bincount(labels, minlength=2).min()))
    if config.cv_folds and folds >= 2:
        oof = np.zeros(len(labels))
        splitter = StratifiedKFold(folds, shuffle=True, random_state=config.seed)
        for train_idx, test_idx in splitter.split(labels, labels):
            oof[test_idx] = bag_proba(fit(train_idx), test_idx)
        return {"history": [], "best_epoch": None, "val_proba": oof, "val_labels": labels,
                "head": fit(np.arange(len(labels))), "evaluation": f"{folds}-fold cross-validation (out-of-fold)"}
    train_idx, val_idx = (_split_validation(labels, config.validation_fraction, config.seed)
                          if config.validation_fraction > 0 else (np.arange(len(labels)), np.zeros(0, dtype=int)))
    head = fit(train_idx)
    return {"history": [], "best_epoch": None, "head": head,
            "val_proba": bag_proba(head, val_idx) if len(val_idx) else np.zeros(0),
            "val_labels": labels[val_idx] if len(val_idx) else np.zeros(0, dtype=int)}


def train_instances(network: CellNetwork, bags: Bags, config: CellTrainConfig, mean: Sequence[float],
                    std: Sequence[float], progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune ``network`` on ``bags`` in place; returns the history, the held-out bag
    probabilities and labels (for the threshold) and the epoch kept."""
    torch.manual_seed(config.seed)
    labels = np.asarray(bags.labels)
    if len(np.unique(labels)) < 2:
        raise InputError(f"training needs images of both classes, got only {sorted(set(labels.tolist()))}")
    split = split_for(network, config.trained_stages)
    trained = freeze_for_training(network, split)
    maps = trunk_maps(network, split, bags.crops, config.views, mean, std, progress)
    train_idx, val_idx = (_split_validation(labels, config.validation_fraction, config.seed)
                          if config.validation_fraction > 0 else (np.arange(len(labels)), np.zeros(0, dtype=int)))
    pseudo = np.full(len(labels), -1, dtype=np.int64)  # local index of each bag's pseudo-positive
    if config.positive_weight > 0:
        from .bootstrap import pseudo_positives

        index, sub_offsets = _subset(bags.offsets, train_idx)
        found = pseudo_positives(pooled_features(network, split, maps)[index], bags.crops[index], sub_offsets,
                                 labels[train_idx], config.seed)
        for i, scores in zip(train_idx, np.split(found["scores"], sub_offsets[1:-1])):
            if labels[i] == 1 and len(scores):
                pseudo[i] = int(np.argmax(scores))
    head_ids = {id(p) for p in network.head.parameters()}
    groups = [{"params": [p for p in trained if id(p) in head_ids], "lr": config.learning_rate},
              {"params": [p for p in trained if id(p) not in head_ids], "lr": config.top_learning_rate}]
    optimiser = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / config.bags_per_step)
    total_steps = steps_per_epoch * config.epochs
    warmup = steps_per_epoch
    peak = [g["lr"] for g in optimiser.param_groups]
    rng = np.random.default_rng(config.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    step = 0
    for epoch in range(1, config.epochs + 1):
        network.train()
        set_batchnorm_eval(network)
        order = rng.permutation(train_idx)
        losses = []
        for start in range(0, len(order), config.bags_per_step):
            chosen = order[start:start + config.bags_per_step]
            chosen = chosen[bags.sizes()[chosen] > 0]
            if len(chosen) == 0:
                continue
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
            for group, lr in zip(optimiser.param_groups, peak):
                group["lr"] = lr * scale
            view = rng.integers(0, config.views, size=len(chosen))
            x = torch.cat([maps[v, bags.offsets[i]:bags.offsets[i + 1]] for i, v in zip(chosen, view)]).float()
            logits = network.logits_from_features(split.top(network.backbone, x))
            loss = bag_loss(logits, bags.sizes()[chosen].tolist(), torch.from_numpy(labels[chosen]),
                            config.negative_weight, pseudo[chosen].tolist(), config.positive_weight)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        if config.positive_weight > 0 and config.refresh_every and epoch % config.refresh_every == 0 \
                and epoch < config.epochs:
            positives = train_idx[labels[train_idx] == 1]
            _, own = bag_scores(network, split, maps, bags.offsets, positives)
            for i, scores in zip(positives, own):
                if len(scores):
                    pseudo[i] = int(np.argmax(scores))
        if len(val_idx):
            logits_val, _ = bag_scores(network, split, maps, bags.offsets, val_idx)
            y = labels[val_idx]
            row["val_loss"] = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits_val).float(),
                                                                       torch.from_numpy(y).float()))
            row["val_auc"] = _auc(y, logits_val)
            score = row["val_loss"]
            if config.keep == "val_loss" and (best is None or score < best[0]):  # a copy only when kept
                best = (score, epoch, {k: v.detach().clone() for k, v in network.state_dict().items()})
        history.append(row)
        if progress:
            progress("cells: epochs", epoch, config.epochs)
        logger.info("cells epoch %d: %s", epoch, row)
    kept = config.epochs
    val_proba = np.zeros(0)
    if best is not None:
        network.load_state_dict(best[2])
        kept = best[1]
    if len(val_idx):
        logits_val, _ = bag_scores(network, split, maps, bags.offsets, val_idx)
        val_proba = 1 / (1 + np.exp(-logits_val))
    network.eval()
    return {"history": history, "best_epoch": kept, "val_proba": val_proba, "pseudo": pseudo,
            "val_labels": labels[val_idx] if len(val_idx) else np.zeros(0, dtype=int)}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))
