"""Classifier heads: turn the window features of an image (a "bag") into one probability.

Every head is a scikit-learn estimator. ``bags`` is a sequence of ``(N_i, D)`` float32 arrays,
one per image, the window features in row-major grid order; ``y`` holds 0/1 labels.

- :class:`DenseHead` and :class:`ForestHead` concatenate the windows of an image in grid order
  (every image must have the same grid) and are the two members of the write-up's Round 1
  system (SOFTEC AIC'24), combined by :class:`EnsembleHead`.
- :class:`PooledHead` pools the windows (mean and max), so images of any size work.
- :class:`AttentionHead` is gated-attention multiple-instance learning (Ilse et al. 2018); its
  attention weights say which windows drove the decision.

Heads are saved without pickle (:func:`save_head` / :func:`load_head`): torch tensors go to
safetensors files and scikit-learn models to skops files, whose types are checked before
loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.nn import functional as F

from mitoscope.errors import InputError, ModelError
from mitoscope.inference import (FOREST_ARRAYS, POOLED_ARRAYS, ForestArrays, PooledArrays, combine_ensemble,
                                 mean_max_pool)

__all__ = [
    "HEADS",
    "AttentionHead",
    "DenseHead",
    "EnsembleHead",
    "ForestHead",
    "PooledHead",
    "combine_ensemble",
    "load_head",
    "make_head",
    "save_head",
]

logger = logging.getLogger(__name__)

# Bags evaluated together when no gradient is needed (validation and prediction).
_INFERENCE_BATCH = 64
# Features whose training spread is below this are left unscaled instead of blown up.
_MIN_STD = 1e-6
# Module prefixes of the types a skops file may contain before we agree to load it.
_TRUSTED_SKOPS_PREFIXES = ("sklearn.", "numpy.")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_bags(bags: Any, n_features: int | None = None) -> list[np.ndarray]:
    """Return ``bags`` as a list of finite float32 ``(N_i, D)`` arrays with one shared ``D``.

    ``n_features`` is the ``D`` seen in training (None while fitting).
    """
    if isinstance(bags, np.ndarray):
        if bags.ndim != 3:
            raise InputError(
                "expected a sequence of (windows, features) arrays, one per image, "
                f"got a single array of shape {bags.shape}"
            )
        bags = list(bags)
    elif isinstance(bags, (str, bytes, Mapping)) or not isinstance(bags, Iterable):
        raise InputError(
            "expected a sequence of (windows, features) arrays, one per image, "
            f"got {type(bags).__name__}"
        )
    checked: list[np.ndarray] = []
    for index, bag in enumerate(bags):
        array = np.asarray(bag)
        if array.dtype.kind not in "biuf":
            raise InputError(
                f"expected numeric window features for image {index}, got dtype {array.dtype}"
            )
        if array.ndim != 2:
            raise InputError(
                f"expected a 2-D (windows, features) array for image {index}, "
                f"got shape {array.shape}"
            )
        if array.shape[0] == 0:
            raise InputError(f"expected at least one window for image {index}, got none")
        if n_features is not None:
            expected, origin = n_features, "as in training"
        else:
            expected, origin = (checked[0] if checked else array).shape[1], "as image 0"
        if array.shape[1] != expected:
            raise InputError(
                f"expected {expected} features per window ({origin}), "
                f"got {array.shape[1]} for image {index}"
            )
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise InputError(
                f"expected finite window features, got NaN or infinity in image {index}"
            )
        checked.append(array)
    if not checked:
        raise InputError("expected at least one image, got none")
    return checked


def _check_labels(y: Any, n_images: int) -> np.ndarray:
    """Return ``y`` as int64 0/1 labels, one per image, with both classes present."""
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != n_images:
        raise InputError(
            f"expected {n_images} labels (one per image), got shape {labels.shape}"
        )
    if labels.dtype.kind not in "biuf":
        raise InputError(f"expected 0/1 labels, got dtype {labels.dtype}")
    invalid = ~np.isin(labels, (0, 1))
    if invalid.any():
        shown = ", ".join(str(v) for v in np.unique(labels[invalid])[:5])
        raise InputError(f"expected labels 0 (negative) and 1 (positive), got {shown}")
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=2)
    if (counts == 0).any():
        present = int(np.flatnonzero(counts)[0])
        raise InputError(
            f"expected images of both classes to train on, got only class {present} "
            f"({n_images} images)"
        )
    return labels


def _concat_bags(bags: list[np.ndarray], head: str, n_windows: int | None = None) -> np.ndarray:
    """Concatenate each image's windows in grid order: ``(n_images, N * D)``.

    ``n_windows`` is the grid size seen in training (None while fitting).
    """
    expected = n_windows if n_windows is not None else bags[0].shape[0]
    origin = "the training grid" if n_windows is not None else "the grid of image 0"
    for index, bag in enumerate(bags):
        if bag.shape[0] != expected:
            raise InputError(
                f"expected every image to have {expected} windows ({origin}; {head} "
                f"concatenates them in grid order), got {bag.shape[0]} for image {index}"
            )
    return np.stack(bags).reshape(len(bags), -1)


def _class_weights(y: np.ndarray, class_weight: Any) -> np.ndarray:
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


def _inner_split(
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


def _mean_std(chunks: Iterable[np.ndarray], n_columns: int) -> tuple[np.ndarray, np.ndarray]:
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


def _resolve_seed(random_state: Any) -> int:
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    raise InputError(f"expected random_state to be an int or None, got {random_state!r}")


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(
            f"expected a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from error


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def _plot_history(history: Mapping[str, Any], path: Path, title: str) -> Path:
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
    _atomic_write(path, lambda temp: figure.savefig(temp, format=fmt, dpi=100))
    return path


# --------------------------------------------------------------------------------------------
# Common estimator behaviour
# --------------------------------------------------------------------------------------------


class _Head(ClassifierMixin, BaseEstimator):
    """predict / predict_proba from a subclass's ``_positive_proba``."""

    def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities of class 0 and class 1, shape ``(n_images, 2)``."""
        check_is_fitted(self)
        positive = np.asarray(self._positive_proba(bags), dtype=np.float64)
        return np.column_stack([1.0 - positive, positive])

    def predict(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Labels at probability 0.5 (the pipeline applies the tuned threshold itself)."""
        return (self.predict_proba(bags)[:, 1] >= 0.5).astype(np.int64)


class _TorchHead(_Head):
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
        split = _inner_split(y, self.validation_fraction, seed)
        train_indices, val_indices = split if split is not None else (np.arange(len(y)), None)
        class_weights = _class_weights(y[train_indices], self.class_weight)
        targets = torch.as_tensor(y, dtype=torch.float32, device=device)
        weights = torch.as_tensor(class_weights[y], dtype=torch.float32, device=device)
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
                logits = torch.cat([forward(chunk, False) for chunk in val.split(_INFERENCE_BATCH)])
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
        seed = _resolve_seed(self.random_state)
        device = _resolve_device(self.device)
        cuda_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            train(seed, device)

    def _network_for_inference(self) -> tuple[nn.Module, torch.device]:
        device = _resolve_device(self.device)
        network = self.network_.to(device)
        network.eval()
        return network, device

    def plot_history(self, path: str | os.PathLike[str]) -> Path:
        """Save the training/validation loss and accuracy curves to ``path`` (PNG by default)."""
        check_is_fitted(self)
        title = f"{type(self).__name__} training history"
        if self.history_.get("note"):
            title += " (no early stopping: too few images)"
        return _plot_history(self.history_, Path(path), title)


# --------------------------------------------------------------------------------------------
# Dense head
# --------------------------------------------------------------------------------------------


class _DenseNetwork(nn.Module):
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


class DenseHead(_TorchHead):
    """A small dense network on all window features concatenated in grid order.

    The write-up's Keras model: Dropout(``dropout``) -> Dense(``hidden``, ReLU, with an
    ``l1 * sum|w| + l2 * sum w^2`` penalty on its weights) -> Dense(1, sigmoid), trained with
    Adam and class-weighted binary cross-entropy, early stopping on a stratified inner
    validation split (best weights restored). Inputs are standardised with the mean and std
    of the training images. Every image must have the same number of windows.
    """

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
        checked = _check_bags(bags)
        features = _concat_bags(checked, type(self).__name__)
        labels = _check_labels(y, len(checked))
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"expected dropout in [0, 1), got {self.dropout}")
        mean, std = _mean_std(
            (features[i : i + 64] for i in range(0, len(features), 64)), features.shape[1]
        )

        def train(seed: int, device: torch.device) -> None:
            network = _DenseNetwork(features.shape[1], self.hidden, self.dropout)
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
        features = _concat_bags(
            _check_bags(bags, self.n_features_in_), type(self).__name__, self.n_windows_
        )
        network, device = self._network_for_inference()
        outputs = []
        with torch.no_grad():
            for start in range(0, len(features), _INFERENCE_BATCH):
                chunk = torch.from_numpy(features[start : start + _INFERENCE_BATCH]).to(device)
                outputs.append(torch.sigmoid(network(chunk)).cpu())
        return torch.cat(outputs).numpy()


# --------------------------------------------------------------------------------------------
# Forest head
# --------------------------------------------------------------------------------------------


class ForestHead(_Head):
    """A random forest on all window features concatenated in grid order.

    Every image must have the same number of windows.
    """

    def __init__(
        self,
        n_estimators: int = 900,
        bootstrap: bool = False,
        max_features: Any = "sqrt",
        n_jobs: int | None = -1,
        random_state: int | None = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.bootstrap = bootstrap
        self.max_features = max_features
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, bags: Sequence[np.ndarray], y: Any) -> ForestHead:
        checked = _check_bags(bags)
        features = _concat_bags(checked, type(self).__name__)
        labels = _check_labels(y, len(checked))
        forest = RandomForestClassifier(
            n_estimators=self.n_estimators,
            bootstrap=self.bootstrap,
            max_features=self.max_features,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        self.forest_ = forest.fit(features, labels)
        self.n_features_in_ = checked[0].shape[1]
        self.n_windows_ = checked[0].shape[0]
        self.classes_ = np.array([0, 1])
        return self

    def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        features = _concat_bags(
            _check_bags(bags, self.n_features_in_), type(self).__name__, self.n_windows_
        )
        proba = self.forest_.predict_proba(features)
        return proba[:, list(self.forest_.classes_).index(1)]


# --------------------------------------------------------------------------------------------
# Ensemble head
# --------------------------------------------------------------------------------------------


class EnsembleHead(_Head):
    """The write-up's Round 1 system: a :class:`DenseHead` and a :class:`ForestHead` voting.

    See :func:`combine_ensemble` for the rule. ``dense`` and ``forest`` are unfitted
    estimators (cloned on fit); None means the default-constructed head.
    """

    def __init__(
        self,
        dense: BaseEstimator | None = None,
        forest: BaseEstimator | None = None,
        dense_weight: float = 1.1,
    ) -> None:
        self.dense = dense
        self.forest = forest
        self.dense_weight = dense_weight

    def fit(self, bags: Sequence[np.ndarray], y: Any) -> EnsembleHead:
        checked = _check_bags(bags)
        labels = _check_labels(y, len(checked))
        self.dense_ = (clone(self.dense) if self.dense is not None else DenseHead()).fit(
            checked, labels
        )
        self.forest_ = (clone(self.forest) if self.forest is not None else ForestHead()).fit(
            checked, labels
        )
        self.n_features_in_ = checked[0].shape[1]
        self.n_windows_ = checked[0].shape[0]
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba_members(self, bags: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Each member's positive-class probability, ``{"dense": (n,), "forest": (n,)}``."""
        check_is_fitted(self)
        checked = _check_bags(bags, self.n_features_in_)
        return {
            "dense": self.dense_.predict_proba(checked)[:, 1],
            "forest": self.forest_.predict_proba(checked)[:, 1],
        }

    def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        members = self.predict_proba_members(bags)
        return combine_ensemble(members["dense"], members["forest"], self.dense_weight)


# --------------------------------------------------------------------------------------------
# Pooled head
# --------------------------------------------------------------------------------------------


class PooledHead(_Head):
    """Mean- and max-pooled window features -> standardise -> logistic regression.

    Pooling makes the head independent of the grid, so images of any size work. Classes are
    weighted "balanced".
    """

    def __init__(self, C: float = 1.0, max_iter: int = 2000) -> None:
        self.C = C
        self.max_iter = max_iter

    def fit(self, bags: Sequence[np.ndarray], y: Any) -> PooledHead:
        checked = _check_bags(bags)
        labels = _check_labels(y, len(checked))
        pipeline = Pipeline([
            ("scaler", StandardScaler()),
            ("logistic", LogisticRegression(
                C=self.C, max_iter=self.max_iter, class_weight="balanced"
            )),
        ])
        self.pipeline_ = pipeline.fit(mean_max_pool(checked), labels)
        self.n_features_in_ = checked[0].shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        pooled = mean_max_pool(_check_bags(bags, self.n_features_in_))
        proba = self.pipeline_.predict_proba(pooled)
        return proba[:, list(self.pipeline_.classes_).index(1)]

    def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One logit per window: the model's decision for an image made of that window alone.

        A window ``w`` is scored as the pooled vector ``[w, w]`` (an image whose windows are
        all ``w`` has mean = max = ``w``). This is exact for that imagined image, not a
        decomposition of a real image's score: max pooling lets one window dominate, which
        is what makes the score useful to point at mitotic windows.
        """
        check_is_fitted(self)
        checked = _check_bags(bags, self.n_features_in_)
        return [self.pipeline_.decision_function(np.hstack([bag, bag])) for bag in checked]


# --------------------------------------------------------------------------------------------
# Attention head
# --------------------------------------------------------------------------------------------


class _GatedAttentionNetwork(nn.Module):
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


def _pad(
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


class AttentionHead(_TorchHead):
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
        checked = _check_bags(bags)
        labels = _check_labels(y, len(checked))
        for name in ("dropout", "instance_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"expected {name} in [0, 1), got {getattr(self, name)}")
        n_features = checked[0].shape[1]
        mean, std = _mean_std(checked, n_features)

        def train(seed: int, device: torch.device) -> None:
            network = _GatedAttentionNetwork(
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
                x, mask = _pad(chosen, device)
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
        checked = _check_bags(bags, self.n_features_in_)
        network, device = self._network_for_inference()
        probabilities, logits, weights = [], [], []
        with torch.no_grad():
            for start in range(0, len(checked), _INFERENCE_BATCH):
                chunk = checked[start : start + _INFERENCE_BATCH]
                x, mask = _pad(chunk, device)
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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

HEADS: dict[str, type[_Head]] = {
    "dense": DenseHead,
    "forest": ForestHead,
    "ensemble": EnsembleHead,
    "pooled": PooledHead,
    "attention": AttentionHead,
}


def make_head(name: str, **params: Any) -> _Head:
    """Construct the head registered as ``name`` with ``params``."""
    if name not in HEADS:
        raise InputError(f"expected a head among {', '.join(HEADS)}, got {name!r}")
    try:
        return HEADS[name](**params)
    except TypeError as error:
        raise InputError(f"bad parameters for head {name!r}: {_one_line(error)}") from error


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------

_NESTED_HEAD_KEY = "__head__"


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, BaseEstimator):
        return {_NESTED_HEAD_KEY: type(value).__name__, "params": _params_to_json(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, where) for key, item in value.items()}
    raise InputError(
        f"expected JSON-compatible head parameters, got {type(value).__name__} for {where}"
    )


def _params_to_json(head: BaseEstimator) -> dict[str, Any]:
    return {
        key: _jsonable(value, f"{type(head).__name__}.{key}")
        for key, value in head.get_params(deep=False).items()
    }


def _head_class(class_name: Any) -> type[_Head]:
    by_name = {cls.__name__: cls for cls in HEADS.values()}
    if class_name not in by_name:
        raise ModelError(
            f"head spec: expected a class among {', '.join(by_name)}, got {class_name!r}"
        )
    return by_name[class_name]


def _params_from_json(params: Any, class_name: str) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise ModelError(f"head spec for {class_name}: expected a params object, got {params!r}")
    decoded = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and _NESTED_HEAD_KEY in value:
            nested = _head_class(value[_NESTED_HEAD_KEY])
            value = _construct(nested, _params_from_json(value.get("params"), nested.__name__))
        decoded[key] = value
    return decoded


def _construct(cls: type[_Head], params: dict[str, Any]) -> _Head:
    try:
        return cls(**params)
    except TypeError as error:
        raise ModelError(f"head spec for {cls.__name__}: {_one_line(error)}") from error


def _spec_state(spec: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    state = spec.get("state")
    class_name = spec.get("class")
    if not isinstance(state, Mapping):
        raise ModelError(f"head spec for {class_name}: expected a 'state' object, got {state!r}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ModelError(f"head spec for {class_name}: missing state {', '.join(missing)}")
    for key in keys:
        if key.startswith("n_") and not (isinstance(state[key], int) and state[key] > 0):
            raise ModelError(
                f"head spec for {class_name}: expected a positive integer {key}, got {state[key]!r}"
            )
    return dict(state)


def _check_file_name(name: str) -> None:
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError(f"expected a plain file name for the head files, got {name!r}")


def _save_tensors(network: nn.Module, path: Path, class_name: str) -> None:
    from safetensors.torch import save_file

    tensors = {
        key: value.detach().cpu().contiguous().clone()
        for key, value in network.state_dict().items()
    }
    _atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata={"class": class_name}))


def _load_tensors(network: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: head weights file is missing")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own and OS errors for broken files
        raise ModelError(f"{path}: not a readable safetensors file ({_one_line(error)})") from error
    expected = network.state_dict()
    if set(tensors) != set(expected):
        raise ModelError(
            f"{path}: expected tensors {sorted(expected)}, got {sorted(tensors)}"
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"{path}: expected tensor {key} of shape {tuple(expected[key].shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    network.load_state_dict(tensors, assign=True)  # the file's tensors become the weights
    network.eval()
    return network


def _save_arrays(arrays: Mapping[str, np.ndarray], path: Path, class_name: str) -> None:
    from safetensors.numpy import save_file

    tensors = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
    _atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata={"class": class_name}))


def forest_arrays(forest: RandomForestClassifier) -> dict[str, np.ndarray]:
    """A fitted forest as flat node arrays for :class:`mitoscope.inference.ForestArrays`.

    All trees' nodes in one sequence (``roots`` says where each tree starts; children are
    indices into it, -1 at leaves), float64 thresholds as scikit-learn keeps them, and each
    node's positive-class fraction as its ``predict_proba`` normalises it.
    """
    trees = [estimator.tree_ for estimator in forest.estimators_]
    starts = np.cumsum([0] + [tree.node_count for tree in trees])[:-1]
    positive_column = list(forest.classes_).index(1)

    def children(side: np.ndarray, start: int) -> np.ndarray:
        return np.where(side >= 0, side + start, -1).astype(np.int64)

    values = []
    for tree in trees:
        fractions = tree.value[:, 0, :].astype(np.float64)
        totals = fractions.sum(axis=1)
        totals[totals == 0.0] = 1.0
        values.append(fractions[:, positive_column] / totals)
    return {
        "roots": starts.astype(np.int64),
        "feature": np.concatenate([tree.feature for tree in trees]).astype(np.int64),
        "threshold": np.concatenate([tree.threshold for tree in trees]).astype(np.float64),
        "left": np.concatenate([children(tree.children_left, start) for tree, start in zip(trees, starts)]),
        "right": np.concatenate([children(tree.children_right, start) for tree, start in zip(trees, starts)]),
        "positive": np.concatenate(values),
    }


def pooled_arrays(pipeline: Pipeline) -> dict[str, np.ndarray]:
    """A fitted pooled head's scaler and logistic regression for :class:`mitoscope.inference.PooledArrays`,
    signed so that a positive decision means the positive class."""
    scaler, logistic = pipeline.named_steps["scaler"], pipeline.named_steps["logistic"]
    sign = 1.0 if list(logistic.classes_).index(1) == 1 else -1.0
    return {
        "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
        "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
        "coef": sign * np.asarray(logistic.coef_, dtype=np.float64),
        "intercept": sign * np.asarray(logistic.intercept_, dtype=np.float64),
    }


def _save_sklearn(model: BaseEstimator, path: Path) -> list[str]:
    """Write ``model`` with skops; return the types a load must trust (kept in the spec)."""
    import skops.io

    _atomic_write(path, lambda temp: skops.io.dump(model, temp))
    return sorted(skops.io.get_untrusted_types(file=path))


def _load_sklearn(path: Path, expected_type: type, n_features: int, types: Sequence[str] | None = None) -> Any:
    """Load a skops file trusting only scikit-learn/numpy types: ``types`` (recorded at save) when
    given, so the file is parsed once; skops refuses a file holding any other type."""
    import skops.io

    if not path.is_file():
        raise ModelError(f"{path}: head model file is missing")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        raise ModelError(f"{path}: expected the head spec's skops_types to be a list of type names, got {types!r}")
    try:
        untrusted = list(types) if types is not None else skops.io.get_untrusted_types(file=path)
    except Exception as error:  # a broken zip or JSON schema surfaces as many error types
        raise ModelError(f"{path}: not a readable skops file ({_one_line(error)})") from error
    foreign = [name for name in untrusted if not name.startswith(_TRUSTED_SKOPS_PREFIXES)]
    if foreign:
        raise ModelError(
            f"{path}: expected only scikit-learn/numpy types, got {', '.join(sorted(foreign))}"
        )
    try:
        model = skops.io.load(path, trusted=untrusted)
    except Exception as error:
        raise ModelError(f"{path}: not a readable skops file ({_one_line(error)})") from error
    if not isinstance(model, expected_type):
        raise ModelError(
            f"{path}: expected a {expected_type.__name__}, got {type(model).__name__}"
        )
    if getattr(model, "n_features_in_", None) != n_features:
        raise ModelError(
            f"{path}: expected a model of {n_features} input features, "
            f"got {getattr(model, 'n_features_in_', None)}"
        )
    return model


def save_head(head: _Head, directory: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Write a fitted head's files into ``directory`` and return its JSON-able spec.

    The spec holds ``class``, ``params`` (``get_params``, nested heads as
    ``{"__head__": class, "params": ...}``), ``files`` (names relative to ``directory``) and
    ``state`` (learned values that are not tensors). Torch weights and standardisation
    statistics go to ``<name>.safetensors``, scikit-learn models to ``<name>.skops`` with their
    arrays beside them (``<name>.trees.safetensors``, ``<name>.arrays.safetensors``: what
    :mod:`mitoscope.inference` predicts from without scikit-learn); an
    ensemble saves its members as ``<name>.dense.*`` and ``<name>.forest.*`` and lists their
    specs under ``members``. No pickle is involved.
    """
    _check_file_name(name)
    class_name = type(head).__name__
    if type(head) not in HEADS.values():
        raise InputError(f"expected a head among {', '.join(HEADS)}, got {class_name}")
    check_is_fitted(head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"class": class_name, "params": _params_to_json(head)}
    state: dict[str, Any] = {"n_features_in_": int(head.n_features_in_)}
    files: list[str] = []

    if isinstance(head, _TorchHead):
        file_name = f"{name}.safetensors"
        _save_tensors(head.network_, directory / file_name, class_name)
        files.append(file_name)
        state["history_"] = _jsonable(head.history_, f"{class_name}.history_")
    elif isinstance(head, ForestHead):
        file_name = f"{name}.skops"
        state["skops_types"] = _save_sklearn(head.forest_, directory / file_name)
        _save_arrays(forest_arrays(head.forest_), directory / f"{name}{FOREST_ARRAYS}", class_name)
        files += [file_name, f"{name}{FOREST_ARRAYS}"]
    elif isinstance(head, PooledHead):
        file_name = f"{name}.skops"
        state["skops_types"] = _save_sklearn(head.pipeline_, directory / file_name)
        _save_arrays(pooled_arrays(head.pipeline_), directory / f"{name}{POOLED_ARRAYS}", class_name)
        files += [file_name, f"{name}{POOLED_ARRAYS}"]
    elif isinstance(head, EnsembleHead):
        members = {
            "dense": save_head(head.dense_, directory, f"{name}.dense"),
            "forest": save_head(head.forest_, directory, f"{name}.forest"),
        }
        spec["members"] = members
        files.extend(file for member in members.values() for file in member["files"])
    if hasattr(head, "n_windows_"):
        state["n_windows_"] = int(head.n_windows_)
    spec["files"] = files
    spec["state"] = state
    json.dumps(spec)  # fail here, not when the caller writes model.json
    return spec


def load_head(directory: str | os.PathLike[str], spec: Mapping[str, Any]) -> _Head:
    """Rebuild a fitted head from the files in ``directory`` and the spec of :func:`save_head`.

    A missing, corrupt or mismatching file raises :class:`ModelError` naming the file.
    """
    if not isinstance(spec, Mapping):
        raise ModelError(f"head spec: expected an object, got {type(spec).__name__}")
    directory = Path(directory)
    cls = _head_class(spec.get("class"))
    head = _construct(cls, _params_from_json(spec.get("params"), cls.__name__))
    files = spec.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ModelError(
            f"head spec for {cls.__name__}: expected a list of file names, got {files!r}"
        )
    for file_name in files:
        if Path(file_name).name != file_name:
            raise ModelError(
                f"head spec for {cls.__name__}: expected plain file names, got {file_name!r}"
            )

    def only_file(suffix: str) -> Path:
        matching = [f for f in files if f.endswith(suffix)]
        if len(matching) != 1:
            raise ModelError(
                f"head spec for {cls.__name__}: expected one {suffix} file, got {matching}"
            )
        return directory / matching[0]

    if cls is DenseHead:
        state = _spec_state(spec, ("n_features_in_", "n_windows_", "history_"))
        n_inputs = state["n_windows_"] * state["n_features_in_"]
        with torch.device("meta"):  # shapes only: initialising ~10^8 weights to overwrite them costs seconds
            network = _DenseNetwork(n_inputs, head.hidden, head.dropout)
        head.network_ = _load_tensors(network, only_file(".safetensors"))
        head.history_ = state["history_"]
        head.n_windows_ = state["n_windows_"]
    elif cls is AttentionHead:
        state = _spec_state(spec, ("n_features_in_", "history_"))
        with torch.device("meta"):
            network = _GatedAttentionNetwork(
                state["n_features_in_"], head.hidden, head.attention_dim, head.dropout
            )
        head.network_ = _load_tensors(network, only_file(".safetensors"))
        head.history_ = state["history_"]
    elif cls is ForestHead:
        state = _spec_state(spec, ("n_features_in_", "n_windows_"))
        n_inputs = state["n_windows_"] * state["n_features_in_"]
        head.forest_ = _load_sklearn(only_file(".skops"), RandomForestClassifier, n_inputs,
                                     state.get("skops_types"))
        head.n_windows_ = state["n_windows_"]
        if any(f.endswith(FOREST_ARRAYS) for f in files):  # written since 0.1: checked here, used by inference
            ForestArrays(only_file(FOREST_ARRAYS), state)
    elif cls is PooledHead:
        state = _spec_state(spec, ("n_features_in_",))
        head.pipeline_ = _load_sklearn(only_file(".skops"), Pipeline, 2 * state["n_features_in_"],
                                       state.get("skops_types"))
        if any(f.endswith(POOLED_ARRAYS) for f in files):
            PooledArrays(only_file(POOLED_ARRAYS), state)
    else:  # EnsembleHead
        state = _spec_state(spec, ("n_features_in_", "n_windows_"))
        members = spec.get("members")
        if not isinstance(members, Mapping) or set(members) != {"dense", "forest"}:
            raise ModelError("head spec for EnsembleHead: expected members 'dense' and 'forest'")
        head.dense_ = load_head(directory, members["dense"])
        head.forest_ = load_head(directory, members["forest"])
        for member in (head.dense_, head.forest_):
            if member.n_features_in_ != state["n_features_in_"]:
                raise ModelError(
                    f"head spec for EnsembleHead: expected members of {state['n_features_in_']} "
                    f"features per window, got {member.n_features_in_}"
                )
        head.n_windows_ = state["n_windows_"]
    head.n_features_in_ = state["n_features_in_"]
    head.classes_ = np.array([0, 1])
    return head
