"""The per-cell ceiling of the cell model: its own instances and features, trained *with cell labels*.

    python benchmarks/cells_ceiling.py [--sets small-cells-1024 large-cells-1024] [--work /tmp/mitoscope-bench]
    python benchmarks/cells_ceiling.py --finetuned --seeds 0 1 2 [--sets ...] [--work ...]

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
of the median mitotic cell; the pointing game (a Mitosis test scene's best cell is mitotic; added
after `cells_ceiling.json` was measured). The recipes were fixed before any number was seen.

With `--finetuned`, the encoder of the self-trained scorer instead (`scorer=finetuned`): the
product's own training of the whole network on augmented crops (`fit_cell_classifier` with the
default `CellTrainConfig(scorer="finetuned")`, the seed the product's final fit uses), given the
training scenes' *cell labels* in place of the teacher's pseudo-labels: every mitotic found cell a
positive, every other found cell (of Normal and Mitosis scenes alike) a negative. Test cells
scored as the product scores them (mean logit over `views` views). Reported per seed, and mean ±
sd: the four numbers above, beside the product's self-trained test rows (README) that learnt the same network from image
labels. Fixed before any of its numbers was seen.
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
        record[recipe] = scored(model.decision_function(make(te_cnn, te_stats)), te_flags, te_offsets, te_y)
        print(name, recipe, record[recipe], flush=True)
    return record


def scored(scores, flags, offsets, y) -> dict:
    """The ceiling's numbers for per-cell ``scores`` of the test cells (a scene scores as its best cell)."""
    from sklearn.metrics import roc_auc_score

    from mitoscope.cells.training import best_cell_logit

    scene = best_cell_logit(scores, offsets)
    pointed = [bool(flags[a + int(np.argmax(scores[a:b]))])
               for a, b, label in zip(offsets[:-1], offsets[1:], y) if label == 1 and b > a]
    return {"cell_auc": round(float(roc_auc_score(flags, scores)), 4),
            "scene_auc_max_pooled": round(float(roc_auc_score(y, scene)), 4),
            "interphase_fpr_at_median_mitotic": round(float(np.mean(scores[~flags] >= np.median(scores[flags]))), 4),
            "pointing_game": round(float(np.mean(pointed)), 4)}


def finetuned_set(work: Path, name: str, seeds: list[int]) -> dict:
    """The self-trained scorer's network trained with cell labels, once per seed (see the module)."""
    import torch

    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.network import build_cell_network, trained_parameters
    from mitoscope.cells.training import cell_logits, fit_cell_classifier

    train_dir, test_dir = scene_pair(work, name)
    started = time.perf_counter()
    tr_crops, tr_centres, tr_offsets, tr_names, _ = found_cells(train_dir)
    te_crops, te_centres, te_offsets, te_names, te_y = found_cells(test_dir)
    tr_flags = mitotic_flags(train_dir, tr_names, tr_offsets, tr_centres)
    te_flags = mitotic_flags(test_dir, te_names, te_offsets, te_centres)
    record = {"set": name, "train_cells": int(len(tr_flags)), "train_mitotic": int(tr_flags.sum()),
              "test_cells": int(len(te_flags)), "test_mitotic": int(te_flags.sum()),
              "cells_s": round(time.perf_counter() - started, 1), "runs": []}
    positives, negatives = np.flatnonzero(tr_flags), np.flatnonzero(~tr_flags)
    for seed in seeds:
        config = CellTrainConfig(scorer="finetuned", seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # as the product builds it (cells.workflow)
            network, backbone = build_cell_network(config.backbone, pretrained=True, dropout=config.dropout)
            mean, std = backbone.data_config["mean"], backbone.data_config["std"]
            started = time.perf_counter()
            fit_cell_classifier(network, trained_parameters(network, config.trained_stages), tr_crops, positives,
                                negatives, config, config.seed * 100, mean, std)
            train_s = time.perf_counter() - started
            scores = cell_logits(network, te_crops, np.arange(len(te_crops)), config.views, mean, std)
        run = {"seed": seed, **scored(scores, te_flags, te_offsets, te_y), "train_s": round(train_s, 1)}
        record["runs"].append(run)
        print(name, run, flush=True)
    for key in ("cell_auc", "scene_auc_max_pooled", "interphase_fpr_at_median_mitotic", "pointing_game"):
        values = [r[key] for r in record["runs"]]
        record[key] = {"mean": round(float(np.mean(values)), 4),
                       "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["small-cells-1024", "large-cells-1024"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/cells_ceiling.json, cells_ceiling_finetuned.json with --finetuned")
    parser.add_argument("--finetuned", action="store_true",
                        help="the self-trained scorer's network trained with cell labels, instead of logistic regression")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="with --finetuned: one training per seed")
    args = parser.parse_args()
    require_shared()
    results_dir = REPO / "benchmarks" / "results"
    if args.finetuned:
        out = args.out or results_dir / "cells_ceiling_finetuned.json"
        results = {"machine": machine(), "recipe": "fit_cell_classifier, CellTrainConfig(scorer='finetuned') defaults, "
                   "cell labels from boxes.csv", "seeds": args.seeds, "sets": []}
        for name in args.sets:
            results["sets"].append(finetuned_set(args.work, name, args.seeds))
            save_results(out, results)
        return
    args.out = args.out or results_dir / "cells_ceiling.json"
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
