# PROTOTYPE (not the product): can the cell encoder be fine-tuned from image labels without
# memorising? Self-training on the TRAINING scenes only: the scenes are split by image (stratified,
# seed 0) into a fitting part and a held-out part; nothing of the test scenes is read. Boxes of the
# held-out training scenes give a diagnostic cell AUC (never used for fitting).
#   1. linear MIL (the product's LinearInstanceHead) on frozen lite0 features of the fitting part;
#      its best cell of each Mitosis image is that image's pseudo-positive; every cell of a Normal
#      image is a known negative; the other cells of Mitosis images are left out;
#   2. the top stages of lite0 fine-tuned as a plain cell classifier on those labels (cached trunk
#      maps of 8 views, balanced batches, frozen BatchNorm, few epochs);
#   3. scored on the held-out part: (a) linear MIL on frozen features, (b) the fine-tuned logit,
#      (c) linear MIL refitted on the fine-tuned features, (d) mean of (a) and (b) as z-scores.
# usage: python cells_selftrain.py SET WORK [EPOCHS] [STAGES] [LR]
# Written against commit 6d3e9f0 (the scorer on cached trunk maps, since replaced): run it there.
import sys, time, json
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import scene_pair
from cells_ceiling import mitotic_flags
from sklearn.metrics import roc_auc_score
from mitoscope.cells.bootstrap import LinearInstanceHead, intensity_features
from mitoscope.cells.network import build_cell_network, split_for, freeze_for_training, set_batchnorm_eval
from mitoscope.cells.training import trunk_maps, crop_features, _subset
from mitoscope.cells.proposals import cut_crops, find_cells
from mitoscope.io import ReadOptions, load_labelled_images, read_image

SET, WORK = sys.argv[1], Path(sys.argv[2])
EPOCHS = int(sys.argv[3]) if len(sys.argv) > 3 else 6
STAGES = int(sys.argv[4]) if len(sys.argv) > 4 else 2
LR = float(sys.argv[5]) if len(sys.argv) > 5 else 3e-4
VIEWS = 8
torch.manual_seed(0)
t0 = time.time()
train_dir, _ = scene_pair(WORK, SET)
data = load_labelled_images(train_dir, train_dir / "labels.csv")
crops, centres, offsets = [], [], [0]
for p in data.paths:
    image = read_image(p, ReadOptions())
    pr = find_cells(image)
    crops.append(cut_crops(image, pr, 96)); centres.append(pr.centres); offsets.append(offsets[-1] + len(pr))
crops = np.concatenate(crops); offsets = np.asarray(offsets); y = np.asarray(data.y)
stats = intensity_features(crops)
flags = mitotic_flags(train_dir, [p.name for p in data.paths], offsets, centres)
rng = np.random.default_rng(0)
held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:int(round(0.25 * np.sum(y == c)))] for c in (0, 1)])
fit = np.setdiff1d(np.arange(len(y)), held)
fi, fo = _subset(offsets, fit); hi, ho = _subset(offsets, held)
print(f"{SET}: {len(crops)} cells, fit {len(fit)} / held {len(held)} images, {time.time()-t0:.0f} s", flush=True)

network, backbone = build_cell_network("tf_efficientnet_lite0", pretrained=True, dropout=0.2)
mean, std = backbone.data_config["mean"], backbone.data_config["std"]
frozen = crop_features(network, crops, mean, std)

def bag_auc(scores, o, images):
    best = [scores[o[k]:o[k + 1]].max() for k in range(len(images))]
    return round(float(roc_auc_score(y[images], best)), 4)

def report(name, held_scores):
    r = {"model": name, "held_image_auc": bag_auc(held_scores, ho, held),
         "held_cell_auc": round(float(roc_auc_score(flags[hi], held_scores)), 4)}
    print(r, flush=True); return r

linear = LinearInstanceHead(seed=0).fit(frozen[fi], stats[fi], fo, y[fit])
a_fit, a_held = linear.decision_function(frozen[fi], stats[fi]), linear.decision_function(frozen[hi], stats[hi])
results = [report("linear-frozen", a_held)]
pseudo = []
for k, i in enumerate(fit):
    if y[i] == 1 and fo[k + 1] > fo[k]:
        pseudo.append(fi[fo[k] + int(np.argmax(a_fit[fo[k]:fo[k + 1]]))])
pseudo = np.asarray(pseudo)
negatives = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in fit if y[i] == 0])
print(f"pseudo-positives {len(pseudo)} ({flags[pseudo].mean():.2f} truly mitotic), negatives {len(negatives)}", flush=True)

split = split_for(network, STAGES)
trained = freeze_for_training(network, split)
t = time.time()
maps = trunk_maps(network, split, crops, VIEWS, mean, std)
print(f"trunk maps {tuple(maps.shape)} in {time.time()-t:.0f} s", flush=True)
head_ids = {id(p) for p in network.head.parameters()}
opt = torch.optim.AdamW([{"params": [p for p in trained if id(p) in head_ids], "lr": 1e-3},
                         {"params": [p for p in trained if id(p) not in head_ids], "lr": LR}], weight_decay=1e-2)
steps_per_epoch = len(negatives) // 48
total = EPOCHS * steps_per_epoch
peak = [g["lr"] for g in opt.param_groups]
step = 0
for epoch in range(EPOCHS):
    network.train(); set_batchnorm_eval(network)
    order = rng.permutation(negatives)
    losses = []
    for s in range(steps_per_epoch):
        neg = order[s * 48:(s + 1) * 48]
        pos = rng.choice(pseudo, 16)
        idx = np.concatenate([pos, neg]); target = torch.cat([torch.ones(16), torch.zeros(48)])
        views = rng.integers(0, VIEWS, len(idx))
        x = maps[views, idx].float()
        scale = min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + np.cos(np.pi * step / total))
        for g, lr in zip(opt.param_groups, peak):
            g["lr"] = lr * scale
        logits = network.logits_from_features(split.top(network.backbone, x))
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(trained, 1.0); opt.step()
        losses.append(float(loss)); step += 1
    network.eval()
    with torch.no_grad():
        b_held = np.mean([np.concatenate([network.logits_from_features(split.top(network.backbone, maps[v, hi[j:j + 512]].float())).numpy()
                                          for j in range(0, len(hi), 512)]) for v in range(VIEWS)], axis=0)
    print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}", end=" ", flush=True)
    r = report(f"finetuned-epoch{epoch + 1}", b_held)
results.append(r)
with torch.no_grad():
    tuned = np.mean([np.concatenate([split.top(network.backbone, maps[v, j:j + 512].float()).mean(dim=(-2, -1)).numpy()
                                     for j in range(0, len(crops), 512)]) for v in range(VIEWS)], axis=0)
refit = LinearInstanceHead(seed=0).fit(tuned[fi], stats[fi], fo, y[fit])
results.append(report("linear-on-finetuned", refit.decision_function(tuned[hi], stats[hi])))
z = lambda s: (s - s.mean()) / (s.std() + 1e-9)
results.append(report("mean-linear-finetuned", z(a_held) + z(b_held)))
out = Path(f"/tmp/runs/selftrain_{SET}_{EPOCHS}_{STAGES}_{LR}.json")
out.write_text(json.dumps({"set": SET, "epochs": EPOCHS, "stages": STAGES, "lr": LR, "results": results,
                           "pseudo_precision": float(flags[pseudo].mean()), "seconds": round(time.time() - t0)}))
print("done", round(time.time() - t0), "s", flush=True)
