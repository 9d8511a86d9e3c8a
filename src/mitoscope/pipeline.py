"""Train, predict and evaluate: the Python API behind the CLI.

    from mitoscope.pipeline import TrainConfig, train, MitoscopeModel
    result = train("scenes/", "scenes/labels.csv", "model/", TrainConfig(head="ensemble"))
    model = MitoscopeModel.load("model/")
    rows = model.predict(["new.tif"])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import check_out_dir
from .atomic import atomic_write_text
from .backbones import create_backbone
from .cache import open_cache
from .errors import InputError
from .features import FeatureCache, FeatureExtractor, extract_dataset
from .heads import HEADS, make_head
from .heads.registry import FIXED_GRID_HEADS
from .io import LabelledImages, SourceProfile, load_labelled_images
from .options import TrainConfig
from .predictions import (Predictions, Progress, Warn, predict, prediction_rows, rows_to_csv, score_label,
                          screen_images)
# The model itself sits below the workflows (mitoscope.window_model); here for `from mitoscope.pipeline import X`.
from .window_model import BACKBONE_FILE, MitoscopeModel, features_at_size, modal_size, stage_progress  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = ["FIXED_GRID_HEADS", "MitoscopeModel", "Predictions", "Progress", "TrainConfig", "TrainResult", "evaluate",
           "load_model", "localize", "open_cache", "predict", "prediction_rows", "rows_to_csv", "score_label", "train"]


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


@dataclass
class TrainResult:
    model: "MitoscopeModel"
    cv_metrics: dict[str, Any] | None
    model_dir: Path
    # What to know before trusting the model (chance-level CV, a degenerate threshold...): see
    # mitoscope.evaluation.fit_warnings. Also in metrics.json and model.json.
    warnings: list[str] = field(default_factory=list)


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
    data.refuse_slides(f"the {config.head} head")
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
