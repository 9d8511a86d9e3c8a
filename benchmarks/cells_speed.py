"""4K predict with the cell model (the default of ``train``), against the plain way, in one run.

    python benchmarks/cells_speed.py [--model MODEL_DIR] [--repeats 3] [--before OLD_CHECKOUT/src]
                                     [--other-model MODEL_DIR]

The image: one crowded 3840x2160 field composed from the real Jurkat cells
(``compose_scenes.py --size 3840x2160 --cell-scale 1.5,2 --cells 400,500 --seed 3 --part test``:
the density of the crowded 1024 scenes, 8 times the area). The model: ``--model`` (a trained
cell model) or, without it, one saved from the untrained network (its size is the real one;
its quality does not matter for timing).

Measured: ``mitoscope predict MODEL IMAGE --out x.csv`` as a subprocess (wall time, process
start included, and peak resident memory), served by the exported network (OpenVINO); the
same prediction in PyTorch (``serve=False``); and the plain loop a user would write: the same
cells scored one crop at a time in PyTorch under ``torch.no_grad``. Targets: < 6 s, < 3 GB.
With ``--before``, the served command also runs on an older checkout's code (e.g. a
``git worktree`` of the commit before a speed change), in turn with the current one, so that
the ratio holds even when the machine's speed drifts during the run. With ``--other-model``,
another model's served predict runs in turn the same way (e.g. the other scorer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from common import COMPOSE, DATA, REPO, machine, save_results
from speed import mitoscope_command, run_measured


def compose_image(work: Path) -> Path:
    out = work / "scene-4k"
    if not (out / "labels.csv").is_file():
        subprocess.run([sys.executable, str(COMPOSE), str(DATA / "jurkat-cells"), str(out), "--n", "1", "--size",
                        "3840x2160", "--cell-scale", "1.5,2", "--cells", "400,500", "--seed", "3", "--part", "test"],
                       check=True, capture_output=True)
    return next((out / "images").glob("*.png"))


def untrained_model(work: Path) -> Path:
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.model import CellModel
    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.proposals import CROP_DIAMETERS
    from mitoscope.io import ReadOptions

    out = work / "model-untrained"
    if (out / "model.json").is_file():
        return out
    config = CellTrainConfig()
    network, backbone = build_cell_network(config.backbone)
    model = CellModel({"kind": "cells", "backbone": backbone.describe(),
                       "cells": {"input_size": config.input_size, "crop_diameters": CROP_DIAMETERS, "min_diameter": 8.0,
                                 "dropout": config.dropout, "pooling": "max"},
                       "read": ReadOptions().to_dict(), "source_images": None, "classes": ["Normal", "Mitosis"],
                       "positive": "Mitosis", "threshold": 0.5, "head": {"name": "cells", "params": config.to_dict()},
                       "train_image_size": None}, network.eval())
    model.save(out, overwrite=True)
    return out


def plain_loop(model_dir: Path, image_path: Path) -> dict:
    """The cells scored one crop at a time in PyTorch (each under the model's views): what a user
    would write around the network."""
    from mitoscope.cells.model import CellModel, sigmoid
    from mitoscope.cells.proposals import cut_crops, find_cells
    from mitoscope.io import read_image

    start = time.perf_counter()
    model = CellModel.load(model_dir)
    image = read_image(image_path)
    proposals = find_cells(image)
    crops = cut_crops(image, proposals, model.input_size)
    scores = [float(sigmoid(model.score_crops(crop[None]))[0]) for crop in crops]
    return {"wall_s": round(time.perf_counter() - start, 2), "cells": len(proposals), "max_probability": max(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mitoscope-cells-speed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cells_speed.json")
    parser.add_argument("--before", type=Path, default=None,
                        help="an older checkout's src/: also time its predict, in turn with this one's")
    parser.add_argument("--other-model", type=Path, default=None,
                        help="another trained cell model: also time its served predict, in turn with --model's")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    image = compose_image(args.work)
    model_dir = args.model or untrained_model(args.work)
    env = dict(os.environ)
    results: dict = {"machine": machine(), "image": str(image), "model": str(model_dir)}
    commands: dict[str, tuple[list[str], str, dict[str, str]]] = {}
    out_csv = {variant: args.work / f"predict-{variant}.csv" for variant in ("served", "before", "other", "torch")}

    def served(model: Path, variant: str) -> tuple[list[str], str, dict[str, str]]:
        return ([*mitoscope_command(), "predict", str(model), str(image), "--out", str(out_csv[variant])],
                f"mitoscope predict {model} {image} --out {out_csv[variant]}", env)

    commands["served"] = served(model_dir, "served")
    if args.before:  # the same command on an older checkout's code, its runs taken in turn with the served ones
        commands["before"] = ([sys.executable, "-m", "mitoscope", "predict", str(model_dir), str(image), "--out",
                               str(out_csv["before"])], f"PYTHONPATH={args.before} python -m mitoscope predict ...",
                              {**env, "PYTHONPATH": str(args.before)})
    if args.other_model:  # e.g. the other scorer's model: its runs taken in turn with --model's, same drift
        commands["other"] = served(args.other_model, "other")
    shown = (f"from mitoscope.predictions import predict; predict({str(model_dir)!r}, [{str(image)!r}], "
             f"{str(out_csv['torch'])!r}, serve=False)")
    commands["torch"] = ([sys.executable, "-c", shown], shown, env)
    runs: dict[str, list] = {variant: [] for variant in commands}
    for variant, (command, _, variant_env) in commands.items():
        run_measured(command, variant_env)  # warm-up: the file cache and OpenVINO's compiled-model cache
    for _ in range(args.repeats):
        for variant, (command, _, variant_env) in commands.items():
            runs[variant].append(run_measured(command, variant_env))
    for variant, (_, shown, _) in commands.items():
        results[variant] = {"wall_s": statistics.median([r[0] for r in runs[variant]]),
                            "wall_runs": [r[0] for r in runs[variant]],
                            "peak_rss_mb": max(r[1] for r in runs[variant]), "command": shown,
                            "csv_row": out_csv[variant].read_text().splitlines()[1]}
        print(variant, results[variant], flush=True)
    if args.before:
        found = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True)
        results["before"]["commit"] = found.stdout.strip() or None
        results["speedup_served_vs_before"] = round(results["before"]["wall_s"] / results["served"]["wall_s"], 2)
    if args.other_model:
        results["other"]["model"] = str(args.other_model)
        results["ratio_served_vs_other"] = round(results["served"]["wall_s"] / results["other"]["wall_s"], 2)
    results["plain_loop"] = plain_loop(model_dir, image)
    results["speedup_served_vs_plain"] = round(results["plain_loop"]["wall_s"] / results["served"]["wall_s"], 2)
    results["targets"] = {"under_6_s": results["served"]["wall_s"] < 6, "under_3_gb": results["served"]["peak_rss_mb"] < 3072}
    print(results["plain_loop"], results["speedup_served_vs_plain"], results["targets"], flush=True)
    save_results(args.out, results)


if __name__ == "__main__":
    main()
