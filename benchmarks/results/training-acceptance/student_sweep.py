"""The student sweep behind docs/training.md ("The student, second round"): one saved teacher, many students.

A short training loop of its own (not the Trainer) so that each variant costs only its own seconds: the frozen
teacher's tokens of the 2,500 training and 2,000 test scenes are encoded once and cached in ``--cache``; each run
trains two pooling heads on them with ListNet (+ optional hinge / InfoNCE) for ``--seconds`` of wall time (warm-up
then cosine over the elapsed fraction, as the Trainer's timed stages), evaluates on the 2,000 test images and
appends one JSON line to ``--results``. The chosen setting was then run through the Trainer by the acceptance.

    python -m aladin_fast train ... --stages teacher --teacher-seconds 270 --output-dir runs/teacher
        # (or any Trainer run with the acceptance's teacher settings; this file needs its checkpoint.pt)
    python benchmarks/results/training-acceptance/student_sweep.py --teacher runs/teacher/checkpoint.pt \
        --name lib512 --mode lib --dim 512 --layers 0 --T 20 --tT 0.1 --lr 4e-3 --seconds 90

Modes: ``pool_then_proj`` (max-pool the head's tokens, then project: the Student's default), ``proj_then_pool``
(project every padded token, then max-pool), ``mlp_then_pool`` (an MLP per token), ``lib`` / ``lib_mlp`` (the
library's PoolingHead with ``project_tokens=True``: only valid tokens are projected).
"""
import time, json, math, argparse, os
import torch, torch.nn.functional as F
from torch import nn
from aladin_fast.data import SyntheticScenes
from aladin_fast.training import Trainer
from aladin_fast.training.data import encode_captions, as_source
from aladin_fast.models.encoders import TokenTransformer
from aladin_fast.losses import listnet_loss, hinge_loss, infonce_loss
from aladin_fast.eval import retrieval_metrics
from aladin_fast import acceptance as A
torch.set_num_threads(1)

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=90)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--layers", type=int, default=1)
p.add_argument("--mode", default="pool_then_proj")  # pool_then_proj | proj_then_pool | mlp_then_pool
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--T", type=float, default=6.0)
p.add_argument("--tT", type=float, default=1.0)
p.add_argument("--hinge", type=float, default=0.0)
p.add_argument("--infonce", type=float, default=0.0)
p.add_argument("--name", default="run")
p.add_argument("--test", type=int, default=2000)
p.add_argument("--warmup", type=int, default=20)
p.add_argument("--wd", type=float, default=1e-4)
p.add_argument("--teacher", default="runs/teacher/checkpoint.pt", help="a Trainer checkpoint with the teacher")
p.add_argument("--cache", default="runs/teacher/token_cache.pt", help="where the teacher's tokens are cached")
p.add_argument("--results", default="runs/student_sweep.jsonl")
args = p.parse_args()

cache = args.cache
if os.path.exists(cache):
    C = torch.load(cache)
else:
    common = dict(regions=36, feature_dim=256, world_seed=0)
    train = SyntheticScenes(2500, seed=0, **common); test = SyntheticScenes(2000, seed=1, **common)
    cfg = A._train_config(dict(A.ACCEPTANCE_SIZES), 0, "cpu", None, False).replace(stages=("teacher",))
    tr = Trainer(cfg, train); tr.resume(args.teacher)
    T = tr.teacher.eval()
    C = {}
    with torch.no_grad():
        for name, data in (("train", train), ("test", test)):
            src = as_source(data)
            toks, lens = [], []
            for s in range(0, src.num_images, 256):
                r, l = src.image_batch(range(s, min(s + 256, src.num_images)))
                t, l = T.encode_images(r, l); toks.append(t); lens.append(l)
            C[name + "_img"] = torch.cat(toks); C[name + "_img_len"] = torch.cat(lens)
            ids, l = encode_captions(tr.tokenizer, src.captions)
            toks = []
            for s in range(0, ids.shape[0], 1024):
                t, _ = T.encode_captions(ids[s:s+1024], l[s:s+1024]); toks.append(t)
            C[name + "_cap"] = torch.cat(toks); C[name + "_cap_len"] = l
    C["teacher"] = T.state_dict(); C["teacher_hparams"] = T.hparams
    torch.save(C, cache)
from aladin_fast.models import Teacher
T = Teacher(**C["teacher_hparams"]); T.load_state_dict(C["teacher"]); T.eval()

class Head(nn.Module):
    def __init__(self, d, D, layers, mode, hidden):
        super().__init__()
        self.mode = mode
        self.norm = nn.LayerNorm(d)
        self.tf = TokenTransformer(d, layers, 4, None, 0.0)
        if mode == "mlp_then_pool":
            self.proj = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, D))
        else:
            self.proj = nn.Linear(d, D)
    def forward(self, x, l):
        h = self.tf(self.norm(x), l)
        valid = (torch.arange(x.shape[1])[None] < l[:, None])[..., None]
        if self.mode == "pool_then_proj":
            return F.normalize(self.proj(h.masked_fill(~valid, -float("inf")).amax(1)), dim=-1)
        z = self.proj(h)
        return F.normalize(z.masked_fill(~valid, -float("inf")).amax(1), dim=-1)

torch.manual_seed(0)
if args.mode.startswith("lib"):
    from aladin_fast.models.student import PoolingHead
    hid = args.hidden if args.mode == "lib_mlp" else None
    img_head = PoolingHead(128, args.dim, args.layers, 4, None, 0.0, "max", True, hid)
    cap_head = PoolingHead(128, args.dim, args.layers, 4, None, 0.0, "max", True, hid)
else:
    img_head = Head(128, args.dim, args.layers, args.mode, args.hidden)
    cap_head = Head(128, args.dim, args.layers, args.mode, args.hidden)
params = list(img_head.parameters()) + list(cap_head.parameters())
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
N = C["train_img"].shape[0]
start = time.perf_counter(); cpu0 = time.process_time(); step = 0; gen = torch.Generator().manual_seed(0)
def lr_at(step, frac):
    if step < args.warmup: return (step + 1) / (args.warmup + 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))
done = False; losses = []
while not done:
    perm = torch.randperm(N, generator=gen)
    choice = torch.randint(0, 5, (N,), generator=gen)
    for s in range(0, N, args.batch):
        el = time.perf_counter() - start
        if el >= args.seconds: done = True; break
        idx = perm[s:s + args.batch]; cap = idx * 5 + choice[idx]
        it, il = C["train_img"][idx], C["train_img_len"][idx]
        cl = C["train_cap_len"][cap]; ct = C["train_cap"][cap][:, : int(cl.max())]
        with torch.no_grad():
            ts = T.score(ct, cl, it, il)
        for g in opt.param_groups: g["lr"] = args.lr * lr_at(step, el / args.seconds)
        ie, ce = img_head(it, il), cap_head(ct, cl)
        ss = ce @ ie.T
        loss = listnet_loss(ss, ts, args.T, args.tT)
        if args.hinge: loss = loss + args.hinge * hinge_loss(ss, hardest_negative=True)
        if args.infonce: loss = loss + args.infonce * infonce_loss(ss, 0.05)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 2.0); opt.step(); step += 1
        losses.append(float(loss))
train_s = time.perf_counter() - start; cpu = time.process_time() - cpu0
img_head.eval(); cap_head.eval()
with torch.no_grad():
    nt = args.test
    ie = torch.cat([img_head(C["test_img"][s:s+512], C["test_img_len"][s:s+512]) for s in range(0, nt, 512)])
    ce = torch.cat([cap_head(C["test_cap"][s:s+1024], C["test_cap_len"][s:s+1024]) for s in range(0, nt * 5, 1024)])
    m = retrieval_metrics((ie @ ce.T).contiguous())
out = dict(name=args.name, args=vars(args), steps=step, train_s=round(train_s, 1), cpu_s=round(cpu, 1),
           load=os.getloadavg()[0], loss_first=sum(losses[:20]) / 20, loss_last=sum(losses[-20:]) / 20,
           i2t_r1=round(m["i2t_r1"], 1), t2i_r1=round(m["t2i_r1"], 1), rsum=round(m["rsum"], 1))
print(json.dumps(out))
with open(args.results, "a") as f: f.write(json.dumps(out) + "\n")
