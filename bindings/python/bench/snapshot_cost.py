"""Cost of keel's rollback snapshots on an HF Llama with AdamW (CPU): host memory held and the
time the training loop loses to taking one, copied synchronously (`snapshot_async=False`)
or in the background (the default), and with `rollback_from="checkpoints"` (only the base
is held). Not a test: timings are noisy on a shared machine; the script alternates the modes
and reports medians over every snapshot taken.

    python bindings/python/bench/snapshot_cost.py [--preset tiny|small] [--batch 4 --seq 128]

Per mode it prints: the median loop step; the loop's own time in keel's snapshot code per
snapshot (the synchronous copy, or the background copy's launch plus the next step's wait
for it); the extra wall time of a snapshot's step and the next one over the median of the
other steps (what the loop loses, contention with a background copy included); the bytes
the snapshots hold (`GuardedOptimizer.snapshot_bytes`) and per parameter; the RSS growth;
and, once, the time of one full synchronous copy of weights + AdamW state.
"""

import argparse
import gc
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import keel.torch as kt

# keel's presets (src/config/model.rs): vocab, hidden, layers, heads, kv heads, ffn
PRESETS = {"tiny": (4096, 256, 4, 4, 4, 688), "small": (8192, 512, 8, 8, 4, 1376)}


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(model, opt, x, mode: str, steps: int, every: int) -> dict:
    kw = dict(probe_attention=False, probe_logits=False, probe_updates=False)
    if mode == "checkpoints":
        kw["rollback_from"] = "checkpoints"
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=every, keep=2,
                               snapshot_async=(mode == "async"), **kw)
    # the loop's own time in keel's snapshot code: taking (sync) or launching (async) a
    # snapshot, and waiting for a background copy before the next update
    inside = [0.0]
    for name in ("_maybe_snapshot", "_snapshot_ready"):
        inner = getattr(gopt, name)

        def timed(*a, _inner=inner, **k):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0

        setattr(gopt, name, timed)
    r0 = rss()
    totals = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gopt.step(loss)
        gopt.zero_grad()
        totals.append(time.perf_counter() - t0)
    held = gopt.snapshot_bytes  # waits for a copy in flight
    r1 = rss()
    # step i (1-based) took a snapshot when i % every == 0; the next step waits for an async one
    snap = {i for i in range(1, steps + 1) if i % every == 0}
    touched = snap | {i + 1 for i in snap}
    plain = [t for i, t in enumerate(totals, 1) if i not in touched and i > 2]  # 1-2: warm-up, the base
    base = statistics.median(plain)
    stalls = [totals[i - 1] + (totals[i] if i < steps else base) - 2 * base for i in sorted(snap) if i > 2]
    n_snap = max(1, len(snap))  # the base, taken once at the first step, is not counted
    del gopt
    gc.collect()
    return {"step": base, "inside": inside[0] / n_snap, "stall": statistics.median(stalls) if stalls else 0.0,
            "held": held, "rss": r1 - r0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    vocab, d, layers, heads, kv, ffn = PRESETS[a.preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(a.seq, 256),
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, vocab, (a.batch, a.seq))
    # one full synchronous copy of weights + AdamW state (after a step: the moments exist)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    g = kt.GuardedOptimizer(opt, model=model, probe_attention=False, probe_logits=False, probe_updates=False)
    copies = []
    for _ in range(3):
        t0 = time.perf_counter()
        st = g._capture()
        copies.append(time.perf_counter() - t0)
        del st
    del g
    print(f"{a.preset}: {n / 1e6:.2f}M parameters, batch {a.batch} x {a.seq}, {torch.get_num_threads()} threads; "
          f"one synchronous copy of weights + AdamW state: {statistics.median(copies) * 1e3:.0f} ms")
    results: dict = {}
    for _ in range(a.rounds):  # alternate to share the machine's noise
        for mode in ("sync", "async", "checkpoints"):
            results.setdefault(mode, []).append(run(model, opt, x, mode, a.steps, a.every))
    print(f"{'mode':<12} {'step ms':>8} {'in keel ms/snap':>16} {'extra step ms/snap':>19} {'held MB':>8} "
          f"{'B/param':>8} {'RSS +MB':>8}")
    for mode, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{mode:<12} {med['step'] * 1e3:8.0f} {med['inside'] * 1e3:16.1f} {med['stall'] * 1e3:19.0f} "
              f"{med['held'] / 1e6:8.1f} {med['held'] / n:8.1f} {med['rss'] / 1e6:8.1f}")


if __name__ == "__main__":
    main()
