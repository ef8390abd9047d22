#!/usr/bin/python3
"""bench/model_peer.py - the PyTorch peer of bench/bench_model.c: the same GPT
(4 layers, 4 heads, width 128, context 128, byte vocabulary, tied output,
tanh-GELU MLP), batch 16, AdamW + grad clipping, torch.set_num_threads(N).
Prints training tokens/s and peak RSS.  Not a test.

usage: /usr/bin/python3 bench/model_peer.py [threads=2] [steps=20] [warmup=3]
"""
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

L, H, C, CTX, B, T, V = 4, 4, 128, 128, 16, 128, 256


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        hs = C // H
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(~self.mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(CTX, C)
        self.h = nn.ModuleList([Block() for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():  # kdkit's init: N(0, 0.02), scaled projections
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj.weight") or \
                    name.endswith("mlp_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    t0 = time.perf_counter()
    for s in range(warmup + steps):
        if s == warmup:
            t0 = time.perf_counter()
        x = torch.randint(0, V, (B, T))
        y = torch.randint(0, V, (B, T))
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    el = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    nparams = sum(p.numel() for p in model.parameters())
    print(f"PyTorch   : {steps * B * T / el:8.0f} tokens/s  ({steps} steps of {B}x{T}, "
          f"{threads} threads, {1e3 * el / steps:.1f} ms/step; torch {torch.__version__})  "
          f"peak RSS {rss:6.1f} MiB  params {nparams}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
