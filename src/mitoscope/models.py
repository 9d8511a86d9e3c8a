"""Saved models through one door: :class:`ModelCard` (``model.json`` read once), the :class:`Model`
protocol every model class follows, and :func:`load_model`, which decides once which class runs.

Four classes run a saved model, all :class:`mitoscope.artifacts.ModelDescription`\\ s:

- :class:`mitoscope.inference.ServedModel`: a window-feature model served from its backbone's
  ONNX export and its head's arrays, without PyTorch or scikit-learn;
- :class:`mitoscope.pipeline.MitoscopeModel`: the same model in PyTorch and scikit-learn;
- :class:`mitoscope.finetune.FineTunedModel`: a fine-tuned network (``"kind": "finetuned"``);
- :class:`mitoscope.cells.model.CellModel`: the cell model (``"kind": "cells"``), served on its
  exported network or in PyTorch.

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

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

# The card lives with the model folder it describes (mitoscope.artifacts), and full_model below
# the served model that falls back to it (mitoscope.torch_models); both here as before.
from .artifacts import ModelCard, off_grid, read_model_card
from .errors import NotServable
from .torch_models import full_model

logger = logging.getLogger(__name__)

__all__ = ["Model", "ModelCard", "load_model", "off_grid", "read_model_card"]


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
    :class:`~mitoscope.inference.ServedModel` (``engine``: see :mod:`mitoscope.engines`), and a cell
    model a :class:`~mitoscope.cells.model.CellModel` on its exported network;
    otherwise, and for anything it does not cover (``on_fallback(reason)``, by default logged), the
    full pipeline's :class:`~mitoscope.pipeline.MitoscopeModel`, for ``"kind": "finetuned"``
    :class:`~mitoscope.finetune.FineTunedModel`, for ``"kind": "cells"`` the cell model in PyTorch. ``max_pixels`` and ``channels`` replace the
    model's pixel limit and source channels for these reads.
    """
    card = model_dir if isinstance(model_dir, ModelCard) else read_model_card(model_dir)
    model: Any = None
    if serve:
        try:  # the exported form of the model's kind, without PyTorch
            if card.kind == "cells":
                from .cells.model import CellModel

                model = CellModel.served_from_card(card, engine)
                model.limit_pixels(max_pixels)
            else:
                from .inference import ServedModel

                model = ServedModel.from_card(card, max_pixels, engine)
        except NotServable as reason:
            (on_fallback or (lambda why: logger.info("predicting with the full pipeline: %s", why)))(str(reason))
    if model is None:
        model = full_model(card)
        model.limit_pixels(max_pixels)
    model.choose_channels(channels)
    return model
