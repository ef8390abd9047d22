#!/usr/bin/python3
"""Generate the PyTorch reference for the model tests (tests/test_model_ref.c).

Run once with Debian's python3-torch and commit the output; the normal test
run reads the files and never needs PyTorch:

    /usr/bin/python3 scripts/gen_model_ref.py tests/data/model

Writes <dir>/ref.bin (raw little-endian arrays, back to back) and
<dir>/ref.json (the index: for each array its dtype "f32"/"i32"/"u8", shape
and byte offset in ref.bin; plus the configuration and scalar results).

What it records, for a fixed tiny model (2 layers, 2 heads, width 16,
context 16) and batch (B=2, T=8):
  param.<name>        initial parameters (float32, torch's RNG, seed 1234)
  tokens, targets, mask, teacher_ids, teacher_logprobs   the batch
  logits              forward output, computed in float64 then rounded
  grad.<name>         d loss / d parameter for
                      loss = 0.6 CE(masked) + 0.4 tau^2 KL(teacher top-4 || student), tau 2
  loss_total/ce/kd    (JSON scalars), and loss_ce_all (plain CE, no mask)
  adam.<s>.grad.<name> and adam.<s>.param.<name> for s = 1..3: the float32
                      gradient fed to step s (after which grad-norm clipping
                      and torch.optim.AdamW with the warmup + cosine LR run),
                      and the parameters after it; adam_norms / adam_lrs.
The model is written out functionally with explicitly named tensors so the
names match kdkit's (docs/model.md).
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

L, H, C, CTX = 2, 2, 16, 16
B, T, V = 2, 8, 256
K, TAU, W_CE, W_KD = 4, 2.0, 0.6, 0.4
LR_MAX, LR_MIN, WARMUP, TOTAL = 1e-2, 1e-3, 2, 10
BETAS, EPS, WD, CLIP = (0.9, 0.95), 1e-8, 0.1, 0.5
ADAM_STEPS = 3

LAYER = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
         ("attn.c_attn.weight", (3 * C, C)), ("attn.c_attn.bias", (3 * C,)),
         ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
         ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
         ("mlp.c_fc.weight", (4 * C, C)), ("mlp.c_fc.bias", (4 * C,)),
         ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,))]


def param_shapes():
    out = [("wte", (V, C)), ("wpe", (CTX, C))]
    for i in range(L):
        out += [(f"h.{i}.{n}", s) for n, s in LAYER]
    out += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return out


def init_params(gen):
    # Not kdkit's init (that one is tested separately): random everywhere,
    # LayerNorm weights around 1, so every path carries signal.
    P = {}
    for name, shape in param_shapes():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            t = (0.3 if name in ("wte", "wpe") else 0.2) * torch.randn(shape, generator=gen)
        P[name] = t.float()
    return P


def forward(P, tokens):
    x = P["wte"][tokens] + P["wpe"][:T]
    hs = C // H
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(L):
        p = lambda n: P[f"h.{i}.{n}"]
        h = F.layer_norm(x, (C,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        qkv = h @ p("attn.c_attn.weight").T + p("attn.c_attn.bias")
        q, k, v = qkv.split(C, dim=-1)
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ p("attn.c_proj.weight").T + p("attn.c_proj.bias")
        h = F.layer_norm(x, (C,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        h = F.gelu(h @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    return x @ P["wte"].T


def losses(logits, targets, mask, tids, tlp):
    z = logits.reshape(B * T, V)
    m = mask.reshape(-1).bool()
    ce = F.cross_entropy(z[m], targets.reshape(-1)[m].long())
    ids = tids.reshape(B * T, K).long()
    lp = tlp.reshape(B * T, K).to(z.dtype)
    valid = ids >= 0
    scaled = torch.where(valid, lp / TAU, torch.full_like(lp, float("-inf")))
    has = valid.any(-1) & m
    pk = torch.zeros_like(scaled)
    pk[has] = scaled[has].softmax(-1)
    pt = torch.zeros(B * T, V, dtype=z.dtype)
    pt.scatter_add_(1, ids.clamp(min=0), pk)
    logq = (z / TAU).log_softmax(-1)
    safe = torch.where(pt > 0, pt, torch.ones_like(pt))
    kl = (pt * (safe.log() - logq)).sum(-1)
    kd = TAU * TAU * kl[has].mean()
    return W_CE * ce + W_KD * kd, ce, kd


def lr_at(s):
    if s < WARMUP:
        return LR_MAX * (s + 1) / WARMUP
    if s >= TOTAL:
        return LR_MIN
    p = (s - WARMUP) / (TOTAL - WARMUP)
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * p))


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/data/model"
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    P0 = init_params(gen)
    tokens = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    tokens[0, :4] = torch.tensor([104, 101, 108, 108])  # repeated tokens exercise wte scatter
    tokens[1, 3] = tokens[1, 5]
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, 1] = 0
    mask[1, 6] = 0
    tids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(B * T)]).view(B, T, K)
    tlog = torch.randn(B, T, V, generator=gen) * 2.0
    tlp_full = tlog.log_softmax(-1)
    tlp = torch.gather(tlp_full, 2, tids)
    order = tlp.argsort(-1, descending=True)
    tids = torch.gather(tids, 2, order)
    tlp = torch.gather(tlp, 2, order).float()
    tids[0, 2, 2:] = -1          # fewer than k entries
    tids[1, 4, :] = -1           # no teacher at all: position leaves KD
    tids = tids.to(torch.int32)

    arrays = {}

    def put(name, t, dtype):
        arrays[name] = (np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype)), dtype)

    for n, t in P0.items():
        put("param." + n, t, "<f4")
    put("tokens", tokens, "u1")
    put("targets", targets, "u1")
    put("mask", mask, "u1")
    put("teacher_ids", tids, "<i4")
    put("teacher_logprobs", tlp, "<f4")

    # Forward and backward in float64 from the float32 parameters.
    P = {n: t.double().requires_grad_(True) for n, t in P0.items()}
    logits = forward(P, tokens)
    total, ce, kd = losses(logits, targets, mask, tids, tlp.double())
    total.backward()
    put("logits", logits, "<f4")
    for n, t in P.items():
        put("grad." + n, t.grad, "<f4")
    with torch.no_grad():
        ce_all = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    scalars = {"loss_total": total.item(), "loss_ce": ce.item(), "loss_kd": kd.item(),
               "loss_ce_all": ce_all.item()}

    # AdamW: float32 model, grads recorded, clipping, schedule, 3 steps.
    Q = {n: t.clone().requires_grad_(True) for n, t in P0.items()}
    decay = [Q[n] for n, s in param_shapes() if len(s) >= 2]
    nodecay = [Q[n] for n, s in param_shapes() if len(s) < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=LR_MAX, betas=BETAS, eps=EPS)
    norms, lrs = [], []
    for s in range(1, ADAM_STEPS + 1):
        opt.zero_grad()
        lg = forward(Q, tokens)
        tot, _, _ = losses(lg, targets, mask, tids, tlp)
        tot.backward()
        for n, t in Q.items():
            put(f"adam.{s}.grad." + n, t.grad, "<f4")
        norm = torch.nn.utils.clip_grad_norm_(list(Q.values()), CLIP)
        lr = lr_at(s - 1)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        for n, t in Q.items():
            put(f"adam.{s}.param." + n, t, "<f4")
        norms.append(norm.item())
        lrs.append(lr)
    scalars["adam_norms"] = norms
    scalars["adam_lrs"] = lrs

    index = {"config": {"n_layer": L, "n_head": H, "d_model": C, "n_ctx": CTX,
                        "B": B, "T": T, "teacher_k": K, "temperature": TAU,
                        "ce_weight": W_CE, "kd_weight": W_KD,
                        "lr_max": LR_MAX, "lr_min": LR_MIN, "warmup": WARMUP, "total": TOTAL,
                        "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS,
                        "weight_decay": WD, "clip": CLIP, "adam_steps": ADAM_STEPS},
             "scalars": scalars, "arrays": {}, "torch": torch.__version__}
    off = 0
    with open(os.path.join(outdir, "ref.bin"), "wb") as f:
        for name, (a, dtype) in arrays.items():
            b = a.tobytes()
            index["arrays"][name] = {"dtype": {"<f4": "f32", "<i4": "i32", "u1": "u8"}[dtype],
                                     "shape": list(a.shape), "offset": off, "nbytes": len(b)}
            f.write(b)
            off += len(b)
    with open(os.path.join(outdir, "ref.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {off} bytes of arrays; loss {total.item():.6f} (ce {ce.item():.6f}, "
          f"kd {kd.item():.6f}); grad norms {norms}")


if __name__ == "__main__":
    main()
