"""How many of the teacher's best cells of each Mitosis image should the self-trained scorer learn
as mitotic (`positives_per_image`, 1 or 2)? Measured on the inner pair only.

    python benchmarks/cells_positives_per_image.py --set small-cells-1024 --seeds 1 [--work DIR]

A recipe experiment, so it never reads a test scene: the *training* part of the cells split in
halves (`common.inner_pair`: 120 fitting scenes, 60 validation scenes). For each seed the final
network of `--head-param scorer=finetuned` is trained on the fitting scenes twice, with the
product's `pseudo_labels(..., per_image=1)` and `per_image=2`, and scored on the validation scenes
(`cells_pseudo_positives.scores`: image AUC, pointing game, cell AUC).

Rule, written before any of these runs: `positives_per_image=2` replaces 1 when, over the seeds
measured (with seed 0 of crowded 1024 from `cells_pseudo_positives.json`), its mean validation
AUC is higher on both crowded 1024 and few large cells and its mean pointing game is not lower on
either by more than one validation scene's share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cells_pseudo_positives import load, scores, untrained
from common import inner_pair, machine, require_shared, save_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="small-cells-1024")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--per-image", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    require_shared()
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.training import cell_logits, fit_cell_classifier, pseudo_labels

    out = args.out or Path(__file__).parent / "results" / f"cells_positives_per_image_{args.set}.json"
    fit_dir, val_dir = inner_pair(args.work, args.set)
    fit_bags, fit_hit = load(fit_dir)
    val_bags, val_hit = load(val_dir)
    config = CellTrainConfig(scorer="finetuned")
    every = np.arange(len(fit_bags.labels))
    runs = []
    for seed in args.seeds:
        base = untrained(config, fit_bags, seed)
        network, mean, std, features, stats, trained, start = (
            base[k] for k in ("network", "mean", "std", "features", "stats", "trained", "start"))
        for per_image in args.per_image:
            started = time.time()
            network.load_state_dict(start)
            positives, negatives = pseudo_labels(features, stats, fit_bags, every, seed, per_image)
            fit_cell_classifier(network, trained, fit_bags.crops, positives, negatives, config, seed, mean, std)
            logits = cell_logits(network, val_bags.crops, np.arange(len(val_bags.crops)), config.views, mean, std)
            runs.append({"seed": seed, "per_image": per_image, **scores(logits, val_bags, val_hit),
                         "positives": len(positives), "positives_mitotic": float(fit_hit[positives].mean()),
                         "seconds": round(time.time() - started, 1)})
            print(json.dumps(runs[-1]), flush=True)
    results = {"set": args.set, "config": config.to_dict(), "fit_scenes": str(fit_dir), "val_scenes": str(val_dir),
               "val_mitosis_scenes": int(sum(1 for k in range(len(val_bags.labels)) if val_bags.labels[k] == 1)),
               "runs": runs}
    save_results(out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
