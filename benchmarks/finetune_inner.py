"""Settings of the scene fine-tuning recipe compared on the inner pair only: `mitoscope finetune`
with the scene recipe of ``accuracy.py`` (plus each setting) trained on the fitting scenes and
scored on the validation scenes.

    python benchmarks/finetune_inner.py --set large-cells-1024 --seeds 0 1 2 \\
        --settings '{}' '{"restarts": 3}' [--work DIR] --out FILE

A recipe experiment, so it never reads a test scene: the *training* part of the cells split in
halves (`common.inner_pair`: 120 fitting scenes, 60 validation scenes made of other cells). Per
seed and setting: validation AUC, pointing game, the "learned" verdict of ``accuracy.learned``,
the guard's events and the time.

Rule, written before its runs: `restarts=3` joins the scene recipe of ``accuracy.py`` when, over
seeds 0-2 on the large-cell inner pair, it learns (``accuracy.learned``) on more seeds than the
recipe without restarts (`{}` then), or on as many with a higher mean validation AUC. Measured
(`finetune_inner_restarts_large.json`, at 0b0839d): both learn on 3 seeds of 3; mean validation AUC
0.867 (0.833 / 0.881 / 0.887) against 0.810 (0.840 / 0.704 / 0.887), pointing game 0.789 against
0.700: adopted. The recipe now holds it, so the same comparison today is
`--settings '{"restarts": 1}' '{}'`.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from accuracy import SCENE_RECIPE, learned
from common import inner_pair, machine, require_shared, save_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="large-cells-1024")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of FineTuneConfig fields")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    require_shared()
    from mitoscope.augment import AugmentConfig
    from mitoscope.finetune import FineTuneConfig, finetune
    from mitoscope.pipeline import evaluate, localize

    fit_dir, val_dir = inner_pair(args.work, args.set)
    with open(val_dir / "labels.csv", newline="") as handle:
        val_y = [row["Label"] == "Mitosis" for row in csv.DictReader(handle)]
    runs = []
    for text in args.settings:
        setting = json.loads(text)
        for seed in args.seeds:
            name = f"inner-{args.set}-seed{seed}" + "".join(f"-{k}{v}" for k, v in setting.items())
            model_dir = args.work / "models" / name
            config = FineTuneConfig(**{**SCENE_RECIPE, "seed": seed, **setting}, augment=AugmentConfig(stain_jitter=False))
            started = time.time()
            finetune(fit_dir, fit_dir / "labels.csv", model_dir, config, overwrite=True)
            seconds = round(time.time() - started, 1)
            report = args.work / "reports" / name
            scores = evaluate(model_dir, val_dir, val_dir / "labels.csv", report)
            where = localize(model_dir, val_dir, val_dir / "boxes.csv", report / "localization",
                             labels_csv=val_dir / "labels.csv")
            with open(model_dir / "history.csv", newline="") as handle:
                history = list(csv.DictReader(handle))
            run = {"seed": seed, "settings": setting, "finetune_s": seconds,
                   "test": {k: scores.get(k) for k in ("auc", "f1", "balanced_accuracy")},
                   "localization": {"pointing_game": where.get("pointing_game")},
                   "n_test_positive": sum(val_y), "n_test_negative": len(val_y) - sum(val_y),
                   "guard": [row["guard"] for row in history if row.get("guard")],
                   "best_epochs": [(p["phase"], p["best_epoch"]) for p in
                                   json.loads((model_dir / "model.json").read_text())["training"]["phases"]]}
            run["learned"] = learned(run)
            runs.append(run)
            print(json.dumps(run), flush=True)
            save_results(args.out, {"machine": machine(), "results": {
                "set": args.set, "recipe": SCENE_RECIPE, "fit_scenes": str(fit_dir), "val_scenes": str(val_dir),
                "note": "scores of the inner validation scenes (cells of the training part, none in the fitting "
                        "scenes); the keys say test only to share accuracy.learned", "runs": runs}})


if __name__ == "__main__":
    main()
