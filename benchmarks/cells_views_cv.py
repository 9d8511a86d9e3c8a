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

from common import REPO, best_cell_cv_auc, machine, require_shared, save_results, training_bags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["small-cells-1024", "large-cells-1024"])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_views_cv.json")
    args = parser.parse_args()
    require_shared()
    import torch

    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import crop_features
    from mitoscope.cells.views import crop_views

    results = {"machine": machine(), "protocol": "5-fold stratified CV (shuffles 0, 1, 2) on the training scenes only",
               "runs": []}
    torch.manual_seed(0)
    network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True)
    network.eval()
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    for set_name in args.sets:
        bags, y = training_bags(args.work, set_name)
        offsets = bags.offsets
        started = time.perf_counter()
        # each view once (crop_features averages the first k; the means for every k come from these)
        per_view = [crop_features(network, crop_views(bags.crops, view), mean, std) for view in range(max(args.views))]
        seconds = time.perf_counter() - started
        for k in args.views:
            features = np.mean(per_view[:k], axis=0)
            aucs = best_cell_cv_auc(features, bags.crops, offsets, y, (0, 1, 2))
            run = {"set": set_name, "views": k, "cv_auc": aucs, "mean": round(float(np.mean(aucs)), 4),
                   "cells": int(len(bags.crops)), "features_s_all_views": round(seconds, 1)}
            print(run, flush=True)
            results["runs"].append(run)
            save_results(args.out, results)


if __name__ == "__main__":
    main()
