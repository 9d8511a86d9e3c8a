"""The window-feature model in PyTorch and scikit-learn: :class:`MitoscopeModel`.

A backbone's window features (:mod:`mitoscope.features`) and a fitted head (:mod:`mitoscope.heads`),
saved into and loaded from a model folder (:mod:`mitoscope.artifacts`). Trained by
:func:`mitoscope.pipeline.train` and chosen by :func:`mitoscope.models.load_model` (through
:func:`mitoscope.torch_models.full_model`); ``from mitoscope.pipeline import MitoscopeModel``
still works.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.torch import save_file

from .artifacts import ModelDescription
from .atomic import atomic_path
from .backbones import Backbone, create_backbone, described_backbone
from .engines import EXPORTED_ENGINES, NeedsPyTorch, onnx_path, resolve_engine, served_engine
from .errors import ModelError
from .features import FeatureCache, FeatureExtractor, ImageFeatures, extract_dataset, pick_device
from .heads import load_head, save_head
from .io import ReadOptions
from .results import Predictions, Progress, prediction_rows

logger = logging.getLogger(__name__)

__all__ = ["BACKBONE_FILE", "MitoscopeModel", "features_at_size", "modal_size", "stage_progress"]


BACKBONE_FILE = "backbone.safetensors"


def stage_progress(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(stage, done, total)) if progress else None


def modal_size(feats: Sequence[ImageFeatures]) -> tuple[int, int]:
    return collections.Counter(tuple(f.image_size) for f in feats).most_common(1)[0][0]


def features_at_size(
    paths: Sequence[Path],
    feats: list[ImageFeatures],
    size: tuple[int, int],
    extractor: FeatureExtractor,
    read_options: ReadOptions,
    cache: FeatureCache | None,
    progress: Progress | None,
) -> tuple[list[ImageFeatures], list[bool]]:
    """Re-extract, resized to ``size``, the images whose size differs (fixed-grid heads)."""
    resized = [tuple(f.image_size) != tuple(size) for f in feats]
    redo = [p for p, r in zip(paths, resized) if r]
    if redo:
        again = iter(extract_dataset(redo, extractor, read_options, cache, resize_to=size,
                                     progress=stage_progress(progress, f"resizing to {size[1]}x{size[0]}")))
        feats = [next(again) if r else f for f, r in zip(feats, resized)]
    return feats, resized


class MitoscopeModel(ModelDescription):
    """A trained model: backbone settings, a fitted head, classes and a tuned threshold."""

    def __init__(self, config: dict[str, Any], head: Any, backbone: Backbone | None = None) -> None:
        self.config = config
        self.head = head
        self._backbone = backbone
        self._extractor: FeatureExtractor | None = None
        self._extractor_engine = "auto"

    # --- what the model knows -------------------------------------------------------------
    def extractor(self, batch_size: int = 32, device: str | None = None, engine: str = "auto") -> FeatureExtractor:
        if self._extractor is not None and self._extractor_engine != engine:
            self._extractor = None  # asked for another engine
        if self._extractor is None:
            tiling = self.config["tiling"]
            self._extractor_engine = engine

            def make(backbone: Backbone, engine: str = engine) -> FeatureExtractor:
                return FeatureExtractor(backbone, tiling["window"], tiling["overlap"], batch_size, device,
                                        mode=tiling.get("extraction", "windows"), engine=engine)

            exported = self._exported(device, engine) if self._backbone is None else None
            if exported is not None:
                try:  # straight from the ONNX export of these weights: no PyTorch model to build
                    self._extractor = make(described_backbone(self.config["backbone"]), exported)
                    self._extractor.runner  # noqa: B018 - opens the session now, so trouble shows here
                    return self._extractor
                except Exception as exc:
                    logger.warning("cannot run the ONNX export of %s (%s); building the model",
                                   self.config["backbone"]["name"], " ".join(str(exc).split())[:200])
            if self._backbone is None:
                self._backbone = self._load_backbone()
            self._extractor = make(self._backbone)
        return self._extractor

    def _exported(self, device: str | None, engine: str = "auto") -> str | None:
        """The exported engine that runs these backbone weights' export for ``engine`` here without
        the network (see :func:`mitoscope.engines.served_engine`); None when the network is needed."""
        info = self.config["backbone"]
        export = onnx_path(info["name"], info["weights_sha256"])
        if resolve_engine(engine, pick_device(device)) not in EXPORTED_ENGINES or not export.is_file():
            return None
        try:
            return served_engine(export, engine)
        except NeedsPyTorch as reason:  # a check to make, or every engine rejected: the network settles it
            logger.info("building the model of %s: %s", info["name"], reason)
            return None

    def _load_backbone(self) -> Backbone:
        info = self.config["backbone"]
        carried = self.config.get("backbone_file")
        weights_path = Path(self.config["_model_dir"]) / carried if carried else None
        backbone = create_backbone(info["name"], weights=weights_path)
        if backbone.weights_id != info["weights_sha256"]:
            raise ModelError(
                f"{Path(self.config['_model_dir']) / 'model.json'}: backbone {info['name']} weights here (sha256 "
                f"{backbone.weights_id[:12]}) differ from those the model was trained with "
                f"({info['weights_sha256'][:12]}, {info['weights_source']})"
            )
        return backbone

    # --- prediction -----------------------------------------------------------------------
    def features(
        self,
        paths: Sequence[Path],
        cache: FeatureCache | None = None,
        progress: Progress | None = None,
        batch_size: int = 32,
        device: str | None = None,
        engine: str = "auto",
        skipped: dict[Path, str] | None = None,
    ) -> tuple[list[ImageFeatures], list[bool]]:
        """Features of ``paths`` (resized to the training size for a fixed-grid head) and whether each
        was resized. With ``skipped`` an unreadable image is recorded there and left out."""
        extractor = self.extractor(batch_size, device, engine)
        feats = extract_dataset(paths, extractor, self.read_options, cache, progress=stage_progress(progress, "features"),
                                skipped=skipped)
        if self.fixed_size is None:
            return feats, [False] * len(feats)
        paths = [path for path in paths if path not in (skipped or {})]
        return features_at_size(paths, feats, self.fixed_size, extractor, self.read_options, cache, progress)

    def probabilities(self, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        proba = self.head.predict_proba(list(bags))[:, 1]
        members = self.head.predict_proba_members(list(bags)) if hasattr(self.head, "predict_proba_members") else {}
        return proba, {name: np.asarray(p) for name, p in members.items()}

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        cache: FeatureCache | None = None,
        progress: Progress | None = None,
        batch_size: int = 32,
        device: str | None = None,
        with_window_scores: bool = False,
        engine: str = "auto",
        skip_bad: bool = False,
    ) -> Predictions:
        """Predict image files; with ``skip_bad`` an image that cannot be read is left out and listed
        in the result's ``skipped`` instead of raising InputError."""
        paths = [Path(p) for p in paths]
        skipped: dict[Path, str] = {}
        feats, resized = self.features(paths, cache, progress, batch_size, device, engine,
                                       skipped if skip_bad else None)
        paths = [path for path in paths if path not in skipped]
        if not paths:
            return Predictions(paths=[], proba=np.zeros(0), members={}, notes=[], skipped=skipped)
        bags = [f.features for f in feats]
        proba, members = self.probabilities(bags)
        fixed = self.fixed_size
        notes = [
            f"resized {f.image_size[1]}x{f.image_size[0]} to the training size {fixed[1]}x{fixed[0]}" if r else ""
            for f, r in zip(feats, resized)
        ]
        scores = None
        if with_window_scores and hasattr(self.head, "window_scores"):
            scores = [np.asarray(s, dtype=np.float64) for s in self.head.window_scores(bags)]
        return Predictions(
            paths=paths, proba=proba, members=members, notes=notes, window_scores=scores,
            boxes=[f.boxes for f in feats], image_sizes=[tuple(f.image_size) for f in feats], skipped=skipped,
        )

    def predict(self, paths: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]]:
        """One row per image: Image, Label (the training CSV's words), Probability, per-head columns, Note."""
        return prediction_rows(self.predict_paths(paths, **kwargs), self.classes, self.threshold, self.head_name)

    # --- persistence ----------------------------------------------------------------------
    def save(self, out_dir: str | Path, extra_files: Callable[[Path], list[str]] | None = None,
             overwrite: bool = False) -> Path:
        """Write the model folder; backbone weights that cannot be had again by name travel with it."""
        backbone = self._backbone
        carry_backbone = backbone is not None and not backbone.weights_source.startswith(("embedded:", "timm:"))
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if carry_backbone:
            config["backbone_file"] = BACKBONE_FILE

        def write(tmp: Path) -> list[str]:
            spec = save_head(self.head, tmp, "head")
            config["head"] = {**config["head"], "spec": spec}
            names = list(spec.get("files", []))
            if carry_backbone:
                with atomic_path(tmp / BACKBONE_FILE) as target:
                    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(target))
                names.append(BACKBONE_FILE)
            if extra_files:
                names += extra_files(tmp)
            return names

        return self._save(out_dir, config, write, overwrite)

    @classmethod
    def from_card(cls, card: Any) -> "MitoscopeModel":
        """:meth:`load` from a model's :class:`mitoscope.artifacts.ModelCard` (``model.json`` already read;
        its files are hashed here, once per card)."""
        model_dir = card.path
        card.verify_files()
        if card.kind != "window-features":
            raise ModelError(f"{model_dir}: model kind {card.kind!r} is not a window-feature model")
        try:
            head = load_head(Path(model_dir), card.head_files_spec())
        except ModelError:
            raise
        except Exception as exc:  # anything else from a damaged head file is still the model's fault
            raise ModelError(f"{model_dir}: cannot load the head ({type(exc).__name__}: {exc})") from None
        model = cls(card.settings(), head)
        model.card = card
        return model
