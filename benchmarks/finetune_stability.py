"""Why the scene fine-tuning collapsed, measured: per-epoch diagnostics of its two phases.

    python benchmarks/finetune_stability.py --batchnorm train --gradient-clip 0 --seed 0 --stop-after 10
    python benchmarks/finetune_stability.py --batchnorm frozen --gradient-clip 1 --seed 0 --stop-after 10

Trains the scene recipe of ``accuracy.py`` (large-cell scenes, cell-disjoint training part) and
prints, for every epoch: the learning rates, the median and largest gradient norm of each
parameter group (before clipping), the spread of the training logits, the fraction of the
final feature map that is dead (<= 0 after the last BatchNorm and ReLU6) or saturated (>= 6),
and the mean largest attention weight (1/256 is uniform). Phase 2 stops after
``--stop-after`` epochs (the collapse came at the peak learning rate, epoch 4 of 25).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import SCENE_RECIPE
from common import REPO, machine, require_shared, save_results, scene_pair
from lightning.pytorch.callbacks import Callback

from mitoscope.augment import AugmentConfig
from mitoscope.finetune import FineTuneConfig, finetune


class Diagnostics(Callback):
    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.rows: list[dict] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.norms: dict[str, list[float]] = {}
        self.dead: list[float] = []
        self.saturated: list[float] = []
        self.peak: list[float] = []

        def final_map(_, __, out):
            out = out.detach().float()
            self.dead.append(float((out <= 0).float().mean()))
            self.saturated.append(float((out >= 5.999).float().mean()))

        def attention(_, __, out):
            self.peak.append(float(out[2].detach().max(dim=1).values.mean()))

        self.hooks = [module.network.backbone.bn2.register_forward_hook(final_map)]
        if module.network.pool == "attention":
            self.hooks.append(module.network.head.register_forward_hook(attention))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        for group in optimizer.param_groups:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in group["params"] if p.grad is not None))
            self.norms.setdefault(group.get("name", "?"), []).append(float(norm))

    def on_train_epoch_end(self, trainer, module) -> None:
        for hook in self.hooks:
            hook.remove()
        row = {"phase": module.tag.get("phase"), "epoch": trainer.current_epoch + 1,
               "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
               "grad_norm": {k: {"median": round(float(np.median(v)), 3), "max": round(float(np.max(v)), 3)}
                             for k, v in self.norms.items()},
               # the epoch's history row is written at its validation end, before this hook
               "train_logit_sd": round(float(module.history[-1].get("train_logit_sd", float("nan"))), 4),
               "train_auc": round(float(module.history[-1].get("train_auc", float("nan"))), 4),
               "dead_fraction": round(float(np.mean(self.dead)), 4),
               "saturated_fraction": round(float(np.mean(self.saturated)), 4),
               "attention_peak": round(float(np.mean(self.peak)), 4) if self.peak else None}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if module.tag.get("phase") == "full" and trainer.current_epoch + 1 >= self.stop_after:
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batchnorm", choices=["frozen", "train"], default="frozen")
    parser.add_argument("--gradient-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mitoscope-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a setting of the scene recipe (e.g. lr_full=1e-4)")
    args = parser.parse_args()
    require_shared()
    train_dir, _ = scene_pair(args.work, "large-cells-1024")  # the training part only
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    # one attempt: the diagnostics follow one run of phase 2
    config = FineTuneConfig(**{**SCENE_RECIPE, "seed": args.seed, "restarts": 1, **overrides}, batchnorm=args.batchnorm,
                            gradient_clip=args.gradient_clip, augment=AugmentConfig(stain_jitter=False))
    diagnostics = Diagnostics(args.stop_after)
    name = f"stability-bn{args.batchnorm}-clip{args.gradient_clip:g}-seed{args.seed}" + "".join(
        f"-{key}{value}" for key, value in overrides.items())
    start = time.perf_counter()
    finetune(train_dir, train_dir / "labels.csv", args.work / "models" / name, config, overwrite=True,
             callbacks=[diagnostics])
    history = (args.work / "models" / name / "history.csv").read_text()
    out = args.out or REPO / "benchmarks" / "results" / f"finetune_{name.replace('-', '_')}.json"
    save_results(out, {"machine": machine(), "settings": vars(args) | {"work": str(args.work), "out": str(out)},
                       "seconds": round(time.perf_counter() - start, 1), "epochs": diagnostics.rows,
                       "history_csv": history})


if __name__ == "__main__":
    main()
