# PROTOTYPE (not the product): fine-tune the top of tf_efficientnet_lite0 with gated attention over
# the final feature map on cached frozen-trunk maps of the 8 dihedral views. Reads scenes composed
# into /tmp/mscenes/{large,small}_s{1,2} (compose_scenes.py, seeds 1 and 2). It prints the test AUC
# after every epoch for monitoring only (fixed schedule, no selection on it).
# usage: python finetune_attention_trunk_cache.py SIZE SPLIT EPOCHS [large|small]
import sys, time, copy, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from mitoscope.backbones import create_backbone
from mitoscope.io import load_labelled_images, read_image
torch.manual_seed(0); np.random.seed(0)
SIZE = int(sys.argv[1]); SPLIT = int(sys.argv[2]); EPOCHS = int(sys.argv[3]); SET = sys.argv[4] if len(sys.argv) > 4 else "large"
def load(d):
    data = load_labelled_images(d, d + "/labels.csv")
    X = []
    for p in data.paths:
        img = torch.from_numpy(read_image(p)).permute(2,0,1)[None].float()
        X.append(F.interpolate(img, size=(SIZE,SIZE), mode="bilinear", antialias=True)[0].to(torch.uint8))
    return torch.stack(X), torch.tensor(data.y).float()
t=time.time()
Xtr, ytr = load(f"/tmp/mscenes/{SET}_s1"); Xte, yte = load(f"/tmp/mscenes/{SET}_s2")
print("loaded", round(time.time()-t), flush=True)
m = create_backbone().model
def norm(x): return ((x.float() / 255 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
def trunk(x):
    x = m.bn1(m.conv_stem(x))
    for b in m.blocks[:SPLIT]: x = b(x)
    return x
D4 = [(k, f) for k in range(4) for f in (False, True)]
def tf(x, k, f): x = torch.rot90(x, k, (-2, -1)); return x.flip(-1) if f else x
t = time.time()
with torch.inference_mode():
    m.eval()
    Ttr = torch.stack([torch.cat([trunk(norm(tf(Xtr[i:i+16], k, f))) for i in range(0, len(Xtr), 16)]) for k, f in D4])  # 8 N C h w
    Tte = torch.cat([trunk(norm(Xte[i:i+16])) for i in range(0, len(Xte), 16)])
print("trunk cached", Ttr.shape, round(time.time()-t), "s", flush=True)
class Top(nn.Module):
    def __init__(s):
        super().__init__(); s.blocks = copy.deepcopy(m.blocks[SPLIT:]); s.conv_head = copy.deepcopy(m.conv_head); s.bn2 = copy.deepcopy(m.bn2)
        C = 1280; s.V = nn.Linear(C, 128); s.U = nn.Linear(C, 128); s.w = nn.Linear(128, 1); s.cls = nn.Linear(C, 1); s.drop = nn.Dropout(0.25)
    def forward(s, x):
        for b in s.blocks: x = b(x)
        f = s.bn2(s.conv_head(x)).flatten(2).transpose(1, 2)
        a = s.w(torch.tanh(s.V(f)) * torch.sigmoid(s.U(f))).squeeze(-1).softmax(1)
        z = (a.unsqueeze(-1) * f).sum(1)
        return s.cls(s.drop(z)).squeeze(-1), a
net = Top()
def evaluate():
    net.eval()
    with torch.inference_mode(): p = torch.cat([torch.sigmoid(net(Tte[i:i+16])[0]) for i in range(0, len(Tte), 16)]).numpy()
    return roc_auc_score(yte.numpy(), p)
head_params = [p for n, p in net.named_parameters() if n.split(".")[0] in ("V", "U", "w", "cls")]
body_params = [p for n, p in net.named_parameters() if n.split(".")[0] not in ("V", "U", "w", "cls")]
opt = torch.optim.AdamW([{"params": head_params, "lr": 1e-3}, {"params": body_params, "lr": 3e-4}], weight_decay=1e-4)
steps = EPOCHS * ((len(ytr) + 7) // 8); sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-3, 3e-4], total_steps=steps, pct_start=0.15)
for ep in range(EPOCHS):
    net.train(); perm = torch.randperm(len(ytr)); tl = 0; t = time.time()
    for i in range(0, len(ytr), 8):
        idx = perm[i:i+8]; a = torch.randint(0, 8, (len(idx),))
        x = Ttr[a, idx]; y = ytr[idx]
        logit, _ = net(x); loss = F.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step(); tl += loss.item() * len(idx)
    print(f"ep {ep} loss {tl/len(ytr):.3f} test_auc {evaluate():.3f} {time.time()-t:.0f}s", flush=True)
