"""The heads' arithmetic in numpy alone, for training and serving both.

Training (the estimators, in PyTorch and scikit-learn) and serving (each head's numpy form,
run by :mod:`mitoscope.inference`) import their shared rules from here: the ensemble's vote
and the pooled head's mean+max pooling. The numpy forward passes of the fitted models (the
dense network, the forest walked as flat node arrays, the pooled head's scaler and logistic
regression, the gated attention network) live here too, beside them; each is held against its
PyTorch or scikit-learn original by the tests. Nothing here imports more than numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mitoscope.errors import InputError

__all__ = ["combine_ensemble", "dense_forward", "gated_attention", "grid_rows", "logistic_decision", "mean_max_pool",
           "sigmoid", "standardise", "walk_forest"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------------------------
# Rules shared by the estimators and their served forms
# --------------------------------------------------------------------------------------------


def combine_ensemble(p_dense: np.ndarray, p_forest: np.ndarray, dense_weight: float = 1.1) -> np.ndarray:
    """The write-up's vote between the dense and the forest model, image by image.

    If both models give the same label (at 0.5), that label stands; otherwise the more
    confident model wins, confidence being ``|p - 0.5| * 2``, the dense model's multiplied by
    ``dense_weight`` (ties go to the dense model). The ensemble's probability is the winning
    model's probability. When the models agree, the winner (the more confident one) gives the
    same label, so "take the probability of the model with the larger weighted confidence"
    is the whole rule.
    """
    p_dense = np.asarray(p_dense, dtype=np.float64)
    p_forest = np.asarray(p_forest, dtype=np.float64)
    if p_dense.shape != p_forest.shape:
        raise InputError(
            f"expected member probabilities of the same shape, got {p_dense.shape} "
            f"and {p_forest.shape}"
        )
    dense_confidence = np.abs(p_dense - 0.5) * 2.0 * dense_weight
    forest_confidence = np.abs(p_forest - 0.5) * 2.0
    return np.where(dense_confidence >= forest_confidence, p_dense, p_forest)


def mean_max_pool(bags: Sequence[np.ndarray]) -> np.ndarray:
    """Mean and max of the windows of each image: ``(n_images, 2 * D)`` (the pooled head's input)."""
    return np.stack([np.concatenate([bag.mean(axis=0), bag.max(axis=0)]) for bag in bags])


# --------------------------------------------------------------------------------------------
# Forward passes of fitted models, from their arrays
# --------------------------------------------------------------------------------------------


def grid_rows(bags: Sequence[np.ndarray], n_windows: int, n_features: int, head: str) -> np.ndarray:
    """Each image's windows concatenated in grid order, ``(n_images, N * D)``; every image must
    have the training grid."""
    for bag in bags:
        if bag.shape != (n_windows, n_features):
            raise InputError(f"{head} head: expected {n_windows} windows of {n_features} features per image "
                             f"(the training grid), got {bag.shape[0]} of {bag.shape[1]}")
    return np.stack([np.asarray(bag, dtype=np.float32).reshape(-1) for bag in bags])


def standardise(x: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return (x - arrays["mean"]) / arrays["std"]


def dense_forward(x: np.ndarray, a: Mapping[str, np.ndarray]) -> np.ndarray:
    """Standardise -> Linear + ReLU -> Linear -> sigmoid: the dense network's probabilities."""
    x = standardise(x, a)
    hidden = np.maximum(x @ a["hidden.weight"].T + a["hidden.bias"], 0)
    return sigmoid((hidden @ a["output.weight"].T + a["output.bias"])[:, 0].astype(np.float64))


def walk_forest(a: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Every tree walked at once over flat node arrays (see ``forest.forest_arrays``): the mean
    of the leaves' positive-class fractions, as scikit-learn's ``predict_proba``."""
    rows = np.arange(len(x))[:, None]
    nodes = np.broadcast_to(a["roots"], (len(x), len(a["roots"]))).copy()
    for _ in range(len(a["feature"])):  # at most one step per node; trees end far sooner
        inner = a["left"][nodes] >= 0
        if not inner.any():
            break
        # scikit-learn compares the float32 input with the float64 threshold: x <= t goes left.
        values = x[rows, np.where(inner, a["feature"][nodes], 0)].astype(np.float64)
        step = np.where(values <= a["threshold"][nodes], a["left"][nodes], a["right"][nodes])
        nodes = np.where(inner, step, nodes)
    return a["positive"][nodes].sum(axis=1) / nodes.shape[1]


def logistic_decision(pooled: np.ndarray, a: Mapping[str, np.ndarray]) -> np.ndarray:
    """StandardScaler -> logistic regression: the decision (logit) of each row."""
    # scikit-learn keeps float32 input in float32 (scaled in place); the rest agrees to that rounding.
    x = np.array(pooled, dtype=np.float32)
    x -= a["scaler_mean"]
    x /= a["scaler_scale"]
    return (x @ a["coef"].T + a["intercept"])[:, 0]


def gated_attention(bag: np.ndarray, a: Mapping[str, np.ndarray], hidden: int) -> tuple[float, np.ndarray]:
    """The gated attention network (Ilse et al. 2018) on one image's windows: its probability
    and the attention weight of every window (softmax over the image's windows)."""
    h = standardise(np.asarray(bag, dtype=np.float32), a)
    if hidden:
        h = np.maximum(h @ a["encoder.0.weight"].T + a["encoder.0.bias"], 0)
    gate = np.tanh(h @ a["attention_v.weight"].T + a["attention_v.bias"]) * sigmoid(
        h @ a["attention_u.weight"].T + a["attention_u.bias"])
    logits = (gate @ a["attention_w.weight"].T + a["attention_w.bias"])[:, 0]
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    bag_logit = float((weights @ h) @ a["classifier.weight"][0] + a["classifier.bias"][0])
    return float(sigmoid(np.float64(bag_logit))), weights
