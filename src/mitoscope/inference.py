"""Prediction without PyTorch or scikit-learn: a saved window-feature model served with numpy.

Importing torch takes about 4 s on this project's 2-core CPU and scikit-learn with skops
another 3 s, more than a whole 4K prediction should. A saved model whose backbone has an
ONNX export (made when it was trained or first run here) is therefore served by:

- the export in OpenVINO or ONNX Runtime (:mod:`mitoscope.engines`), in the engine that the
  verdicts remembered beside the export allow (:func:`mitoscope.engines.served_engine`),
  with numpy pre- and post-processing (:mod:`mitoscope.array_features`);
- the head in its numpy serving form, which the head's own module in :mod:`mitoscope.heads`
  provides (:func:`mitoscope.heads.registry.load_served`): the dense and attention networks
  from their safetensors weights, the forest and the pooled head's logistic regression from
  the plain arrays :func:`mitoscope.heads.save_head` writes beside their skops files. These
  are the fitted models' own numbers (the forest's float32 inputs against its float64
  thresholds, as scikit-learn compares them), and the tests hold each against its PyTorch or
  scikit-learn head. This module implements no head.

:meth:`ServedModel.load` raises :class:`NotServable` for anything it does not cover (a
fine-tuned network, a model saved before the arrays were written, no export yet or no engine
checked against PyTorch on it, windows that need resizing); :func:`mitoscope.predictions.predict`
then uses the full pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .array_features import ArrayExtractor
from .artifacts import ModelCard, ModelDescription, off_grid, read_model_card
from .cache import FeatureCache, ImageFeatures, extract_dataset
from .engines import EXPORTED_ENGINES, NeedsPyTorch, onnx_path, open_exported, resolve_engine, served_engine
from .errors import NotServable
from .heads.registry import load_served
from .io import ReadOptions, read_image
from .results import Predictions
from .torch_models import full_model

__all__ = ["NotServable", "ServedModel", "load_array_head"]

# A saved head in its numpy form (each head's module says how: mitoscope.heads.registry.load_served).
load_array_head = load_served


class ServedModel(ModelDescription):
    """A saved window-feature model run from its backbone's export and its head's arrays.

    Offers :meth:`predict_paths` as :class:`mitoscope.pipeline.MitoscopeModel` does, with the
    same feature cache entries.
    """

    def __init__(self, config: dict[str, Any], head: Any, export: Path, engine: str,
                 card: ModelCard | None = None) -> None:
        self.config = config
        self.head = head
        self.export = export
        self.engine = engine
        self.card = card if card is not None else ModelCard.of(config, config["_model_dir"])
        self._extractor: ArrayExtractor | None = None

    @classmethod
    def load(cls, model_dir: str | Path, max_pixels: int | None = None, engine: str = "auto") -> "ServedModel":
        """``engine``: auto (OpenVINO, else ONNX Runtime, whichever passed its check), or an exported
        engine (raises InputError if it was rejected); torch is NotServable."""
        return cls.from_card(read_model_card(model_dir), max_pixels, engine)

    @classmethod
    def from_card(cls, card: ModelCard, max_pixels: int | None = None, engine: str = "auto") -> "ServedModel":
        """:meth:`load` from a model's card (its ``model.json`` already read)."""
        # The files' hashes are checked by predict_paths, while OpenVINO starts (see there).
        if card.kind != "window-features":
            raise NotServable(f"model kind {card.kind!r} runs in PyTorch")
        backbone = card.backbone
        if card.window != card.input_size:
            raise NotServable(f"windows of {card.tiling['window']} px are resized to {backbone['input_size']} px "
                              "in PyTorch")
        chosen = resolve_engine(engine, "cpu")
        if chosen not in EXPORTED_ENGINES:
            raise NotServable("engine torch asked for" if engine == "torch"
                              else "neither OpenVINO nor ONNX Runtime is installed")
        export = onnx_path(backbone["name"], backbone["weights_sha256"])
        if not export.is_file():
            raise NotServable(f"no ONNX export of {backbone['name']} yet (made on the first PyTorch run)")
        try:
            chosen = served_engine(export, engine)
        except NeedsPyTorch as reason:  # a check to make, or PyTorch to run: the full pipeline does both
            raise NotServable(str(reason)) from None
        head = load_served(card.path, card.head_files_spec())
        model = cls(card.settings(), head, export, chosen, card)
        model.limit_pixels(max_pixels)
        return model

    def for_images(self, image_sizes: Any, on_fallback: Callable[[str], None] | None = None) -> Any:
        """This model, or the full pipeline's (from the same card: ``model.json`` is not read again nor
        its files hashed twice) when an image is off a fixed-grid head's training size: resized in
        PyTorch, as at training. ``image_sizes`` (path -> (H, W)) come from the images' headers, so
        this is decided before any image is decoded; ``on_fallback(reason)`` is told why."""
        reason = off_grid(self.card, image_sizes)
        if reason is None:
            return self
        if on_fallback is not None:
            on_fallback(reason)
        full = full_model(self.card)
        full.config["read"] = dict(self.config["read"])  # this model's max_pixels and channels
        if self.channels_chosen:
            full.config["_channels_chosen"] = True
        return full

    def extractor(self, batch_size: int = 32) -> ArrayExtractor:
        if self._extractor is None:
            card = self.card
            backbone, tiling = card.backbone, card.tiling
            self._extractor = ArrayExtractor(
                open_exported(self.export, self.engine), card.window, tiling["overlap"], card.input_size,
                backbone["mean"], backbone["std"], batch_size, tiling.get("extraction", "windows"),
                backbone_name=backbone["name"], weights_id=backbone["weights_sha256"])
        return self._extractor

    def predict_paths(self, paths: Sequence[str | Path], cache: FeatureCache | None = None,
                      progress: Callable[[str, int, int], None] | None = None, batch_size: int = 32,
                      device: str | None = None, with_window_scores: bool = False, engine: str = "auto",
                      skip_bad: bool = False) -> Any:
        """Predict image files; with ``skip_bad`` an image that cannot be read is left out and listed
        in the result's ``skipped`` instead of raising InputError."""
        if device not in (None, "cpu"):
            raise NotServable(f"device {device}: served on the CPU only")
        if engine not in ("auto", self.engine):
            raise NotServable(f"engine {engine} asked for, this model is served by {self.engine}")
        paths = [Path(p) for p in paths]
        options = self.read_options
        with ThreadPoolExecutor(max_workers=2) as pool:
            # While OpenVINO starts and compiles: decode the first image, and hash the model's
            # files (a dense head's are large, see README, Speed; both free the GIL). A damaged
            # model file stops here, before any features are computed.
            first = pool.submit(read_image, paths[0], options) if paths else None
            verified = pool.submit(self.card.verify_files, self.config["_model_dir"])  # once per card
            self.extractor(batch_size).warm_up(self.fixed_size)
            verified.result()

            def read(path: Path, read_options: ReadOptions) -> np.ndarray:
                if first is not None and path == paths[0] and read_options is options:
                    return first.result()
                return read_image(path, read_options)

            on_progress = (lambda done, total: progress("features", done, total)) if progress else None
            skipped: dict[Path, str] | None = {} if skip_bad else None
            feats: list[ImageFeatures] = extract_dataset(paths, self.extractor(batch_size), options, cache,
                                                         progress=on_progress, read=read, skipped=skipped)
        skipped = skipped or {}
        paths = [path for path in paths if path not in skipped]
        if not paths:
            return Predictions(paths=[], proba=np.zeros(0), members={}, notes=[], skipped=skipped)
        # predict() has chosen the full pipeline from the headers already (for_images); a direct
        # caller learns it here.
        reason = off_grid(self.card, {path: tuple(f.image_size) for path, f in zip(paths, feats)})
        if reason is not None:
            raise NotServable(reason)
        bags = [f.features for f in feats]
        proba = np.asarray(self.head.predict_proba(bags), dtype=np.float64)
        members = self.head.members(bags) if hasattr(self.head, "members") else {}
        scores = None
        if with_window_scores and hasattr(self.head, "window_scores"):
            scores = [np.asarray(s, dtype=np.float64) for s in self.head.window_scores(bags)]
        return Predictions(paths=paths, proba=proba, members=members, notes=[""] * len(paths), window_scores=scores,
                           boxes=[f.boxes for f in feats], image_sizes=[tuple(f.image_size) for f in feats],
                           skipped=skipped)
