"""The network: a timm backbone's final feature map pooled into one logit, and which part trains.

**Pooling**: ``avg`` (the write-up: global average pooling, dropout, one logit) or
``attention`` (gated-attention MIL over the positions of the final feature map). Both give a
per-position heatmap at prediction time: the attention weights (they sum to 1), or for
``avg`` the class-activation map (the head applied at each position; their mean is the
logit).

**What trains** (:func:`set_trainable`): the head always; of the backbone nothing (phase
"head"), all of it, or the last N of timm's coarse ``group_matcher`` groups (for
EfficientNets the last N of ``model.blocks``, with ``conv_head``/``bn2`` going with the last
block). Frozen parts keep their BatchNorm in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbones import Backbone, create_backbone
from ..defaults import OFFLINE_ALTERNATIVE
from ..errors import InputError, WeightsUnavailableError, one_line
from ..heads import _GatedAttentionNetwork
from ..options import POOLS, check_choice
from .config import FineTuneConfig

if TYPE_CHECKING:
    from .trunk import TrunkSplit


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
            f"backbone {name} cannot take {size}x{size} images ({one_line(exc, 200, typed=True)})"
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
