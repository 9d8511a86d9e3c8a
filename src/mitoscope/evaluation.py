"""Metrics, threshold choice, cross-validation and report files (JSON + PNG plots).

Conventions used throughout: ``y`` holds 0/1 labels (1 = the positive class, e.g. mitosis),
``proba`` the positive-class probability of each image, and an image is called positive
when ``proba >= threshold``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sklearn.metrics import classification_report, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from mitoscope.atomic import atomic_path, atomic_write_json, to_jsonable
from mitoscope.errors import InputError

__all__ = [
    "CVResult",
    "best_f1_threshold",
    "compute_metrics",
    "auc_interval",
    "cross_validate",
    "fit_warnings",
    "plot_confusion_matrix",
    "plot_roc",
    "thresholds_from_other_folds",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Threshold used when the labels give nothing to tune it on (a single class).
DEFAULT_THRESHOLD = 0.5
#: Normal quantile of the AUC confidence interval that must exclude chance (0.5): 95%, two-sided.
CHANCE_Z = 1.959964


class BagClassifier(Protocol):
    """What ``cross_validate`` needs from a head (see ``mitoscope.heads``)."""

    def fit(self, bags: Sequence[np.ndarray], y: np.ndarray) -> Any: ...

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray: ...


# --------------------------------------------------------------------------- validation


def _as_labels(y: Any) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise InputError(f"labels must be a 1-D array of 0/1; got shape {labels.shape}")
    if labels.size == 0:
        raise InputError("labels are empty: expected at least one image")
    unexpected = np.setdiff1d(np.unique(labels), [0, 1])
    if unexpected.size:
        raise InputError(
            f"labels must be 0/1 (1 = positive class); got values {unexpected[:5].tolist()}"
        )
    return labels.astype(np.int64)


def _as_scores(proba: Any, n_images: int) -> np.ndarray:
    scores = np.asarray(proba, dtype=np.float64)
    if scores.shape != (n_images,):
        raise InputError(
            f"probabilities must have shape ({n_images},), one per image; got {scores.shape}"
        )
    if not np.all(np.isfinite(scores)) or scores.min() < 0.0 or scores.max() > 1.0:
        raise InputError("probabilities must be finite numbers in [0, 1]; got values outside")
    return scores


# --------------------------------------------------------------------------- metrics


def best_f1_threshold(y: Any, proba: Any) -> float:
    """Return the threshold on ``proba`` that maximises the F1 score of the positive class.

    Candidate thresholds are midpoints between consecutive distinct scores (and half the
    lowest score, which calls every image positive), so the cut sits in the gap between
    images rather than on one of them and generalises to unseen scores. Among equally good
    cuts the one closest to 0.5 wins (the higher one if two are equally close).
    When ``y`` holds a single class no cut can be learnt and 0.5 is returned.
    """
    labels = _as_labels(y)
    scores = _as_scores(proba, labels.size)
    n_positive = int(labels.sum())
    if n_positive in (0, labels.size):
        logger.warning("only one class among %d images: using threshold %.2f",
                       labels.size, DEFAULT_THRESHOLD)
        return DEFAULT_THRESHOLD

    distinct, inverse = np.unique(scores, return_inverse=True)
    # Walk the distinct scores from the highest down: cutting just below score j calls
    # every image with a score >= distinct_desc[j] positive.
    positives_at = np.bincount(inverse, weights=labels, minlength=distinct.size)[::-1]
    images_at = np.bincount(inverse, minlength=distinct.size)[::-1]
    true_positives = np.cumsum(positives_at)
    predicted_positives = np.cumsum(images_at)
    f1 = 2.0 * true_positives / (predicted_positives + n_positive)

    distinct_desc = distinct[::-1]
    upper, lower = distinct_desc[:-1], distinct_desc[1:]
    midpoints = (upper + lower) / 2.0
    # Two adjacent floats can have a midpoint that rounds onto the lower one.
    midpoints = np.where(midpoints > lower, midpoints, upper)
    thresholds = np.append(midpoints, distinct_desc[-1] / 2.0)

    best = f1.max()
    candidates = np.flatnonzero(f1 >= best - 1e-12)
    chosen = candidates[np.argmin(np.abs(thresholds[candidates] - 0.5))]
    return float(thresholds[chosen])


def compute_metrics(
    y: Any,
    proba: Any,
    threshold: float | np.ndarray,
    classes: tuple[str, str],
) -> dict[str, Any]:
    """Classification metrics of ``proba >= threshold`` against ``y``, as a JSON-able dict.

    ``threshold`` is one number, or one per image (cross-validation classifies each image
    with its own fold's threshold). ``classes`` = (negative, positive) names the classes in
    ``report``. ``f1``, ``precision`` and ``recall`` are those of the positive class;
    ``confusion_matrix`` has rows = true class and columns = predicted class, both in the
    order (negative, positive). ``auc`` is ``None`` when ``y`` holds one class only (ROC AUC
    is undefined then); ``notes`` says so.
    """
    labels = _as_labels(y)
    scores = _as_scores(proba, labels.size)
    if len(classes) != 2:
        raise InputError(f"classes must be (negative, positive); got {tuple(classes)!r}")
    thresholds = np.asarray(threshold, dtype=np.float64)
    if thresholds.ndim not in (0, 1) or (thresholds.ndim == 1 and thresholds.size != labels.size):
        raise InputError(
            f"threshold must be one number or one per image ({labels.size}); "
            f"got shape {thresholds.shape}"
        )
    predicted = (scores >= thresholds).astype(np.int64)

    # Counted by hand rather than with sklearn's scorers: exact, and no warnings on
    # empty classes (those scores are 0 by convention, as sklearn's zero_division=0).
    tn = int(np.sum((labels == 0) & (predicted == 0)))
    fp = int(np.sum((labels == 0) & (predicted == 1)))
    fn = int(np.sum((labels == 1) & (predicted == 0)))
    tp = int(np.sum((labels == 1) & (predicted == 1)))
    n_images = labels.size
    n_positive = tp + fn
    n_negative = tn + fp

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else 0.0

    recall = ratio(tp, n_positive)
    specificity = ratio(tn, n_negative)
    # Balanced accuracy = mean recall over the classes actually present (as sklearn).
    present_recalls = [r for r, n in ((specificity, n_negative), (recall, n_positive)) if n]

    notes: list[str] = []
    if n_positive and n_negative:
        auc: float | None = float(roc_auc_score(labels, scores))
    else:
        auc = None
        present = classes[1] if n_positive else classes[0]
        notes.append(f"AUC is undefined: all {n_images} images are {present}")

    report = classification_report(
        labels, predicted, labels=[0, 1], target_names=list(classes),
        output_dict=True, zero_division=0,
    )
    return {
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc,
        "accuracy": ratio(tp + tn, n_images),
        "precision": ratio(tp, tp + fp),
        "recall": recall,
        "balanced_accuracy": float(np.mean(present_recalls)),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "report": to_jsonable(report),
        "threshold": float(thresholds) if thresholds.ndim == 0 else thresholds.tolist(),
        "n_images": n_images,
        "n_positive": n_positive,
        "classes": list(classes),
        "notes": notes,
    }


# --------------------------------------------------------------------------- cross-validation


@dataclass
class CVResult:
    """Out-of-fold results of ``cross_validate``.

    ``threshold`` is the best-F1 threshold on all out-of-fold probabilities: the one a model
    trained on every image stores. ``metrics`` scores each image with its own fold's
    threshold (``fold_thresholds[fold[i]]``), which was chosen without that fold's labels.
    """

    oof_proba: np.ndarray
    fold: np.ndarray
    fold_thresholds: np.ndarray
    threshold: float
    metrics: dict[str, Any]
    per_fold: list[dict[str, Any]] = field(default_factory=list)


def thresholds_from_other_folds(y: Any, oof_proba: Any, fold: Any) -> np.ndarray:
    """For each fold k, the best-F1 threshold on the out-of-fold probabilities of the
    images *not* in fold k. Fold k's own labels never enter its threshold."""
    labels = _as_labels(y)
    scores = _as_scores(oof_proba, labels.size)
    fold_of = np.asarray(fold, dtype=np.int64)
    if fold_of.shape != labels.shape:
        raise InputError(f"fold must have shape {labels.shape}; got {fold_of.shape}")
    n_folds = int(fold_of.max()) + 1
    return np.array(
        [best_f1_threshold(labels[fold_of != k], scores[fold_of != k]) for k in range(n_folds)]
    )


def _check_fold_count(labels: np.ndarray, n_splits: int, groups: np.ndarray | None) -> None:
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise InputError(f"the number of folds must be an integer >= 2; got {n_splits!r}")
    counts = {"positive (1)": int(labels.sum()), "negative (0)": int(labels.size - labels.sum())}
    smaller_name, smaller = min(counts.items(), key=lambda item: item[1])
    if smaller < 2:
        raise InputError(
            f"cross-validation needs at least 2 images of each class; "
            f"got {smaller} {smaller_name} image(s)"
        )
    if n_splits > smaller:
        raise InputError(
            f"{n_splits} folds need at least {n_splits} images of each class (each fold "
            f"tests both); got only {smaller} {smaller_name} images: use {smaller} folds or fewer"
        )
    if groups is not None:
        n_groups = np.unique(groups).size
        if n_splits > n_groups:
            raise InputError(
                f"{n_splits} folds need at least {n_splits} groups; got {n_groups}: "
                f"use {n_groups} folds or fewer"
            )


def cross_validate(
    make_head: Callable[[], BagClassifier],
    bags: Sequence[np.ndarray],
    y: Any,
    n_splits: int = 5,
    seed: int = 0,
    groups: Any = None,
    progress: Callable[[int, int], None] | None = None,
    classes: tuple[str, str] = ("negative", "positive"),
) -> CVResult:
    """Stratified k-fold cross-validation of a fresh ``make_head()`` per fold.

    Folds come from ``StratifiedKFold(shuffle=True, random_state=seed)``, or
    ``StratifiedGroupKFold`` when ``groups`` (one label per image, e.g. the slide it came
    from) is given, so that no group is split between training and testing.
    ``progress(done, n_splits)`` is called once before the first fold (``done`` = 0) and
    after each fold, like every progress callback of the package. ``classes`` =
    (negative, positive) only names the classes in reports.
    """
    labels = _as_labels(y)
    if len(bags) != labels.size:
        raise InputError(f"got {len(bags)} bags for {labels.size} labels: expected one per image")
    group_of = None
    if groups is not None:
        group_of = np.asarray(groups)
        if group_of.shape != labels.shape:
            raise InputError(f"groups must have shape {labels.shape}; got {group_of.shape}")
    _check_fold_count(labels, n_splits, group_of)

    if group_of is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(labels.size), labels, group_of))
    for k, (train, test) in enumerate(splits):
        if test.size == 0 or np.unique(labels[train]).size < 2:
            problem = "no test images" if test.size == 0 else "a single class to train on"
            raise InputError(
                f"fold {k}: the groups leave {problem}; "
                f"use fewer folds or groups that each mix classes"
            )

    if progress is not None:
        progress(0, n_splits)
    oof_proba = np.full(labels.size, np.nan)
    fold = np.full(labels.size, -1, dtype=np.int64)
    for k, (train, test) in enumerate(splits):
        head = make_head()
        # Bags may differ in length, so they are picked one by one, never fancy-indexed.
        head.fit([bags[i] for i in train], labels[train])
        proba = np.asarray(head.predict_proba([bags[i] for i in test]))
        if proba.shape != (test.size, 2):
            raise ValueError(
                f"{type(head).__name__}.predict_proba returned shape {proba.shape}; "
                f"expected ({test.size}, 2)"
            )
        oof_proba[test] = proba[:, 1]
        fold[test] = k
        logger.info("fold %d/%d: %d test images", k + 1, n_splits, test.size)
        if progress is not None:
            progress(k + 1, n_splits)

    # A threshold tuned on the very images it is then scored on is optimistic: the cut
    # would fit that fold's labels and the reported F1 would overstate what a stored
    # threshold achieves on new images. So fold k is scored with a threshold picked on the
    # other folds' out-of-fold predictions, just as the final model's threshold is picked on
    # images other than the ones it will meet later.
    fold_thresholds = thresholds_from_other_folds(labels, oof_proba, fold)
    threshold = best_f1_threshold(labels, oof_proba)

    metrics = compute_metrics(labels, oof_proba, fold_thresholds[fold], classes)
    metrics["threshold"] = threshold
    metrics["fold_thresholds"] = fold_thresholds.tolist()
    metrics["n_splits"] = n_splits
    metrics["notes"].append(
        "out-of-fold predictions; each image classified with its fold's threshold "
        "(chosen on the other folds); 'threshold' is the one a model trained on all images stores"
    )
    per_fold = []
    for k in range(n_splits):
        in_fold = fold == k
        fold_metrics = compute_metrics(
            labels[in_fold], oof_proba[in_fold], fold_thresholds[k], classes
        )
        fold_metrics["fold"] = k
        per_fold.append(fold_metrics)
    return CVResult(
        oof_proba=oof_proba,
        fold=fold,
        fold_thresholds=fold_thresholds,
        threshold=threshold,
        metrics=metrics,
        per_fold=per_fold,
    )


# --------------------------------------------------------------------------- warnings


def auc_interval(auc: float, n_positive: int, n_negative: int, z: float = CHANCE_Z) -> tuple[float, float]:
    """Confidence interval ``auc -/+ z * SE`` of a ROC AUC, clipped to [0, 1].

    SE is Hanley & McNeil's (1982) standard error for ``n_positive`` positive and
    ``n_negative`` negative images; the default ``z`` gives a two-sided 95% interval.
    """
    if n_positive < 1 or n_negative < 1:
        raise InputError(f"an AUC interval needs images of both classes; got {n_positive} positive, "
                         f"{n_negative} negative")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (n_positive - 1) * (q1 - auc * auc)
                + (n_negative - 1) * (q2 - auc * auc)) / (n_positive * n_negative)
    half = z * float(np.sqrt(max(variance, 0.0)))
    return max(0.0, auc - half), min(1.0, auc + half)


CONSTANT_LOGIT_SPAN = 1e-3  # held-out logits closer together than this: a constant output


def fit_warnings(
    y: Any = None,
    proba: Any = None,
    threshold: float | None = None,
    classes: tuple[str, str] = ("negative", "positive"),
    source: str = "out-of-fold",
    epochs: Sequence[tuple[str, int | None, int]] = (),
) -> list[str]:
    """What a user must know before trusting a freshly trained model, one sentence each.

    ``y`` and ``proba`` are the held-out labels and probabilities the decision ``threshold``
    was chosen on (cross-validation's out-of-fold predictions, or a validation split's);
    ``source`` names them in the messages. ``epochs`` lists ``(what, best_epoch, epochs_run)``
    of each early-stopped training. The rules:

    - **chance**: the held-out ROC AUC's 95% confidence interval (:func:`auc_interval`)
      reaches 0.5 or below: the model is not shown to tell the classes apart;
    - **degenerate threshold**: every held-out image lies on one side of the threshold, so
      the model calls all of them one class (max-F1 does so, calling all positive, when the
      probabilities do not separate the classes);
    - **constant output**: the held-out logits span less than ``CONSTANT_LOGIT_SPAN``: the
      model collapsed to one answer for every image (logits, because tiny probabilities can
      still rank images well);
    - **first epoch**: the best validation epoch of a training that ran longer was its first:
      training never improved on its starting point.
    """
    warnings: list[str] = []
    negative, positive = classes
    if y is not None and proba is not None:
        labels = _as_labels(y)
        scores = _as_scores(proba, labels.size)
        n_positive = int(labels.sum())
        n_negative = labels.size - n_positive
        clipped = np.clip(scores.astype(np.float64), 1e-12, 1 - 1e-12)
        if labels.size > 1 and float(np.ptp(np.log(clipped) - np.log1p(-clipped))) < CONSTANT_LOGIT_SPAN:
            warnings.append(
                f"the model gives every one of the {labels.size} {source} images the same probability "
                f"({float(scores.min()):.3g} to {float(scores.max()):.3g}): it collapsed to a constant output"
            )
        if n_positive and n_negative:
            auc = float(roc_auc_score(labels, scores))
            low, high = auc_interval(auc, n_positive, n_negative)
            if low <= 0.5:
                warnings.append(
                    f"{source} AUC {auc:.3g} (95% CI {low:.3g} to {high:.3g}, {n_positive} {positive} and "
                    f"{n_negative} {negative} images) does not rule out chance (0.5): the model is not shown to "
                    f"tell {positive} from {negative}"
                )
        if threshold is not None:
            above = int(np.sum(scores >= threshold))
            if above in (0, labels.size):
                called, side = (positive, "at or above") if above else (negative, "below")
                warnings.append(
                    f"threshold {threshold:.3g} is degenerate: all {labels.size} {source} probabilities lie {side} "
                    f"it, so it calls every one of those images {called}"
                )
    for what, best, run in epochs:
        if best == 1 and run > 1:
            warnings.append(
                f"{what}: the best validation epoch was the first of {run}; training never improved on it "
                f"(learning rate too high, too few images, or nothing learnable)"
            )
    return warnings


# --------------------------------------------------------------------------- plots and report


def _save_figure(figure: "Figure", path: str | os.PathLike[str]) -> Path:
    destination = Path(path)
    with atomic_path(destination) as temp:
        figure.savefig(temp, format="png")
    return destination


def plot_roc(y: Any, proba: Any, path: str | os.PathLike[str], title: str = "ROC curve") -> Path:
    """Draw the ROC curve of ``proba`` against ``y`` into the PNG file ``path``.

    With a single class in ``y`` the curve is undefined; the figure says so instead.
    """
    labels = _as_labels(y)
    scores = _as_scores(proba, labels.size)
    from matplotlib.figure import Figure  # here, not at import: predict never plots

    # A bare Figure (no pyplot): no global state, no GUI backend, safe in threads.
    figure = Figure(figsize=(4.5, 4.5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if np.unique(labels).size == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        auc = roc_auc_score(labels, scores)
        axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUC = {auc:.3f}")
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "ROC undefined:\nonly one class present",
                  ha="center", va="center", transform=axes.transAxes)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
             ylabel="true positive rate", title=title, aspect="equal")
    return _save_figure(figure, path)


def plot_confusion_matrix(
    cm: Any,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix (rows = true, columns = predicted) into the PNG file ``path``."""
    counts = np.asarray(cm)
    if counts.shape != (len(classes), len(classes)):
        raise InputError(
            f"confusion matrix must be {len(classes)}x{len(classes)} for classes "
            f"{list(classes)}; got shape {counts.shape}"
        )
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes)
    dark = counts.max() / 2 if counts.size and counts.max() else np.inf
    for row in range(counts.shape[0]):
        for col in range(counts.shape[1]):
            axes.text(col, row, str(counts[row, col]), ha="center", va="center",
                      color="white" if counts[row, col] > dark else "black")
    ticks = np.arange(len(classes))
    axes.set(xticks=ticks, yticks=ticks, xticklabels=list(classes), yticklabels=list(classes),
             xlabel="predicted", ylabel="true", title=title)
    return _save_figure(figure, path)


def write_report(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    y: Any,
    proba: Any,
    classes: tuple[str, str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``metrics.json`` (``metrics`` plus ``extra``), ``roc.png`` and
    ``confusion_matrix.png`` into ``out_dir`` (created if needed); return ``out_dir``."""
    folder = Path(out_dir)
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(metrics))
    if clashes:
        raise ValueError(f"extra report entries would overwrite metrics: {clashes}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the report folder ({error.strerror})") from error
    plot_roc(y, proba, folder / "roc.png", title=f"ROC: {classes[1]} vs {classes[0]}")
    plot_confusion_matrix(metrics["confusion_matrix"], classes, folder / "confusion_matrix.png")
    # metrics.json last: when it exists, the plots next to it are complete.
    atomic_write_json(folder / "metrics.json", {**metrics, **extra})
    return folder
