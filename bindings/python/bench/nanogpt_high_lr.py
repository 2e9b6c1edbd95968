"""A too-high learning rate in a nanoGPT-style loop, guarded and not (issue: see a too-high LR
in any PyTorch model with no model-specific code).

The loop is written the way karpathy's nanoGPT train.py writes it: a GPT with a fused c_attn
and F.scaled_dot_product_attention (nanoGPT's model.py in miniature, dropout 0), char-level
tinyshakespeare, nanoGPT's warm-up-then-cosine schedule set on every param group each
iteration, its AdamW groups (decay on 2-D tensors only), gradient clipping at 1.0 after
`scaler.unscale_`, a GradScaler (disabled: float32, as nanoGPT makes it on CPU), and batches
drawn from the global RNG. keel's part is the wrapper and `optimizer.record(loss, step=it)`;
it is given no names, no probe and no settings.

    python3 bindings/python/bench/nanogpt_high_lr.py                 # ../shared/data/tinyshakespeare.txt
    python3 bindings/python/bench/nanogpt_high_lr.py --data input.txt --mults 1,10,30,100

Prints, per peak LR, the final val loss unguarded and guarded (and the guard's actions), the
step time of each, and whether the stable run is bit-identical with and without keel.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import keel.torch as kt


class CausalSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), h

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), CausalSelfAttention(d, h), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init)
        for n, p in self.named_parameters():  # nanoGPT's scaled init of the residual projections
            if n.endswith("c_proj.weight") or n.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, lr, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def load(path):
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def run(a, data, mult, guard):
    train_ids, val_ids, vocab = data
    torch.manual_seed(a.seed)
    model = GPT(vocab, a.block, a.n_layer, a.n_head, a.n_embd)
    lr_peak = a.lr * mult
    min_lr = lr_peak / 10
    optimizer = model.configure_optimizers(0.1, lr_peak, (0.9, 0.99))
    acts = []
    if guard:
        optimizer = kt.GuardedOptimizer(optimizer, model=model, **a.guard_set)
        optimizer.add_event_hook(lambda step, sc, text: acts.extend(
            f"{k.rsplit('/', 1)[1]}@{step}" for k in sc
            if k.startswith("keel/event/") and k.rsplit("/", 1)[1] in ("rollback", "bad_batch", "early_rule_off", "give_up")))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def get_lr(it):
        if it < a.warmup:
            return lr_peak * (it + 1) / (a.warmup + 1)
        r = (it - a.warmup) / max(1, a.iters - a.warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, r))) * (lr_peak - min_lr)

    def get_batch(ids):
        ix = torch.randint(len(ids) - a.block, (a.batch,))
        return torch.stack([ids[i : i + a.block] for i in ix]), torch.stack([ids[i + 1 : i + 1 + a.block] for i in ix])

    X, Y = get_batch(train_ids)
    t0 = time.perf_counter()
    for it in range(a.iters):
        lr = get_lr(it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for _ in range(a.accum):
            _, loss = model(X, Y)
            loss = loss / a.accum
            X, Y = get_batch(train_ids)
            scaler.scale(loss).backward()
            if guard:
                optimizer.record(loss, step=it)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / a.iters
    model.eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        tot = 0.0
        for _ in range(a.eval_iters):
            ix = torch.randint(len(val_ids) - a.block, (a.batch,), generator=g)
            x = torch.stack([val_ids[i : i + a.block] for i in ix])
            y = torch.stack([val_ids[i + 1 : i + 1 + a.block] for i in ix])
            tot += float(model(x, y)[1])
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tot / a.eval_iters, step_s, weights, acts


def _value(v: str):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--data", default=os.path.join(here, "..", "..", "..", "..", "shared", "data", "tinyshakespeare.txt"))
    p.add_argument("--lr", type=float, default=3e-3, help="the stable peak LR (default 3e-3)")
    p.add_argument("--mults", default="1,10,30,100", help="peak LR multiples of --lr")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--quiet", action="store_true", help="hide keel's console lines")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a GuardedOptimizer/[guard] setting for the guarded runs (repeatable), e.g. early_patience=2")
    p.add_argument("--guarded-only", action="store_true", help="skip the unguarded runs (tuning)")
    a = p.parse_args()
    a.guard_set = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.sets)}
    logging.basicConfig(level=logging.ERROR if a.quiet else logging.WARNING, format="  %(message)s")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data = load(a.data)
    rows = []
    for mult in [float(m) for m in a.mults.split(",")]:
        print(f"peak LR {a.lr * mult:.3g} ({mult:g}x) ...", flush=True)
        u, us, uw, _ = run(a, data, mult, False) if not a.guarded_only else (float("nan"), 1.0, None, [])
        g, gs, gw, acts = run(a, data, mult, True)
        uw = uw or {}
        same = bool(uw) and all(torch.equal(uw[k], gw[k]) for k in uw)
        rows.append((mult, u, g, us, gs, same, acts))
        print(f"  unguarded {u:.3f}, keel {g:.3f} ({', '.join(acts) or 'no action'})", flush=True)
    base = rows[0][1]
    print(f"\nnanoGPT-style, {a.n_layer} layers d {a.n_embd}, {a.iters} iters, warm-up {a.warmup}, batch {a.batch}x{a.block}; "
          f"stable peak LR {a.lr:g}: val {base:.3f}")
    print("| peak LR | unguarded val | vs stable | keel (defaults) val | vs stable | keel's actions | step time keel/unguarded | weights identical |")
    print("|---|---|---|---|---|---|---|---|")
    for mult, u, g, us, gs, same, acts in rows:
        print(f"| {mult:g}x | {u:.3f} | {100 * (u / base - 1):+.1f}% | {g:.3f} | {100 * (g / base - 1):+.1f}% | "
              f"{', '.join(acts) or 'none'} | {gs / us:.3f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
