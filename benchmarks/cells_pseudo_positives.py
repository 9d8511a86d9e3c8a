"""Which cells should the self-trained scorer learn as mitotic? Measured on the inner pair only.

    python benchmarks/cells_pseudo_positives.py [--set small-cells-1024] [--work /tmp/mitoscope-bench]

A recipe experiment, so it never reads a test scene: the *training* part of the cells split in
halves (`common.inner_pair`: 120 fitting scenes, 60 validation scenes). The self-trained scorer
(`--head-param scorer=finetuned`) learns each Mitosis image's best cell under a linear
multiple-instance teacher (`cells.training.pseudo_labels`). Compared, for the final network:

- `teacher`: the product's recipe, the teacher's picks (fitted on all fitting images);
- `student_oof`: a second round of self-training at no extra training, the best cell under the
  3-fold cross-validation network that did not train on the image;
- `agree_only` (added after the first two were seen): the teacher's picks on the images where
  the held-out network picks the same cell, no pseudo-positive on the others;
- `teacher_top2` (added after the first three were seen): the teacher's best two cells of each
  Mitosis image (a Mitosis scene holds 1-3 mitoses).

Reported: validation AUC (each scene scores as its best cell), pointing game (the best cell of a
Mitosis scene lies in one of its `boxes.csv` boxes), cell AUC (cells in a box against every cell
of a Normal scene), and how often each way's picks on the *fitting* scenes are truly mitotic
(their boxes serve as a diagnostic only; nothing is trained on them). The first two ways were
fixed before any number was seen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import found_cells, inner_pair, machine, mitotic_flags, require_shared, save_results


def load(folder: Path):
    """The product's cells of a folder's scenes as bags, and whether each is mitotic (boxes.csv)."""
    from mitoscope.cells.training import Bags

    crops, centres, offsets, names, y = found_cells(folder)
    return Bags(crops, offsets, y), mitotic_flags(folder, names, offsets, centres)


def untrained(config, bags, seed: int = 0) -> tuple:
    """(network, mean, std, features, stats, trained, start): the untrained cell network of
    ``config`` (head drawn under ``seed``), its normalisation, the teacher's inputs on ``bags``
    (frozen features, intensity statistics), its trained parameters and its starting weights:
    what every way here starts from."""
    import torch

    from mitoscope.cells.bootstrap import intensity_features
    from mitoscope.cells.network import build_cell_network, trained_parameters
    from mitoscope.cells.training import frozen_features

    torch.manual_seed(seed)
    network, backbone = build_cell_network(config.backbone, dropout=config.dropout)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    features, _ = frozen_features(network, bags, config, mean, std)
    return (network, mean, std, features, intensity_features(bags.crops),
            trained_parameters(network, config.trained_stages),
            {k: v.detach().clone() for k, v in network.state_dict().items()})


def scores(logits: np.ndarray, bags, hit: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    o = bags.offsets
    best = np.array([logits[o[k]:o[k + 1]].max() if o[k + 1] > o[k] else -60 for k in range(len(o) - 1)])
    mitosis = [k for k in range(len(o) - 1) if bags.labels[k] == 1 and o[k + 1] > o[k]]
    pointing = float(np.mean([hit[o[k] + int(np.argmax(logits[o[k]:o[k + 1]]))] for k in mitosis]))
    negatives = np.concatenate([np.arange(o[k], o[k + 1]) for k in range(len(o) - 1) if bags.labels[k] == 0])
    positives = np.flatnonzero(hit)
    cell_auc = roc_auc_score(np.r_[np.ones(len(positives)), np.zeros(len(negatives))],
                             np.r_[logits[positives], logits[negatives]])
    return {"auc": float(roc_auc_score(bags.labels, best)), "pointing": pointing, "cell_auc": float(cell_auc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="small-cells-1024")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cells_pseudo_positives.json")
    args = parser.parse_args()
    require_shared()
    from sklearn.model_selection import StratifiedKFold

    from mitoscope.cells.bootstrap import LinearInstanceHead
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.training import _subset, cell_logits, fit_cell_classifier, pseudo_labels

    started = time.time()
    fit_dir, val_dir = inner_pair(args.work, args.set)
    fit_bags, fit_hit = load(fit_dir)
    val_bags, val_hit = load(val_dir)

    config = CellTrainConfig(scorer="finetuned")
    network, mean, std, features, stats, trained, start = untrained(config, fit_bags)
    o, labels = fit_bags.offsets, fit_bags.labels
    every = np.arange(len(labels))
    mitosis = [k for k in every if labels[k] == 1 and o[k + 1] > o[k]]
    results: dict = {"set": args.set, "config": config.to_dict(), "fit_scenes": str(fit_dir), "val_scenes": str(val_dir),
                     "found_cells": {"fit": len(fit_bags.crops), "val": len(val_bags.crops)},
                     "cells_in_boxes": {"fit": int(fit_hit.sum()), "val": int(val_hit.sum())}}

    teacher_positives, negatives = pseudo_labels(features, stats, fit_bags, every, 0)
    oof = np.zeros(len(fit_bags.crops))
    for fold, (train, held) in enumerate(StratifiedKFold(3, shuffle=True, random_state=0).split(labels, labels)):
        network.load_state_dict(start)
        positives, fold_negatives = pseudo_labels(features, stats, fit_bags, train, fold + 1)
        fit_cell_classifier(network, trained, fit_bags.crops, positives, fold_negatives, config, fold + 1, mean, std)
        index, _ = _subset(o, held)
        oof[index] = cell_logits(network, fit_bags.crops, index, config.views, mean, std)
    student_positives = np.array([o[k] + int(np.argmax(oof[o[k]:o[k + 1]])) for k in mitosis])
    results["out_of_fold_on_fit_scenes"] = scores(oof, fit_bags, fit_hit)

    # How often the picks on the fitting scenes are mitotic: top-1 and top-2 of each way, and the
    # images where the two ways agree (a diagnostic; the fitting scenes' boxes train nothing).
    teacher = LinearInstanceHead(seed=0).fit(features, stats, o, labels).decision_function(features, stats)

    def ranks(x: np.ndarray, k: int) -> np.ndarray:
        part = x[o[k]:o[k + 1]]
        return np.argsort(np.argsort(part)) / max(1, len(part) - 1)

    picks = {}
    for name, score in (("teacher", lambda k: teacher[o[k]:o[k + 1]]), ("student_oof", lambda k: oof[o[k]:o[k + 1]]),
                        ("rank_mean", lambda k: ranks(teacher, k) + ranks(oof, k))):
        top1 = [o[k] + int(np.argmax(score(k))) for k in mitosis]
        top2 = [o[k] + int(i) for k in mitosis for i in np.argsort(-score(k))[:2]]
        picks[name] = {"top1_precision": float(fit_hit[top1].mean()), "top2_precision": float(fit_hit[top2].mean())}
    agree = [k for k in mitosis if np.argmax(teacher[o[k]:o[k + 1]]) == np.argmax(oof[o[k]:o[k + 1]])]
    picks["agree"] = {"images": len(agree), "of": len(mitosis),
                      "precision": float(np.mean([fit_hit[o[k] + int(np.argmax(teacher[o[k]:o[k + 1]]))] for k in agree]))}
    results["picks_on_fit_scenes"] = picks

    # Added after the first two were seen (validation scenes only): the teacher's picks where the
    # held-out network agrees, the other Mitosis images left without a pseudo-positive.
    agreed = teacher_positives[teacher_positives == student_positives]
    # Added after the three above were seen: the teacher's best two cells of each Mitosis image.
    top_two = pseudo_labels(features, stats, fit_bags, every, 0, per_image=2)[0]
    for variant, positives in (("teacher", teacher_positives), ("student_oof", student_positives),
                               ("agree_only", agreed), ("teacher_top2", top_two)):
        network.load_state_dict(start)
        fit_cell_classifier(network, trained, fit_bags.crops, positives, negatives, config, 0, mean, std)
        logits = cell_logits(network, val_bags.crops, np.arange(len(val_bags.crops)), config.views, mean, std)
        results[variant] = scores(logits, val_bags, val_hit)
    results["seconds"] = round(time.time() - started, 1)
    save_results(args.out, {"machine": machine(), "results": results})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
