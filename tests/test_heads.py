"""Tests for mitoscope.heads: estimator contract, learning, the ensemble rule, attention
localisation, input errors and pickle-free persistence."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import numpy as np
import pytest
import skops.io
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from mitoscope.errors import InputError, ModelError
from mitoscope.heads import (
    HEADS,
    AttentionHead,
    DenseHead,
    EnsembleHead,
    ForestHead,
    PooledHead,
    _inner_split,
    combine_ensemble,
    load_head,
    make_head,
    save_head,
)

N_FEATURES = 16
N_WINDOWS = 9
DENSE_FAST = dict(max_epochs=30, patience=5, device="cpu")
FOREST_FAST = dict(n_estimators=30, n_jobs=1)
ATTENTION_FAST = dict(
    hidden=16, attention_dim=8, max_epochs=20, patience=5, learning_rate=5e-3, device="cpu"
)


def fast_params(name: str) -> dict:
    """Small, quick settings for each head (a few trees, a few epochs)."""
    return {
        "dense": dict(DENSE_FAST),
        "forest": dict(FOREST_FAST),
        "ensemble": dict(dense=DenseHead(**DENSE_FAST), forest=ForestHead(**FOREST_FAST)),
        "pooled": {},
        "attention": dict(ATTENTION_FAST),
    }[name]


def shifted_bags(n_images: int, seed: int, shift: float = 1.5):
    """Every window of a positive image has its first four features shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_images) % 2)
    bags = []
    for label in y:
        bag = rng.normal(size=(N_WINDOWS, N_FEATURES)).astype(np.float32)
        if label:
            bag[:, :4] += shift
        bags.append(bag)
    return bags, y


def single_window_bags(n_images: int, seed: int, sizes=(6, 20), shift: float = 3.0):
    """Bags of random sizes; a positive bag has ONE window with its first 4 features shifted.

    Returns the bags, labels and the index of the signal window of each bag.
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_images) % 2)
    bags, signal = [], []
    for label in y:
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        bag = rng.normal(size=(size, N_FEATURES)).astype(np.float32)
        where = int(rng.integers(size))
        if label:
            bag[where, :4] += shift
        bags.append(bag)
        signal.append(where)
    return bags, y, signal


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    # The test machine's cores are shared; extra intra-op threads only add contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy():
    train_bags, train_y = shifted_bags(48, seed=0)
    test_bags, test_y = shifted_bags(32, seed=1)
    return train_bags, train_y, test_bags, test_y


@pytest.fixture(scope="module")
def fitted(toy):
    """name -> (head, what fit returned), every head fitted once on the toy problem."""
    train_bags, train_y, _, _ = toy
    heads = {}
    for name in HEADS:
        head = make_head(name, **fast_params(name))
        heads[name] = (head, head.fit(train_bags, train_y))
    return heads


@pytest.fixture(scope="module")
def single_window():
    train = single_window_bags(60, seed=2)
    test = single_window_bags(40, seed=3)
    head = AttentionHead(**ATTENTION_FAST).fit(train[0], train[1])
    return head, train, test


class ConstantHead(ClassifierMixin, BaseEstimator):
    """A stand-in ensemble member that returns fixed positive probabilities."""

    def __init__(self, probabilities=()):
        self.probabilities = probabilities

    def fit(self, bags, y):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, bags):
        positive = np.asarray(self.probabilities, dtype=float)
        return np.column_stack([1 - positive, positive])


# ------------------------------------------------------------------------------------------
# Registry and estimator contract
# ------------------------------------------------------------------------------------------


def test_registry_and_make_head():
    assert set(HEADS) == {"dense", "forest", "ensemble", "pooled", "attention"}
    assert isinstance(make_head("pooled", C=0.5), PooledHead)
    assert make_head("pooled", C=0.5).C == 0.5
    with pytest.raises(InputError, match=r"dense, forest, ensemble, pooled, attention.*'mlp'"):
        make_head("mlp")
    with pytest.raises(InputError, match="bogus"):
        make_head("forest", bogus=1)


def _same_params(left: dict, right: dict) -> bool:
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        other = right[key]
        if isinstance(value, BaseEstimator):
            if type(value) is not type(other) or value.get_params() != other.get_params():
                return False
        elif value != other:
            return False
    return True


@pytest.mark.parametrize("name", list(HEADS))
def test_estimator_contract_before_fit(name, toy):
    head = make_head(name, **fast_params(name))
    params = head.get_params(deep=False)
    assert _same_params(clone(head).get_params(deep=False), params)
    assert _same_params(make_head(name).set_params(**params).get_params(deep=False), params)
    assert not [attr for attr in vars(head) if attr.endswith("_")]
    with pytest.raises(NotFittedError):
        head.predict_proba(toy[2])
    with pytest.raises(NotFittedError):
        head.predict(toy[2])
    if hasattr(head, "window_scores"):
        with pytest.raises(NotFittedError):
            head.window_scores(toy[2])


@pytest.mark.parametrize("name", list(HEADS))
def test_each_head_learns_a_separable_problem(name, toy, fitted):
    head, returned = fitted[name]
    _, _, test_bags, test_y = toy
    assert returned is head
    np.testing.assert_array_equal(head.classes_, [0, 1])
    proba = head.predict_proba(test_bags)
    assert proba.shape == (len(test_bags), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(head.predict(test_bags), (proba[:, 1] >= 0.5).astype(int))
    assert roc_auc_score(test_y, proba[:, 1]) > 0.9
    # fit must leave the parameters alone (members are cloned, not fitted in place).
    assert _same_params(
        head.get_params(deep=False), make_head(name, **fast_params(name)).get_params(deep=False)
    )
    if name == "ensemble":
        assert not hasattr(head.dense, "network_") and not hasattr(head.forest, "forest_")


# ------------------------------------------------------------------------------------------
# Ensemble rule
# ------------------------------------------------------------------------------------------


def test_combine_ensemble_rule_on_hand_built_probabilities():
    dense = np.array([0.8, 0.55, 0.2, 0.3, 0.45, 0.3])
    forest = np.array([0.6, 0.9, 0.1, 0.7, 0.9, 0.75])
    combined = combine_ensemble(dense, forest, dense_weight=1.1)
    # agree -> the label stands (more confident one's probability);
    # dense 0.3 (0.4 * 1.1 = 0.44) beats forest 0.7 (0.4) only thanks to the weight;
    # dense 0.45 (0.11) loses to forest 0.9 (0.8); dense 0.3 (0.44) loses to forest 0.75 (0.5).
    np.testing.assert_allclose(combined, [0.8, 0.9, 0.1, 0.3, 0.9, 0.75])
    # Without the weight tip-over the forest wins the 0.3 vs 0.7 case.
    assert combine_ensemble(np.array([0.3]), np.array([0.7]), dense_weight=0.9)[0] == 0.7
    with pytest.raises(InputError, match="same shape"):
        combine_ensemble(np.zeros(2), np.zeros(3))


def test_ensemble_head_applies_the_rule_to_its_members():
    bags = [np.zeros((4, 3), np.float32) for _ in range(4)]
    head = EnsembleHead(
        dense=ConstantHead((0.3, 0.8, 0.45, 0.6)),
        forest=ConstantHead((0.7, 0.6, 0.9, 0.2)),
    ).fit(bags, [0, 1, 0, 1])
    np.testing.assert_allclose(head.predict_proba(bags)[:, 1], [0.3, 0.8, 0.9, 0.2])
    np.testing.assert_array_equal(head.predict(bags), [0, 1, 1, 0])
    members = head.predict_proba_members(bags)
    np.testing.assert_allclose(members["dense"], [0.3, 0.8, 0.45, 0.6])
    np.testing.assert_allclose(members["forest"], [0.7, 0.6, 0.9, 0.2])


def test_fitted_ensemble_members_are_the_fitted_heads(toy, fitted):
    head, _ = fitted["ensemble"]
    members = head.predict_proba_members(toy[2])
    np.testing.assert_array_equal(members["dense"], head.dense_.predict_proba(toy[2])[:, 1])
    np.testing.assert_array_equal(members["forest"], head.forest_.predict_proba(toy[2])[:, 1])


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dense", "forest", "ensemble"])
def test_concat_heads_reject_mismatched_bag_sizes(name, toy, fitted):
    bags, y = shifted_bags(6, seed=5)
    bags[2] = bags[2][:4]
    with pytest.raises(InputError, match=r"9 windows \(the grid of image 0.*got 4 for image 2"):
        make_head(name, **fast_params(name)).fit(bags, y)
    head, _ = fitted[name]
    mixed = [toy[2][0], toy[2][1][:4]]
    expected = r"expected every image to have 9 windows \(the training grid.*got 4 for image 1"
    with pytest.raises(InputError, match=expected):
        head.predict_proba(mixed)


@pytest.mark.parametrize("name", list(HEADS))
def test_bad_inputs_raise_input_errors(name, toy, fitted):
    head, _ = fitted[name]
    good = toy[2][:3]
    expected = r"expected 16 features per window \(as in training\), got 8 for image 1"
    with pytest.raises(InputError, match=expected):
        head.predict_proba([good[0], good[1][:, :8]])
    with pytest.raises(InputError, match=r"2-D .* image 0, got shape \(16,\)"):
        head.predict_proba([good[0][0]])
    with pytest.raises(InputError, match="at least one image"):
        head.predict_proba([])
    with pytest.raises(InputError, match="single array"):
        head.predict_proba(good[0])
    broken = good[1].copy()
    broken[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinity in image 1"):
        head.predict_proba([good[0], broken])

    unfitted = make_head(name, **fast_params(name))
    bags, y = shifted_bags(6, seed=6)
    with pytest.raises(InputError, match=r"expected 6 labels \(one per image\), got shape \(5,\)"):
        unfitted.fit(bags, y[:5])
    with pytest.raises(InputError, match="expected labels 0 .* and 1 .*, got 2"):
        unfitted.fit(bags, np.where(y == 1, 2, 0))
    with pytest.raises(InputError, match="both classes.*only class 1"):
        unfitted.fit(bags, np.ones(6, int))


# ------------------------------------------------------------------------------------------
# Localisation
# ------------------------------------------------------------------------------------------


def test_attention_points_at_the_single_signal_window(single_window):
    head, _, (test_bags, test_y, signal) = single_window
    assert roc_auc_score(test_y, head.predict_proba(test_bags)[:, 1]) > 0.9
    weights = head.window_scores(test_bags)
    logits = head.attention_logits(test_bags)
    assert [len(w) for w in weights] == [len(b) for b in test_bags]
    np.testing.assert_allclose([w.sum() for w in weights], 1.0, rtol=1e-5)
    hits = [int(np.argmax(w)) == where for w, where, label in zip(weights, signal, test_y) if label]
    assert np.mean(hits) >= 0.9
    # The softmax keeps the order of the logits within a bag.
    assert all(np.argmax(w) == np.argmax(a) for w, a in zip(weights, logits))


def test_attention_handles_bags_of_different_sizes(single_window):
    head, _, (test_bags, _, _) = single_window
    assert len({len(b) for b in test_bags}) > 5
    together = head.predict_proba(test_bags)[:, 1]
    alone = np.array([head.predict_proba([bag])[0, 1] for bag in test_bags])
    # Padding to the longest bag must not change any image's result.
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    one_window = head.window_scores([test_bags[0][:1]])
    np.testing.assert_allclose(one_window[0], [1.0])


def test_pooled_window_scores_point_at_the_signal_window():
    train_bags, train_y, _ = single_window_bags(60, seed=2)
    test_bags, test_y, signal = single_window_bags(40, seed=3)
    head = PooledHead().fit(train_bags, train_y)
    scores = head.window_scores(test_bags)
    assert [len(s) for s in scores] == [len(b) for b in test_bags]
    hits = [int(np.argmax(s)) == where for s, where, label in zip(scores, signal, test_y) if label]
    assert np.mean(hits) >= 0.9
    # A window's score is the logit of an image made only of copies of that window.
    window = test_bags[0][3]
    copies = np.repeat(window[None], 5, axis=0)
    expected = 1 / (1 + np.exp(-scores[0][3]))
    np.testing.assert_allclose(head.predict_proba([copies])[0, 1], expected, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Torch heads: determinism, history, small data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, params", [(DenseHead, DENSE_FAST), (AttentionHead, ATTENTION_FAST)])
def test_torch_heads_are_deterministic_and_leave_global_rng_alone(cls, params):
    bags, y = shifted_bags(16, seed=7)
    quick = dict(params, max_epochs=4)
    state = torch.get_rng_state()
    first = cls(**quick, random_state=3).fit(bags, y).predict_proba(bags)
    assert torch.equal(torch.get_rng_state(), state)
    second = cls(**quick, random_state=3).fit(bags, y).predict_proba(bags)
    other = cls(**quick, random_state=4).fit(bags, y).predict_proba(bags)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", ["dense", "attention"])
def test_history_early_stopping_and_plot(name, fitted, tmp_path):
    head, _ = fitted[name]
    history = head.history_
    assert history["early_stopping"] is True
    n = history["epochs_run"]
    assert len(history["loss"]) == len(history["val_loss"]) == len(history["accuracy"]) == n
    assert history["best_epoch"] == int(np.argmin(history["val_loss"])) + 1
    assert n == head.max_epochs or n == history["best_epoch"] + head.patience
    path = head.plot_history(tmp_path / "history.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]


def test_dense_head_restores_its_best_weights(toy, fitted):
    head, _ = fitted["dense"]
    train_bags, train_y, _, _ = toy
    train, val = _inner_split(train_y, head.validation_fraction, head.random_state)
    counts = np.bincount(train_y[train], minlength=2)
    weights = (len(train) / (2 * counts))[train_y[val]]
    p = np.clip(head.predict_proba([train_bags[i] for i in val])[:, 1], 1e-12, 1 - 1e-12)
    targets = train_y[val]
    loss = np.mean(weights * -(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
    best = head.history_["val_loss"][head.history_["best_epoch"] - 1]
    assert loss == pytest.approx(best, rel=1e-4)


def test_dense_l1_l2_penalty_shrinks_the_hidden_weights():
    bags, y = shifted_bags(16, seed=9)
    quick = dict(
        DENSE_FAST, max_epochs=15, validation_fraction=0.0, learning_rate=1e-2, batch_size=4
    )
    free = DenseHead(**quick, l1=0.0, l2=0.0).fit(bags, y)
    penalised = DenseHead(**quick, l1=0.01, l2=0.01).fit(bags, y)
    assert "validation_fraction is 0" in penalised.history_["note"]
    free_size = free.network_.hidden.weight.abs().mean().item()
    penalised_size = penalised.network_.hidden.weight.abs().mean().item()
    assert penalised_size < 0.2 * free_size


@pytest.mark.parametrize("cls, params", [(DenseHead, DENSE_FAST), (AttentionHead, ATTENTION_FAST)])
def test_tiny_dataset_trains_without_early_stopping(cls, params, tmp_path):
    bags, _ = shifted_bags(3, seed=8)
    head = cls(**dict(params, max_epochs=6)).fit(bags, [0, 1, 1])
    assert head.history_["early_stopping"] is False
    assert "too few images" in head.history_["note"]
    assert len(head.history_["loss"]) == 6 and head.history_["val_loss"] == []
    assert head.plot_history(tmp_path / "tiny.png").is_file()


# ------------------------------------------------------------------------------------------
# Persistence
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HEADS))
def test_save_load_round_trip(name, toy, fitted, tmp_path):
    head, _ = fitted[name]
    spec = json.loads(json.dumps(save_head(head, tmp_path, "head")))
    assert spec["class"] == type(head).__name__
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(spec["files"])
    loaded = load_head(tmp_path, spec)
    assert type(loaded) is type(head)
    assert _same_params(loaded.get_params(deep=False), head.get_params(deep=False))
    np.testing.assert_array_equal(loaded.predict_proba(toy[2]), head.predict_proba(toy[2]))
    if hasattr(head, "window_scores"):
        for a, b in zip(loaded.window_scores(toy[2]), head.window_scores(toy[2])):
            np.testing.assert_array_equal(a, b)
    if name == "ensemble":
        for member, proba in head.predict_proba_members(toy[2]).items():
            np.testing.assert_array_equal(loaded.predict_proba_members(toy[2])[member], proba)
    if hasattr(head, "history_"):
        assert loaded.history_ == head.history_
        assert loaded.plot_history(tmp_path / "plots" / "h.png").is_file()
    if hasattr(head, "n_windows_"):
        assert loaded.n_windows_ == N_WINDOWS
        with pytest.raises(InputError, match="training grid"):
            loaded.predict_proba([toy[2][0][:4]])


@pytest.mark.parametrize("name", list(HEADS))
def test_broken_saved_files_raise_model_error(name, fitted, tmp_path):
    head, _ = fitted[name]
    spec = save_head(head, tmp_path, "head")
    for file_name in spec["files"]:
        path = tmp_path / file_name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2])
        with pytest.raises(ModelError, match=file_name.replace(".", r"\.")):
            load_head(tmp_path, spec)
        path.unlink()
        with pytest.raises(ModelError, match=f"{file_name.replace('.', '[.]')}: .*missing"):
            load_head(tmp_path, spec)
        path.write_bytes(original)
    load_head(tmp_path, spec)  # intact again


@pytest.mark.parametrize("name", list(HEADS))
def test_spec_that_does_not_fit_the_files_raises_model_error(name, fitted, tmp_path):
    head, _ = fitted[name]
    spec = save_head(head, tmp_path, "head")
    wrong = json.loads(json.dumps(spec))
    wrong["state"]["n_features_in_"] = N_FEATURES + 1
    if name == "ensemble":
        wrong["members"]["dense"]["state"]["n_features_in_"] = N_FEATURES + 1
    with pytest.raises(ModelError, match=r"head\.(dense\.)?(safetensors|skops)|features"):
        load_head(tmp_path, wrong)
    with pytest.raises(ModelError, match="NeuralNet"):
        load_head(tmp_path, dict(spec, **{"class": "NeuralNet"}))


def test_skops_file_with_foreign_types_is_refused(fitted, tmp_path):
    head, _ = fitted["pooled"]
    spec = save_head(head, tmp_path, "head")
    rng = np.random.default_rng(0)
    hostile = make_pipeline(FunctionTransformer(operator.neg), LogisticRegression()).fit(
        rng.normal(size=(10, 2 * N_FEATURES)), np.arange(10) % 2
    )
    skops.io.dump(hostile, tmp_path / "head.skops")
    with pytest.raises(ModelError, match=r"head\.skops.*_operator\.neg"):
        load_head(tmp_path, spec)


def test_skops_types_come_from_the_spec_and_must_be_scikit_learn_ones(fitted, toy, tmp_path):
    head, _ = fitted["pooled"]
    bags = toy[2]
    spec = save_head(head, tmp_path, "head")
    types = spec["state"]["skops_types"]
    assert isinstance(types, list) and all(t.startswith(("sklearn.", "numpy.")) for t in types)
    expected = head.predict_proba(bags)
    # An older spec without the list: the file is scanned for its types instead.
    older = {**spec, "state": {k: v for k, v in spec["state"].items() if k != "skops_types"}}
    np.testing.assert_array_equal(load_head(tmp_path, older).predict_proba(bags), expected)
    with pytest.raises(ModelError, match=r"head\.skops: expected only scikit-learn/numpy types, got builtins\.eval"):
        load_head(tmp_path, {**spec, "state": {**spec["state"], "skops_types": [*types, "builtins.eval"]}})
    with pytest.raises(ModelError, match="skops_types to be a list of type names"):
        load_head(tmp_path, {**spec, "state": {**spec["state"], "skops_types": "sklearn.pipeline.Pipeline"}})


def test_save_head_rejects_bad_names_and_unfitted_heads(fitted, tmp_path):
    head, _ = fitted["pooled"]
    with pytest.raises(InputError, match="plain file name"):
        save_head(head, tmp_path, "../escape")
    with pytest.raises(NotFittedError):
        save_head(PooledHead(), tmp_path, "head")
    assert list(Path(tmp_path).iterdir()) == []
