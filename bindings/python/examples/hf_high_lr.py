"""A Hugging Face Trainer run of a small LLaMA at a peak LR ten times too high, unguarded and
with keel.hf.GuardCallback, next to a run at a stable LR; validation loss side by side.

    python3 bindings/python/examples/hf_high_lr.py            # the three runs, ~2.5 min on 2 cores
    python3 bindings/python/examples/hf_high_lr.py --multiples 10,100   # also at 100x
    python3 bindings/python/examples/hf_high_lr.py --lr 3e-2 --guard   # one run

Data: byte-level tokens of ../shared/data/tinyshakespeare.txt when present, else of a text
made here (the same fixed-cast stories as keel's built-in corpus, in miniature), 90/10 split.
Model: LlamaConfig(hidden 128, 4 layers, 4 heads, 2 KV heads, MLP 352, vocab 256), AdamW
(β2 0.95, or KEEL_DEMO_BETA2; weight decay 0.1), cosine schedule without warm-up, clipping at 1.0, batch 16 × 128.
"""

import argparse
import json
import math
import os
import pathlib
import random
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import keel
import keel.hf

BETA2 = float(os.environ.get("KEEL_DEMO_BETA2", "0.95"))
HERE = pathlib.Path(__file__).resolve()
SHAKESPEARE = HERE.parents[4] / "shared" / "data" / "tinyshakespeare.txt"  # ../shared beside the repo


def corpus() -> bytes:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_bytes()
    rng = random.Random(0)
    who = ["ada", "bo", "cy", "dee", "eli", "fay"]
    does = ["finds a red ball", "reads a book", "walks to the sea", "counts to ten", "sings a song", "bakes bread"]
    out = []
    for _ in range(20000):
        a, b = rng.sample(who, 2)
        out.append(f"{a} {rng.choice(does)} with {b}. then {b} {rng.choice(does)}.\n")
    return "".join(out).encode()


class Windows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor, t: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - t - 1, (n,), generator=g)
        self.data, self.t = data, t

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        x = self.data[s : s + self.t]
        return {"input_ids": x, "labels": x}


class EvalEvery(TrainerCallback):
    """Validation loss on a fixed set of windows every `every` steps (no Trainer eval loop:
    keeps the runs comparable and cheap)."""

    def __init__(self, val, every):
        self.val, self.every, self.curve = val, every, []

    @torch.no_grad()
    def measure(self, model):
        was = model.training
        model.eval()
        losses = [float(model(input_ids=x, labels=x).loss) for x in self.val]
        model.train(was)
        return sum(losses) / len(losses)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve.append((state.global_step, self.measure(model)))


def run(lr, guard, steps, seed, out_dir, guard_config):
    data = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    t = 128
    g = torch.Generator().manual_seed(1)
    val_batches = [torch.stack([val[s : s + t] for s in torch.randint(0, len(val) - t - 1, (16,), generator=g).tolist()]) for _ in range(8)]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=t, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ev = EvalEvery(val_batches, 50)
    cbs = [ev]
    gcb = None
    if guard:
        gcb = keel.hf.GuardCallback(snapshot_every=25, **guard_config)
        cbs.append(gcb)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1, adam_beta2=BETA2, max_grad_norm=1.0,
        logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0,
    )
    tr = Trainer(model=model, args=args, train_dataset=Windows(train, t, steps * 16, seed), callbacks=cbs)
    t0 = time.time()
    status = "finished"
    try:
        tr.train()
    except keel.GaveUp as e:
        status = f"gave up at step {e.step}"
    events = []
    p = pathlib.Path(out_dir) / "keel-events.jsonl"
    if p.exists():
        events = [json.loads(l) for l in p.read_text().splitlines()]
    return {
        "lr": lr, "guard": guard, "status": status, "wall_s": round(time.time() - t0, 1),
        "val": [(s, round(v, 4)) for s, v in ev.curve],
        "actions": [(e["step"], e["kind"]) for e in events if e["kind"] in ("skip", "lr_backoff", "rollback", "restored", "give_up")],
        "lr_factor": gcb.guard.lr_factor if gcb else 1.0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, help="one run at this peak LR (default: the three runs)")
    ap.add_argument("--stable-lr", type=float, default=3e-3)
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--multiples", default="10", help="peak LRs as multiples of the stable one, e.g. 10,100")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="guard keys, e.g. rollback_lr_factor=0.1")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    gc = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        gc[k] = json.loads(v)
    # KEEL_DEMO_THREADS: fewer threads when several runs share the machine
    torch.set_num_threads(int(os.environ.get("KEEL_DEMO_THREADS", max(1, os.cpu_count() or 1))))
    plan = [(a.lr, a.guard)] if a.lr else [(a.stable_lr, False)] + [
        (float(m) * a.stable_lr, g) for m in a.multiples.split(",") for g in (False, True)
    ]
    results = []
    for lr, guard in plan:
        with tempfile.TemporaryDirectory() as d:
            r = run(lr, guard, a.steps, a.seed, d, gc)
        results.append(r)
        print(json.dumps(r), flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))
    print()
    print(f"{'run':<28} {'status':<22} " + " ".join(f"val@{s:<4}" for s, _ in results[0]["val"]))
    for r in results:
        name = f"lr {r['lr']:.0e}" + (" + keel guard" if r["guard"] else "")
        print(f"{name:<28} {r['status']:<22} " + " ".join(f"{v:<8.4f}" for _, v in r["val"]))


if __name__ == "__main__":
    sys.exit(main())
