"""The dense head: a small dense network on all window features concatenated in grid order.

Saved as ``<name>.safetensors`` (the network, with its standardisation statistics); served
from that file's arrays with numpy (:class:`DenseArrays`). The estimator (:class:`DenseHead`,
:class:`DenseNetwork`) needs PyTorch and is defined on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import read_arrays
from .maths import dense_forward, grid_rows
from .registry import SavedHead, training_part

__all__ = ["DenseArrays", "DenseHead", "DenseNetwork", "serve"]


# --------------------------------------------------------------------------------------------
# Serving (numpy)
# --------------------------------------------------------------------------------------------


class DenseArrays:
    """:class:`DenseHead` at inference: standardise -> Linear + ReLU -> Linear -> sigmoid."""

    def __init__(self, path: Path, state: Mapping[str, Any], hidden: int) -> None:
        self.n_windows, self.n_features = int(state["n_windows_"]), int(state["n_features_in_"])
        n = self.n_windows * self.n_features
        self.arrays = read_arrays(path, {"mean": (n,), "std": (n,), "hidden.weight": (hidden, n),
                                         "hidden.bias": (hidden,), "output.weight": (1, hidden), "output.bias": (1,)})

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return dense_forward(grid_rows(bags, self.n_windows, self.n_features, "dense"), self.arrays)


def serve(saved: SavedHead) -> DenseArrays:
    return DenseArrays(saved.file(".safetensors"), saved.state, int(saved.params.get("hidden", 128)))


# --------------------------------------------------------------------------------------------
# Training (PyTorch)
# --------------------------------------------------------------------------------------------


def _training() -> dict[str, Any]:
    import torch
    from torch import nn

    from mitoscope.errors import InputError

    from .base import check_bags, check_labels, concat_bags
    from .neural import INFERENCE_BATCH, TorchHead, mean_std

    class DenseNetwork(nn.Module):
        """Standardise -> Dropout -> Linear + ReLU -> Linear(1) (a logit)."""

        def __init__(self, n_inputs: int, hidden: int, dropout: float) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_inputs))
            self.register_buffer("std", torch.ones(n_inputs))
            self.dropout = nn.Dropout(dropout)
            self.hidden = nn.Linear(n_inputs, hidden)
            self.output = nn.Linear(hidden, 1)
            # Keras' Dense defaults (Glorot uniform, zero bias), as in the write-up's model.
            for layer in (self.hidden, self.output):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            return self.output(torch.relu(self.hidden(self.dropout(x)))).squeeze(-1)

    class DenseHead(TorchHead):
        """A small dense network on all window features concatenated in grid order.

        The write-up's Keras model: Dropout(``dropout``) -> Dense(``hidden``, ReLU, with an
        ``l1 * sum|w| + l2 * sum w^2`` penalty on its weights) -> Dense(1, sigmoid), trained with
        Adam and class-weighted binary cross-entropy, early stopping on a stratified inner
        validation split (best weights restored). Inputs are standardised with the mean and std
        of the training images. Every image must have the same number of windows.
        """

        _state_keys = ("n_features_in_", "n_windows_", "history_")

        def __init__(
            self,
            dropout: float = 0.6,
            hidden: int = 128,
            l1: float = 0.01,
            l2: float = 0.01,
            learning_rate: float = 1e-3,
            max_epochs: int = 200,
            batch_size: int = 16,
            patience: int = 15,
            validation_fraction: float = 0.2,
            class_weight: Any = "balanced",
            random_state: int | None = 0,
            device: str | None = None,
        ) -> None:
            self.dropout = dropout
            self.hidden = hidden
            self.l1 = l1
            self.l2 = l2
            self.learning_rate = learning_rate
            self.max_epochs = max_epochs
            self.batch_size = batch_size
            self.patience = patience
            self.validation_fraction = validation_fraction
            self.class_weight = class_weight
            self.random_state = random_state
            self.device = device

        def fit(self, bags: Sequence[np.ndarray], y: Any) -> DenseHead:
            checked = check_bags(bags)
            features = concat_bags(checked, type(self).__name__)
            labels = check_labels(y, len(checked))
            if not 0.0 <= self.dropout < 1.0:
                raise InputError(f"expected dropout in [0, 1), got {self.dropout}")
            mean, std = mean_std(
                (features[i : i + 64] for i in range(0, len(features), 64)), features.shape[1]
            )

            def train(seed: int, device: torch.device) -> None:
                network = DenseNetwork(features.shape[1], self.hidden, self.dropout)
                network.mean.copy_(torch.from_numpy(mean))
                network.std.copy_(torch.from_numpy(std))
                network.to(device)
                inputs = torch.from_numpy(features).to(device)
                optimizer = torch.optim.Adam(network.parameters(), lr=self.learning_rate)
                hidden_weight = network.hidden.weight

                def add_penalty_gradient() -> None:
                    # Keras' l1_l2 regulariser adds l1 * sum|w| + l2 * sum w^2 to every batch's
                    # loss; its gradient is added directly, which skips building a graph over the
                    # (possibly 57M-weight) matrix and roughly halves a CPU step.
                    with torch.no_grad():
                        hidden_weight.grad.add_(torch.sign(hidden_weight), alpha=self.l1)
                        hidden_weight.grad.add_(hidden_weight, alpha=2.0 * self.l2)

                self.history_ = self._train_network(
                    network, optimizer, lambda batch, training: network(inputs[batch]),
                    labels, self.batch_size, seed, device, add_penalty_gradient,
                )
                self.network_ = network

            self._fit_seeded(train)
            self.n_features_in_ = checked[0].shape[1]
            self.n_windows_ = checked[0].shape[0]
            self.classes_ = np.array([0, 1])
            return self

        def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
            features = concat_bags(
                check_bags(bags, self.n_features_in_), type(self).__name__, self.n_windows_
            )
            network, device = self._network_for_inference()
            outputs = []
            with torch.no_grad():
                for start in range(0, len(features), INFERENCE_BATCH):
                    chunk = torch.from_numpy(features[start : start + INFERENCE_BATCH]).to(device)
                    outputs.append(torch.sigmoid(network(chunk)).cpu())
            return torch.cat(outputs).numpy()

        def _network_for_state(self, state: Mapping[str, Any]) -> nn.Module:
            return DenseNetwork(state["n_windows_"] * state["n_features_in_"], self.hidden, self.dropout)

        def _read(self, saved: SavedHead) -> dict[str, Any]:
            state = super()._read(saved)
            self.n_windows_ = state["n_windows_"]
            return state

    return {"DenseHead": DenseHead, "DenseNetwork": DenseNetwork}


__getattr__ = training_part(globals(), _training, "DenseHead", "DenseNetwork")
