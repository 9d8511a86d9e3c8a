"""Which frozen encoder for the cell model: 5-fold CV on the TRAINING scenes only, image labels only.

    python benchmarks/cells_backbone_cv.py --sets small-cells-1024 large-cells-1024 \
        --backbones tf_efficientnet_lite0 tf_efficientnet_lite1 tf_efficientnet_lite2 [--work DIR]

The product's cell recipe (proposals, 96 px crops, `LinearInstanceHead` with its defaults)
with each backbone's frozen pooled features; stratified 5-fold cross-validation over the 120
training scenes (2 shuffles), each scene scored by its best cell; no test scene and no box is
read. Used to choose the default encoder before any test number of it is seen.
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
    parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                                          "tf_efficientnet_lite2"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_backbone_cv.json")
    args = parser.parse_args()
    require_shared()
    import torch

    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import crop_features

    results = {"machine": machine(), "protocol": "5-fold stratified CV (shuffles 0, 1) on the training scenes only",
               "runs": []}
    for set_name in args.sets:
        bags, y = training_bags(args.work, set_name)
        offsets = bags.offsets
        for name in args.backbones:
            torch.manual_seed(0)
            network, backbone = build_cell_network(name, pretrained=True)
            started = time.perf_counter()
            features = crop_features(network, bags.crops, backbone.data_config["mean"], backbone.data_config["std"])
            seconds = time.perf_counter() - started

            aucs = best_cell_cv_auc(features, bags.crops, offsets, y, (0, 1))
            run = {"set": set_name, "backbone": name, "cv_auc": aucs, "mean": round(float(np.mean(aucs)), 4),
                   "cells": int(len(bags.crops)), "features_s": round(seconds, 1)}
            print(run, flush=True)
            results["runs"].append(run)
            save_results(args.out, results)


if __name__ == "__main__":
    main()
