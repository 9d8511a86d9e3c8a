"""Model files from someone else (mitoscope.heads.files): loading never runs their code."""

from __future__ import annotations

import os

import numpy as np
import pytest
import skops.io
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from mitoscope.errors import ModelError
from mitoscope.heads.files import load_sklearn, save_sklearn


def fitted():
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    return make_pipeline(FunctionTransformer(), LogisticRegression()).fit(x, y)


def test_a_scikit_learn_head_round_trips_trusting_only_its_recorded_types(tmp_path):
    types = save_sklearn(fitted(), tmp_path / "head.skops")
    assert all(name.startswith(("sklearn.", "numpy.")) for name in types)
    model = load_sklearn(tmp_path / "head.skops", type(fitted()), 3, types)
    assert model.predict_proba(np.zeros((1, 3))).shape == (1, 2)


def test_a_skops_file_holding_an_untrusted_type_is_refused_without_running_it(tmp_path):
    path = tmp_path / "head.skops"
    tampered = fitted()
    tampered.steps[0][1].func = os.system  # would run shell commands on the features, once loaded and used
    skops.io.dump(tampered, path)
    assert any("system" in name for name in skops.io.get_untrusted_types(file=path))
    # what the file says it holds is not trusted: only scikit-learn and numpy types are
    with pytest.raises(ModelError, match=r"head.skops: expected only scikit-learn/numpy types, got .*system"):
        load_sklearn(path, type(fitted()), 3)
    # nor does a model.json that lists only benign types make skops load the foreign one
    benign = save_sklearn(fitted(), tmp_path / "benign.skops")
    with pytest.raises(ModelError, match="head.skops: not a readable skops file"):
        load_sklearn(path, type(fitted()), 3, benign)
