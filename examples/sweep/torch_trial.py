#!/usr/bin/env python3
"""One sweep trial as a plain PyTorch loop on a tiny Hugging Face Llama: the kind of script
`keel sweep` runs as a command trial (examples/sweep/torch_command.toml).

    python3 examples/sweep/torch_trial.py --lr 3e-3 --width 64 --seed 0 --out /tmp/t --steps 200

Byte-level language modelling of tinyshakespeare (../shared/data/tinyshakespeare.txt; a
generated text where it is missing), AdamW with warm-up and cosine decay, gradient clipping at
1.0, an evaluation every 50 steps. keel's part is two lines: `GuardedOptimizer(...,
log_dir=args.out)` writes keel's run format into the trial directory (loss, gradient norm,
LR, validation loss, and the early signals: attention logits, logZ, update ratios), and the
guard is detect-only (`enabled=False`): a sweep measures how the recipe behaves, the sweep
itself stops a trial that diverged.
"""

import argparse
import math
import os
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import keel.torch

HERE = os.path.dirname(os.path.abspath(__file__))
B, T = 8, 64


def corpus(seed: int) -> bytes:
    path = os.path.join(HERE, "..", "..", "..", "shared", "data", "tinyshakespeare.txt")
    if os.path.exists(path):
        return open(path, "rb").read()
    rng = random.Random(seed)  # no corpus: a generated one, so the example still runs
    words = [bytes(rng.choices(b"etaoinshrdlu", k=rng.randint(2, 7))) for _ in range(400)]
    return b" ".join(rng.choice(words) for _ in range(200_000))


def train(lr: float, width: int = 64, layers: int = 2, seed: int = 0, steps: int = 200, out=None,
          on_step=None) -> float:
    """Train; returns the last validation loss. `on_step(step, loss)` is called after every
    step (an Optuna objective reports there and may raise optuna.TrialPruned)."""
    torch.set_num_threads(int(os.environ.get("TRIAL_THREADS", "1")))
    torch.manual_seed(seed)
    data = torch.tensor(list(corpus(seed)), dtype=torch.long)
    split = int(0.9 * len(data))
    train_d, val_d = data[:split], data[split:]
    cfg = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=int(width * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                      num_key_value_heads=max(1, width // 32), max_position_embeddings=T,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    opt = keel.torch.GuardedOptimizer(adamw, model=model, scheduler=sched, log_dir=out,
                                      tokens_per_step=B * T, enabled=False)

    def batch(src, g):
        ix = torch.randint(len(src) - T, (B,), generator=g)
        return torch.stack([src[i:i + T] for i in ix])  # HF shifts the labels itself

    g = torch.Generator().manual_seed(seed)
    gv = torch.Generator().manual_seed(1234)
    vbatches = [batch(val_d, gv) for _ in range(4)]
    v = float("nan")
    for step in range(1, steps + 1):
        x = batch(train_d, g)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(loss, gn, step=step)
        opt.zero_grad()
        if on_step is not None:
            on_step(step, loss.item())
        if step % 50 == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                v = sum(model(input_ids=vx, labels=vx).loss.item() for vx in vbatches) / len(vbatches)
            model.train()
            if out is not None:
                opt.log_val(v, step=step)
    return v


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    train(a.lr, a.width, a.layers, a.seed, a.steps, a.out)
