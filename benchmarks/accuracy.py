"""Accuracy of every head on real data (run by hand; results go to benchmarks/results/).

    python benchmarks/accuracy.py scenes --sets large-cells-1024 small-cells-1024 \
        --work /tmp/mitoscope-bench --cache-dir /tmp/mitoscope-cache

For each scene set (composed from the real Jurkat cells by ../shared/tools/compose_scenes.py:
120 training scenes seed 1, 60 test scenes seed 2) and each head: train with 5-fold CV on the
training scenes only (image labels only), then evaluate the saved model on the test scenes.
Records F1, AUC, balanced accuracy and wall times; the equivalent CLI commands are stored
with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from common import (DATA, PRETRAIN_SET, REPO, machine, pretrain_scenes, require_shared, save_results, scene_pair,
                    timed)

from mitoscope.pipeline import TrainConfig, evaluate, localize, open_cache, train

HEADS = ["ensemble", "pooled", "attention"]  # the ensemble's evaluation also reports dense and forest
KEYS = ("f1", "auc", "balanced_accuracy", "accuracy", "threshold")


def scenes(args: argparse.Namespace) -> dict:
    cache = open_cache(args.cache_dir)
    results = {}
    for set_name in args.sets:
        train_dir, test_dir = scene_pair(args.work, set_name)
        for head in args.heads:
            record: dict = {"set": set_name, "head": head}
            record["extraction"] = args.extraction
            suffix = "" if args.extraction == "windows" else f"-{args.extraction}"
            model_dir = args.work / "models" / f"{set_name}-{head}{suffix}"
            config = TrainConfig(head=head, cv=5, seed=0, window=args.window, overlap=args.overlap,
                                 extraction=args.extraction)
            with timed(record, "train_s"):
                result = train(train_dir, train_dir / "labels.csv", model_dir, config, cache, overwrite=True)
            with timed(record, "evaluate_s"):
                test = evaluate(model_dir, test_dir, test_dir / "labels.csv", args.work / "reports" / f"{set_name}-{head}{suffix}", cache)
            record["cv"] = {k: result.cv_metrics.get(k) for k in KEYS}
            record["test"] = {k: test.get(k) for k in KEYS}
            report = json.loads((args.work / "reports" / f"{set_name}-{head}{suffix}" / "metrics.json").read_text())
            # An ensemble's members are the dense and forest heads trained with the same seed:
            # their test metrics (at threshold 0.5) come for free with the ensemble's evaluation.
            record["test_members"] = {name: {k: m.get(k) for k in KEYS} for name, m in report.get("members", {}).items()}
            record["commands"] = [
                f"mitoscope train {train_dir} --labels {train_dir}/labels.csv --out {model_dir} --head {head} --cv 5 --seed 0"
                + ("" if args.extraction == "windows" else f" --extraction {args.extraction}"),
                f"mitoscope evaluate {model_dir} {test_dir} --labels {test_dir}/labels.csv --out REPORT",
            ]
            results[f"{set_name}/{head}{suffix}"] = record
            print(json.dumps(record), flush=True)
    return results


def crops(args: argparse.Namespace) -> dict:
    """Single-cell / single-figure crops: k-fold CV of each head (grouped by slide for H&E)."""
    cache = open_cache(args.cache_dir)
    sets = {
        # Jurkat: 40x40 3-channel uint16 (brightfield, DNA, darkfield) -> one window of 40 px, resized to 224.
        "jurkat-cells": dict(data=DATA / "jurkat-cells", window=40, positive=None, channels=(1, 0, 2)),
        # H&E atypical vs normal mitotic figures, 128 px RGB; CV grouped by slide (the CSV's slide column).
        "he-atypical": dict(data=DATA / "he-mitotic-figures", window=128, positive="atypical", channels=None),
    }
    results = {}
    for set_name in args.sets:
        spec = sets[set_name]
        for head in args.heads:
            record: dict = {"set": set_name, "head": head}
            model_dir = args.work / "models" / f"{set_name}-{head}"
            config = TrainConfig(head=head, cv=5, seed=0, window=spec["window"], overlap=0.0,
                                 positive=spec["positive"], channels=spec["channels"])
            with timed(record, "train_s"):
                result = train(spec["data"], spec["data"] / "labels.csv", model_dir, config, cache, overwrite=True)
            record["cv"] = {k: result.cv_metrics.get(k) for k in KEYS}
            channels = f" --channels {','.join(map(str, spec['channels']))}" if spec["channels"] else ""
            positive = f" --positive {spec['positive']}" if spec["positive"] else ""
            record["commands"] = [
                f"mitoscope train {spec['data']} --labels {spec['data']}/labels.csv --out {model_dir} --head {head} "
                f"--window {spec['window']} --overlap 0 --cv 5 --seed 0{channels}{positive}"
            ]
            results[f"{set_name}/{head}"] = record
            print(json.dumps(record), flush=True)
    return results


# The fine-tuning recipes, fixed before any test number was seen (see the README for why).
# Scenes: 512 px, the last two stages of lite0 + gated attention over the feature map, trained
# on cached frozen-trunk maps of 8 flipped/rotated views (fluorescence: no stain jitter).
# restarts=3: adopted by the rule of finetune_inner.py (inner pair, seeds 0-2: learned on 3 of 3 either
# way, mean validation AUC 0.867 against 0.810; finetune_inner_restarts_large.json).
SCENE_RECIPE = dict(backbone="tf_efficientnet_lite0", size=512, pool="attention", dropout=0.25, unfreeze=2,
                    epochs_head=5, epochs_full=25, lr_head=1e-3, lr_full=3e-4, batch_size=8, trunk_views=8,
                    monitor="loss", patience=30, seed=0, restarts=3)
# H&E crops: 128 px (their size), average pooling (one figure fills the crop), stain jitter on.
CROP_RECIPE = dict(backbone="tf_efficientnet_lite0", size=128, pool="avg", dropout=0.3, unfreeze="all",
                   epochs_head=5, epochs_full=15, lr_head=1e-3, lr_full=1e-4, batch_size=32,
                   monitor="loss", patience=30, seed=0, cv=5)
# Adopted by a screen: the whole network on freshly augmented crops (flips, quarter turns, zoom,
# brightness/contrast, stain jitter), as the self-trained cell scorer learns. The recipe before it
# (unfreeze=2, lr_full=3e-4, trunk_views=8: the top two stages on cached maps of 8 views) is
# `--set unfreeze=2 --set lr_full=3e-4`. Rule written before the screen's run: replace the recipe if
# the new one's seed-0 CV AUC is at least 0.789 (the old seed 0: 0.779, + 0.01) and its seed-0
# balanced accuracy at least 0.709 (the old one's); seeds 1 and 2 are then reported beside the old
# recipe's, also on their own, since seed 0 chose. Results: README, H&E crops.


def _command(data: Path, labels: Path, out: Path, settings: dict, extra: str = "") -> str:
    flags = {"no_stain_jitter": None}
    parts = [f"mitoscope finetune {data} --labels {labels} --out {out}"]
    for key, value in settings.items():
        if key in flags:
            parts.append("--no-stain-jitter")
        else:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts) + extra


def summary(runs: list[dict]) -> dict:
    """Mean and sample sd over the seeds of every number the runs share (e.g. test.auc)."""
    flat: dict[str, list[float]] = {}
    for run in runs:
        for group in ("test", "cv", "localization", "count"):
            for key, value in (run.get(group) or {}).items():
                if isinstance(value, (int, float)) and value is not None:
                    flat.setdefault(f"{group}.{key}", []).append(float(value))
        if "finetune_s" in run:
            flat.setdefault("finetune_s", []).append(run["finetune_s"])
    return {key: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None,
                  "n": len(v)} for key, v in flat.items()}


def learned(run: dict) -> dict:
    """Whether one seed's fine-tuned scene model learnt, by a rule fixed before the guard's test runs:
    its test AUC is above chance (the Hanley-McNeil 95% interval's lower end above 0.5) and its
    attention finds the mitoses (pointing game >= 0.5: the top position lies on a mitotic cell in at
    least half of the Mitosis test scenes)."""
    from mitoscope.evaluation import auc_interval

    test, where = run.get("test") or {}, run.get("localization") or {}
    if test.get("auc") is None or where.get("pointing_game") is None:
        return {}
    low, _ = auc_interval(float(test["auc"]), run["n_test_positive"], run["n_test_negative"])
    return {"auc_low": round(low, 4), "above_chance": low > 0.5, "finds_mitoses": where["pointing_game"] >= 0.5,
            "learned": bool(low > 0.5 and where["pointing_game"] >= 0.5)}


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` settings over a fine-tuning recipe; VALUE is JSON (``unfreeze='"all"'``, ``lr_full=1e-4``)."""
    from mitoscope.finetune import FineTuneConfig

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FineTuneConfig.__dataclass_fields__:
            raise SystemExit(f"--set expects KEY=VALUE with KEY a FineTuneConfig field, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise SystemExit(f"--set {item!r}: VALUE must be JSON ({error})") from None
    return overrides


def finetuned(args: argparse.Namespace) -> dict:
    """The fine-tuned model (`mitoscope finetune`) on scenes (test set) and on H&E crops (grouped CV),
    once per seed in ``args.seeds``; the record holds every run and their mean ± sd."""
    results = {}
    for set_name in args.sets:
        runs = []
        for seed in args.seeds:  # saved after every run: one seed can take the better part of an hour on a CPU
            runs.append(finetuned_once(args, set_name, seed))
            results[f"{set_name}/finetuned"] = {"set": set_name, "model": "finetuned", "seeds": list(args.seeds),
                                                "summary": summary(runs), "runs": runs,
                                                "learned": sum(bool((r.get("learned") or {}).get("learned"))
                                                               for r in runs)}
            save_results(args.out, {"machine": machine(), "results": results})
        print(json.dumps(results[f"{set_name}/finetuned"]["summary"]), flush=True)
    return results


def finetuned_once(args: argparse.Namespace, set_name: str, seed: int) -> dict:
    from mitoscope.augment import AugmentConfig
    from mitoscope.finetune import FineTuneConfig, finetune

    overrides = parse_overrides(args.set)
    record: dict = {"set": set_name, "model": "finetuned", "seed": seed, "backbone": args.backbone,
                    **({"overrides": overrides} if overrides else {})}
    tag = ("" if args.backbone == CROP_RECIPE["backbone"] else f"-{args.backbone}") + "".join(
        f"-{key}{value}" for key, value in overrides.items())
    model_dir = args.work / "models" / f"{set_name}-finetuned{tag}-seed{seed}"
    if set_name == "he-atypical":
        data = DATA / "he-mitotic-figures"
        recipe = {**CROP_RECIPE, "seed": seed, "backbone": args.backbone, **overrides}
        config = FineTuneConfig(**recipe, positive="atypical")
        with timed(record, "finetune_s"):
            result = finetune(data, data / "labels.csv", model_dir, config, overwrite=True)
        record["cv"] = {k: result.cv_metrics.get(k) for k in KEYS}
        record["commands"] = [_command(data, data / "labels.csv", model_dir, recipe, " --positive atypical")]
        record["baseline"] = "published slide-level split, ImageNet EfficientNetV2-S: balanced accuracy 0.71, AUC 0.70"
    else:
        train_dir, test_dir = scene_pair(args.work, set_name)
        extra: dict = {}
        if set_name == "variable-scale":  # pre-trained on tiles of large images first (the write-up's Round 2)
            pre = pretrain_scenes(args.work)
            extra = dict(pretrain_data=str(pre), pretrain_labels=str(pre / "labels.csv"), tile=1024, tile_overlap=0.25)
            record["pretrain"] = {"set": PRETRAIN_SET[0], "compose_args": PRETRAIN_SET[1], "n": PRETRAIN_SET[2],
                                  "seed": PRETRAIN_SET[3]}
        config = FineTuneConfig(**{**SCENE_RECIPE, "seed": seed, "backbone": args.backbone, **overrides}, **extra,
                                augment=AugmentConfig(stain_jitter=False))
        with timed(record, "finetune_s"):
            finetune(train_dir, train_dir / "labels.csv", model_dir, config, overwrite=True)
        report_dir = args.work / "reports" / f"{set_name}-finetuned-seed{seed}"
        with timed(record, "evaluate_s"):
            test = evaluate(model_dir, test_dir, test_dir / "labels.csv", report_dir)
        record["test"] = {k: test.get(k) for k in KEYS}
        with timed(record, "localize_s"):
            where = localize(model_dir, test_dir, test_dir / "boxes.csv", report_dir / "localization",
                             labels_csv=test_dir / "labels.csv")
        record["localization"] = {k: where.get(k) for k in ("pointing_game", "pointing_game_centre", "window_auc",
                                                             "mean_image_window_auc")}
        test_y = [row["Label"] == "Mitosis" for row in csv.DictReader(open(test_dir / "labels.csv", newline=""))]
        record["n_test_positive"], record["n_test_negative"] = sum(test_y), len(test_y) - sum(test_y)
        record["learned"] = learned(record)
        history = model_dir / "history.csv"
        record["guard"] = ([row["guard"] for row in csv.DictReader(open(history, newline="")) if row.get("guard")]
                           if history.is_file() else None)
        settings = {**SCENE_RECIPE, "seed": seed, "backbone": args.backbone, **overrides, **extra,
                    "no_stain_jitter": True}
        record["commands"] = [
            _command(train_dir, train_dir / "labels.csv", model_dir, settings),
            f"mitoscope evaluate {model_dir} {test_dir} --labels {test_dir}/labels.csv --out REPORT",
            f"mitoscope localize {model_dir} {test_dir} --boxes {test_dir}/boxes.csv --out REPORT/localization",
        ]
    record["history"] = (model_dir / "history.csv").read_text() if (model_dir / "history.csv").is_file() else None
    print(json.dumps({k: v for k, v in record.items() if k != "history"}), flush=True)
    return record


def cells(args: argparse.Namespace) -> dict:
    """The cell model (`mitoscope train --head cells`) once per seed: test AUC/F1, the pointing
    game, and the mitotic count's mean absolute error against boxes.csv; saved after every run."""
    results: dict = {}
    for set_name in args.sets:
        runs = []
        for seed in args.seeds:
            runs.append(cells_once(args, set_name, seed))
            results[f"{set_name}/cells"] = {"set": set_name, "model": "cells", "seeds": list(args.seeds),
                                            "summary": summary(runs), "runs": runs}
            save_results(args.out, {"machine": machine(), "results": results})
        print(json.dumps(results[f"{set_name}/cells"]["summary"]), flush=True)
    return results


def count_errors(pred, boxes_csv: Path) -> dict:
    """Mean absolute error of the per-image mitotic count against the true boxes."""
    from mitoscope.localization import load_boxes

    truth = load_boxes(boxes_csv)
    errors = [abs(int(c) - len(truth.get(p.name, ()))) for p, c in zip(pred.paths, pred.counts)]
    true_counts = [len(truth.get(p.name, ())) for p in pred.paths]
    return {"count_mae": round(float(np.mean(errors)), 4), "true_count_mean": round(float(np.mean(true_counts)), 4),
            "predicted_count_mean": round(float(np.mean(pred.counts)), 4)}


def cells_once(args: argparse.Namespace, set_name: str, seed: int) -> dict:
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.workflow import train_cells
    from mitoscope.evaluation import compute_metrics
    from mitoscope.io import load_labelled_images
    from mitoscope.localization import localization_report
    from mitoscope.models import load_model

    from mitoscope.cli import parse_head_params

    params = parse_head_params(args.head_param)
    config = CellTrainConfig(seed=seed, **({"scorer": args.scorer} if args.scorer else {}), **params)
    record: dict = {"set": set_name, "model": "cells", "scorer": config.scorer, "seed": seed, "settings": params}
    train_dir, test_dir = scene_pair(args.work, set_name)
    tag = "".join(f"-{k}{v}" for k, v in sorted(params.items()))
    model_dir = args.work / "models" / f"{set_name}-cells-{config.scorer}{tag}-seed{seed}"
    with timed(record, "train_s"):
        result = train_cells(train_dir, train_dir / "labels.csv", model_dir, config, overwrite=True)
    record["train_seconds"] = result.seconds
    record["validation"] = {k: (result.cv_metrics or {}).get(k) for k in KEYS}
    record["warnings"] = result.warnings
    model = load_model(model_dir)
    data = load_labelled_images(test_dir, test_dir / "labels.csv", model.positive)
    with timed(record, "predict_s"):
        pred = model.predict_paths(data.paths, with_window_scores=True)
    record["engine"] = getattr(model, "engine", None)
    test = compute_metrics(data.y, pred.proba, model.threshold, tuple(model.classes))
    record["test"] = {k: test.get(k) for k in KEYS}
    where = localization_report(pred, test_dir / "boxes.csv", labels=data.y)
    record["localization"] = {k: where.get(k) for k in ("pointing_game", "pointing_game_centre", "window_auc",
                                                         "mean_image_window_auc")}
    record["count"] = count_errors(pred, test_dir / "boxes.csv")
    scorer = (f" --head-param scorer={config.scorer}" if args.scorer else "") + "".join(
        f" --head-param {pair}" for pair in args.head_param)
    record["commands"] = [f"mitoscope train {train_dir} --labels {train_dir}/labels.csv --out {model_dir} --seed {seed}"
                          + scorer,
                          f"mitoscope evaluate {model_dir} {test_dir} --labels {test_dir}/labels.csv --out REPORT"]
    record["history"] = (model_dir / "history.csv").read_text() if (model_dir / "history.csv").is_file() else None
    print(json.dumps({k: v for k, v in record.items() if k != "history"}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("scenes", help="composed whole-image scenes, every window head")
    p.add_argument("--sets", nargs="+", default=["large-cells-1024", "small-cells-1024"])
    p.add_argument("--heads", nargs="+", default=HEADS)
    p.add_argument("--window", type=int, default=224)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--extraction", choices=["windows", "fullconv"], default="windows",
                   help="fullconv: window vectors pooled from one whole-image pass (compare with windows)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scenes_round1.json")
    c = sub.add_parser("crops", help="single cells (Jurkat) and H&E figure crops, k-fold CV")
    c.add_argument("--sets", nargs="+", default=["jurkat-cells", "he-atypical"])
    c.add_argument("--heads", nargs="+", default=["ensemble", "pooled"])
    c.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    c.add_argument("--cache-dir", type=Path, default=None)
    c.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "crops_round1.json")
    f = sub.add_parser("finetune", help="the fine-tuned model: scenes (test set, localization) and H&E crops (CV)")
    f.add_argument("--sets", nargs="+", default=["large-cells-1024", "small-cells-1024", "variable-scale", "he-atypical"])
    f.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one fine-tuning run per seed")
    f.add_argument("--backbone", default=CROP_RECIPE["backbone"],
                   help="the network fine-tuned (offline weights: tf_efficientnet_lite0, lite1, lite2)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting over the recipe (FineTuneConfig field, JSON value), e.g. lr_full=1e-4")
    f.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    f.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune.json")
    m = sub.add_parser("cells", help="the cell model (the default of train): scenes, test set, counts")
    m.add_argument("--sets", nargs="+", default=["small-cells-1024", "small-cells-2048", "large-cells-1024",
                                                 "variable-scale"])
    m.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    m.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    m.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells.json")
    m.add_argument("--scorer", choices=["linear", "finetuned"], default=None,
                   help="the cell scorer (default: the product's default)")
    m.add_argument("--head-param", action="append", default=[], metavar="KEY=VALUE",
                   help="another setting of the cell model, as `mitoscope train --head-param` takes it")
    args = parser.parse_args()
    require_shared()
    args.work.mkdir(parents=True, exist_ok=True)
    run = {"scenes": scenes, "crops": crops, "finetune": finetuned, "cells": cells}[args.what]
    results = {"machine": machine(), "results": run(args)}
    save_results(args.out, results)


if __name__ == "__main__":
    main()
