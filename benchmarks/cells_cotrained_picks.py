"""Who names the final network's pseudo-positives: the linear teacher alone (the product) or the
teacher refitted with each cell's out-of-fold network logit (`final_picks=cotrained`)?

    python benchmarks/cells_cotrained_picks.py --set small-cells-1024 --seeds 0 1 [--work DIR] --out FILE

A recipe experiment on the inner pair (`common.inner_pair`: 120 fitting scenes and 60 validation
scenes, both from the *training* part of the cells; no test scene is read). Why: with the cell
labels the product's network reaches a crowded scene AUC of 0.943, from image labels 0.826; the
label-gap diagnostic (`cells_label_gap.py`, README) showed that the teacher's 10 wrong picks of
60 cost 0.06 of validation AUC, so the next recipe should make the picks right more often. The
held-out networks alone pick worse than the teacher (72% against 83% mitotic,
`cells_pseudo_positives.py`): they lack the teacher's bag constraint (some cell of a Mitosis
image is mitotic), which the teacher has only on weak frozen features. `cotrained` gives the
teacher both: its features plus the out-of-fold logit of the cross-validation network that did
not train on the cell's image (the three fold networks the product trains anyway, for its
threshold), so the final network learns those picks at no extra training.

For each seed the product's whole training runs once on the fitting scenes with
`final_picks=cotrained` (everything else the product's recipe: `fold_soup` on). Its fold networks
are the product's, step for step (the same seeds and picks; the out-of-fold scores and threshold
are checked against the product's run in `cells_fold_soup_SET.json`), so the product's numbers for
the same seed are those of that run's soup. Reported per seed: validation image AUC, pointing game,
cell AUC, and at the product's threshold balanced accuracy, F1 and count error
(`cells_threshold_transfer.called`), for the soup and the final network alone; and how often each
way's picks on the fitting scenes are truly mitotic (`boxes.csv` of the fitting scenes, a
diagnostic only: nothing is trained on it).

Rule, written before its runs: `cotrained` becomes the default when, over seeds 0 and 1, the
soup's mean validation AUC is higher than the product's soup (`cells_fold_soup_SET.json`, the same
seeds) on both crowded 1024 and few large cells, and its mean pointing game is not lower on either
by more than one validation scene's share (1/30).

Also recorded, a diagnostic for another question (added before the first full run): the same
networks' validation scores under the first 4 of the 8 views (`views4`), what a prediction with 4
views would give (it would bring the default's 4K predict under 6 s: README, Speed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cells_pseudo_positives import scores
from cells_threshold_transfer import called, inner_arguments, load, trained
from common import inner_pair, machine, save_results

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    args = inner_arguments(__doc__, "small-cells-1024")
    from mitoscope.cells import training
    from mitoscope.evaluation import best_f1_threshold

    fit_dir, val_dir = inner_pair(args.work, args.set)
    fit_bags, fit_hit, _ = load(fit_dir)
    val_bags, val_hit, val_counts = load(val_dir)
    every = np.arange(len(val_bags.crops))
    product = {run["seed"]: run for run in
               json.loads((RESULTS / f"cells_fold_soup_{args.set}.json").read_text())["results"]["runs"]}

    # The final fit's teacher picks, for the diagnostic: the same call without the extra column.
    original = training.pseudo_labels
    teacher_picks: list[np.ndarray] = []

    def recording(frozen, stats, bags, images, seed, per_image=1):
        if len(images) == len(bags) and stats.shape[1] > 6 * bags.crops.shape[-1]:
            teacher_picks.append(original(frozen, stats[:, :-1], bags, images, seed, per_image)[0])
        return original(frozen, stats, bags, images, seed, per_image)

    training.pseudo_labels = recording
    runs = []
    for seed in args.seeds:
        started = time.time()
        teacher_picks.clear()
        config, network, mean, std, fit = trained(fit_bags, {"final_picks": "cotrained", "seed": seed,
                                                             **json.loads(args.settings)})
        threshold = float(best_f1_threshold(fit["val_labels"], fit["val_proba"]))
        run: dict = {"seed": seed, "threshold": threshold,
                     "product_threshold": product.get(seed, {}).get("threshold"),
                     "picks_truly_mitotic": {"teacher": float(fit_hit[teacher_picks[0]].mean()),
                                             "cotrained": float(fit_hit[fit["final_positives"]].mean()),
                                             "of": int(len(fit["final_positives"])),
                                             "changed": int(np.sum(~np.isin(fit["final_positives"],
                                                                            teacher_picks[0])))}}
        soup_logits = training.cell_logits(network, val_bags.crops, every, config.views, mean, std)
        soup_views4 = training.cell_logits(network, val_bags.crops, every, 4, mean, std)
        network.load_state_dict(fit["soup"]["final_alone"])
        final_logits = training.cell_logits(network, val_bags.crops, every, config.views, mean, std)
        final_views4 = training.cell_logits(network, val_bags.crops, every, 4, mean, std)
        for name, logits in (("final", final_logits), ("soup", soup_logits)):
            run[name] = {**scores(logits, val_bags, val_hit), **called(logits, val_bags, val_counts, threshold)}
        run["views4"] = {name: scores(logits, val_bags, val_hit)
                         for name, logits in (("final", final_views4), ("soup", soup_views4))}
        if seed in product:
            run["product_soup"] = product[seed]["soup"]
        run["seconds"] = round(time.time() - started, 1)
        runs.append(run)
        print(json.dumps(run), flush=True)
        results = {"set": args.set, "config": config.to_dict(), "settings": json.loads(args.settings),
                   "fit_scenes": str(fit_dir), "val_scenes": str(val_dir), "runs": runs}
        mine = [r["soup"] for r in runs]
        theirs = [r["product_soup"] for r in runs if "product_soup" in r]
        if len(theirs) == len(mine):
            results["mean"] = {way: {k: float(np.mean([r[k] for r in rows])) for k in ("auc", "pointing", "cell_auc")}
                               for way, rows in (("cotrained_soup", mine), ("product_soup", theirs))}
        save_results(args.out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
