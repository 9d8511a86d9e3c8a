"""The forest head: a random forest on all window features concatenated in grid order.

Saved as ``<name>.skops`` (the scikit-learn forest) and ``<name>.trees.safetensors`` (its
trees as flat node arrays, :func:`forest_arrays`), from which it is served with numpy
(:class:`ForestArrays`). The estimator (:class:`ForestHead`) needs scikit-learn and is
defined on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoscope.errors import ModelError

from .files import read_arrays
from .maths import grid_rows, walk_forest
from .registry import SavedHead, training_part

__all__ = ["FOREST_ARRAYS", "ForestArrays", "ForestHead", "forest_arrays", "serve"]

# The arrays file written beside the forest's skops file.
FOREST_ARRAYS = ".trees.safetensors"


def forest_arrays(forest: Any) -> dict[str, np.ndarray]:
    """A fitted ``RandomForestClassifier`` as flat node arrays for :class:`ForestArrays`.

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


# --------------------------------------------------------------------------------------------
# Serving (numpy)
# --------------------------------------------------------------------------------------------


class ForestArrays:
    """:class:`ForestHead` at inference: every tree walked at once, as flat arrays."""

    def __init__(self, path: Path, state: Mapping[str, Any]) -> None:
        self.n_windows, self.n_features = int(state["n_windows_"]), int(state["n_features_in_"])
        a = read_arrays(path, {"roots": None, "feature": None, "threshold": None, "left": None, "right": None,
                               "positive": None})
        nodes = len(a["feature"])
        if any(len(a[key]) != nodes for key in ("threshold", "left", "right", "positive")) or not len(a["roots"]):
            raise ModelError(f"{path}: expected node arrays of one length and at least one tree")
        inner = a["left"] >= 0
        if (a["roots"].min() < 0 or a["roots"].max() >= nodes
                or (inner & ((a["right"] < 0) | (a["left"] >= nodes) | (a["right"] >= nodes))).any()
                or (inner & ((a["feature"] < 0) | (a["feature"] >= self.n_windows * self.n_features))).any()):
            raise ModelError(f"{path}: tree arrays point outside the trees or the features; the file is damaged")
        self.arrays = a

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return walk_forest(self.arrays, grid_rows(bags, self.n_windows, self.n_features, "forest"))


def serve(saved: SavedHead) -> ForestArrays:
    return ForestArrays(saved.file(FOREST_ARRAYS), saved.state)


# --------------------------------------------------------------------------------------------
# Training (scikit-learn)
# --------------------------------------------------------------------------------------------


def _training() -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier

    from .base import Head, check_bags, check_labels, concat_bags
    from .files import load_sklearn, save_arrays, save_sklearn, spec_state

    class ForestHead(Head):
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
            checked = check_bags(bags)
            features = concat_bags(checked, type(self).__name__)
            labels = check_labels(y, len(checked))
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
            features = concat_bags(
                check_bags(bags, self.n_features_in_), type(self).__name__, self.n_windows_
            )
            proba = self.forest_.predict_proba(features)
            return proba[:, list(self.forest_.classes_).index(1)]

        def _write(self, directory: Path, name: str, spec: dict[str, Any], state: dict[str, Any]) -> list[str]:
            file_name = f"{name}.skops"
            state["skops_types"] = save_sklearn(self.forest_, directory / file_name)
            save_arrays(forest_arrays(self.forest_), directory / f"{name}{FOREST_ARRAYS}", type(self).__name__)
            return [file_name, f"{name}{FOREST_ARRAYS}"]

        def _read(self, saved: SavedHead) -> dict[str, Any]:
            state = spec_state(saved.spec, ("n_features_in_", "n_windows_"))
            n_inputs = state["n_windows_"] * state["n_features_in_"]
            self.forest_ = load_sklearn(saved.file(".skops"), RandomForestClassifier, n_inputs,
                                        state.get("skops_types"))
            self.n_windows_ = state["n_windows_"]
            if saved.has(FOREST_ARRAYS):  # written since 0.1: checked here, used by inference
                ForestArrays(saved.file(FOREST_ARRAYS), state)
            return state

    return {"ForestHead": ForestHead}


__getattr__ = training_part(globals(), _training, "ForestHead")
