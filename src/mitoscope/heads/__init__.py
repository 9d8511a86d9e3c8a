"""Classifier heads: turn the window features of an image (a "bag") into one probability.

Every head is a scikit-learn estimator. ``bags`` is a sequence of ``(N_i, D)`` float32 arrays,
one per image, the window features in row-major grid order; ``y`` holds 0/1 labels.

- :class:`DenseHead` and :class:`ForestHead` concatenate the windows of an image in grid order
  (every image must have the same grid) and are the two members of the write-up's Round 1
  system (SOFTEC AIC'24), combined by :class:`EnsembleHead`.
- :class:`PooledHead` pools the windows (mean and max), so images of any size work.
- :class:`AttentionHead` is gated-attention multiple-instance learning (Ilse et al. 2018); its
  attention weights say which windows drove the decision.

One module per head (``dense``, ``forest``, ``ensemble``, ``pooled``, ``attention``) holds its
estimator, its files and its numpy serving form; :mod:`.registry` lists them with their traits
and makes, saves (:func:`save_head`), loads (:func:`load_head`) and serves
(:func:`load_served`) any of them. Heads are saved without pickle: torch tensors go to
safetensors files and scikit-learn models to skops files, whose types are checked before
loading.

Importing this package imports neither PyTorch nor scikit-learn (serving and the command
line's checks need only the registry): the estimators load when first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from .maths import combine_ensemble, mean_max_pool
from .registry import (FIXED_GRID_HEADS, HEAD_NAMES, REGISTRY, HeadTraits, load_head, load_served, make_head,
                       save_head, window_score_label)

__all__ = [
    "FIXED_GRID_HEADS",
    "HEADS",
    "HEAD_NAMES",
    "REGISTRY",
    "AttentionHead",
    "DenseHead",
    "EnsembleHead",
    "ForestHead",
    "HeadTraits",
    "PooledHead",
    "combine_ensemble",
    "load_head",
    "load_served",
    "make_head",
    "mean_max_pool",
    "save_head",
    "window_score_label",
]

# Loaded on first use (PyTorch, scikit-learn): name -> (module, name there). The underscored
# names are those of the single heads.py this package replaced.
_LAZY = {
    "DenseHead": ("dense", "DenseHead"),
    "ForestHead": ("forest", "ForestHead"),
    "EnsembleHead": ("ensemble", "EnsembleHead"),
    "PooledHead": ("pooled", "PooledHead"),
    "AttentionHead": ("attention", "AttentionHead"),
    "DenseNetwork": ("dense", "DenseNetwork"),
    "GatedAttentionNetwork": ("attention", "GatedAttentionNetwork"),
    "forest_arrays": ("forest", "forest_arrays"),
    "pooled_arrays": ("pooled", "pooled_arrays"),
    "_DenseNetwork": ("dense", "DenseNetwork"),
    "_GatedAttentionNetwork": ("attention", "GatedAttentionNetwork"),
    "_pad": ("attention", "pad_bags"),
    "_Head": ("base", "Head"),
    "_TorchHead": ("neural", "TorchHead"),
    "_check_bags": ("base", "check_bags"),
    "_check_labels": ("base", "check_labels"),
    "_concat_bags": ("base", "concat_bags"),
    "_inner_split": ("neural", "inner_split"),
    "_class_weights": ("neural", "class_weights"),
    "_mean_std": ("neural", "mean_std"),
}


def __getattr__(name: str) -> Any:
    if name == "HEADS":  # name -> estimator class, in registry order
        from .registry import head_classes

        value = head_classes()
    elif name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), "HEADS", *_LAZY})
