"""The instance network: a pretrained CNN that scores one cell crop (one logit from a linear head
on its pooled features), and which of its layers the fine-tuned scorer trains."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..backbones import Backbone, create_backbone
from ..errors import InputError
from ..finetune.trunk import backbone_chain


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


def trained_parameters(network: CellNetwork, trained_stages: int) -> list[nn.Parameter]:
    """Make only what the fine-tuned scorer trains require gradients, and return it: the head and
    the last ``trained_stages`` stages of the backbone with its final 1x1 conv (0: every layer).
    BatchNorm layers stay frozen wherever they are (their ImageNet statistics would drift on
    batches of similar cells)."""
    if trained_stages == 0:
        names = [""]
    else:
        chain = backbone_chain(network.backbone)
        if chain is None:
            raise InputError(f"backbone {type(network.backbone).__name__} cannot be cut into a frozen trunk and a "
                             "trained top (known: EfficientNet, MobileNetV3, ResNet); train every stage (0) instead")
        stages = [i for i, name in enumerate(chain) if name.startswith(("blocks.", "layer"))]
        if not 0 <= trained_stages <= len(stages):
            raise InputError(f"trained stages must be between 0 (all) and {len(stages)}, got {trained_stages}")
        names = list(chain[stages[-trained_stages]:])
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    trained: list[nn.Parameter] = []
    for name in names:
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


@contextmanager
def channels_last(network: nn.Module) -> Iterator[None]:
    """Run ``network`` with channels-last weights (feed it channels-last inputs: :func:`as_channels_last`);
    the CPU's convolution kernels train and score a 96 px crop faster that way (README). The weights
    go back to the usual layout on exit, which saving and exporting expect. Blocks nest: only the
    outermost converts the weights, so scoring inside a training block keeps them channels-last."""
    depth = getattr(network, "_channels_last_depth", 0)
    if not depth:
        network.to(memory_format=torch.channels_last)
    network._channels_last_depth = depth + 1
    try:
        yield
    finally:
        network._channels_last_depth = depth
        if not depth:
            network.to(memory_format=torch.contiguous_format)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)
