# PROTOTYPE (not the product): does fine-tuning the whole cell encoder on raw, augmented crops
# generalise to cells never seen in training, where the cached-trunk self-training did not?
# Chosen on the TRAINING part of the cells only: common.inner_pair splits it into two halves,
# fitting scenes from one, validation scenes from the other (no test cell is read). Boxes of the
# validation scenes give diagnostics (cell AUC, pointing game), never used for fitting.
#   linear     the product's default: linear MIL on frozen lite0 features (4 views) + statistics
#   selftrain  the product's scorer=finetuned: top 2 stages on cached trunk maps of 8 views
#   full       every layer but BatchNorm fine-tuned on raw crops, each batch freshly augmented
#              (flips, turns, zoom, brightness, contrast), same pseudo-labels as selftrain
#   full-r2    `full` again from ImageNet weights, on pseudo-positives re-picked by `full`
#   +linear    the z-scored mean of a variant's cell logits and the linear scorer's
# usage: python cells_fulltune.py SET WORK [--seeds 0 1] [--epochs 6] [--out FILE]
# Its `selftrain` variant needs the cached-trunk functions of commit 6d3e9f0: run it there.
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cells_ceiling import mitotic_flags  # noqa: E402
from common import inner_pair, machine  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from mitoscope.augment import AugmentConfig, augment_batch  # noqa: E402
from mitoscope.cells.bootstrap import LinearInstanceHead, intensity_features  # noqa: E402
from mitoscope.cells.config import CellTrainConfig  # noqa: E402
from mitoscope.cells.network import (build_cell_network, freeze_for_training, set_batchnorm_eval,  # noqa: E402
                                     split_for)
from mitoscope.cells.proposals import cut_crops, find_cells  # noqa: E402
from mitoscope.cells.training import cell_logits, crop_features, fit_cell_classifier, trunk_maps  # noqa: E402
from mitoscope.cells.views import crop_views  # noqa: E402
from mitoscope.io import ReadOptions, load_labelled_images, read_image  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("set")
ap.add_argument("work", type=Path)
ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
ap.add_argument("--epochs", type=int, default=6)
ap.add_argument("--variants", nargs="+", default=["linear", "selftrain", "full", "full-r2"])
ap.add_argument("--out", type=Path, default=None)
args = ap.parse_args()
t0 = time.time()


def load(folder):
    data = load_labelled_images(folder, folder / "labels.csv")
    crops, centres, offsets = [], [], [0]
    for p in data.paths:
        image = read_image(p, ReadOptions())
        found = find_cells(image)
        crops.append(cut_crops(image, found, 96))
        centres.append(found.centres)
        offsets.append(offsets[-1] + len(found))
    offsets = np.asarray(offsets)
    flags = mitotic_flags(folder, [p.name for p in data.paths], offsets, centres)
    return np.concatenate(crops), offsets, np.asarray(data.y), flags


fit_dir, val_dir = inner_pair(args.work, args.set)
fc, fo, fy, fflags = load(fit_dir)
vc, vo, vy, vflags = load(val_dir)
fstats, vstats = intensity_features(fc), intensity_features(vc)
print(f"{args.set}: fit {len(fy)} images / {len(fc)} cells, val {len(vy)} / {len(vc)}, {time.time() - t0:.0f} s",
      flush=True)


def report(name, seed, scores, seconds, extra=None):
    best = np.array([scores[vo[k]:vo[k + 1]].max() if vo[k + 1] > vo[k] else -1e9 for k in range(len(vy))])
    top = [vo[k] + int(np.argmax(scores[vo[k]:vo[k + 1]])) for k in range(len(vy)) if vy[k] == 1 and vo[k + 1] > vo[k]]
    row = {"variant": name, "seed": seed, "val_image_auc": round(float(roc_auc_score(vy, best)), 4),
           "val_cell_auc": round(float(roc_auc_score(vflags, scores)), 4),
           "val_pointing": round(float(np.mean(vflags[top])), 4), "seconds": round(seconds), **(extra or {})}
    print(json.dumps(row), flush=True)
    return row


def z(s):
    return (s - s.mean()) / (s.std() + 1e-9)


def tta_logits(network, crops, mean, std, views=8, batch=256):
    from mitoscope.cells.training import normalise
    network.eval()
    out = np.zeros(len(crops))
    with torch.no_grad():
        for v in range(views):
            for s in range(0, len(crops), batch):
                x = normalise(crop_views(crops[s:s + batch], v), mean, std)
                out[s:s + len(x)] += network(x).double().numpy()
    return out / views


def pick(scores, offsets, labels):
    pos, neg = [], []
    for k in range(len(labels)):
        lo, hi = offsets[k], offsets[k + 1]
        if hi == lo:
            continue
        if labels[k] == 1:
            pos.append(lo + int(np.argmax(scores[lo:hi])))
        else:
            neg.extend(range(lo, hi))
    return np.asarray(pos), np.asarray(neg)


def train_full(network, mean, std, pos, neg, seed, epochs, backbone_lr=1e-4, head_lr=1e-3):
    """Every layer but BatchNorm; raw crops, each batch augmented afresh."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    aug = AugmentConfig(stain_jitter=False)
    for p in network.parameters():
        p.requires_grad_(True)
    bn = [p for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
          for p in m.parameters(recurse=False)]
    bn_ids = {id(p) for p in bn}
    for p in bn:
        p.requires_grad_(False)
    head_ids = {id(p) for p in network.head.parameters()}
    body = [p for p in network.parameters() if id(p) not in head_ids and id(p) not in bn_ids]
    opt = torch.optim.AdamW([{"params": list(network.head.parameters()), "lr": head_lr},
                             {"params": body, "lr": backbone_lr}], weight_decay=1e-2)
    peak = [g["lr"] for g in opt.param_groups]
    steps = max(1, len(neg) // 48)
    total, step = steps * epochs, 0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    target = torch.cat([torch.ones(16), torch.zeros(48)])
    for epoch in range(epochs):
        network.train()
        set_batchnorm_eval(network)
        order = rng.permutation(neg)
        losses = []
        for k in range(steps):
            n = order[k * 48:(k + 1) * 48]
            if len(n) < 48:
                n = rng.choice(neg, 48)
            chosen = np.concatenate([rng.choice(pos, 16), n])
            x = torch.from_numpy(np.ascontiguousarray(fc[chosen])).permute(0, 3, 1, 2).float().div_(255.0)
            x = (augment_batch(x, aug, gen) - m) / s
            scale = min(1.0, (step + 1) / steps) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g, lr in zip(opt.param_groups, peak):
                g["lr"] = lr * scale
            loss = F.binary_cross_entropy_with_logits(network(x), target)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in network.parameters() if p.requires_grad], 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
        print(f"  epoch {epoch + 1}: loss {np.mean(losses):.4f} ({time.time() - t0:.0f} s)", flush=True)
    network.eval()


rows = []
for seed in args.seeds:
    network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True, dropout=0.2)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    start_state = {k: v.clone() for k, v in network.state_dict().items()}
    t = time.time()
    ffeat = crop_features(network, fc, mean, std, views=4)
    vfeat = crop_features(network, vc, mean, std, views=4)
    linear = LinearInstanceHead(seed=seed).fit(ffeat, fstats, fo, fy)
    lin_fit, lin_val = linear.decision_function(ffeat, fstats), linear.decision_function(vfeat, vstats)
    pos, neg = pick(lin_fit, fo, fy)
    precision = round(float(fflags[pos].mean()), 4)
    rows.append(report("linear", seed, lin_val, time.time() - t, {"pseudo_precision": precision}))
    if "selftrain" in args.variants:
        t = time.time()
        config = CellTrainConfig(scorer="finetuned", seed=seed, epochs=args.epochs)
        split = split_for(network, config.trained_stages)
        trained = freeze_for_training(network, split)
        maps = trunk_maps(network, split, np.concatenate([fc, vc]), config.views, mean, std)
        fit_cell_classifier(network, split, trained, maps, pos, neg, config, seed)
        st_val = cell_logits(network, split, maps, np.arange(len(fc), len(fc) + len(vc)))
        del maps
        rows.append(report("selftrain", seed, st_val, time.time() - t))
        rows.append(report("selftrain+linear", seed, z(st_val) + z(lin_val), 0))
        network.load_state_dict(start_state)
    if "full" in args.variants or "full-r2" in args.variants:
        t = time.time()
        train_full(network, mean, std, pos, neg, seed, args.epochs)
        full_val = tta_logits(network, vc, mean, std)
        rows.append(report("full", seed, full_val, time.time() - t))
        rows.append(report("full+linear", seed, z(full_val) + z(lin_val), 0))
        if "full-r2" in args.variants:
            t = time.time()
            pos2, _ = pick(tta_logits(network, fc, mean, std), fo, fy)
            network.load_state_dict(start_state)
            train_full(network, mean, std, pos2, neg, seed + 50, args.epochs)
            r2_val = tta_logits(network, vc, mean, std)
            rows.append(report("full-r2", seed, r2_val, time.time() - t,
                               {"pseudo_precision": round(float(fflags[pos2].mean()), 4)}))
            rows.append(report("full-r2+linear", seed, z(r2_val) + z(lin_val), 0))
    if args.out:
        args.out.write_text(json.dumps({"set": args.set, "machine": machine(), "epochs": args.epochs,
                                        "rows": rows, "seconds": round(time.time() - t0)}, indent=1))
print("done", round(time.time() - t0), "s", flush=True)
