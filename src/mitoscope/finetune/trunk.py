"""Frozen-trunk cache: the frozen first part of the backbone runs once per image and view.

On by default with ``--unfreeze N`` (``trunk_cache``); with ``--unfreeze all`` no trunk is
left frozen. No phase ever trains the part of the backbone before the first module that
``--unfreeze N`` unfreezes (for EfficientNets: ``conv_stem``, ``bn1`` and ``blocks[:k]``),
so it runs once per training image and *view*, in eval mode, before training, and both
phases train on the cached maps: the top of the backbone and the head see exactly what they
would see from images, at a fraction of the cost (README, "Speed"). A view is one of the 8
flips/quarter turns of the square (``trunk_views`` of them, a random one per image and
epoch), each with its own draw of the zoom, brightness/contrast and stain jitter when those
are on. Validation uses the image as it is (its 8 symmetries with ``tta``). The cache takes
``views x images x C x h x w x 4`` bytes and is refused beyond ``trunk_cache_gb``; it is
shared by the cross-validation folds and the final fit. The saved model is the whole
network, as without the cache.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..augment import AugmentConfig, augment_batch, dihedral
from ..errors import InputError, one_line
from ..progress import Progress
from ..lightning_setup import on_gpu
from .config import FineTuneConfig
from .inference import TTA_TRANSFORMS
from .network import FineTuneNetwork, unfrozen_parameter_names

logger = logging.getLogger(__name__)


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
                         f"({one_line(exc, 200, typed=True)})") from None
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
    if not on_gpu(config):
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
