"""Each head's numpy serving form predicts what its estimator predicts.

A small model of every registered head is trained on tiny constructed data, saved with
``save_head`` and served from its files by ``load_served`` (numpy alone, as
:mod:`mitoscope.inference` runs it): the probabilities, window scores and ensemble members
agree with the estimator's to float32 rounding (the forest exactly). Edge cases of the forest's
thresholds and the pooled head's window logits are pinned on their own below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mitoscope.errors import InputError, ModelError, NotServable
from mitoscope.heads import (REGISTRY, ForestHead, PooledHead, forest_arrays, load_served, make_head, pooled_arrays,
                             save_head)
from mitoscope.heads.forest import ForestArrays
from mitoscope.heads.pooled import PooledArrays

SRC = Path(__file__).resolve().parents[1] / "src"
N_WINDOWS, N_FEATURES = 4, 6
SMALL = {
    "dense": dict(hidden=8, max_epochs=6, device="cpu"),
    "forest": dict(n_estimators=15, n_jobs=1),
    "ensemble": dict(dense=make_head("dense", hidden=8, max_epochs=6, device="cpu"),
                     forest=make_head("forest", n_estimators=15, n_jobs=1)),
    "pooled": {},
    "attention": dict(hidden=8, attention_dim=4, max_epochs=6, device="cpu"),
}
# How far the served probabilities may be from the estimator's: the forest's are the same sums of
# the same leaf values; the networks run in float32 (numpy's matmul is not torch's); scikit-learn
# scales float32 input in float32.
ATOL = {"forest": 1e-12}


def tiny_bags(n_images: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A 2x2 grid of 6 features per image; a positive image has one window's first features raised."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_images) % 2
    bags = []
    for label in y:
        bag = rng.normal(size=(N_WINDOWS, N_FEATURES)).astype(np.float32)
        if label:
            bag[rng.integers(N_WINDOWS), :2] += 2.0
        bags.append(bag)
    return bags, y


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (fitted head, folder, spec): every registered head, trained small and saved."""
    bags, y = tiny_bags(20, seed=0)
    out = {}
    for traits in REGISTRY:
        head = make_head(traits.name, **SMALL.get(traits.name, {})).fit(bags, y)
        folder = tmp_path_factory.mktemp(f"served-{traits.name}")
        out[traits.name] = (head, folder, save_head(head, folder, "head"))
    return out


@pytest.mark.parametrize("traits", REGISTRY, ids=lambda t: t.name)
def test_every_head_served_in_numpy_predicts_what_its_estimator_predicts(traits, saved):
    head, folder, spec = saved[traits.name]
    bags, _ = tiny_bags(9, seed=1)
    served = load_served(folder, spec)
    expected = head.predict_proba(bags)[:, 1]
    assert len(np.unique(expected)) > 1  # real, differing answers
    np.testing.assert_allclose(served.predict_proba(bags), expected, rtol=0, atol=ATOL.get(traits.name, 1e-6))
    assert hasattr(served, "window_scores") == hasattr(head, "window_scores") == (traits.window_scores is not None)
    if traits.window_scores:
        for got, reference in zip(served.window_scores(bags), head.window_scores(bags)):
            np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    if hasattr(head, "predict_proba_members"):
        members = head.predict_proba_members(bags)
        assert set(served.members(bags)) == set(members)
        for name, proba in served.members(bags).items():
            np.testing.assert_allclose(proba, members[name], rtol=0, atol=ATOL.get(name, 1e-6))


@pytest.mark.parametrize("traits", [t for t in REGISTRY if t.fixed_grid], ids=lambda t: t.name)
def test_served_fixed_grid_heads_refuse_another_grid(traits, saved):
    _, folder, spec = saved[traits.name]
    expected = r"expected 4 windows of 6 features per image \(the training grid\), got 2 of 6"
    with pytest.raises(InputError, match=expected):
        load_served(folder, spec).predict_proba([np.zeros((2, N_FEATURES), np.float32)])


def test_served_heads_refuse_specs_they_cannot_serve(saved, tmp_path):
    _, folder, spec = saved["pooled"]
    with pytest.raises(NotServable, match="head class 'NeuralNet' has no array form"):
        load_served(folder, {**spec, "class": "NeuralNet"})
    with pytest.raises(NotServable, match=r"PooledHead saved without its \.arrays\.safetensors file"):
        load_served(folder, {**spec, "files": [f for f in spec["files"] if not f.endswith(".arrays.safetensors")]})
    with pytest.raises(ModelError, match="expected a list of plain file names"):
        load_served(folder, {**spec, "files": ["../head.skops"]})
    with pytest.raises(ModelError, match=r"head spec for PooledHead is incomplete \(KeyError"):
        load_served(folder, {**spec, "state": {}})


def test_serving_a_saved_head_imports_neither_torch_nor_scikit_learn(saved):
    specs = {name: (str(folder), spec) for name, (_, folder, spec) in saved.items()}
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from mitoscope.heads import load_served\n"
        f"specs = json.loads({json.dumps(json.dumps(specs))})\n"
        "for folder, spec in specs.values():\n"
        f"    load_served(folder, spec).predict_proba([np.zeros(({N_WINDOWS}, {N_FEATURES}), np.float32)])\n"
        "print(json.dumps([m for m in ('torch', 'sklearn', 'skops', 'scipy') if m in sys.modules]))\n"
    )
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_forest_arrays_give_scikit_learns_probabilities_exactly(tmp_path):
    """Features taking values that are adjacent float32 numbers: the forest splits between them
    at a float64 midpoint that no float32 holds, so thresholds rounded to float32 would send
    one of the two down the wrong branch."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(3).astype(np.float32)
    levels = np.concatenate([base, np.nextafter(base, np.float32(np.inf))])
    train_bags = [levels[rng.integers(0, 6, (3, 5))] for _ in range(40)]
    y = rng.integers(0, 2, 40)
    head = ForestHead(n_estimators=25, bootstrap=True, random_state=0).fit(train_bags, y)
    thresholds = forest_arrays(head.forest_)["threshold"]
    assert (thresholds.astype(np.float32) != thresholds)[forest_arrays(head.forest_)["left"] >= 0].any()
    test_bags = [np.nextafter(bag, rng.choice([-np.inf, np.inf], bag.shape).astype(np.float32)) for bag in train_bags]
    test_bags += train_bags
    save_file(forest_arrays(head.forest_), str(tmp_path / "trees.safetensors"))
    served = ForestArrays(tmp_path / "trees.safetensors", {"n_windows_": 3, "n_features_in_": 5})
    expected = head.predict_proba(test_bags)[:, 1]
    np.testing.assert_allclose(served.predict_proba(test_bags), expected, rtol=0, atol=1e-12)
    assert len(np.unique(expected)) > 5


def test_pooled_arrays_give_the_logistic_regressions_probabilities_and_window_logits(tmp_path):
    rng = np.random.default_rng(1)
    bags = [rng.standard_normal((int(rng.integers(2, 6)), 8)).astype(np.float32) for _ in range(30)]
    y = np.arange(30) % 2
    head = PooledHead().fit(bags, y)
    save_file(pooled_arrays(head.pipeline_), str(tmp_path / "pooled.safetensors"))
    served = PooledArrays(tmp_path / "pooled.safetensors", {"n_features_in_": 8})
    # scikit-learn fits float32 input in float32 (coef_ too): agreement to float32 rounding.
    np.testing.assert_allclose(served.predict_proba(bags), head.predict_proba(bags)[:, 1], rtol=0, atol=1e-6)
    for got, expected in zip(served.window_scores(bags), head.window_scores(bags)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


