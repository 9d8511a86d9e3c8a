"""Tests for mitoscope.evaluation: metrics, threshold choice, cross-validation, report files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from mitoscope.errors import InputError
from mitoscope.evaluation import (
    auc_interval,
    best_f1_threshold,
    compute_metrics,
    cross_validate,
    fit_warnings,
    plot_confusion_matrix,
    plot_roc,
    thresholds_from_other_folds,
    write_report,
)

CLASSES = ("Normal", "Mitosis")


# --------------------------------------------------------------------------- helpers


class MeanLogisticHead:
    """A minimal bag classifier: logistic regression on each bag's mean window feature."""

    def fit(self, bags, y):
        self.model_ = LogisticRegression().fit(np.stack([b.mean(axis=0) for b in bags]), y)
        return self

    def predict_proba(self, bags):
        return self.model_.predict_proba(np.stack([b.mean(axis=0) for b in bags]))


def make_bags(n_images: int, seed: int, shift: float = 2.0):
    """Bags of 3..8 windows x 4 features; positives have their first feature shifted."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n_images // 2))
    rng.shuffle(y)
    bags = []
    for label in y:
        bag = rng.normal(size=(int(rng.integers(3, 9)), 4)).astype(np.float32)
        bag[:, 0] += shift * label
        bags.append(bag)
    return bags, y


def strict_json(path: Path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


# --------------------------------------------------------------------------- compute_metrics


def test_metrics_match_hand_computed_example():
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    proba = [0.1, 0.45, 0.3, 0.7, 0.8, 0.4, 0.9, 0.65, 0.2, 0.95]
    # At 0.5: negatives -> 0,0,0,1 (tn=3, fp=1); positives -> 1,0,1,1,0,1 (tp=4, fn=2).
    m = compute_metrics(y, proba, 0.5, CLASSES)
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # 18 of the 24 (positive, negative) pairs are ranked correctly.
    assert m["auc"] == pytest.approx(18 / 24)
    assert m["threshold"] == 0.5
    assert m["n_images"] == 10 and m["n_positive"] == 6
    assert m["report"]["Normal"]["precision"] == pytest.approx(3 / 5)
    assert m["report"]["Normal"]["recall"] == pytest.approx(3 / 4)
    assert m["report"]["Mitosis"]["support"] == 6
    assert m["notes"] == []
    json.dumps(m, allow_nan=False)  # plain Python types only


def test_score_equal_to_threshold_is_positive():
    m = compute_metrics([0, 1], [0.3, 0.5], 0.5, CLASSES)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_per_image_thresholds():
    m = compute_metrics([0, 1, 1], [0.4, 0.4, 0.7], np.array([0.5, 0.3, 0.8]), CLASSES)
    assert m["confusion_matrix"] == [[1, 0], [1, 1]]


def test_auc_is_none_with_a_single_class():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning leaks out either
        m = compute_metrics([1, 1, 1], [0.2, 0.6, 0.9], 0.5, CLASSES)
    assert m["auc"] is None
    assert any("AUC" in note and "Mitosis" in note for note in m["notes"])
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]


@pytest.mark.parametrize(
    ("y", "proba"),
    [
        ([0, 2], [0.1, 0.2]),
        ([0, 1], [0.1]),
        ([0, 1], [0.1, np.nan]),
        ([0, 1], [0.1, 1.5]),
        ([], []),
    ],
)
def test_metrics_reject_bad_input(y, proba):
    with pytest.raises(InputError):
        compute_metrics(y, proba, 0.5, CLASSES)


# --------------------------------------------------------------------------- best_f1_threshold


def test_threshold_picks_the_f1_maximising_cut():
    # Cuts (midpoints) and F1: 0.7->0.5, 0.5->0.8, 0.35->0.67, 0.25->0.857, 0.15->0.75, 0.05->0.67
    y = [0, 0, 1, 0, 1, 1]
    proba = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
    assert best_f1_threshold(y, proba) == pytest.approx(0.25)


def test_threshold_ties_go_to_the_cut_closest_to_half():
    # Calling everything positive and calling only the top image positive both give F1 2/3.
    assert best_f1_threshold([1, 0, 0, 1], [0.1, 0.2, 0.3, 0.9]) == pytest.approx(0.6)
    assert best_f1_threshold([1, 0, 0, 1], [0.6, 0.62, 0.64, 0.99]) == pytest.approx(0.3)


def test_threshold_is_optimal_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(8):
        y = rng.integers(0, 2, size=30)
        y[:2] = [0, 1]
        proba = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # with ties
        threshold = best_f1_threshold(y, proba)
        cuts = np.concatenate([np.unique(proba), [1.01]])
        best = max(f1_score(y, proba >= cut, zero_division=0) for cut in cuts)
        assert f1_score(y, proba >= threshold, zero_division=0) == pytest.approx(best)
        assert threshold not in set(proba.tolist())  # sits between scores, not on one


def test_threshold_degenerate_inputs():
    assert best_f1_threshold([0, 0, 0], [0.1, 0.7, 0.9]) == 0.5
    assert best_f1_threshold([1, 1], [0.1, 0.2]) == 0.5
    # One distinct score: the only useful cut calls everything positive.
    threshold = best_f1_threshold([0, 1, 1], [0.4, 0.4, 0.4])
    assert threshold < 0.4
    assert best_f1_threshold([0, 1], [0.0, 0.0]) == 0.0
    with pytest.raises(InputError):
        best_f1_threshold([], [])


# --------------------------------------------------------------------------- cross_validate


def test_cv_learns_a_learnable_problem():
    bags, y = make_bags(80, seed=0)
    result = cross_validate(MeanLogisticHead, bags, y, n_splits=5, seed=0, classes=CLASSES)
    assert result.metrics["auc"] > 0.97
    assert result.metrics["f1"] > 0.9
    assert result.oof_proba.shape == (80,) and np.all(np.isfinite(result.oof_proba))
    assert sorted(np.bincount(result.fold).tolist()) == [16] * 5
    assert result.threshold == pytest.approx(best_f1_threshold(y, result.oof_proba))
    assert result.metrics["threshold"] == result.threshold
    assert len(result.per_fold) == 5
    assert sum(f["n_images"] for f in result.per_fold) == 80


def test_cv_with_shuffled_labels_is_at_chance():
    bags, y = make_bags(200, seed=0)
    shuffled = np.random.default_rng(0).permutation(y)
    result = cross_validate(MeanLogisticHead, bags, shuffled, n_splits=5, seed=0)
    assert 0.35 < result.metrics["auc"] < 0.65


def test_cv_scores_each_image_with_its_fold_threshold():
    bags, y = make_bags(60, seed=2, shift=0.7)  # overlapping classes: thresholds matter
    result = cross_validate(MeanLogisticHead, bags, y, n_splits=4, seed=5)
    np.testing.assert_allclose(
        result.fold_thresholds, thresholds_from_other_folds(y, result.oof_proba, result.fold)
    )
    predicted = result.oof_proba >= result.fold_thresholds[result.fold]
    expected_cm = [[int(np.sum((y == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]
    assert result.metrics["confusion_matrix"] == expected_cm
    for k, fold_metrics in enumerate(result.per_fold):
        assert fold_metrics["threshold"] == pytest.approx(result.fold_thresholds[k])


def test_fold_threshold_ignores_its_own_labels():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=100)
    oof = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    fold = np.arange(100) % 5
    before = thresholds_from_other_folds(y, oof, fold)
    flipped = y.copy()
    flipped[fold == 2] = 1 - flipped[fold == 2]
    after = thresholds_from_other_folds(flipped, oof, fold)
    assert after[2] == before[2]
    # The flipped labels do reach the other folds' thresholds, so the check above has teeth.
    assert np.any(np.delete(after, 2) != np.delete(before, 2))


class SpyHead:
    """Records which images (id stored in the last feature) it trains and predicts on."""

    def __init__(self, log):
        self.log = log

    def fit(self, bags, y):
        self.log.append(("fit", [int(b[0, -1]) for b in bags]))
        return self

    def predict_proba(self, bags):
        self.log.append(("predict", [int(b[0, -1]) for b in bags]))
        p = np.array([1 / (1 + np.exp(-b[:, 0].mean())) for b in bags])
        return np.column_stack([1 - p, p])


def test_grouped_cv_never_splits_a_group():
    bags, y = make_bags(60, seed=6)
    for index, bag in enumerate(bags):
        bag[:, -1] = index
    groups = np.repeat(np.arange(15), 4)  # 15 slides of 4 images
    log = []
    result = cross_validate(lambda: SpyHead(log), bags, y, n_splits=3, seed=0, groups=groups)
    for group in range(15):
        assert np.unique(result.fold[groups == group]).size == 1
    fits, predicts = log[0::2], log[1::2]
    assert len(fits) == len(predicts) == 3
    for (_, train_ids), (_, test_ids) in zip(fits, predicts):
        assert not set(groups[train_ids]) & set(groups[test_ids])
    assert sorted(i for _, ids in predicts for i in ids) == list(range(60))


def test_cv_passes_variable_length_bags_and_reports_progress():
    bags, y = make_bags(20, seed=7)
    for index, bag in enumerate(bags):
        bag[:, -1] = index
    log, calls = [], []
    cross_validate(lambda: SpyHead(log), bags, y, n_splits=4, progress=lambda *a: calls.append(a))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    for (_, train_ids), (_, test_ids) in zip(log[0::2], log[1::2]):
        assert not set(train_ids) & set(test_ids)
        assert len(train_ids) + len(test_ids) == 20


def test_cv_rejects_more_folds_than_the_smaller_class():
    bags, y = make_bags(20, seed=8)
    y = np.array([1, 1, 1] + [0] * 17)
    with pytest.raises(InputError, match=r"only 3 positive"):
        cross_validate(MeanLogisticHead, bags, y, n_splits=5)
    with pytest.raises(InputError, match="folds"):
        cross_validate(MeanLogisticHead, bags, y, n_splits=1)
    with pytest.raises(InputError, match="groups"):
        cross_validate(MeanLogisticHead, bags, np.array([0, 1] * 10), n_splits=3,
                       groups=[0, 1] * 10)
    with pytest.raises(InputError, match="bags"):
        cross_validate(MeanLogisticHead, bags[:10], np.array([0, 1] * 10), n_splits=3)


# --------------------------------------------------------------------------- plots and report


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 100 and image.height > 100


def test_write_report_writes_valid_json_and_pngs(tmp_path):
    y = np.array([0, 0, 1, 1, 1])
    proba = np.array([0.2, 0.6, 0.4, 0.7, 0.9])
    metrics = compute_metrics(y, proba, 0.5, CLASSES)
    extra = {"model": Path("some/model"), "loss": np.float32(0.25), "nan": float("nan"),
             "ids": np.arange(3)}
    out = write_report(tmp_path / "report", metrics, y, proba, CLASSES, extra=extra)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["confusion_matrix.png", "metrics.json", "roc.png"]
    written = strict_json(out / "metrics.json")
    assert written["confusion_matrix"] == [[1, 1], [1, 2]]
    assert written["auc"] == pytest.approx(metrics["auc"])
    assert written["nan"] is None and written["loss"] == 0.25 and written["ids"] == [0, 1, 2]
    assert written["model"] == "some/model"
    assert_png(out / "roc.png")
    assert_png(out / "confusion_matrix.png")


def test_report_with_a_single_class_has_null_auc(tmp_path):
    y, proba = np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.7, 0.3])
    metrics = compute_metrics(y, proba, 0.5, CLASSES)
    write_report(tmp_path, metrics, y, proba, CLASSES)
    assert strict_json(tmp_path / "metrics.json")["auc"] is None
    assert_png(tmp_path / "roc.png")


def test_report_refuses_extra_that_overwrites_metrics(tmp_path):
    y, proba = np.array([0, 1]), np.array([0.1, 0.9])
    metrics = compute_metrics(y, proba, 0.5, CLASSES)
    with pytest.raises(ValueError, match="f1"):
        write_report(tmp_path, metrics, y, proba, CLASSES, extra={"f1": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_plots_write_pngs_directly(tmp_path):
    plot_roc([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.4], tmp_path / "r.png", title="t")
    plot_confusion_matrix([[5, 0], [2, 9]], CLASSES, tmp_path / "c.png")
    assert_png(tmp_path / "r.png")
    assert_png(tmp_path / "c.png")
    with pytest.raises(InputError):
        plot_confusion_matrix([[1, 2, 3]], CLASSES, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "r.png"]


# --------------------------------------------------------------------------- warnings


def test_auc_interval_has_the_spread_of_auc_over_repeated_samples():
    """Binormal scores with a true AUC of 0.8, 50 images per class: the interval's half-width is
    1.96 times the standard deviation of the AUCs of many such samples (Hanley & McNeil: 0.0445)."""
    rng = np.random.default_rng(0)
    shift = np.sqrt(2) * 0.8416212  # AUC = Phi(shift / sqrt(2)) = 0.8
    positives = rng.standard_normal((4000, 50)) + shift
    negatives = rng.standard_normal((4000, 50))
    aucs = (positives[:, :, None] > negatives[:, None, :]).mean(axis=(1, 2))
    low, high = auc_interval(0.8, 50, 50)
    assert (low + high) / 2 == pytest.approx(0.8)
    assert (high - low) / 2 / 1.959964 == pytest.approx(0.0445, abs=5e-4)
    assert (high - low) / 2 / 1.959964 == pytest.approx(aucs.std(), rel=0.1)
    assert auc_interval(0.99, 3, 3)[1] == 1.0 and auc_interval(0.01, 3, 3)[0] == 0.0  # clipped
    with pytest.raises(InputError, match="both classes"):
        auc_interval(0.7, 0, 5)


def test_no_warning_for_a_model_that_separates_the_classes_with_a_sensible_threshold():
    y = np.array([0, 1] * 15)
    proba = np.where(y == 1, 0.7, 0.3) + np.linspace(-0.05, 0.05, 30)
    threshold = best_f1_threshold(y, proba)
    assert fit_warnings(y, proba, threshold, CLASSES, "cross-validation", [("DenseHead", 7, 20)]) == []


def test_probabilities_that_do_not_separate_the_classes_warn_of_chance_and_a_degenerate_threshold():
    # Positives and negatives interleaved, each positive just below a negative: AUC 0.45, and max F1
    # calls every image positive (the H&E pooled model's 0.00027 threshold).
    y = np.array([1, 0] * 10)
    proba = np.linspace(0.0002, 0.0004, 20)
    threshold = best_f1_threshold(y, proba)
    assert threshold < proba.min()
    chance, degenerate = fit_warnings(y, proba, threshold, CLASSES, "5-fold cross-validation (out-of-fold)")
    # Hanley & McNeil: SE = sqrt((0.2475 + 9 * 0.0878 + 9 * 0.0768) / 100) = 0.1315; 0.45 -/+ 1.96 SE.
    assert chance.startswith("5-fold cross-validation (out-of-fold) AUC 0.45 (95% CI 0.192 to 0.708, 10 Mitosis "
                             "and 10 Normal images) does not rule out chance (0.5)")
    assert degenerate == ("threshold 0.0001 is degenerate: all 20 5-fold cross-validation (out-of-fold) "
                          "probabilities lie at or above it, so it calls every one of those images Mitosis")


def test_a_threshold_above_every_probability_and_an_auc_below_chance_warn_too():
    y = np.array([1] * 40 + [0] * 40)
    proba = np.linspace(0.1, 0.4, 80)  # every positive below every negative: AUC 0
    warnings = fit_warnings(y, proba, 0.9, CLASSES, "validation split")
    assert len(warnings) == 2
    assert "validation split AUC 0 (95% CI 0 to 0" in warnings[0]
    assert warnings[1].endswith("lie below it, so it calls every one of those images Normal")


def test_an_auc_whose_interval_clears_chance_is_not_flagged():
    y = np.array([0, 1] * 30)
    proba = np.where(y == 1, 0.6, 0.4) + np.random.default_rng(1).normal(0, 0.12, 60)
    proba = np.clip(proba, 0, 1)
    auc = compute_metrics(y, proba, 0.5, CLASSES)["auc"]
    assert auc_interval(auc, 30, 30)[0] > 0.5
    assert fit_warnings(y, proba, 0.5, CLASSES) == []


def test_a_best_epoch_of_one_in_a_longer_training_warns():
    epochs = [("DenseHead (final fit)", 1, 16), ("fine-tuning phase head", 1, 1), ("fine-tuning phase full", 4, 9),
              ("AttentionHead (final fit)", None, 30)]
    assert fit_warnings(epochs=epochs) == [
        "DenseHead (final fit): the best validation epoch was the first of 16; training never improved on it "
        "(learning rate too high, too few images, or nothing learnable)"
    ]


def test_a_model_that_gives_every_image_the_same_probability_warns_of_a_collapse():
    y = np.array([0, 1] * 12)
    proba = np.full(24, 0.5)  # what a network whose final feature map went dead answers
    warnings = fit_warnings(y, proba, 0.5, CLASSES, "validation split")
    assert "the model gives every one of the 24 validation split images the same probability (0.5 to 0.5): " \
           "it collapsed to a constant output" in warnings
    assert not any("collapsed" in w for w in fit_warnings(y, np.linspace(0.0002, 0.0004, 24), None, CLASSES))
