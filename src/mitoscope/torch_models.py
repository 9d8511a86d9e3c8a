"""The model of a saved folder in PyTorch (and scikit-learn), chosen by its kind: :func:`full_model`.

Below :mod:`mitoscope.inference` (a served model that cannot run an image falls back to it) and
:mod:`mitoscope.models` (:func:`~mitoscope.models.load_model` when a model is not served). The
model classes are imported when a model is built, so that importing this module imports
neither PyTorch nor scikit-learn.
"""

from __future__ import annotations

from typing import Any

from .artifacts import ModelCard

__all__ = ["full_model"]


def full_model(card: ModelCard) -> Any:
    """The model in PyTorch (and scikit-learn): its files verified (once per card)."""
    if card.kind == "finetuned":
        from .finetune.model import FineTunedModel

        return FineTunedModel.from_card(card)
    if card.kind == "cells":
        from .cells.model import CellModel

        return CellModel.from_card(card)
    from .window_model import MitoscopeModel

    return MitoscopeModel.from_card(card)
