"""The heads mitoscope knows, what each is like, and the one way to make, save, load and serve one.

:data:`REGISTRY` has one line per head: its ``--head`` name, its estimator's class, its module
(``mitoscope.heads.<module>``) and its traits. Everything else asks here: the command line's
choices and help (:mod:`mitoscope.options`), which heads need one image size
(:data:`FIXED_GRID_HEADS`), what a head's window scores mean (:func:`window_score_label`), and
the files of a saved head (:func:`save_head`, :func:`load_head`, :func:`load_served`).

This module imports no PyTorch and no scikit-learn: a head's estimator is imported when it is
first made or loaded, its numpy serving form needs neither. A head module holds:

- its estimator (a :class:`mitoscope.heads.base.Head`) with ``_write(directory, name, spec,
  state) -> files`` and ``_read(saved) -> state``, the learned state's files; defined on first
  use (:func:`training_part`) because it needs PyTorch or scikit-learn;
- ``serve(saved)``, its numpy form for :mod:`mitoscope.inference` (``predict_proba(bags) ->
  (n,)``, and ``window_scores(bags)`` or ``members(bags)`` where the head has them); a head
  without one is served by the full pipeline.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mitoscope.errors import InputError, ModelError, NotServable

from .files import check_file_name, one_line

__all__ = ["ATTENTION_WEIGHTS", "DEFAULT_HEAD", "FIXED_GRID_HEADS", "HEAD_NAMES", "REGISTRY", "WINDOW_SCORING_HEADS",
           "HeadTraits", "SavedHead", "head_class", "head_classes", "head_module", "load_head", "load_served",
           "make_head", "save_head", "training_part", "window_score_label"]

# What the attention head's window scores are; a fine-tuned model's attention pooling gives the same.
ATTENTION_WEIGHTS = "attention weight (higher = more mitotic)"


@dataclass(frozen=True)
class HeadTraits:
    """One head: ``name`` (``--head``), its estimator ``class_name`` in ``mitoscope.heads.<module>``
    (``module`` defaults to the name), whether it needs one grid of windows (``fixed_grid``:
    it concatenates them, so every image is resized to the training size) and, for a head that
    scores windows, what the scores are (``window_scores``: heatmap legends; None: no scores)."""

    name: str
    class_name: str
    fixed_grid: bool = False
    window_scores: str | None = None
    module: str | None = None


REGISTRY: tuple[HeadTraits, ...] = (
    HeadTraits("dense", "DenseHead", fixed_grid=True),
    HeadTraits("forest", "ForestHead", fixed_grid=True),
    HeadTraits("ensemble", "EnsembleHead", fixed_grid=True),
    HeadTraits("pooled", "PooledHead", window_scores="window score (logistic-regression logit)"),
    HeadTraits("attention", "AttentionHead", window_scores=ATTENTION_WEIGHTS),
)

# The head `mitoscope train` uses unless told otherwise (the write-up's Round 1 system).
DEFAULT_HEAD = "ensemble"
# The --head choices as the command line lists them: the default first.
HEAD_NAMES = (DEFAULT_HEAD, *(t.name for t in REGISTRY if t.name != DEFAULT_HEAD))
# Heads whose input is the concatenation of all windows: the grid (and so the image size) is fixed.
FIXED_GRID_HEADS = {t.name for t in REGISTRY if t.fixed_grid}
# Heads that score windows (what heatmaps and localisation need), alphabetically.
WINDOW_SCORING_HEADS = tuple(sorted(t.name for t in REGISTRY if t.window_scores))


def window_score_label(head_name: str) -> str:
    """What the window scores of a model with this head mean (a heatmap's legend)."""
    traits = {t.name: t for t in REGISTRY}.get(head_name)
    return (traits.window_scores if traits is not None else None) or ATTENTION_WEIGHTS


# --------------------------------------------------------------------------------------------
# Head modules and classes
# --------------------------------------------------------------------------------------------


def head_module(traits: HeadTraits) -> ModuleType:
    """The module of a head (imports numpy only; its estimator loads on first use)."""
    return importlib.import_module(f"{__package__}.{traits.module or traits.name}")


def head_class(name: str) -> type:
    """The estimator class registered as ``name`` (imports PyTorch or scikit-learn)."""
    traits = {t.name: t for t in REGISTRY}[name]
    return getattr(head_module(traits), traits.class_name)


def head_classes() -> dict[str, type]:
    """Name -> estimator class, in registry order (``mitoscope.heads.HEADS``)."""
    return {t.name: head_class(t.name) for t in REGISTRY}


_DEFINING = threading.RLock()


def training_part(namespace: dict[str, Any], define: Callable[[], dict[str, Any]], *names: str
                  ) -> Callable[[str], Any]:
    """A head module's ``__getattr__`` for ``names``, its estimator and what goes with it.

    They need PyTorch or scikit-learn, which serving never imports, so the module defines them
    in ``define()`` (which imports those libraries and returns ``{name: object}``), run once,
    when one of ``names`` is first asked for; the module's numpy serving form needs nothing
    of it. A class defined there is named as if at the module's top level.
    """
    module = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        with _DEFINING:
            if name not in namespace:
                defined = define()
                if set(defined) != set(names):
                    raise RuntimeError(f"{module}: defined {sorted(defined)}, declared {sorted(names)}")
                for key, value in defined.items():
                    if isinstance(value, type):
                        value.__qualname__ = key
                namespace.update(defined)
        return namespace[name]

    return __getattr__


# --------------------------------------------------------------------------------------------
# Making a head
# --------------------------------------------------------------------------------------------


def make_head(name: str, **params: Any) -> Any:
    """Construct the head registered as ``name`` with ``params``."""
    names = {t.name: t for t in REGISTRY}
    if name not in names:
        raise InputError(f"expected a head among {', '.join(names)}, got {name!r}")
    cls = head_class(name)
    try:
        return cls(**params)
    except TypeError as error:
        raise InputError(f"bad parameters for head {name!r}: {one_line(error)}") from error


# --------------------------------------------------------------------------------------------
# Saved heads
# --------------------------------------------------------------------------------------------

_NESTED_HEAD_KEY = "__head__"


@dataclass(frozen=True)
class SavedHead:
    """A saved head's spec and the folder of its files, as a head's ``_read`` or ``serve`` sees it.

    ``serving``: a missing file means the head was saved by an older mitoscope, served by the
    full pipeline (:class:`NotServable`), not a broken model (:class:`ModelError`).
    """

    directory: Path
    spec: Mapping[str, Any]
    files: list[str]
    serving: bool = False

    @property
    def params(self) -> Mapping[str, Any]:
        return self.spec.get("params") or {}

    @property
    def state(self) -> Mapping[str, Any]:
        return self.spec.get("state") or {}

    def has(self, suffix: str) -> bool:
        return any(f.endswith(suffix) for f in self.files)

    def file(self, suffix: str) -> Path:
        """The path of the one listed file ending in ``suffix``."""
        matching = [f for f in self.files if f.endswith(suffix)]
        if len(matching) != 1:
            cls = self.spec.get("class")
            if self.serving:
                raise NotServable(f"{cls} saved without its {suffix} file (saved by an older mitoscope)")
            raise ModelError(f"head spec for {cls}: expected one {suffix} file, got {matching}")
        return self.directory / matching[0]


def jsonable(value: Any, where: str) -> Any:
    from sklearn.base import BaseEstimator

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, BaseEstimator):
        return {_NESTED_HEAD_KEY: type(value).__name__, "params": params_to_json(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(key): jsonable(item, where) for key, item in value.items()}
    raise InputError(
        f"expected JSON-compatible head parameters, got {type(value).__name__} for {where}"
    )


def params_to_json(head: Any) -> dict[str, Any]:
    return {
        key: jsonable(value, f"{type(head).__name__}.{key}")
        for key, value in head.get_params(deep=False).items()
    }


def _head_class(class_name: Any) -> type:
    by_name = {t.class_name: t for t in REGISTRY}
    if class_name not in by_name:
        raise ModelError(
            f"head spec: expected a class among {', '.join(by_name)}, got {class_name!r}"
        )
    return head_class(by_name[class_name].name)


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


def _construct(cls: type, params: dict[str, Any]) -> Any:
    try:
        return cls(**params)
    except TypeError as error:
        raise ModelError(f"head spec for {cls.__name__}: {one_line(error)}") from error


def save_head(head: Any, directory: str | os.PathLike[str], name: str) -> dict[str, Any]:
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
    from sklearn.utils.validation import check_is_fitted

    check_file_name(name)
    class_name = type(head).__name__
    names = {t.name: t for t in REGISTRY}
    traits = {t.class_name: t for t in REGISTRY}.get(class_name)
    if traits is None or type(head) is not head_class(traits.name):
        raise InputError(f"expected a head among {', '.join(names)}, got {class_name}")
    check_is_fitted(head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"class": class_name, "params": params_to_json(head)}
    state: dict[str, Any] = {"n_features_in_": int(head.n_features_in_)}
    files: list[str] = head._write(directory, name, spec, state)
    if hasattr(head, "n_windows_"):
        state["n_windows_"] = int(head.n_windows_)
    spec["files"] = files
    spec["state"] = state
    json.dumps(spec)  # fail here, not when the caller writes model.json
    return spec


def load_head(directory: str | os.PathLike[str], spec: Mapping[str, Any]) -> Any:
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
    state = head._read(SavedHead(directory, spec, files))
    head.n_features_in_ = state["n_features_in_"]
    head.classes_ = np.array([0, 1])
    return head


def load_served(directory: str | Path, spec: Mapping[str, Any]) -> Any:
    """The head of ``spec`` (as :func:`save_head` wrote it) in its numpy form, without PyTorch or
    scikit-learn.

    Raises :class:`NotServable` for a head without one or saved without its arrays,
    :class:`ModelError` for a damaged one.
    """
    directory = Path(directory)
    if not isinstance(spec, Mapping):
        raise ModelError(f"head spec: expected an object, got {type(spec).__name__}")
    cls, files = spec.get("class"), spec.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and Path(f).name == f for f in files):
        raise ModelError(f"head spec for {cls}: expected a list of plain file names, got {files!r}")
    traits = next((t for t in REGISTRY if t.class_name == cls), None)
    serve = getattr(head_module(traits), "serve", None) if traits is not None else None
    if serve is None:
        raise NotServable(f"head class {cls!r} has no array form")
    try:
        return serve(SavedHead(directory, spec, files, serving=True))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{directory}: head spec for {cls} is incomplete ({type(error).__name__}: {error})") from None
