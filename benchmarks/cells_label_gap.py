"""Where the self-trained scorer loses to cell labels: the picks' errors, or their number?

    python benchmarks/cells_label_gap.py --set small-cells-1024 --seeds 0 1 [--work DIR] --out FILE

A diagnostic on the inner pair (`common.inner_pair`: 120 fitting scenes and 60 validation scenes,
both from the *training* part of the cells; no test scene is read). Given the cell labels, the
product's network reaches a test scene AUC of 0.943 on crowded 1024 and 0.948 on the large cells,
and from image labels 0.826 and 0.915 (`cells_ceiling.py --finetuned`, README). The product's
final network learns one pick per Mitosis image (the linear teacher's best cell) against every
cell of the Normal images. Here the same network, from the same start and seed, learns four sets
of positives and negatives, each one step further from the product toward the cell labels:

- `teacher`: the product's picks and negatives (`scorer=finetuned`'s network trained on all images, before
  `fold_soup` averages it with the fold networks);
- `teacher_clean`: the same number of picks, each the truly mitotic cell the teacher ranks highest
  in its image (no pick where the image has no found mitotic cell): what perfect picks would give;
- `true_positives`: every truly mitotic found cell of the Mitosis images, the same negatives: what
  more positives add;
- `cell_labels`: every truly mitotic found cell against every other found cell (the ceiling's
  training, also using the Mitosis images' other cells as negatives).

Truth is `boxes.csv` of the fitting scenes: a benchmark's diagnostic only, as in the ceiling.
Reported per way: validation image AUC (best cell), pointing game, cell AUC
(`cells_pseudo_positives.scores`), positives, their share truly mitotic, negatives, seconds.
What it decides (written before its runs): if `teacher_clean` recovers most of the distance from
`teacher` to `cell_labels`, the next recipe to measure is one that makes the picks right more
often; if `true_positives` is needed for it, one that finds more of each image's mitoses.
"""

from __future__ import annotations

import json
import time

import numpy as np

from cells_pseudo_positives import load, scores, untrained
from cells_threshold_transfer import inner_arguments
from common import inner_pair, machine, save_results


def main() -> None:
    args = inner_arguments(__doc__, "small-cells-1024")
    from mitoscope.cells.bootstrap import LinearInstanceHead
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.training import cell_logits, fit_cell_classifier, pseudo_labels

    fit_dir, val_dir = inner_pair(args.work, args.set)
    fit_bags, fit_hit = load(fit_dir)
    val_bags, val_hit = load(val_dir)
    o, labels = fit_bags.offsets, np.asarray(fit_bags.labels)
    every = np.arange(len(labels))
    in_mitosis = np.repeat(labels == 1, np.diff(o))
    mitosis = np.flatnonzero((labels == 1) & (np.diff(o) > 0))
    runs = []
    for seed in args.seeds:
        config = CellTrainConfig(**{"scorer": "finetuned", "seed": seed, **json.loads(args.settings)})
        fit_seed = config.seed * 100  # the product's final fit (cells.training.train_instances)
        network, mean, std, features, stats, trained, start = untrained(config, fit_bags, config.seed)
        picks, negatives = pseudo_labels(features, stats, fit_bags, every, fit_seed, config.positives_per_image)
        teacher = LinearInstanceHead(seed=fit_seed).fit(features, stats, o, labels).decision_function(features, stats)
        assert np.array_equal(np.sort(picks), np.sort([o[k] + int(np.argmax(teacher[o[k]:o[k + 1]])) for k in mitosis]))
        clean = []
        for k in mitosis:
            mitotic = o[k] + np.flatnonzero(fit_hit[o[k]:o[k + 1]])
            if len(mitotic):
                clean.append(int(mitotic[np.argmax(teacher[mitotic])]))
        true = np.flatnonzero(fit_hit & in_mitosis)
        ways = {"teacher": (picks, negatives), "teacher_clean": (np.asarray(clean), negatives),
                "true_positives": (true, negatives), "cell_labels": (np.flatnonzero(fit_hit), np.flatnonzero(~fit_hit))}
        run: dict = {"seed": seed}
        for name, (positives, negs) in ways.items():
            started = time.time()
            network.load_state_dict(start)
            fit_cell_classifier(network, trained, fit_bags.crops, positives, negs, config, fit_seed, mean, std)
            logits = cell_logits(network, val_bags.crops, np.arange(len(val_bags.crops)), config.views, mean, std)
            run[name] = {**scores(logits, val_bags, val_hit), "positives": int(len(positives)),
                         "positives_mitotic": float(fit_hit[positives].mean()), "negatives": int(len(negs)),
                         "seconds": round(time.time() - started, 1)}
            print(json.dumps({"seed": seed, name: run[name]}), flush=True)
        runs.append(run)
        results = {"set": args.set, "config": config.to_dict(), "settings": json.loads(args.settings),
                   "fit_scenes": str(fit_dir), "val_scenes": str(val_dir), "fit_cells": int(len(fit_hit)), "fit_mitotic": int(fit_hit.sum()), "runs": runs}
        save_results(args.out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
