"""Training the cell scorers from image labels alone (see :mod:`mitoscope.cells`).

An image is a bag of cell crops; it is Mitosis when its best-scoring cell is mitotic. The linear
scorer (:func:`train_linear`) is a multiple-instance model on few frozen features. The fine-tuned
scorer (:func:`train_instances`) is self-trained: that linear model's best cell of each Mitosis
image is a pseudo-positive, every cell of a Normal image a known negative, and the network learns
them as a plain cell classifier on the crops themselves, each batch freshly augmented (flips,
turns, zoom, brightness, contrast) so that it learns what mitotic cells share rather than the
training cells themselves. Fine-tuning on the max-pooled bag loss memorised the training cells,
and so did self-training on cached maps of a frozen trunk (README).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import AugmentConfig, augment_batch
from ..errors import InputError
from .bootstrap import intensity_features
from .config import CellTrainConfig
from .export import exported_features
from .network import CellNetwork, as_channels_last, channels_last, set_batchnorm_eval, trained_parameters
from .views import crop_views

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
    array = np.ascontiguousarray(crops)
    if not array.flags.writeable:  # e.g. memory-mapped crops (torch wants arrays it may write)
        array = array.copy()
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


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


def crop_features(network: CellNetwork, crops: np.ndarray, mean: Sequence[float], std: Sequence[float],
                  progress: Progress | None = None, batch: int = 256, views: int = 1) -> np.ndarray:
    """The network's pooled features of (n, s, s, 3) uint8 crops (before its head), averaged over
    the first ``views`` of :data:`VIEWS` (a cell has no orientation)."""
    network.eval()
    out = np.zeros((len(crops), network.head.in_features), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(crops), batch):  # batch by batch: memory for one batch, however many cells
            chunk = np.asarray(crops[start:start + batch])
            total = np.zeros((len(chunk), network.head.in_features), dtype=np.float64)
            for view in range(views):
                x = normalise(crop_views(chunk, view), mean, std)
                total += network.backbone.forward_features(x).mean(dim=(-2, -1)).double().numpy()
            out[start:start + len(chunk)] = total / views
            if progress:
                progress("cells: features", min(start + batch, len(crops)), len(crops))
    return out


def _two_classes(bags: Bags) -> np.ndarray:
    labels = np.asarray(bags.labels)
    if len(np.unique(labels)) < 2:
        raise InputError(f"training needs images of both classes, got only {sorted(set(labels.tolist()))}")
    return labels


def frozen_features(network: CellNetwork, bags: Bags, config: CellTrainConfig, mean: Sequence[float],
                    std: Sequence[float], progress: Progress | None = None) -> tuple[np.ndarray, str]:
    """The untrained network's pooled features of every crop, averaged over ``config.feature_views``
    views, and the engine that computed them: an exported one when it matches PyTorch and
    ``config.feature_engine`` is "auto" (:func:`.export.exported_features`), else "torch"."""
    exported = None
    if config.feature_engine == "auto":
        with tempfile.TemporaryDirectory(prefix="mitoscope-export-") as folder:
            exported = exported_features(network, bags.crops, mean, std, config.feature_views, folder, progress)
    return exported or (crop_features(network, bags.crops, mean, std, progress, views=config.feature_views), "torch")


def train_linear(network: CellNetwork, bags: Bags, config: CellTrainConfig, mean: Sequence[float],
                 std: Sequence[float], progress: Progress | None = None) -> dict[str, Any]:
    """The linear scorer (:class:`~mitoscope.cells.bootstrap.LinearInstanceHead`) on the frozen
    network's features (through an exported engine when one matches PyTorch: see
    :func:`.export.exported_features`). With ``config.cv_folds`` it is cross-validated over every image (the
    out-of-fold bag probabilities come back, for the threshold and the metrics) and then fitted
    on all of them; else fitted on the training share, the held-out share's probabilities back."""
    from .bootstrap import LinearInstanceHead

    labels = _two_classes(bags)
    features, engine = frozen_features(network, bags, config, mean, std, progress)
    stats = intensity_features(bags.crops)

    def fit(images: np.ndarray, fold: int | None) -> tuple[LinearInstanceHead, Callable[[np.ndarray], np.ndarray]]:
        index, offsets = _subset(bags.offsets, images)
        head = LinearInstanceHead(seed=config.seed).fit(features[index], stats[index], offsets, labels[images])

        def proba(held: np.ndarray) -> np.ndarray:
            index, offsets = _subset(bags.offsets, held)
            return best_cell_proba(head.decision_function(features[index], stats[index]), offsets)
        return head, proba

    out = cross_fit(labels, config, fit)
    head = out.pop("fitted")
    return {**out, "history": [], "best_epoch": None, "head": head, "feature_engine": engine}


def _take(crops: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``crops[index]`` in the order of ``index`` (repeats allowed), read in sorted order: a memory
    map reads sorted rows far faster."""
    return np.asarray(crops[np.sort(index)])[np.argsort(np.argsort(index, kind="stable"), kind="stable")]


def cell_logits(network: CellNetwork, crops: np.ndarray, index: np.ndarray, views: int, mean: Sequence[float],
                std: Sequence[float], batch: int = 256) -> np.ndarray:
    """The network's logit of each crop in ``index``, the mean over its first ``views`` views."""
    network.eval()
    total = np.zeros(len(index), dtype=np.float64)
    with torch.no_grad(), channels_last(network):
        for start in range(0, len(index), batch):
            chunk = _take(crops, index[start:start + batch])
            for view in range(views):
                x = as_channels_last(normalise(crop_views(chunk, view), mean, std))
                total[start:start + len(chunk)] += network(x).double().numpy()
    return total / views


def pseudo_labels(frozen: np.ndarray, stats: np.ndarray, bags: Bags, images: np.ndarray,
                  seed: int, per_image: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives): global crop indices. The ``per_image`` best cells of each Mitosis
    image (all of them when it has fewer) under the linear multiple-instance model on frozen
    features and intensity statistics (:mod:`.bootstrap`; any further per-cell columns of
    ``stats`` are features alike), and every cell of each Normal image; the other cells of
    Mitosis images get no label."""
    from .bootstrap import LinearInstanceHead

    labels = np.asarray(bags.labels)
    index, offsets = _subset(bags.offsets, images)
    teacher = LinearInstanceHead(seed=seed).fit(frozen[index], stats[index], offsets, labels[images])
    scores = teacher.decision_function(frozen[index], stats[index])
    positives, negatives = [], []
    for k, image in enumerate(images):
        lo, hi = offsets[k], offsets[k + 1]
        if hi == lo:
            continue
        if labels[image] == 1:
            positives.extend(index[lo + np.argsort(-scores[lo:hi], kind="stable")[:per_image]].tolist())
        else:
            negatives.extend(index[lo:hi].tolist())
    return np.asarray(positives, dtype=np.int64), np.asarray(negatives, dtype=np.int64)


def fit_cell_classifier(network: CellNetwork, trained: list[torch.nn.Parameter], crops: np.ndarray,
                        positives: np.ndarray, negatives: np.ndarray, config: CellTrainConfig, seed: int,
                        mean: Sequence[float], std: Sequence[float], progress: Progress | None = None,
                        ) -> list[dict[str, float]]:
    """Train ``trained`` as a plain cell classifier on pseudo-labelled crops: batches of
    ``config.negatives_per_step`` known negatives and ``config.positives_per_step`` pseudo-positives
    (drawn with replacement: they are few), each batch augmented afresh (:func:`augment_batch`:
    flips, quarter turns, zoom, brightness, contrast; stain jitter with ``config.stain_jitter``);
    warm-up over the first epoch, then cosine; frozen BatchNorm; gradients clipped to norm 1. With
    ``config.hard_negatives`` that share of each batch's negatives is drawn from the hardest tenth
    of them under the network itself, rescored (one view) at the start of every epoch after the first.
    An epoch is one pass over the negatives, or ``config.min_steps_per_epoch`` steps when that is
    more (then as many fresh passes as it takes)."""
    if not len(positives) or not len(negatives):
        raise InputError(f"self-training needs pseudo-positive and negative cells, got {len(positives)} and "
                         f"{len(negatives)} (images without any found cell?)")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    augment = AugmentConfig(stain_jitter=config.stain_jitter)
    head_ids = {id(p) for p in network.head.parameters()}
    optimiser = torch.optim.AdamW([{"params": [p for p in trained if id(p) in head_ids], "lr": config.learning_rate},
                                   {"params": [p for p in trained if id(p) not in head_ids],
                                    "lr": config.top_learning_rate}], weight_decay=config.weight_decay)
    peak = [group["lr"] for group in optimiser.param_groups]
    steps_per_epoch = max(1, len(negatives) // config.negatives_per_step, config.min_steps_per_epoch)
    total = steps_per_epoch * config.epochs
    target = torch.cat([torch.ones(config.positives_per_step), torch.zeros(config.negatives_per_step)])
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    n_hard = int(round(config.hard_negatives * config.negatives_per_step))
    history, step, hardest = [], 0, None
    with channels_last(network):
        for epoch in range(1, config.epochs + 1):
            if n_hard and epoch > 1:
                logits = cell_logits(network, crops, negatives, 1, mean, std)
                hardest = negatives[np.argsort(-logits, kind="stable")[:max(1, len(negatives) // 10)]]
            network.train()
            set_batchnorm_eval(network)
            uniform = config.negatives_per_step - (n_hard if hardest is not None else 0)
            passes = math.ceil(steps_per_epoch * uniform / len(negatives)) if len(negatives) >= uniform else 1
            order = np.concatenate([rng.permutation(negatives) for _ in range(passes)])
            losses = []
            for k in range(steps_per_epoch):
                negative = order[k * uniform:(k + 1) * uniform]
                if len(negative) < uniform:  # fewer negatives than one batch: drawn again
                    negative = rng.choice(negatives, uniform)
                if uniform < config.negatives_per_step:
                    negative = np.concatenate([negative, rng.choice(hardest, config.negatives_per_step - uniform)])
                chosen = np.concatenate([rng.choice(positives, config.positives_per_step), negative])
                x = torch.from_numpy(np.ascontiguousarray(_take(crops, chosen))).permute(0, 3, 1, 2).float().div_(255.0)
                x = (augment_batch(x, augment, generator) - m) / s
                scale = min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total))
                for group, lr in zip(optimiser.param_groups, peak):
                    group["lr"] = lr * scale
                loss = F.binary_cross_entropy_with_logits(network(as_channels_last(x)), target)
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                optimiser.step()
                losses.append(float(loss.detach()))
                step += 1
                if progress:
                    progress("cells: fine-tuning", step, total)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses))})
    network.eval()
    return history


def train_instances(network: CellNetwork, bags: Bags, config: CellTrainConfig, mean: Sequence[float],
                    std: Sequence[float], progress: Progress | None = None) -> dict[str, Any]:
    """The fine-tuned scorer, by self-training from image labels (see :mod:`mitoscope.cells`): a
    linear multiple-instance teacher on the untrained network's features names each Mitosis
    image's best cell; the network (``config.trained_stages`` of it, 0: all) learns those cells
    against every cell of the Normal images, on augmented crops. With ``config.cv_folds`` the
    whole procedure is cross-validated over the images (out-of-fold bag probabilities back, for
    the threshold and the metrics; carried to the final network's scale by
    ``config.oof_transfer``) and then run on all of them (its pseudo-positives named by
    ``config.final_picks``; ``"final_positives"`` in the result). ``network`` ends trained on all images
    (with ``config.fold_soup``: the mean of that network's weights and the fold networks', the
    final one's own under ``"soup"`` in the result); a cell scores as the mean of its logits over
    ``config.views`` views."""
    labels = _two_classes(bags)
    features, engine = frozen_features(network, bags, config, mean, std, progress)
    stats = intensity_features(bags.crops)
    trained = trained_parameters(network, config.trained_stages)
    start = {k: v.detach().clone() for k, v in network.state_dict().items()}
    standardize = config.oof_transfer == "standardized"
    scales: dict[int | None, tuple[float, float]] = {}
    fold_of = np.full(len(labels), -1)
    best_logit = np.full(len(labels), np.nan)
    trained_states: list[dict[str, torch.Tensor]] = []
    # final_picks="cotrained": each cell's out-of-fold logit, z-scored within its fold network.
    held_out_logit = np.full(len(bags.crops), np.nan)
    picks: dict[str, np.ndarray] = {}

    def fit(images: np.ndarray, fold: int | None) -> tuple[list[dict[str, float]], Callable[[np.ndarray], np.ndarray]]:
        seed = config.seed * 100 + (0 if fold is None else fold + 1)
        network.load_state_dict(start)
        teacher_stats = stats
        if fold is None and config.final_picks == "cotrained":
            index, _ = _subset(bags.offsets, images)
            if np.isnan(held_out_logit[index]).any():
                raise RuntimeError("final_picks=cotrained needs every cell's out-of-fold logit before the final fit")
            teacher_stats = np.concatenate([stats, held_out_logit[:, None]], axis=1)
        positives, negatives = pseudo_labels(features, teacher_stats, bags, images, seed, config.positives_per_image)
        if fold is None:
            picks["positives"] = positives
        history = fit_cell_classifier(network, trained, bags.crops, positives, negatives, config, seed, mean, std,
                                      progress)
        if config.fold_soup:
            trained_states.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        if fold is None and len(trained_states) > 1:
            network.load_state_dict(mean_state(trained_states))
        if standardize:
            scales[fold] = logit_scale(network, bags, images[labels[images] == 1], config, mean, std, seed)

        def proba(held: np.ndarray) -> np.ndarray:
            index, offsets = _subset(bags.offsets, held)
            logits = cell_logits(network, bags.crops, index, config.views, mean, std)
            if fold is not None and len(logits):
                low, median, high = np.percentile(logits, [25, 50, 75])
                held_out_logit[index] = (logits - median) / max(high - low, 1e-3)
            best = best_cell_logit(logits, offsets)
            fold_of[held], best_logit[held] = -1 if fold is None else fold, best
            return _sigmoid(best)
        return history, proba

    out = cross_fit(labels, config, fit, progress)
    history = out.pop("fitted")
    if standardize and "evaluation" in out:
        out["val_proba_raw"] = out["val_proba"]
        out["val_proba"] = carried_proba(best_logit, fold_of, scales)
        out["evaluation"] += ", standardized onto the final network's scale"
        out["scales"] = {("final" if k is None else f"fold {k + 1}"): v for k, v in scales.items()}
    if len(trained_states) > 1:
        out["soup"] = {"networks": len(trained_states), "final_alone": trained_states[-1]}
    return {**out, "history": history, "best_epoch": config.epochs, "feature_engine": engine,
            "final_positives": picks.get("positives")}


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of networks' weights (``fold_soup``); counters and other integer
    buffers come from the last of them."""
    return {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone())
            for k, v in states[-1].items()}


def logit_scale(network: CellNetwork, bags: Bags, images: np.ndarray, config: CellTrainConfig,
                mean: Sequence[float], std: Sequence[float], seed: int, most: int = 1024) -> tuple[float, float]:
    """(median, interquartile range) of the network's cell logits over the cells of ``images`` (at
    most ``most`` of them, drawn under ``seed``): the scale :func:`carried_proba` puts out-of-fold
    scores on. Called with the Mitosis images a network trained on, whose cells it never learned
    a label for (only each image's pseudo-positives), which holds alike for every fold's network
    and the final one."""
    index, _ = _subset(bags.offsets, images)
    if len(index) > most:
        index = np.sort(np.random.default_rng(seed).choice(index, most, replace=False))
    logits = cell_logits(network, bags.crops, index, config.views, mean, std)
    if len(logits) < 4:
        return 0.0, 1.0
    low, median, high = np.percentile(logits, [25, 50, 75])
    return float(median), float(max(high - low, 1e-3))


def carried_proba(best_logit: np.ndarray, fold_of: np.ndarray, scales: dict[int | None, tuple[float, float]]) -> np.ndarray:
    """Out-of-fold bag probabilities on the final network's scale: each bag's best-cell logit
    z-scored by its fold network's :func:`logit_scale`, then mapped through the final network's.
    Bags without cells keep their floor logit."""
    final_median, final_spread = scales[None]
    carried = best_logit.copy()
    for fold in np.unique(fold_of[fold_of >= 0]):
        median, spread = scales[int(fold)]
        rows = (fold_of == fold) & (best_logit > EMPTY_BAG_LOGIT)
        carried[rows] = final_median + final_spread * (best_logit[rows] - median) / spread
    return _sigmoid(carried)


# The logit of a bag without cells: its probability is 0 in every float format used.
EMPTY_BAG_LOGIT = -60.0


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # Not model.sigmoid: model.py must load without PyTorch, which this module imports.
    return 1 / (1 + np.exp(-logits))


def best_cell_logit(logits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each bag's best cell's logit (:data:`EMPTY_BAG_LOGIT` for a bag without cells)."""
    return np.array([logits[offsets[k]:offsets[k + 1]].max() if offsets[k + 1] > offsets[k] else EMPTY_BAG_LOGIT
                     for k in range(len(offsets) - 1)])


def best_cell_proba(logits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each bag's probability: the sigmoid of its best cell's logit (0 for a bag without cells)."""
    return _sigmoid(best_cell_logit(logits, offsets))


def cross_fit(labels: np.ndarray, config: CellTrainConfig, fit: Callable[[np.ndarray, int | None], tuple[Any, Any]],
              progress: Progress | None = None) -> dict[str, Any]:
    """How either scorer is evaluated and fitted. ``fit(images, fold)`` trains on ``images`` (fold
    None: the final fit) and returns (what it fitted, a function giving held-out images' bag
    probabilities). With ``config.cv_folds``: k-fold cross-validation over every image (the
    out-of-fold probabilities come back, for the threshold and the metrics), then one fit on all;
    else one fit on a training share, the held-out share's probabilities back."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(config.cv_folds, int(np.bincount(labels, minlength=2).min()))
    if config.cv_folds and folds >= 2:
        oof = np.zeros(len(labels))
        splitter = StratifiedKFold(folds, shuffle=True, random_state=config.seed)
        for fold, (train_idx, test_idx) in enumerate(splitter.split(labels, labels)):
            oof[test_idx] = fit(train_idx, fold)[1](test_idx)
            if progress:
                progress("cells: cross-validation", fold + 1, folds)
        return {"fitted": fit(np.arange(len(labels)), None)[0], "val_proba": oof, "val_labels": labels,
                "evaluation": f"{folds}-fold cross-validation (out-of-fold)"}
    train_idx, val_idx = (_split_validation(labels, config.validation_fraction, config.seed)
                          if config.validation_fraction > 0 else (np.arange(len(labels)), np.zeros(0, dtype=int)))
    fitted, proba = fit(train_idx, None)
    return {"fitted": fitted, "val_proba": proba(val_idx) if len(val_idx) else np.zeros(0),
            "val_labels": labels[val_idx] if len(val_idx) else np.zeros(0, dtype=int)}
