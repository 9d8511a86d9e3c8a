"""The ensemble head: the write-up's Round 1 system, a dense head and a forest head voting.

The rule is :func:`mitoscope.heads.maths.combine_ensemble`. Saved as its members
(``<name>.dense.*``, ``<name>.forest.*``, their specs under the spec's ``members``); served as
its members' numpy forms (:class:`EnsembleArrays`). The estimator (:class:`EnsembleHead`) is
defined on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoscope.errors import ModelError

from .maths import combine_ensemble
from .registry import SavedHead, load_head, load_served, save_head, training_part

__all__ = ["EnsembleArrays", "EnsembleHead", "serve"]

_MEMBERS = ("dense", "forest")


def _members(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    members = spec.get("members")
    if not isinstance(members, Mapping) or set(members) != set(_MEMBERS):
        raise ModelError("head spec for EnsembleHead: expected members 'dense' and 'forest'")
    return members


# --------------------------------------------------------------------------------------------
# Serving (numpy)
# --------------------------------------------------------------------------------------------


class EnsembleArrays:
    """:class:`EnsembleHead` at inference: its members' numpy forms, combined by the same rule."""

    def __init__(self, dense: Any, forest: Any, dense_weight: float) -> None:
        self.dense, self.forest, self.dense_weight = dense, forest, float(dense_weight)

    def members(self, bags: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {"dense": self.dense.predict_proba(bags), "forest": self.forest.predict_proba(bags)}

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        members = self.members(bags)
        return combine_ensemble(members["dense"], members["forest"], self.dense_weight)


def serve(saved: SavedHead) -> EnsembleArrays:
    members = _members(saved.spec)
    return EnsembleArrays(load_served(saved.directory, members["dense"]),
                          load_served(saved.directory, members["forest"]), float(saved.params.get("dense_weight", 1.1)))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _training() -> dict[str, Any]:
    from sklearn.base import BaseEstimator, clone
    from sklearn.utils.validation import check_is_fitted

    from .base import Head, check_bags, check_labels
    from .dense import DenseHead
    from .files import spec_state
    from .forest import ForestHead

    class EnsembleHead(Head):
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
            checked = check_bags(bags)
            labels = check_labels(y, len(checked))
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
            checked = check_bags(bags, self.n_features_in_)
            return {
                "dense": self.dense_.predict_proba(checked)[:, 1],
                "forest": self.forest_.predict_proba(checked)[:, 1],
            }

        def _positive_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
            members = self.predict_proba_members(bags)
            return combine_ensemble(members["dense"], members["forest"], self.dense_weight)

        def _write(self, directory: Path, name: str, spec: dict[str, Any], state: dict[str, Any]) -> list[str]:
            members = {
                "dense": save_head(self.dense_, directory, f"{name}.dense"),
                "forest": save_head(self.forest_, directory, f"{name}.forest"),
            }
            spec["members"] = members
            return [file for member in members.values() for file in member["files"]]

        def _read(self, saved: SavedHead) -> dict[str, Any]:
            state = spec_state(saved.spec, ("n_features_in_", "n_windows_"))
            members = _members(saved.spec)
            self.dense_ = load_head(saved.directory, members["dense"])
            self.forest_ = load_head(saved.directory, members["forest"])
            for member in (self.dense_, self.forest_):
                if member.n_features_in_ != state["n_features_in_"]:
                    raise ModelError(
                        f"head spec for EnsembleHead: expected members of {state['n_features_in_']} "
                        f"features per window, got {member.n_features_in_}"
                    )
            self.n_windows_ = state["n_windows_"]
            return state

    return {"EnsembleHead": EnsembleHead}


__getattr__ = training_part(globals(), _training, "EnsembleHead")
