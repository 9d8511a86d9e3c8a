"""The attention head: gated-attention multiple-instance learning (Ilse et al. 2018) over the
windows of an image; its attention weights say which windows drove the decision.

Images of any size work. Saved as ``<name>.safetensors`` (the network, with its
standardisation statistics); served from that file's arrays with numpy
(:class:`AttentionArrays`). The estimator (:class:`AttentionHead`) and its network
(:class:`GatedAttentionNetwork`, also the attention pooling of :mod:`mitoscope.finetune`) need
PyTorch and are defined on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoscope.errors import InputError

from .files import read_arrays
from .maths import gated_attention
from .registry import SavedHead, training_part

__all__ = ["AttentionArrays", "AttentionHead", "GatedAttentionNetwork", "pad_bags", "serve"]


# --------------------------------------------------------------------------------------------
# Serving (numpy)
# --------------------------------------------------------------------------------------------


class AttentionArrays:
    """:class:`AttentionHead` at inference (gated attention, one image at a time)."""

    def __init__(self, path: Path, state: Mapping[str, Any], hidden: int, attention_dim: int) -> None:
        self.n_features = int(state["n_features_in_"])
        d, width = self.n_features, (hidden or self.n_features)
        expected: dict[str, tuple[int, ...]] = {
            "mean": (d,), "std": (d,), "attention_v.weight": (attention_dim, width), "attention_v.bias": (attention_dim,),
            "attention_u.weight": (attention_dim, width), "attention_u.bias": (attention_dim,),
            "attention_w.weight": (1, attention_dim), "attention_w.bias": (1,), "classifier.weight": (1, width),
            "classifier.bias": (1,)}
        if hidden:
            expected.update({"encoder.0.weight": (hidden, d), "encoder.0.bias": (hidden,)})
        self.hidden = hidden
        self.arrays = read_arrays(path, expected)

    def _run(self, bag: np.ndarray) -> tuple[float, np.ndarray]:
        if bag.ndim != 2 or bag.shape[1] != self.n_features or not len(bag):
            raise InputError(f"attention head: expected windows of {self.n_features} features, got {bag.shape}")
        return gated_attention(bag, self.arrays, self.hidden)

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([self._run(bag)[0] for bag in bags])

    def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._run(bag)[1] for bag in bags]


def serve(saved: SavedHead) -> AttentionArrays:
    return AttentionArrays(saved.file(".safetensors"), saved.state, int(saved.params.get("hidden", 128)),
                           int(saved.params.get("attention_dim", 128)))


# --------------------------------------------------------------------------------------------
# Training (PyTorch)
# --------------------------------------------------------------------------------------------


def _training() -> dict[str, Any]:
    import torch
    from sklearn.utils.validation import check_is_fitted
    from torch import nn

    from .base import check_bags, check_labels
    from .neural import INFERENCE_BATCH, TorchHead, mean_std

    class GatedAttentionNetwork(nn.Module):
        """Gated attention MIL (Ilse et al. 2018; CLAM's attention net) with a padding mask."""

        def __init__(self, n_features: int, hidden: int, attention_dim: int, dropout: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_features))
            self.register_buffer("std", torch.ones(n_features))
            # hidden=0: no encoder; attention and classifier work on the features themselves
            # (fine-tuned backbones learn the encoding), with dropout on the pooled vector instead.
            self.encoder: nn.Module = (nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout))
                                       if hidden else nn.Identity())
            self.bag_dropout = nn.Dropout(0.0 if hidden else dropout)
            width = hidden or n_features
            self.attention_v = nn.Linear(width, attention_dim)
            self.attention_u = nn.Linear(width, attention_dim)
            self.attention_w = nn.Linear(attention_dim, 1)
            self.classifier = nn.Linear(width, 1)

        def forward(
            self, x: torch.Tensor, mask: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """``x``: (B, N, D); ``mask``: (B, N), True for real windows.

            Returns bag logits (B,), attention logits (B, N) and attention weights (B, N).
            """
            h = self.encoder((x - self.mean) / self.std)
            gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
            attention_logits = self.attention_w(gate).squeeze(-1)
            if mask is not None:
                attention_logits = attention_logits.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(attention_logits, dim=1)
            bag = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
            return self.classifier(self.bag_dropout(bag)).squeeze(-1), attention_logits, weights

    def pad_bags(
        bags: Sequence[np.ndarray] | Sequence[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack bags of different sizes into (B, N_max, D) with a (B, N_max) validity mask."""
        tensors = [torch.as_tensor(bag) for bag in bags]
        longest = max(t.shape[0] for t in tensors)
        x = torch.zeros(len(tensors), longest, tensors[0].shape[1], dtype=torch.float32, device=device)
        mask = torch.zeros(len(tensors), longest, dtype=torch.bool, device=device)
        for row, tensor in enumerate(tensors):
            x[row, : tensor.shape[0]] = tensor.to(device)
            mask[row, : tensor.shape[0]] = True
        return x, mask

    class AttentionHead(TorchHead):
        """Gated-attention multiple-instance learning over the windows of an image.

        Each window is encoded (Linear + ReLU + Dropout); an attention score
        ``w^T (tanh(V h) * sigmoid(U h))`` is softmaxed over the windows of the image, and the
        attention-weighted sum of the encodings is classified by a linear layer. Images may have
        any number of windows. Training takes one image per step (as Ilse et al. and CLAM do);
        ``instance_dropout`` randomly leaves out that fraction of an image's windows in each step
        as augmentation. Features are standardised with the mean and std over all training
        windows; early stopping works as in :class:`DenseHead`.
        """

        def __init__(
            self,
            hidden: int = 128,
            attention_dim: int = 64,
            dropout: float = 0.25,
            learning_rate: float = 5e-4,
            weight_decay: float = 1e-4,
            max_epochs: int = 100,
            patience: int = 15,
            validation_fraction: float = 0.2,
            class_weight: Any = "balanced",
            instance_dropout: float = 0.0,
            random_state: int | None = 0,
            device: str | None = None,
        ) -> None:
            self.hidden = hidden
            self.attention_dim = attention_dim
            self.dropout = dropout
            self.learning_rate = learning_rate
            self.weight_decay = weight_decay
            self.max_epochs = max_epochs
            self.patience = patience
            self.validation_fraction = validation_fraction
            self.class_weight = class_weight
            self.instance_dropout = instance_dropout
            self.random_state = random_state
            self.device = device

        def fit(self, bags: Sequence[np.ndarray], y: Any) -> AttentionHead:
            checked = check_bags(bags)
            labels = check_labels(y, len(checked))
            for name in ("dropout", "instance_dropout"):
                if not 0.0 <= getattr(self, name) < 1.0:
                    raise InputError(f"expected {name} in [0, 1), got {getattr(self, name)}")
            n_features = checked[0].shape[1]
            mean, std = mean_std(checked, n_features)

            def train(seed: int, device: torch.device) -> None:
                network = GatedAttentionNetwork(
                    n_features, self.hidden, self.attention_dim, self.dropout
                )
                network.mean.copy_(torch.from_numpy(mean))
                network.std.copy_(torch.from_numpy(std))
                network.to(device)
                tensors = [torch.from_numpy(bag).to(device) for bag in checked]
                optimizer = torch.optim.Adam(
                    network.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
                )
                # Separate stream so instance dropout does not shift the shuffling order.
                dropout_generator = torch.Generator().manual_seed(seed + 1)

                def forward(batch: torch.Tensor, training: bool) -> torch.Tensor:
                    chosen = [tensors[int(i)] for i in batch]
                    if training and self.instance_dropout > 0:
                        chosen = [self._drop_instances(t, dropout_generator) for t in chosen]
                    if len(chosen) == 1:
                        return network(chosen[0].unsqueeze(0))[0]
                    x, mask = pad_bags(chosen, device)
                    return network(x, mask)[0]

                self.history_ = self._train_network(
                    network, optimizer, forward, labels, 1, seed, device
                )
                self.network_ = network

            self._fit_seeded(train)
            self.n_features_in_ = n_features
            self.classes_ = np.array([0, 1])
            return self

        def _drop_instances(self, bag: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            keep = torch.rand(bag.shape[0], generator=generator) >= self.instance_dropout
            if not keep.any():
                keep[torch.randint(bag.shape[0], (1,), generator=generator)] = True
            return bag[keep.to(bag.device)]

        def _run(
            self, bags: Sequence[np.ndarray]
        ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
            """Bag probabilities, attention logits and attention weights for every image."""
            checked = check_bags(bags, self.n_features_in_)
            network, device = self._network_for_inference()
            probabilities, logits, weights = [], [], []
            with torch.no_grad():
                for start in range(0, len(checked), INFERENCE_BATCH):
                    chunk = checked[start : start + INFERENCE_BATCH]
                    x, mask = pad_bags(chunk, device)
                    bag_logits, attention_logits, attention = network(x, mask)
                    probabilities.append(torch.sigmoid(bag_logits).cpu().numpy())
                    for row, bag in enumerate(chunk):
                        logits.append(attention_logits[row, : bag.shape[0]].cpu().numpy())
                        weights.append(attention[row, : bag.shape[0]].cpu().numpy())
            return np.concatenate(probabilities), logits, weights

        def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
            return self._run(bags)[0]

        def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
            """Attention weight of every window (softmax over the image's windows, sums to 1)."""
            check_is_fitted(self)
            return self._run(bags)[2]

        def attention_logits(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
            """Attention score of every window before the softmax (comparable across images)."""
            check_is_fitted(self)
            return self._run(bags)[1]

        def _network_for_state(self, state: Mapping[str, Any]) -> nn.Module:
            return GatedAttentionNetwork(state["n_features_in_"], self.hidden, self.attention_dim, self.dropout)

    return {"AttentionHead": AttentionHead, "GatedAttentionNetwork": GatedAttentionNetwork, "pad_bags": pad_bags}


__getattr__ = training_part(globals(), _training, "AttentionHead", "GatedAttentionNetwork", "pad_bags")
