"""The pooled head: mean- and max-pooled window features -> standardise -> logistic regression.

Images of any size work; a window's score is the logit of an image made of that window alone.
Saved as ``<name>.skops`` (the scikit-learn pipeline) and ``<name>.arrays.safetensors`` (its
scaler and logistic regression, :func:`pooled_arrays`), from which it is served with numpy
(:class:`PooledArrays`). The estimator (:class:`PooledHead`) needs scikit-learn and is
defined on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoscope.errors import InputError

from .files import read_arrays
from .maths import logistic_decision, mean_max_pool, sigmoid
from .registry import SavedHead, training_part

__all__ = ["POOLED_ARRAYS", "PooledArrays", "PooledHead", "pooled_arrays", "serve"]

# The arrays file written beside the pooled head's skops file.
POOLED_ARRAYS = ".arrays.safetensors"


def pooled_arrays(pipeline: Any) -> dict[str, np.ndarray]:
    """A fitted pooled head's scaler and logistic regression for :class:`PooledArrays`,
    signed so that a positive decision means the positive class."""
    scaler, logistic = pipeline.named_steps["scaler"], pipeline.named_steps["logistic"]
    sign = 1.0 if list(logistic.classes_).index(1) == 1 else -1.0
    return {
        "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
        "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
        "coef": sign * np.asarray(logistic.coef_, dtype=np.float64),
        "intercept": sign * np.asarray(logistic.intercept_, dtype=np.float64),
    }


# --------------------------------------------------------------------------------------------
# Serving (numpy)
# --------------------------------------------------------------------------------------------


class PooledArrays:
    """:class:`PooledHead` at inference: mean+max pooling -> StandardScaler -> logistic."""

    def __init__(self, path: Path, state: Mapping[str, Any]) -> None:
        self.n_features = int(state["n_features_in_"])
        n = 2 * self.n_features
        self.arrays = read_arrays(path, {"scaler_mean": (n,), "scaler_scale": (n,), "coef": (1, n), "intercept": (1,)})

    def _check(self, bags: Sequence[np.ndarray]) -> None:
        for bag in bags:
            if bag.ndim != 2 or bag.shape[1] != self.n_features or not len(bag):
                raise InputError(f"pooled head: expected windows of {self.n_features} features, got {bag.shape}")

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        self._check(bags)
        return sigmoid(logistic_decision(mean_max_pool(bags), self.arrays))

    def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._check(bags)
        return [logistic_decision(np.hstack([bag, bag]), self.arrays) for bag in bags]


def serve(saved: SavedHead) -> PooledArrays:
    return PooledArrays(saved.file(POOLED_ARRAYS), saved.state)


# --------------------------------------------------------------------------------------------
# Training (scikit-learn)
# --------------------------------------------------------------------------------------------


def _training() -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.validation import check_is_fitted

    from .base import Head, check_bags, check_labels
    from .files import load_sklearn, save_arrays, save_sklearn, spec_state

    class PooledHead(Head):
        """Mean- and max-pooled window features -> standardise -> logistic regression.

        Pooling makes the head independent of the grid, so images of any size work. Classes are
        weighted "balanced".
        """

        def __init__(self, C: float = 1.0, max_iter: int = 2000) -> None:
            self.C = C
            self.max_iter = max_iter

        def fit(self, bags: Sequence[np.ndarray], y: Any) -> PooledHead:
            checked = check_bags(bags)
            labels = check_labels(y, len(checked))
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
            pooled = mean_max_pool(check_bags(bags, self.n_features_in_))
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
            checked = check_bags(bags, self.n_features_in_)
            return [self.pipeline_.decision_function(np.hstack([bag, bag])) for bag in checked]

        def _write(self, directory: Path, name: str, spec: dict[str, Any], state: dict[str, Any]) -> list[str]:
            file_name = f"{name}.skops"
            state["skops_types"] = save_sklearn(self.pipeline_, directory / file_name)
            save_arrays(pooled_arrays(self.pipeline_), directory / f"{name}{POOLED_ARRAYS}", type(self).__name__)
            return [file_name, f"{name}{POOLED_ARRAYS}"]

        def _read(self, saved: SavedHead) -> dict[str, Any]:
            state = spec_state(saved.spec, ("n_features_in_",))
            self.pipeline_ = load_sklearn(saved.file(".skops"), Pipeline, 2 * state["n_features_in_"],
                                          state.get("skops_types"))
            if saved.has(POOLED_ARRAYS):
                PooledArrays(saved.file(POOLED_ARRAYS), state)
            return state

    return {"PooledHead": PooledHead}


__getattr__ = training_part(globals(), _training, "PooledHead")
