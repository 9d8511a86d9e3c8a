"""The self-trained cell scorer's final network alone against the mean of its weights and the fold
networks' (`fold_soup`), compared on the inner pair.

    python benchmarks/cells_fold_soup.py --set small-cells-1024 --seeds 0 1 [--work DIR] --out FILE

A recipe experiment, so it never reads a test scene: the *training* part of the cells split in
halves (`common.inner_pair`: 120 fitting scenes, 60 validation scenes). For each seed the
product's whole training runs once on the fitting scenes (`train_instances`, scorer `finetuned`,
3-fold cross-validation, then one network on all of them) with `fold_soup=True`, and both
networks score the validation scenes: the soup (the mean of the four networks' weights, all
trained from the same start) and the final network alone (the product's rule now). Reported for
each (`cells_pseudo_positives.scores`): image AUC, pointing game, cell AUC; and at the product's
threshold (max F1 on the out-of-fold scores, the same for both) the balanced accuracy, F1 and the
count's mean absolute error (`cells_threshold_transfer.called`).

Why: the four networks of one training differ in their data and seed; a mean of their weights is
one network (no cost at prediction) and may be steadier on cells none of them saw than the final
network alone, whose scale also differs from the fold networks' that chose the threshold.

Rule, written before its runs (README, "The self-trained scorer"): `fold_soup` becomes the
default when, over seeds 0 and 1, its mean validation AUC is higher than the final network's on
both crowded 1024 and few large cells, and its mean pointing game is not lower on either by more
than one validation scene's share (1/30).
"""

from __future__ import annotations

import json
import time

import numpy as np

from cells_pseudo_positives import scores
from cells_threshold_transfer import called, inner_arguments, load, trained
from common import inner_pair, machine, save_results


def main() -> None:
    args = inner_arguments(__doc__, "small-cells-1024")
    from mitoscope.cells.training import cell_logits
    from mitoscope.evaluation import best_f1_threshold

    fit_dir, val_dir = inner_pair(args.work, args.set)
    fit_bags, _, _ = load(fit_dir)
    val_bags, val_hit, val_counts = load(val_dir)
    every = np.arange(len(val_bags.crops))
    runs = []
    for seed in args.seeds:
        started = time.time()
        config, network, mean, std, fit = trained(fit_bags, {"fold_soup": True, "seed": seed,
                                                             **json.loads(args.settings)})
        threshold = float(best_f1_threshold(fit["val_labels"], fit["val_proba"]))
        run: dict = {"seed": seed, "networks": fit["soup"]["networks"], "threshold": threshold}
        soup_logits = cell_logits(network, val_bags.crops, every, config.views, mean, std)
        network.load_state_dict(fit["soup"]["final_alone"])
        final_logits = cell_logits(network, val_bags.crops, every, config.views, mean, std)
        for name, logits in (("final", final_logits), ("soup", soup_logits)):
            run[name] = {**scores(logits, val_bags, val_hit), **called(logits, val_bags, val_counts, threshold)}
        run["seconds"] = round(time.time() - started, 1)
        runs.append(run)
        print(json.dumps(run), flush=True)
        results = {"set": args.set, "config": config.to_dict(), "settings": json.loads(args.settings),
                   "fit_scenes": str(fit_dir), "val_scenes": str(val_dir), "runs": runs}
        save_results(args.out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
