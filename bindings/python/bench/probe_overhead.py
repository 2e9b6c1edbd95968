"""Step-time overhead of keel.probe.AttentionProbe on an HF Llama training step (CPU):
the probe on every step (the guard's early window) and at the default cadence (every 10th
step after it). Prints median step times; not a test (timings are noisy on a shared machine).

    python bindings/python/bench/probe_overhead.py [--hidden 256 --layers 4 --seq 256 --batch 8]
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import keel.probe as kp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=a.hidden, intermediate_size=int(a.hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), max_position_embeddings=a.seq)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    probe = kp.AttentionProbe(model, rows=1)
    x = torch.randint(0, 8192, (a.batch, a.seq))

    def timed(on):
        ts = []
        for _ in range(a.steps):
            probe.on = on
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            m = probe.take()
            opt.step()
            opt.zero_grad()
            if m is not None:
                float(m)  # the guard reads it with the loss
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[3:])

    for _ in range(2):  # alternate to share the machine's noise
        off, on = timed(False), timed(True)
        print(f"step {off * 1e3:.1f} ms; probe every step +{100 * (on / off - 1):.1f}%; "
              f"at 1 step in 10: +{10 * (on / off - 1):.2f}%")


if __name__ == "__main__":
    main()
