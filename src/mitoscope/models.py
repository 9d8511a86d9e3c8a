"""Saved models through one door: :class:`ModelCard` (``model.json`` read once), the :class:`Model`
protocol every model class follows, and :func:`load_model`, which decides once which class runs.

Three classes run a saved model, all :class:`mitoscope.artifacts.ModelDescription`\\ s:

- :class:`mitoscope.inference.ServedModel`: a window-feature model served from its backbone's
  ONNX export and its head's arrays, without PyTorch or scikit-learn;
- :class:`mitoscope.pipeline.MitoscopeModel`: the same model in PyTorch and scikit-learn;
- :class:`mitoscope.finetune.FineTunedModel`: a fine-tuned network (``"kind": "finetuned"``).

:func:`load_model` reads ``model.json`` once into a :class:`ModelCard` (checked as
:func:`mitoscope.artifacts.read_model_config` checks it), and every class is built from that
card: a model file is hashed once however the choice falls (:meth:`ModelCard.verify_files`
remembers). ``serve=True`` tries :class:`ServedModel` first and takes the full pipeline when
the model cannot be served (:class:`mitoscope.errors.NotServable`, told to ``on_fallback``).
Whether the images themselves can be served (a fixed-grid head and an image of another size,
resized in PyTorch as at training) is decided from their headers, before any pixel is read:
:meth:`Model.for_images`.

This module imports neither PyTorch nor scikit-learn.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from .artifacts import read_model_config, verify_model_files
from .errors import NotServable

logger = logging.getLogger(__name__)

__all__ = ["Model", "ModelCard", "load_model", "off_grid", "read_model_card"]


@dataclass(frozen=True)
class ModelCard:
    """What ``model.json`` says, read and checked once: the model's kind, classes, threshold, head,
    backbone, tiling, reading options, training image size and the sha256 of each of its files."""

    path: Path  # the folder as given
    kind: str
    classes: tuple[str, str]
    positive: str
    threshold: float
    head_name: str
    head_spec: Mapping[str, Any] | None  # None when model.json lacks it (the head cannot be loaded)
    backbone: Mapping[str, Any]
    tiling: Mapping[str, Any]  # empty for a fine-tuned network
    read: Mapping[str, Any]
    train_image_size: tuple[int, int] | None
    files: Mapping[str, str]
    config: Mapping[str, Any]  # all of model.json, for what has no field here
    _verified: list[bool] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, config: Mapping[str, Any], path: str | Path) -> "ModelCard":
        """The card of an already checked ``model.json`` (``config``) of the folder ``path``."""
        size = config.get("train_image_size")
        head = config["head"]
        return cls(
            path=Path(path), kind=config["kind"], classes=tuple(config["classes"]), positive=config["positive"],
            threshold=float(config["threshold"]), head_name=head.get("name", ""), head_spec=head.get("spec"),
            backbone=config.get("backbone") or {}, tiling=config.get("tiling") or {}, read=config.get("read") or {},
            train_image_size=(int(size[0]), int(size[1])) if size else None, files=dict(config["files"]),
            config={k: v for k, v in config.items() if not k.startswith("_")})

    @property
    def resolved(self) -> Path:
        return self.path.resolve()

    @property
    def window(self) -> int | None:
        """The window side in pixels of a window-feature model (None for a fine-tuned network)."""
        return int(self.tiling["window"]) if "window" in self.tiling else None

    @property
    def input_size(self) -> int | None:
        """The backbone's own input side in pixels (windows of another size are resized in PyTorch)."""
        size = self.backbone.get("input_size")
        return int(size) if size is not None else None

    def head_files_spec(self) -> Mapping[str, Any]:
        """The head's spec; KeyError('spec'), as model.json's own lookup raised, when it has none."""
        if self.head_spec is None:
            raise KeyError("spec")
        return self.head_spec

    def settings(self) -> dict[str, Any]:
        """A fresh, mutable copy of ``model.json`` for one model object, with ``_model_dir`` added."""
        return {**copy.deepcopy(dict(self.config)), "_model_dir": str(self.resolved)}

    def verify_files(self, where: str | Path | None = None) -> None:
        """Check every listed file's sha256 (:func:`mitoscope.artifacts.verify_model_files`), once per
        card: a later call does nothing. ``where`` is the folder the errors name (default: as given)."""
        if not self._verified:
            verify_model_files(self.path if where is None else where, dict(self.config))
            self._verified.append(True)


def read_model_card(model_dir: str | Path) -> ModelCard:
    """Read and check ``model.json`` (not yet the files' hashes: :meth:`ModelCard.verify_files`)."""
    return ModelCard.of(read_model_config(model_dir, verify_files=False), model_dir)


def off_grid(card: ModelCard, image_sizes: Mapping[Path, tuple[int, int]]) -> str | None:
    """Why images of these (H, W) sizes cannot be served: the first one off a fixed-grid head's
    training size (resized in PyTorch, as at training); None when all are on it, or any size works."""
    fixed = card.train_image_size
    if fixed is None:
        return None
    for path, size in image_sizes.items():
        if tuple(size) != fixed:
            return f"{path} is {size[1]}x{size[0]}, the model's grid {fixed[1]}x{fixed[0]}: resized in PyTorch"
    return None


@runtime_checkable
class Model(Protocol):
    """What every saved model offers: :class:`~mitoscope.inference.ServedModel`,
    :class:`~mitoscope.pipeline.MitoscopeModel` and :class:`~mitoscope.finetune.FineTunedModel`
    (the properties come from :class:`mitoscope.artifacts.ModelDescription`)."""

    config: dict[str, Any]

    @property
    def classes(self) -> tuple[str, str]: ...

    @property
    def positive(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    @property
    def head_name(self) -> str: ...

    @property
    def gives_window_scores(self) -> bool: ...

    def describe(self) -> ModelCard: ...

    def limit_pixels(self, max_pixels: int | None) -> None: ...

    def choose_channels(self, channels: tuple[int, int, int] | None) -> None: ...

    def for_images(self, image_sizes: Mapping[Path, tuple[int, int]],
                   on_fallback: Callable[[str], None] | None = None) -> "Model": ...

    def predict_paths(self, paths: Sequence[str | Path], cache: Any = None, progress: Any = None, *args: Any,
                      **kwargs: Any) -> Any: ...


def load_model(model_dir: str | Path | ModelCard, engine: str = "auto", max_pixels: int | None = None,
               channels: tuple[int, int, int] | None = None, serve: bool = True,
               on_fallback: Callable[[str], None] | None = None) -> Model:
    """Any saved model, its ``model.json`` read once (or given as its card).

    With ``serve`` a window-feature model that can be served is a
    :class:`~mitoscope.inference.ServedModel` (``engine``: see :mod:`mitoscope.engines`);
    otherwise, and for anything it does not cover (``on_fallback(reason)``, by default logged), the
    full pipeline's :class:`~mitoscope.pipeline.MitoscopeModel` or, for ``"kind": "finetuned"``,
    :class:`~mitoscope.finetune.FineTunedModel`. ``max_pixels`` and ``channels`` replace the
    model's pixel limit and source channels for these reads.
    """
    card = model_dir if isinstance(model_dir, ModelCard) else read_model_card(model_dir)
    model: Any = None
    if serve:
        from .inference import ServedModel

        try:
            model = ServedModel.from_card(card, max_pixels, engine)
        except NotServable as reason:
            (on_fallback or (lambda why: logger.info("predicting with the full pipeline: %s", why)))(str(reason))
    if model is None:
        model = full_model(card)
        model.limit_pixels(max_pixels)
    model.choose_channels(channels)
    return model


def full_model(card: ModelCard) -> Any:
    """The model in PyTorch (and scikit-learn): its files verified (once per card)."""
    if card.kind == "finetuned":
        from .finetune import FineTunedModel

        return FineTunedModel.from_card(card)
    from .pipeline import MitoscopeModel

    return MitoscopeModel.from_card(card)
