"""Whether the cell model should average each cell's frozen features over flipped/turned views:
5-fold CV on the TRAINING scenes only, image labels only.

    python benchmarks/cells_views_cv.py --sets small-cells-1024 large-cells-1024 --views 1 4 8 [--work DIR]

A cell has no orientation, so the mean of its features over the dihedral views (quarter turns and
flips) describes the same cell with less of the noise that one pose adds; the tail of the
interphase scores, which decides a crowded scene, is made of such noise. The product's cell recipe
(proposals, 96 px crops, `LinearInstanceHead` with its defaults) with the pooled lite0 features
averaged over the first k views of `mitoscope.cells.views.VIEWS`; stratified 5-fold CV over the
120 training scenes (3 shuffles), each scene scored by its best cell. No test scene, no box read.
Rule fixed before running: the view count with the best mean CV AUC over the sets becomes the
default if it beats 1 view on every set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import REPO, machine, require_shared, save_results, scene_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["small-cells-1024", "large-cells-1024"])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_views_cv.json")
    args = parser.parse_args()
    require_shared()
    import torch
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from mitoscope.augment import dihedral
    from mitoscope.cells.bootstrap import LinearInstanceHead
    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import VIEWS, normalise
    from mitoscope.cells.workflow import collect_bags
    from mitoscope.io import ReadOptions, load_labelled_images

    results = {"machine": machine(), "protocol": "5-fold stratified CV (shuffles 0, 1, 2) on the training scenes only",
               "runs": []}
    torch.manual_seed(0)
    network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True)
    network.eval()
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    for set_name in args.sets:
        train_dir, _ = scene_pair(args.work, set_name)
        data = load_labelled_images(train_dir, train_dir / "labels.csv")
        bags = collect_bags(data.paths, data.y, ReadOptions(), 96)
        y, offsets = np.asarray(data.y), bags.offsets
        started = time.perf_counter()
        per_view = []
        with torch.no_grad():
            for turns, flip in VIEWS[:max(args.views)]:
                out = []
                for start in range(0, len(bags.crops), 256):
                    x = dihedral(normalise(bags.crops[start:start + 256], mean, std), turns, flip)
                    out.append(network.backbone.forward_features(x).mean(dim=(-2, -1)).numpy())
                per_view.append(np.concatenate(out))
        seconds = time.perf_counter() - started

        def rows(images):
            index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in images])
            return index, np.concatenate([[0], np.cumsum([offsets[i + 1] - offsets[i] for i in images])])

        for k in args.views:
            features = np.mean(per_view[:k], axis=0)
            aucs = []
            for shuffle in (0, 1, 2):
                oof = np.zeros(len(y))
                for train, test in StratifiedKFold(5, shuffle=True, random_state=shuffle).split(y, y):
                    i, o = rows(train)
                    j, p = rows(test)
                    head = LinearInstanceHead(seed=shuffle).fit(features[i], bags.crops[i], o, y[train])
                    scores = head.decision_function(features[j], bags.crops[j])
                    oof[test] = [scores[p[m]:p[m + 1]].max() if p[m + 1] > p[m] else -1e9 for m in range(len(test))]
                aucs.append(round(float(roc_auc_score(y, oof)), 4))
            run = {"set": set_name, "views": k, "cv_auc": aucs, "mean": round(float(np.mean(aucs)), 4),
                   "cells": int(len(bags.crops)), "features_s_all_views": round(seconds, 1)}
            print(run, flush=True)
            results["runs"].append(run)
            save_results(args.out, results)


if __name__ == "__main__":
    main()
