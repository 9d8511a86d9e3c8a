"""The instance network: a pretrained CNN that scores one cell crop, cut into a frozen trunk and a
trained top (the cut the fine-tuning package uses), plus a one-logit linear head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import Backbone, create_backbone
from ..errors import InputError
from ..finetune.trunk import TrunkSplit, backbone_chain


class CellNetwork(nn.Module):
    """Scores (n, 3, s, s) normalised crops: ``forward`` gives one logit per crop."""

    def __init__(self, backbone: nn.Module, n_features: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_features, 1)

    def logits_from_features(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = maps.mean(dim=(-2, -1)) if maps.ndim == 4 else maps
        return self.head(self.dropout(pooled)).squeeze(-1)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.backbone.forward_features(crops))


def split_for(network: CellNetwork, trained_stages: int) -> TrunkSplit:
    """Freeze all but the last ``trained_stages`` stages (and the final 1x1 conv) of the backbone."""
    chain = backbone_chain(network.backbone)
    if chain is None:
        raise InputError(f"backbone {type(network.backbone).__name__} cannot be cut into a frozen trunk and a "
                         "trained top (known: EfficientNet, MobileNetV3, ResNet)")
    stages = [i for i, name in enumerate(chain) if name.startswith(("blocks.", "layer"))]
    if not 1 <= trained_stages <= len(stages):
        raise InputError(f"trained stages must be between 1 and {len(stages)}, got {trained_stages}")
    return TrunkSplit(chain, stages[-trained_stages])


def freeze_for_training(network: CellNetwork, split: TrunkSplit) -> list[nn.Parameter]:
    """Train the top and the head; the top's BatchNorm layers stay frozen (their ImageNet
    statistics would drift on small bags of similar cells). Returns the trained parameters."""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    trained: list[nn.Parameter] = []
    for name in split.chain[split.cut:]:
        for module in network.backbone.get_submodule(name).modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                trained.extend(module.parameters(recurse=False))
    trained.extend(network.head.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)
    return trained


def build_cell_network(backbone_name: str, pretrained: bool = True, weights: Any = None,
                       dropout: float = 0.2) -> tuple[CellNetwork, Backbone]:
    backbone = create_backbone(backbone_name, weights=weights, pretrained=pretrained)
    assert backbone.model is not None
    return CellNetwork(backbone.model, backbone.num_features, dropout), backbone


def set_batchnorm_eval(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()
