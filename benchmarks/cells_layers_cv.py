"""Whether the linear cell scorer should see features of earlier stages of the network too:
5-fold CV on the TRAINING scenes only, image labels only.

    python benchmarks/cells_layers_cv.py --sets small-cells-1024 large-cells-1024 [--work DIR]

ImageNet's last layer (1280 features) describes objects; what tells a mitotic cell from an
interphase one is texture and shape (condensed chromatin, a rounded cell), which earlier stages
describe as well or better. The product's cell recipe (proposals, 96 px crops, 4 views averaged,
`LinearInstanceHead` with its defaults: 8 principal components + 18 intensity statistics) with
the pooled outputs of more stages of `tf_efficientnet_lite0`, each stage's features standardised
(z-scored over all cells) before they are concatenated, so that each stage weighs alike in the
principal components. Variants, fixed before running: `final` (the product: the 1280 features
after the last 1x1 convolution), `final+s6` (and the last stage's 320), `final+s5+s6`
(and the 192 before), `s4+s5+s6` (the three last stages, no final layer). Stratified 5-fold CV
over the 120 training scenes (shuffles 0, 1, 2), each scene scored by its best cell; no test
scene and no box is read. Rule fixed before running: a variant replaces `final` only if its
mean CV AUC is at least 0.01 higher on every set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import REPO, best_cell_cv_auc, machine, require_shared, save_results, training_bags

STAGES = {"s4": "blocks.4", "s5": "blocks.5", "s6": "blocks.6"}
VARIANTS = {"final": ["final"], "final+s6": ["final", "s6"], "final+s5+s6": ["final", "s5", "s6"],
            "s4+s5+s6": ["s4", "s5", "s6"]}


def stage_features(network, crops, mean, std, views: int = 4, batch: int = 256) -> dict[str, np.ndarray]:
    """Pooled outputs of the chosen stages and of the final layer, averaged over ``views``."""
    import torch

    from mitoscope.cells.training import normalise
    from mitoscope.cells.views import crop_views

    backbone = network.eval().backbone
    captured: dict[str, torch.Tensor] = {}
    hooks = [backbone.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, key=key: captured.__setitem__(key, output.mean(dim=(-2, -1))))
        for key, name in STAGES.items()]
    out: dict[str, list[np.ndarray]] = {key: [] for key in [*STAGES, "final"]}
    try:
        with torch.no_grad():
            for start in range(0, len(crops), batch):
                chunk = np.asarray(crops[start:start + batch])
                totals: dict[str, np.ndarray] = {}
                for view in range(views):
                    final = backbone.forward_features(normalise(crop_views(chunk, view), mean, std)).mean(dim=(-2, -1))
                    for key, value in [*captured.items(), ("final", final)]:
                        totals[key] = totals.get(key, 0) + value.double().numpy()
                for key, value in totals.items():
                    out[key].append((value / views).astype(np.float32))
    finally:
        for hook in hooks:
            hook.remove()
    return {key: np.concatenate(parts) for key, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["small-cells-1024", "large-cells-1024"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_layers_cv.json")
    args = parser.parse_args()
    require_shared()
    import torch

    from mitoscope.cells.network import build_cell_network

    results = {"machine": machine(), "protocol": "5-fold stratified CV (shuffles 0, 1, 2) on the training scenes only",
               "variants": VARIANTS, "stages": STAGES, "runs": []}
    torch.manual_seed(0)
    network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    for set_name in args.sets:
        bags, y = training_bags(args.work, set_name)
        started = time.perf_counter()
        stages = stage_features(network, bags.crops, mean, std)
        seconds = round(time.perf_counter() - started, 1)
        z = {key: (value - value.mean(0)) / (value.std(0) + 1e-6) for key, value in stages.items()}
        for name, keys in VARIANTS.items():
            features = stages["final"] if keys == ["final"] else np.concatenate([z[key] for key in keys], axis=1)
            aucs = best_cell_cv_auc(features, bags.crops, bags.offsets, y, (0, 1, 2))
            run = {"set": set_name, "variant": name, "cv_auc": aucs, "mean": round(float(np.mean(aucs)), 4),
                   "features": int(features.shape[1]), "cells": int(len(bags.crops)), "features_s": seconds}
            print(run, flush=True)
            results["runs"].append(run)
            save_results(args.out, results)


if __name__ == "__main__":
    main()
