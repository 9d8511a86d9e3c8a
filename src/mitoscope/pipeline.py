"""Train, predict and evaluate: the Python API behind the CLI.

    from mitoscope.pipeline import TrainConfig, train, MitoscopeModel
    result = train("scenes/", "scenes/labels.csv", "model/", TrainConfig(head="ensemble"))
    model = MitoscopeModel.load("model/")
    rows = model.predict(["new.tif"])
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .artifacts import ModelDescription, check_out_dir, write_model_dir
from safetensors.torch import save_file

from .atomic import atomic_path, atomic_write_text
from .backbones import Backbone, create_backbone, described_backbone
from .engines import EXPORTED_ENGINES, NeedsPyTorch, onnx_path, resolve_engine, served_engine
from .errors import InputError, ModelError
from .cache import open_cache
from .features import FeatureCache, FeatureExtractor, ImageFeatures, extract_dataset, pick_device
from .heads import HEADS, load_head, make_head, save_head
from .heads.registry import FIXED_GRID_HEADS
from .predictions import (Predictions, Progress, Warn, predict, prediction_rows, rows_to_csv, score_label,
                          screen_images)
from .io import LabelledImages, ReadOptions, SourceProfile, load_labelled_images
from .options import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["FIXED_GRID_HEADS", "MitoscopeModel", "Predictions", "Progress", "TrainConfig", "TrainResult", "evaluate",
           "load_model", "localize", "open_cache", "predict", "prediction_rows", "rows_to_csv", "score_label", "train"]


BACKBONE_FILE = "backbone.safetensors"



def build_head(name: str, params: dict[str, Any]) -> Any:
    """A head from CLI-style parameters; an ensemble's members take theirs too.

    ``member__param`` (scikit-learn style, e.g. ``forest__n_estimators``) goes to that
    member; a plain parameter the head itself lacks goes to each member that has it (so
    ``max_epochs`` reaches an ensemble's dense member, ``n_estimators`` its forest).
    """
    if name not in HEADS:
        raise InputError(f"unknown head {name!r}: expected one of {', '.join(sorted(HEADS))}")
    own = set(HEADS[name]().get_params(deep=False))
    members = {key: HEADS[key] for key in own if key in HEADS}  # e.g. ensemble: dense, forest
    direct: dict[str, Any] = {}
    routed: dict[str, dict[str, Any]] = {member: {} for member in members}
    for key, value in params.items():
        member, sep, param = key.partition("__")
        if sep and member in members:
            routed[member][param] = value
        elif key in members and isinstance(value, dict):  # e.g. dense='{"max_epochs": 5}'
            routed[key].update(value)
        elif key in own or not members:
            direct[key] = value
        else:
            takers = [m for m, cls in members.items() if key in cls().get_params(deep=False)]
            if not takers:
                raise InputError(
                    f"bad parameter {key!r} for head {name!r}: expected one of {', '.join(sorted(own))} "
                    f"or MEMBER__PARAM with MEMBER in {', '.join(sorted(members))}"
                )
            for taker in takers:
                routed[taker][key] = value
    for member, member_params in routed.items():
        if member not in direct:  # always explicit members, so that seeded() reaches them
            direct[member] = make_head(member, **member_params)
        elif member_params:
            raise InputError(f"head {name!r}: give {member!r} or {member}__PARAM parameters, not both")
    return make_head(name, **direct)


def seeded(head: Any, seed: int) -> Any:
    """Set every ``random_state`` of a head (nested members too) to ``seed``."""
    params = {key: seed for key in head.get_params(deep=True) if key.split("__")[-1] == "random_state"}
    return head.set_params(**params) if params else head


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


@dataclass
class TrainResult:
    model: "MitoscopeModel"
    cv_metrics: dict[str, Any] | None
    model_dir: Path
    # What to know before trusting the model (chance-level CV, a degenerate threshold...): see
    # mitoscope.evaluation.fit_warnings. Also in metrics.json and model.json.
    warnings: list[str] = field(default_factory=list)


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

        model_dir = write_model_dir(out_dir, config, write, overwrite=overwrite)
        self.config = {**config, "_model_dir": str(Path(model_dir).resolve())}
        self.card = None  # describe() now tells the saved model.json
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> "MitoscopeModel":
        from .models import read_model_card

        return cls.from_card(read_model_card(model_dir))

    @classmethod
    def from_card(cls, card: Any) -> "MitoscopeModel":
        """:meth:`load` from a model's :class:`mitoscope.models.ModelCard` (``model.json`` already read;
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


def train(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Extract features, cross-validate, fit the head on all images and save the model."""
    config = config.validate()
    build_head(config.head, config.head_params)  # bad head parameters fail before any feature is extracted
    check_out_dir(out_dir, overwrite)  # refuse now, not after the features and the fitting
    data = load_labelled_images(data_dir, labels_csv, config.positive)
    if config.cv and min(np.bincount(data.y, minlength=2)) < config.cv:
        raise InputError(
            f"{labels_csv or data_dir}: {config.cv}-fold cross-validation needs at least {config.cv} images of each "
            f"class, got {np.bincount(data.y, minlength=2).tolist()} ({', '.join(data.classes)}); lower --cv"
        )
    sources = SourceProfile.from_paths(data.paths, config.read_options)  # headers only: an unreadable one fails now
    # Random-init weights come from the seed, not from whatever the process drew before:
    # the same arguments give the same model (and the feature cache can be reused).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = create_backbone(config.backbone, weights=config.weights, pretrained=config.pretrained)
    extractor = FeatureExtractor(backbone, config.window, config.overlap, config.batch_size, config.device,
                                 mode=config.extraction, engine=config.engine)
    read_options = config.read_options
    feats = extract_dataset(data.paths, extractor, read_options, cache, progress=stage_progress(progress, "features"))
    train_size = None
    if config.head in FIXED_GRID_HEADS:
        train_size = modal_size(feats)
        feats, _ = features_at_size(data.paths, feats, train_size, extractor, read_options, cache, progress)
    bags = [f.features for f in feats]

    def new_head() -> Any:
        return seeded(build_head(config.head, config.head_params), config.seed)

    cv_result = None
    if config.cv:
        from .evaluation import cross_validate, write_report  # here: predict never needs them

        cv_result = cross_validate(new_head, bags, data.y, n_splits=config.cv, seed=config.seed, classes=data.classes,
                                   groups=data.groups, progress=stage_progress(progress, "cross-validation"))
    if progress:
        progress("final fit", 0, 1)
    head = new_head().fit(bags, data.y)
    if progress:
        progress("final fit", 1, 1)
    threshold = float(cv_result.threshold) if cv_result is not None else 0.5
    from .evaluation import fit_warnings

    held_out = (data.y, cv_result.oof_proba, threshold) if cv_result is not None else (None, None, None)
    warnings = fit_warnings(*held_out, data.classes, f"{config.cv}-fold cross-validation (out-of-fold)",
                            epochs=head_epochs(head))
    for warning in warnings:
        logger.info("warning: %s", warning)
    model_config = {
        "kind": "window-features",
        "backbone": backbone.describe(),
        "tiling": {"window": config.window, "overlap": config.overlap, "extraction": config.extraction},
        "read": read_options.to_dict(),
        "source_images": sources.to_dict(),
        "classes": list(data.classes),
        "positive": data.classes[1],
        "threshold": threshold,
        "threshold_rule": "max F1 on cross-validated out-of-fold predictions" if cv_result else "0.5 (no CV)",
        "train_image_size": list(train_size) if train_size else None,
        # The instances a head sees: one feature vector per sliding window (size: "tiling").
        "head": {"name": config.head, "params": config.head_params, "instances": "windows"},
        "training": {
            "n_images": len(data.paths),
            "n_per_class": dict(zip(data.classes, np.bincount(data.y, minlength=2).tolist())),
            "cv_folds": config.cv,
            "seed": config.seed,
            "labels": str(labels_csv) if labels_csv else None,
            "warnings": warnings,
        },
    }
    model = MitoscopeModel(model_config, head, backbone)

    def extra(tmp: Path) -> list[str]:
        names = []
        history_owner = getattr(head, "dense_", None) or head
        if hasattr(history_owner, "plot_history") and getattr(history_owner, "history_", None):
            history_owner.plot_history(tmp / "training_curves.png")
            names.append("training_curves.png")
        if cv_result is not None:
            write_report(tmp, cv_result.metrics, data.y, cv_result.oof_proba, data.classes,
                         extra={"evaluation": f"{config.cv}-fold cross-validation, out-of-fold predictions",
                                "per_fold": cv_result.per_fold, "warnings": warnings})
            names += ["metrics.json", "roc.png", "confusion_matrix.png"]
        return names

    model_dir = model.save(out_dir, extra, overwrite=overwrite)
    return TrainResult(model=model, cv_metrics=cv_result.metrics if cv_result else None, model_dir=Path(model_dir),
                       warnings=warnings)


def head_epochs(head: Any) -> list[tuple[str, int | None, int]]:
    """``(what, best_epoch, epochs_run)`` of a fitted head's early-stopped network (an ensemble's
    dense member); empty for heads without one, or trained without a validation split."""
    owner = getattr(head, "dense_", None) or head
    history = getattr(owner, "history_", None) or {}
    if history.get("best_epoch") is None:
        return []
    return [(f"{type(owner).__name__} (final fit)", int(history["best_epoch"]), int(history["epochs_run"]))]


def load_model(model_dir: str | Path, max_pixels: int | None = None) -> Any:
    """Load any saved mitoscope model (window-feature heads or a fine-tuned network) for PyTorch:
    :func:`mitoscope.models.load_model` without serving.

    ``max_pixels`` replaces the pixel limit the model was trained with, for these reads only.
    """
    from .models import load_model as load

    return load(model_dir, engine="torch", max_pixels=max_pixels, serve=False)


def localize(
    model_dir: str | Path,
    data_dir: str | Path,
    boxes_csv: str | Path,
    out_dir: str | Path,
    labels_csv: str | Path | None = None,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
    engine: str = "auto",
) -> dict[str, Any]:
    """Score how well a model's window scores point at known mitoses (``boxes.csv``):
    pointing game over Mitosis images and window-level ROC AUC -> ``localization.json``.
    ``engine`` runs the backbone (see :mod:`mitoscope.engines`)."""
    from .localization import localization_report, write_localization

    model = load_model(model_dir)
    if labels_csv is None and (Path(data_dir) / "labels.csv").is_file():
        labels_csv = Path(data_dir) / "labels.csv"
    data = load_labelled_images(data_dir, labels_csv, model.positive)
    y = labels_as_model_classes(data, model, str(labels_csv or data_dir))
    pred = model.predict_paths(data.paths, cache=cache, progress=progress, with_window_scores=True, engine=engine)
    report = localization_report(pred, boxes_csv, labels=y)
    report["model"] = str(model_dir)
    write_localization(out_dir, report)
    return report


def labels_as_model_classes(data: LabelledImages, model: Any, source: str) -> np.ndarray:
    """0/1 targets of an evaluation set, in the model's own class words."""
    unknown = sorted(set(data.labels) - set(model.classes))
    if unknown:
        raise InputError(f"{source}: labels {unknown} are not the model's classes {list(model.classes)}")
    return np.array([int(label == model.positive) for label in data.labels])


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
    max_pixels: int | None = None,
    engine: str = "auto",
    channels: tuple[int, int, int] | None = None,
    warn: Warn | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model on labelled images into ``out_dir`` (metrics.json, plots,
    predictions.csv). Every image is checked against the kinds of image the model was trained
    on first, as by ``predict`` (warnings go to ``warn``, by default the log, and into the
    report); ``channels`` replaces the source channels read as R, G, B."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"{out_dir}: report output exists and is a file, expected a folder")
    model = load_model(model_dir, max_pixels)
    model.choose_channels(channels)
    data = load_labelled_images(data_dir, labels_csv, model.positive)
    y = labels_as_model_classes(data, model, str(labels_csv or data_dir))
    _, warnings, _ = screen_images(model, data.paths)
    pred = model.predict_paths(data.paths, cache=cache, progress=progress, engine=engine)
    proba, members = pred.proba, pred.members
    from .evaluation import compute_metrics, write_report

    metrics = compute_metrics(y, proba, model.threshold, model.classes)
    extra = {
        "evaluation": f"saved model {Path(model_dir)} on {labels_csv or data_dir}",
        "n_resized": int(sum(bool(n) for n in pred.notes)),
        "members": {name: compute_metrics(y, p, 0.5, model.classes) for name, p in members.items()},
        "warnings": [f"{path}: {warning}" for path, warning in warnings.items()],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir, metrics, y, proba, model.classes, extra=extra)
    rows = prediction_rows(pred, model.classes, model.threshold, model.head_name, warnings)
    for row, truth in zip(rows, data.labels):
        row["True"] = truth
    atomic_write_text(out_dir / "predictions.csv", rows_to_csv(rows))
    for path, warning in warnings.items():
        (warn or logger.warning)(f"{path}: {warning}")
    return metrics
