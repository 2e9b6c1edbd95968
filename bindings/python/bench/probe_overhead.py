"""Step-time overhead of keel's early signals at the DEFAULT cadence, on an HF Llama training
step (CPU). Not a test: timings on a shared machine are noisy; run it more than once.

The signals (keel.torch.GuardedOptimizer with model=, all on by default): the exact max
attention logit per layer, the output logZ from the LM head, the update/weight ratio per
parameter. They are measured on telemetry steps: every step of the guard's early window
(early_window = 30), then every probe_every-th step (10); a 300-step run has 57.

Two identical models train side by side on the same batches, one guarded with the signals on
(the defaults), one with them off; their steps alternate (and which goes first alternates),
so the machine's noise falls on both alike. Measuring does not change the numerics, so both
do the same work. Printed per size:
- the step time (median, signals off);
- the overhead of a telemetry step and of any other step: the median of the paired
  differences (on minus off) over those steps, relative to the median step time;
- the amortised overhead of a `--horizon`-step run (default 300) at the default cadence,
  from those two, and from the telemetry steps alone (the other steps measure nothing: their
  figure is the noise level); and the total-time overhead of this run's own steps (noisier).

    python bindings/python/bench/probe_overhead.py [--sizes tiny,small] [--steps 150 --small-steps 50]

Sizes are keel's presets (`keel init --preset`): tiny = 4 layers, hidden 256, vocab 4096,
seq 256; small = 8 layers, hidden 512, vocab 8192, seq 512.
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import keel.torch as kt

SIZES = {
    # layers, hidden, heads, kv heads, ffn, vocab, seq
    "tiny": (4, 256, 4, 4, 688, 4096, 256),
    "small": (8, 512, 8, 4, 1376, 8192, 512),
}


def model_for(size: str) -> LlamaForCausalLM:
    layers, hidden, heads, kv, ffn, vocab, seq = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def telemetry_steps(horizon: int, early: int = 30, every: int = 10) -> int:
    return sum(1 for s in range(1, horizon + 1) if s <= early or s % every == 0)


def bench(size: str, steps: int, batch: int, horizon: int) -> None:
    seq, vocab = SIZES[size][6], SIZES[size][5]
    runs = {}
    for on in (True, False):
        m = model_for(size)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
        kw = {} if on else dict(probe_attention=False, probe_logits=False, probe_updates=False)
        runs[on] = (m, kt.GuardedOptimizer(opt, model=m, **kw))
    assert runs[True][1]._probe is not None and runs[True][1]._logits is not None
    g = torch.Generator().manual_seed(1)
    times = {True: [], False: []}
    probed = []

    def one(on, x):
        m, gopt = runs[on]
        t0 = time.perf_counter()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        gopt.step(loss, gn)
        gopt.zero_grad()
        times[on].append(time.perf_counter() - t0)

    for s in range(1, steps + 1):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        probed.append(runs[True][1]._probe_on)
        for on in ((True, False) if s % 2 else (False, True)):
            one(on, x)
    skip = 2  # warm-up
    base = statistics.median(times[False][skip:])
    diff = [a - b for a, b in zip(times[True], times[False])]
    tel = [d for d, p in zip(diff[skip:], probed[skip:]) if p]
    other = [d for d, p in zip(diff[skip:], probed[skip:]) if not p]
    d_tel = statistics.median(tel) / base
    d_other = statistics.median(other) / base if other else 0.0
    n_tel = telemetry_steps(horizon)
    amortised = (n_tel * d_tel + (horizon - n_tel) * d_other) / horizon
    # the other steps measure nothing (a flag is read): their figure is the noise level
    amortised_tel = n_tel * d_tel / horizon
    measured = sum(times[True][skip:]) / sum(times[False][skip:]) - 1
    print(f"{size}: step {base * 1e3:.0f} ms (signals off, batch {batch} x seq {seq}); "
          f"telemetry step {100 * d_tel:+.1f}% ({len(tel)} steps), other step {100 * d_other:+.2f}% "
          f"({len(other)} steps); amortised over {horizon} steps ({n_tel} telemetry) {100 * amortised:+.2f}% "
          f"(telemetry steps alone {100 * amortised_tel:+.2f}%); "
          f"this run's {steps - skip} steps in total {100 * measured:+.2f}%", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=150, help="steps per model (the small one: --small-steps)")
    ap.add_argument("--small-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--horizon", type=int, default=300)
    # one thread: on a shared machine more threads than free cores make every step slower
    # and far noisier
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for size in a.sizes.split(","):
        bench(size, a.small_steps if size == "small" else a.steps, a.batch, a.horizon)


if __name__ == "__main__":
    main()
