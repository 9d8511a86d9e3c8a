"""The whole procedure: checks, optional pre-training on tiles, optional cross-validation, the
final fit, and the model folder (:func:`finetune`).

Every check that can fail runs before any training. With ``pretrain_data`` both phases first
run on the pre-training tiles (:mod:`.data`), then the main stage (both phases again) trains
on ``DATA_DIR`` starting from the adapted network, head included; with ``cv`` the
pre-training runs once, before the folds (it never sees ``DATA_DIR``). The decision
threshold is the max-F1 one on the validation predictions, or on the out-of-fold
predictions with ``cv``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..artifacts import check_out_dir
from ..atomic import atomic_write_json, atomic_write_text, to_jsonable
from ..errors import InputError
from ..evaluation import best_f1_threshold, compute_metrics, cross_validate, fit_warnings, write_report
from ..io import SourceProfile, load_labelled_images
from ..progress import Progress
from ..lightning_setup import quiet_lightning, resolve_precision
from .config import FineTuneConfig
from .data import ImageStore, _load_pretrain_set, validation_split
from .history import _phase_summary, history_csv, plot_history
from .model import HEAD_NAME, NETWORK_FILE, FineTunedModel
from .network import build_network, check_input_size
from .training import FineTuner, PhaseResult, _is_global_zero, make_trainer
from .trunk import build_trunk_cache, check_trunk_budget, plan_trunk_views, resolve_trunk_split, trunk_map_shape

logger = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    model: FineTunedModel | None  # None on DDP ranks other than 0
    cv_metrics: dict[str, Any] | None
    model_dir: Path | None
    history: list[dict[str, Any]]
    validation_metrics: dict[str, Any] | None
    # What to know before trusting the model: see mitoscope.evaluation.fit_warnings.
    warnings: list[str] = field(default_factory=list)


def _work_dir(out_dir: Path) -> Path:
    # Next to the output (same filesystem, shared by every DDP rank), never in the cwd.
    return out_dir.parent / f".{out_dir.name}.finetune-work"


RUN_FILE = "run.json"


def _run_fingerprint(config: FineTuneConfig, data: Any, labels_csv: str | Path | None) -> dict[str, Any]:
    """What makes two runs the same run: every setting that shapes training, and the training
    files as they are now (path, size, modification time). A resumed run must match it."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("progress_bar",)}
    files = []
    for path in [*data.paths, *([Path(labels_csv)] if labels_csv else [])]:
        stat = Path(path).stat()
        files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return to_jsonable({"settings": settings, "labels": list(data.labels), "files": files})


def _prepare_work_dir(work: Path, fingerprint: dict[str, Any], fresh: bool) -> bool:
    """The work folder of checkpoints: kept when it holds an interrupted run of the same command
    (return True: resume), else emptied. ``fresh`` always empties it."""
    run_file = work / RUN_FILE
    if not fresh and run_file.is_file():
        try:
            same = json.loads(run_file.read_text()) == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return True
        logger.warning("%s: an interrupted run of other settings or data; starting over", work)
    # Checkpoints of another run must not mix with ours. Every DDP rank runs this before its first
    # fit, and no rank writes a checkpoint before all of them have joined that fit.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if _is_global_zero():
        atomic_write_json(run_file, fingerprint)
    return False


def finetune(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    config: FineTuneConfig = FineTuneConfig(),
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    fresh: bool = False,
) -> FineTuneResult:
    """Fine-tune (optionally pre-train on tiles, optionally cross-validate) and save the model.

    Every check that can fail (options, labels, weights, image size, output folder) runs
    before any training. The model folder is written atomically at the end by DDP rank 0.

    **Resuming.** Checkpoints go to a work folder beside ``out_dir``: every phase's state after
    each epoch, and each finished phase's best network. A run that was killed or crashed is
    resumed by the same call (same settings, same files): finished phases are reloaded, an
    unfinished one goes on from its last epoch, with its optimizer, schedule, early stopping,
    history and random state, so the result equals an uninterrupted run's (the data order and
    dropout included; on a GPU, as far as its kernels are deterministic). ``fresh`` starts over.
    The work folder is removed once the model is saved.
    """
    config = config.validate()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)  # the model folder's one guard: refused now, not after training
    data = load_labelled_images(data_dir, labels_csv, config.positive)
    data.refuse_slides("finetune")
    source = str(labels_csv or data_dir)
    groups = None if data.groups is None else np.asarray(data.groups)
    counts = np.bincount(data.y, minlength=2)
    if config.cv and counts.min() < config.cv:
        raise InputError(
            f"{source}: {config.cv}-fold cross-validation needs at least {config.cv} images of each class, got "
            f"{counts.tolist()} ({', '.join(data.classes)}); lower --cv"
        )
    if config.cv and groups is not None and np.unique(groups).size < config.cv:
        raise InputError(f"{source}: {config.cv}-fold grouped cross-validation needs at least {config.cv} groups, "
                         f"got {np.unique(groups).size}; lower --cv")
    validation_split(data.y, groups, config.val_fraction, config.seed, source)  # fails now rather than after hours
    sources = SourceProfile.from_paths(data.paths, config.read_options)  # headers only: an unreadable one fails now
    with quiet_lightning(True):
        make_trainer(config, 1, [], Path(os.devnull))  # devices, precision: checked now, not after the images are read
    with torch.random.fork_rng(devices=[]):
        # The new head's (and a --no-pretrained base's) first weights come from the seed: two runs
        # of one command are the same run, and a resumed run rebuilds the network it started from.
        torch.manual_seed(config.seed)
        network, backbone = build_network(config)
    map_shape = check_input_size(network, config.backbone, config.size)
    mean, std = list(backbone.data_config["mean"]), list(backbone.data_config["std"])
    split = resolve_trunk_split(network, config)
    if split is not None:  # the cache of the training images must fit: say so now, not after reading them
        n_views = len(plan_trunk_views(config.augment, config.trunk_views, config.tta)[0])
        check_trunk_budget(n_views, len(data.paths), trunk_map_shape(network, split, config.size),
                           config.trunk_cache_gb, source)

    store = ImageStore(config.size, config.read_options, cache_dir)
    work = _work_dir(out_dir)
    if _prepare_work_dir(work, _run_fingerprint(config, data, labels_csv), fresh):
        logger.warning("resuming the interrupted run in %s (--fresh starts over)", work)
    is_zero = True
    saved = False
    try:
        pretrain_summary = None
        stage_phases: list[tuple[str, PhaseResult]] = []
        history: list[dict[str, Any]] = []
        if config.pretrain_data is not None:
            pre_images, pre_y, pre_groups, pretrain_summary = _load_pretrain_set(config, store, data, progress)
            pre_cache = None if split is None else build_trunk_cache(
                network, split, pre_images, config, mean, std, progress, "caching pre-training trunk maps",
                str(config.pretrain_labels or config.pretrain_data))
            tuner = FineTuner(network, config, pre_images, pre_y, pre_groups, mean, std, work / "pretrain",
                              stage="pretrain", callbacks=callbacks, trunk_cache=pre_cache)
            tuner.fit(np.arange(len(pre_y)), pre_y)
            network = tuner.network_
            history += tuner.history_
            stage_phases += [(f"pretrain/{r.name}", r) for r in tuner.phases_]
            pretrain_summary["phases"] = [_phase_summary(r) for r in tuner.phases_]
            pretrain_summary["trunk_cache"] = None if pre_cache is None else pre_cache.describe()
            del pre_images, pre_cache, tuner

        images, _, _ = store.load(data.paths, None, 0.0, progress, "reading images")
        # One cache for the folds and the final fit: the trunk is frozen, the same in all of them.
        trunk_cache = None if split is None else build_trunk_cache(network, split, images, config, mean, std,
                                                                   progress, "caching trunk maps", source)
        cv_result = None
        fold_histories: list[list[dict[str, Any]]] = []
        if config.cv:
            tuners: list[FineTuner] = []

            def new_tuner() -> FineTuner:
                fold = len(tuners) + 1
                tuners.append(FineTuner(network, config, images, data.y, groups, mean, std, work / f"fold{fold}",
                                        stage=f"fold {fold}", callbacks=callbacks, trunk_cache=trunk_cache))
                return tuners[-1]

            cv_result = cross_validate(
                new_tuner, list(range(len(data.y))), data.y, n_splits=config.cv, seed=config.seed, groups=groups,
                classes=data.classes,
                progress=(lambda done, total: progress("cross-validation folds", done, total)) if progress else None,
            )
            fold_histories = [tuner.history_ for tuner in tuners]
        final = FineTuner(network, config, images, data.y, groups, mean, std, work / "final", stage="main",
                          callbacks=callbacks, trunk_cache=trunk_cache).fit(np.arange(len(data.y)), data.y)
        history += final.history_
        stage_phases += [(r.name if config.pretrain_data is None else f"main/{r.name}", r) for r in final.phases_]
        val_y = data.y[final.val_indices_]
        if cv_result is not None:
            threshold = float(cv_result.threshold)
            rule = f"max F1 on {config.cv}-fold cross-validated out-of-fold predictions"
        else:
            threshold = best_f1_threshold(val_y, final.val_proba_)
            rule = "max F1 on the validation split's predictions"
        validation_metrics = compute_metrics(val_y, final.val_proba_, threshold, data.classes)
        held_out = ((data.y, cv_result.oof_proba, f"{config.cv}-fold cross-validation (out-of-fold)") if cv_result
                    else (val_y, final.val_proba_, "validation split"))
        training_warnings = fit_warnings(
            *held_out[:2], threshold, data.classes, held_out[2],
            epochs=[(f"fine-tuning phase {label}", r.best_epoch, r.epochs_run) for label, r in stage_phases])
        training_warnings += [f"fine-tuning phase {label}: {row['guard']}" for label, r in stage_phases
                              for row in r.history if row.get("guard")]
        for warning in training_warnings:
            logger.info("warning: %s", warning)
        validation_metrics["notes"].append(
            "validation split of the final fit: it also chose the best checkpoints (and the threshold without --cv), "
            "so these numbers are optimistic"
        )
        is_zero = _is_global_zero()
        model_config = {
            "kind": "finetuned",
            "backbone": {**backbone.describe(), "note": "weights_* describe the pretrained weights fine-tuning "
                         f"started from; the fine-tuned weights are {NETWORK_FILE}"},
            "network": {
                "file": NETWORK_FILE, "pool": config.pool, "dropout": config.dropout,
                "attention_hidden": config.attention_hidden, "attention_dim": config.attention_dim,
                "feature_map": list(map_shape),
            },
            "image_size": config.size,
            "read": config.read_options.to_dict(),
            "source_images": sources.to_dict(),
            "classes": list(data.classes),
            "positive": data.classes[1],
            "threshold": threshold,
            "threshold_rule": rule,
            "tta": config.tta,
            "augment": config.augment.to_dict(),
            # The instances: positions of the final feature map (32 px cells of the resized image).
            "head": {"name": HEAD_NAME, "pool": config.pool, "instances": "feature_map_positions"},
            "training": {
                "data": str(data_dir), "labels": str(labels_csv) if labels_csv else None,
                "n_images": len(data.paths),
                "n_per_class": dict(zip(data.classes, counts.tolist())),
                "grouped": groups is not None,
                "n_train": int(len(final.train_indices_)), "n_validation": int(len(final.val_indices_)),
                "cv_folds": config.cv,
                "phases": [_phase_summary(r) for r in final.phases_],
                "pretrain": pretrain_summary,
                "trunk_cache": None if trunk_cache is None else trunk_cache.describe(),
                "settings": {k: v for k, v in config.to_dict().items() if k not in ("progress_bar",)},
                "precision": resolve_precision(config),
                "warnings": training_warnings,
            },
        }
        model = FineTunedModel(model_config, final.network_)
        if not is_zero:
            return FineTuneResult(None, cv_result.metrics if cv_result else None, None, history, validation_metrics,
                                  training_warnings)

        def extra(tmp: Path) -> list[str]:
            atomic_write_text(tmp / "history.csv", history_csv(history))
            atomic_write_json(tmp / "history.json", {
                "rows": history, "phases": [{"label": label, **_phase_summary(r)} for label, r in stage_phases],
                "cv_folds": fold_histories, "validation": validation_metrics,
            })
            plot_history(history, stage_phases, tmp / "training_curves.png")
            names = ["history.csv", "history.json", "training_curves.png"]
            if cv_result is not None:
                write_report(tmp, cv_result.metrics, data.y, cv_result.oof_proba, data.classes, extra={
                    "evaluation": f"{config.cv}-fold {'grouped ' if groups is not None else ''}cross-validation of the "
                                  f"whole two-phase fine-tuning, out-of-fold predictions",
                    "per_fold": cv_result.per_fold, "warnings": training_warnings,
                })
                names += ["metrics.json", "roc.png", "confusion_matrix.png"]
            return names

        model_dir = model.save(out_dir, extra, overwrite=overwrite)
        saved = True
        return FineTuneResult(model, cv_result.metrics if cv_result else None, model_dir, history, validation_metrics,
                              training_warnings)
    finally:
        # Kept after a failure (an out-of-memory error, Ctrl+C): the same command resumes from it.
        if is_zero and saved:
            shutil.rmtree(work, ignore_errors=True)

