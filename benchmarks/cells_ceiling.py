"""The per-cell ceiling of the cell model: its own instances and features, trained *with cell labels*.

    python benchmarks/cells_ceiling.py [--sets small-cells-1024 large-cells-1024] [--work /tmp/mitoscope-bench]

A benchmark only (the product learns from image labels). On the cell-disjoint scene sets of
`accuracy.py cells` (120 training scenes from `--part train`, 60 test scenes from `--part
test`), the product's proposals (`find_cells`) and crops give the instances; a found cell is
mitotic when its centre lies in a `boxes.csv` box (every other cell is interphase: the scenes
hold no other mitoses). Features as the product computes them: the frozen
`tf_efficientnet_lite0` pooled features of each crop, and the 18 intensity statistics.
Fitted with the cell labels of the training scenes, scored on the test scenes' cells:

- `product-features`: the product's representation (8 whitened principal components + the
  statistics, standardised), logistic regression (C = 1);
- `all-features`: all 1280 pooled features + the statistics, standardised, logistic regression (C = 0.1).

Reported: per-cell test AUC; the scene-level test AUC when each scene scores as its best cell
(max pooling, as the product does); the false-positive rate over interphase cells at the score
of the median mitotic cell. The recipes were fixed before any number was seen.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import REPO, found_cells, machine, mitotic_flags, require_shared, save_results, scene_pair

RECIPES = {"product-features": 1.0, "all-features": 0.1}


def cells_of(folder: Path, network, mean, std, input_size: int = 96):
    from mitoscope.cells.bootstrap import intensity_features
    from mitoscope.cells.training import crop_features

    crops, centres, offsets, names, y = found_cells(folder, input_size)
    flags = mitotic_flags(folder, names, offsets, centres)
    return crop_features(network, crops, mean, std), intensity_features(crops), flags, offsets, y


def design(recipe: str, train_cnn: np.ndarray, train_stats: np.ndarray):
    from sklearn.decomposition import PCA

    if recipe == "product-features":
        pca = PCA(8, random_state=0).fit(train_cnn)
        scale = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
        return lambda cnn, stats: np.concatenate([pca.transform(cnn) / scale, stats], axis=1)
    return lambda cnn, stats: np.concatenate([cnn, stats], axis=1)


def one_set(work: Path, name: str, network, mean, std) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_dir, test_dir = scene_pair(work, name)
    started = time.perf_counter()
    tr_cnn, tr_stats, tr_flags, _, _ = cells_of(train_dir, network, mean, std)
    te_cnn, te_stats, te_flags, te_offsets, te_y = cells_of(test_dir, network, mean, std)
    record = {"set": name, "train_cells": int(len(tr_flags)), "train_mitotic": int(tr_flags.sum()),
              "test_cells": int(len(te_flags)), "test_mitotic": int(te_flags.sum()),
              "features_s": round(time.perf_counter() - started, 1)}
    for recipe, c in RECIPES.items():
        make = design(recipe, tr_cnn, tr_stats)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight="balanced"))
        model.fit(make(tr_cnn, tr_stats), tr_flags)
        scores = model.decision_function(make(te_cnn, te_stats))
        scene = np.array([scores[a:b].max() if b > a else -np.inf for a, b in zip(te_offsets[:-1], te_offsets[1:])])
        median_mitotic = float(np.median(scores[te_flags]))
        record[recipe] = {
            "cell_auc": round(float(roc_auc_score(te_flags, scores)), 4),
            "scene_auc_max_pooled": round(float(roc_auc_score(te_y, scene)), 4),
            "interphase_fpr_at_median_mitotic": round(float(np.mean(scores[~te_flags] >= median_mitotic)), 4),
        }
        print(name, recipe, record[recipe], flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["small-cells-1024", "large-cells-1024"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_ceiling.json")
    args = parser.parse_args()
    require_shared()
    import torch

    from mitoscope.cells.network import build_cell_network

    torch.manual_seed(0)
    network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    results = {"machine": machine(), "recipes": {k: f"logistic regression, C={v}, balanced" for k, v in RECIPES.items()},
               "sets": []}
    for name in args.sets:
        results["sets"].append(one_set(args.work, name, network, mean, std))
        save_results(args.out, results)


if __name__ == "__main__":
    main()
