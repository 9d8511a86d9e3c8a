"""What the neural heads (dense, attention) share: their training loop and its history.

:class:`TorchHead` trains a network with Adam on class-weighted binary cross-entropy, early
stopping on a stratified inner validation split (the best weights restored), with torch's
global RNG seeded from ``random_state`` and then restored; it saves and loads the network as
safetensors. Imports PyTorch and scikit-learn (training only).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn import functional as F

from mitoscope.errors import InputError

from .base import Head
from .files import atomic_write, load_tensors, save_tensors, spec_state
from .registry import jsonable

if TYPE_CHECKING:
    from .registry import SavedHead

__all__ = ["INFERENCE_BATCH", "TorchHead", "class_weights", "inner_split", "mean_std", "plot_curves",
           "resolve_device", "resolve_seed"]

logger = logging.getLogger("mitoscope.heads")

# Bags evaluated together when no gradient is needed (validation and prediction).
INFERENCE_BATCH = 64
# Features whose training spread is below this are left unscaled instead of blown up.
_MIN_STD = 1e-6


def class_weights(y: np.ndarray, class_weight: Any) -> np.ndarray:
    """Weight of class 0 and class 1 (scikit-learn's "balanced": n / (2 * count))."""
    if class_weight is None:
        return np.ones(2)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise InputError(
                f"expected class_weight 'balanced', None or a dict, got {class_weight!r}"
            )
        counts = np.bincount(y, minlength=2).astype(np.float64)
        return len(y) / (2.0 * np.maximum(counts, 1.0))
    if isinstance(class_weight, Mapping):
        # Keys may be strings after a JSON round trip.
        by_class = {int(key): float(value) for key, value in class_weight.items()}
        return np.array([by_class.get(0, 1.0), by_class.get(1, 1.0)])
    raise InputError(
        f"expected class_weight 'balanced', None or a dict, got {type(class_weight).__name__}"
    )


def inner_split(
    y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Stratified (train, validation) indices for early stopping, or None if too few images.

    Both parts need at least one image of each class.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"expected validation_fraction in [0, 1), got {fraction}")
    n_val = math.ceil(fraction * len(y))
    counts = np.bincount(y, minlength=2)
    if fraction == 0.0 or n_val < 2 or len(y) - n_val < 2 or counts.min() < 2:
        return None
    indices = np.arange(len(y))
    train, val = train_test_split(
        indices, test_size=n_val, stratify=y, random_state=seed
    )
    return np.sort(train), np.sort(val)


def mean_std(chunks: Iterable[np.ndarray], n_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std over the rows of all ``chunks`` (two float64 passes, low memory)."""
    chunks = list(chunks)
    total = np.zeros(n_columns)
    n_rows = 0
    for chunk in chunks:
        total += chunk.sum(axis=0, dtype=np.float64)
        n_rows += chunk.shape[0]
    mean = total / n_rows
    squares = np.zeros(n_columns)
    for chunk in chunks:
        squares += ((chunk - mean) ** 2).sum(axis=0)
    std = np.sqrt(squares / n_rows)
    std[std < _MIN_STD] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def resolve_seed(random_state: Any) -> int:
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    raise InputError(f"expected random_state to be an int or None, got {random_state!r}")


def resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(
            f"expected a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error


def plot_curves(history: Mapping[str, Any], path: Path, title: str) -> Path:
    """Save loss and accuracy curves (training and validation) as an image at ``path``."""
    # Figure + Agg canvas directly: no pyplot, so no global figure state or GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axes, key, label in ((loss_axes, "loss", "loss"), (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(epochs, history[key], label=f"training {label}")
        if history.get(f"val_{key}"):
            axes.plot(epochs, history[f"val_{key}"], label=f"validation {label}")
        if history.get("best_epoch"):
            axes.axvline(history["best_epoch"], color="grey", linestyle="--", label="best epoch")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.legend()
    figure.suptitle(title)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda temp: figure.savefig(temp, format=fmt, dpi=100))
    return path


class TorchHead(Head):
    """Shared training loop (class-weighted BCE, early stopping) and history plotting."""

    network_: nn.Module
    history_: dict[str, Any]

    def _train_network(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        forward: Callable[[torch.Tensor, bool], torch.Tensor],
        y: np.ndarray,
        batch_size: int,
        seed: int,
        device: torch.device,
        add_penalty_gradient: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Train ``network`` and return its history; the best validation weights are kept.

        ``forward(indices, training)`` gives the logits of the images at ``indices``;
        ``add_penalty_gradient()`` runs after each backward pass to add a weight penalty's
        gradient. The recorded losses are the class-weighted cross-entropy without the
        penalty, so training and validation curves are comparable.
        """
        if self.max_epochs < 1:
            raise InputError(f"expected max_epochs >= 1, got {self.max_epochs}")
        split = inner_split(y, self.validation_fraction, seed)
        train_indices, val_indices = split if split is not None else (np.arange(len(y)), None)
        per_class = class_weights(y[train_indices], self.class_weight)
        targets = torch.as_tensor(y, dtype=torch.float32, device=device)
        weights = torch.as_tensor(per_class[y], dtype=torch.float32, device=device)
        generator = torch.Generator().manual_seed(seed)
        train_order = torch.as_tensor(train_indices)

        history: dict[str, Any] = {
            "loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [],
            "best_epoch": None, "epochs_run": 0, "early_stopping": split is not None,
            "n_train": len(train_indices),
            "n_validation": 0 if val_indices is None else len(val_indices),
            "note": "",
        }
        if split is None:
            reason = (
                "validation_fraction is 0" if self.validation_fraction == 0
                else f"too few images for a stratified validation split ({len(y)} images)"
            )
            history["note"] = (
                f"{reason}; trained for a fixed {self.max_epochs} epochs without early stopping"
            )
            logger.log(
                logging.INFO if self.validation_fraction == 0 else logging.WARNING,
                "%s: %s", type(self).__name__, history["note"],
            )

        def weighted_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
            losses = F.binary_cross_entropy_with_logits(logits, targets[batch], reduction="none")
            return (weights[batch] * losses).mean()

        best_loss, best_state, waited = math.inf, None, 0
        for epoch in range(1, self.max_epochs + 1):
            network.train()
            loss_sum, correct = 0.0, 0
            order = train_order[torch.randperm(len(train_order), generator=generator)]
            for batch in order.split(batch_size):
                batch = batch.to(device)
                logits = forward(batch, True)
                data_loss = weighted_loss(logits, batch)
                optimizer.zero_grad(set_to_none=True)
                data_loss.backward()
                if add_penalty_gradient is not None:
                    add_penalty_gradient()
                optimizer.step()
                loss_sum += float(data_loss.detach()) * len(batch)
                correct += int(((logits.detach() >= 0) == (targets[batch] > 0.5)).sum())
            history["loss"].append(loss_sum / len(train_order))
            history["accuracy"].append(correct / len(train_order))
            history["epochs_run"] = epoch
            if val_indices is None:
                continue

            network.eval()
            with torch.no_grad():
                val = torch.as_tensor(val_indices, device=device)
                logits = torch.cat([forward(chunk, False) for chunk in val.split(INFERENCE_BATCH)])
                val_loss = float(weighted_loss(logits, val))
                val_accuracy = float(((logits >= 0) == (targets[val] > 0.5)).float().mean())
            history["val_loss"].append(val_loss)
            history["val_accuracy"].append(val_accuracy)
            if val_loss < best_loss:
                best_loss, waited = val_loss, 0
                history["best_epoch"] = epoch
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            else:
                waited += 1
                if waited >= self.patience:
                    logger.info(
                        "%s: early stop at epoch %d, best epoch %d (validation loss %.4f)",
                        type(self).__name__, epoch, history["best_epoch"], best_loss,
                    )
                    break
        if best_state is not None:
            network.load_state_dict(best_state)
        network.eval()
        return history

    def _fit_seeded(self, train: Callable[[int, torch.device], None]) -> None:
        """Run ``train(seed, device)`` with torch's global RNG seeded and then restored.

        Weight initialisation and dropout draw from the global RNG; forking it keeps fits
        reproducible without changing the caller's random state.
        """
        seed = resolve_seed(self.random_state)
        device = resolve_device(self.device)
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            train(seed, device)

    def _network_for_inference(self) -> tuple[nn.Module, torch.device]:
        device = resolve_device(self.device)
        network = self.network_.to(device)
        network.eval()
        return network, device

    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Save the training/validation loss and accuracy curves to ``path`` (PNG by default)."""
        check_is_fitted(self)
        title = f"{type(self).__name__} training history"
        if self.history_.get("note"):
            title += " (no early stopping: too few images)"
        return plot_curves(self.history_, Path(path), title)


    # --- files: the network's tensors as <name>.safetensors, the history in the spec ------
    _state_keys: tuple[str, ...] = ("n_features_in_", "history_")

    def _network_for_state(self, state: Mapping[str, Any]) -> nn.Module:
        """A network of the saved shapes (``state``: the spec's), to load the weights into."""
        raise NotImplementedError

    def _write(self, directory: Path, name: str, spec: dict[str, Any], state: dict[str, Any]) -> list[str]:
        class_name = type(self).__name__
        file_name = f"{name}.safetensors"
        save_tensors(self.network_, directory / file_name, class_name)
        state["history_"] = jsonable(self.history_, f"{class_name}.history_")
        return [file_name]

    def _read(self, saved: SavedHead) -> dict[str, Any]:
        state = spec_state(saved.spec, self._state_keys)
        with torch.device("meta"):  # shapes only: initialising ~10^8 weights to overwrite them costs seconds
            network = self._network_for_state(state)
        self.network_ = load_tensors(network, saved.file(".safetensors"))
        self.history_ = state["history_"]
        return state
