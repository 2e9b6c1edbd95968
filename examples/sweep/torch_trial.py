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

ap = argparse.ArgumentParser()
ap.add_argument("--lr", type=float, required=True)
ap.add_argument("--width", type=int, default=64)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--out", required=True)
a = ap.parse_args()

torch.set_num_threads(int(os.environ.get("TRIAL_THREADS", "1")))
torch.manual_seed(a.seed)
random.seed(a.seed)
here = os.path.dirname(os.path.abspath(__file__))
path = os.path.join(here, "..", "..", "..", "shared", "data", "tinyshakespeare.txt")
if os.path.exists(path):
    text = open(path, "rb").read()
else:  # no corpus: a generated one, so the example still runs
    words = [bytes(random.choices(b"etaoinshrdlu", k=random.randint(2, 7))) for _ in range(400)]
    text = b" ".join(random.choice(words) for _ in range(200_000))
data = torch.tensor(list(text), dtype=torch.long)
split = int(0.9 * len(data))
train, val = data[:split], data[split:]
B, T = 8, 64

cfg = LlamaConfig(vocab_size=256, hidden_size=a.width, intermediate_size=int(a.width * 8 / 3) // 8 * 8,
                  num_hidden_layers=a.layers, num_attention_heads=max(1, a.width // 32),
                  num_key_value_heads=max(1, a.width // 32), max_position_embeddings=T,
                  tie_word_embeddings=False, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg)
adamw = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
warm = max(1, a.steps // 20)
sched = torch.optim.lr_scheduler.LambdaLR(
    adamw, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))))
opt = keel.torch.GuardedOptimizer(adamw, model=model, scheduler=sched, log_dir=a.out,
                                  tokens_per_step=B * T, enabled=False)


def batch(src, g):
    ix = torch.randint(len(src) - T - 1, (B,), generator=g)
    x = torch.stack([src[i:i + T] for i in ix])
    y = torch.stack([src[i + 1:i + T + 1] for i in ix])
    return x, y


g = torch.Generator().manual_seed(a.seed)
gv = torch.Generator().manual_seed(1234)
vbatches = [batch(val, gv) for _ in range(4)]
for step in range(1, a.steps + 1):
    x, y = batch(train, g)
    loss = model(input_ids=x, labels=y).loss
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(loss, gn, step=step)
    opt.zero_grad()
    if step % 50 == 0 or step == a.steps:
        model.eval()
        with torch.no_grad():
            v = sum(model(input_ids=vx, labels=vy).loss.item() for vx, vy in vbatches) / len(vbatches)
        model.train()
        opt.log_val(v, step=step)
