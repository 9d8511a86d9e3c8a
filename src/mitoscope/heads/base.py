"""What every head's estimator shares: the scikit-learn contract and the checks of its inputs.

``bags`` is a sequence of ``(N_i, D)`` float32 arrays, one per image, the window features in
row-major grid order; ``y`` holds 0/1 labels. Imports scikit-learn (training only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from mitoscope.errors import InputError

if TYPE_CHECKING:
    from .registry import SavedHead

__all__ = ["Head", "check_bags", "check_labels", "concat_bags"]


class Head(ClassifierMixin, BaseEstimator):
    """predict / predict_proba from a subclass's ``_positive_proba``; the files of its learned
    state from its ``_write`` and ``_read`` (see :func:`mitoscope.heads.save_head`)."""

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

    def _write(self, directory: Path, name: str, spec: dict[str, Any], state: dict[str, Any]) -> list[str]:
        """Write the learned state as ``directory / f"{name}..."`` files and return their names;
        put what is not an array into ``state`` (or ``spec``), JSON-able. ``n_features_in_`` and
        ``n_windows_`` are recorded by ``save_head``."""
        raise NotImplementedError

    def _read(self, saved: SavedHead) -> dict[str, Any]:
        """Restore the learned state from ``saved`` (files: ``saved.file(suffix)``; state:
        ``spec_state(saved.spec, keys)``) and return the checked spec state."""
        raise NotImplementedError


def check_bags(bags: Any, n_features: int | None = None) -> list[np.ndarray]:
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


def check_labels(y: Any, n_images: int) -> np.ndarray:
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


def concat_bags(bags: list[np.ndarray], head: str, n_windows: int | None = None) -> np.ndarray:
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
