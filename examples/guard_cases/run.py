#!/usr/bin/env python3
"""The guard's defaults on real instabilities: a tuning set and a held-out set.

Each case is one recipe run three ways with `keel train` and default guard settings:
unguarded (guard.enabled=false) and guarded at the case's high peak LR, and the same recipe
at a stable LR (3e-3) as the reference. The table gives the last validation loss of each and
the guarded / unguarded runs' distance from the stable one, with what the guard did. Clean
runs (stable LR, five seeds, guarded) must raise no action.

The tuning set is where the defaults were chosen (keel's built-in corpus, and the failure
that motivated the LR walk-down: tinyshakespeare with its own BPE at peak LR 0.2). The
held-out set was written down before any tuning and never tuned on: other data and
tokenizers (Python and Rust source code, each with its own BPE; another vocabulary size),
widths, depths, warm-ups, LRs and init scales.

    python3 examples/guard_cases/run.py --set tune      # or heldout, or all
    python3 examples/guard_cases/run.py --set heldout --only code-py   # one case

Needs ../shared/data/tinyshakespeare.txt; builds the code corpora from this machine's
Python standard library and cargo registry sources (first 1.5 MB of each, sorted by path).
About 2 minutes per run on 2 cores.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
STABLE_LR = 3e-3
STEPS = 300
THREADS = int(os.environ.get("KEEL_THREADS", "1"))  # one run per core: run two sets side by side

# name, data ("builtin", "shakespeare", "python", "rust"), high peak LR, extra --set keys
TUNE = [
    ("builtin-lr0.1", "builtin", 0.1, []),
    ("shakespeare-lr0.2", "shakespeare", 0.2, []),
    ("builtin-sigma1", "builtin", STABLE_LR, ["init.std=1.0"]),
]
HELDOUT = [
    ("code-py-lr0.1", "python", 0.1, []),
    ("wide-shallow-lr0.06-wu10", "shakespeare", 0.06,
     ["model.hidden_size=384", "model.num_layers=2", "model.num_heads=6", "model.num_kv_heads=6",
      "model.intermediate_size=1024", "schedule.warmup_steps=10"]),
    ("deep-narrow-rust-lr0.05", "rust", 0.05,
     ["model.hidden_size=96", "model.num_layers=8", "model.num_heads=4", "model.num_kv_heads=2",
      "model.intermediate_size=256", "model.vocab_size=2048"]),
    ("code-py-std0.1-lr0.02-wu20", "python", 0.02, ["init.std=0.1", "schedule.warmup_steps=20"]),
    ("shakespeare-lr0.03-seed7", "shakespeare", 0.03, ["train.seed=7"]),
]
CLEAN = {"tune": ("builtin", []), "heldout": ("python", [])}


def corpus(kind: str, out: str) -> str:
    if kind == "builtin":
        return ""
    if kind == "shakespeare":
        return SHAKESPEARE
    path = os.path.join(out, "data", f"{kind}.txt")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "python":
        files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    else:
        # only the crates keel's Cargo.lock names (exact versions): the same text on any
        # machine that built keel, whatever else its cargo registry holds
        lock = open(os.path.join(ROOT, "Cargo.lock")).read()
        pinned = set(re.findall(r'name = "([^"]+)"\nversion = "([^"]+)"', lock))
        home = os.path.expanduser("~/.cargo/registry/src")
        files = sorted(
            f for f in glob.glob(os.path.join(home, "*", "*", "src", "**", "*.rs"), recursive=True)
            if tuple(os.path.relpath(f, home).split(os.sep)[1].rsplit("-", 1)) in pinned
        )
    buf, n = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        buf.append(t)
        n += len(t)
        if n >= 1_500_000:
            break
    with open(path, "w") as fh:
        fh.write("".join(buf)[:1_500_000])
    return path


TABLE_ONLY = False


def train(keel, out, name, data, lr, sets, guarded, seed=None):
    d = os.path.join(out, name)
    if os.path.exists(os.path.join(d, "metrics.jsonl")) and os.path.exists(os.path.join(d, "done")):
        return d
    if TABLE_ONLY:
        raise FileNotFoundError(d)
    args = [keel, "train", "--preset", "tiny", "--steps", str(STEPS), "--out", d, "--threads", str(THREADS),
            "--set", "train.batch_size=4", "--set", f"optim.lr={lr}"]
    if data:
        args += ["--data", data]
    for s in sets:
        args += ["--set", s]
    if seed is not None:
        args += ["--set", f"train.seed={seed}"]
    if not guarded:
        args += ["--set", "guard.enabled=false"]
    r = subprocess.run(args, capture_output=True, text=True)
    with open(os.path.join(out, name + ".log"), "w") as fh:
        fh.write(r.stdout + r.stderr)
    open(os.path.join(d, "done"), "w").close()
    return d


def summary(d):
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    ev = []
    p = os.path.join(d, "events.jsonl")
    if os.path.exists(p):
        ev = [json.loads(l) for l in open(p)]
    acts = [e for e in ev if e["kind"] in ("skip", "rollback", "lr_backoff", "give_up", "early_rule_off", "init_rescue")]
    rb = [e for e in ev if e["kind"] == "rollback"]
    lrb = [e["detail"]["factor"] for e in ev if e["kind"] == "lr_backoff" and e["detail"].get("permanent")]
    what = []
    if rb:
        what.append(f"{len(rb)} rollback{'s' if len(rb) > 1 else ''} at " + ", ".join(str(e["step"]) for e in rb))
    if lrb:
        what.append(f"LR × {lrb[-1]:.3g}")
    for k in ("skip", "early_rule_off", "init_rescue", "give_up"):
        n = [e for e in ev if e["kind"] == k]
        if n:
            what.append(f"{k} ×{len(n)}" + (f" (step {n[0]['step']})" if k != "skip" else ""))
    return {"val": val[-1] if val else None, "steps": rows[-1]["step"] if rows else 0, "actions": len(acts),
            "what": "; ".join(what) or "nothing"}


def pct(a, b):
    return "—" if a is None or b is None else f"{100 * (a - b) / b:+.1f}%"


def fmt(v):
    return "—" if v is None else f"{v:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["tune", "heldout", "all"], default="all")
    ap.add_argument("--out", default="runs/guard_cases")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--no-clean", action="store_true", help="skip the five clean seeds")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated train.seed values: each case at each seed (a high LR near the edge "
                         "is noisy: one seed can end 0%% or 36%% above the stable run)")
    ap.add_argument("--table", action="store_true", help="print the table of the runs already made; run nothing")
    ap.add_argument("--keel", default=os.environ.get("KEEL", os.path.join(ROOT, "target", "release", "keel")))
    a = ap.parse_args()
    global TABLE_ONLY
    TABLE_ONLY = a.table
    sets = ["tune", "heldout"] if a.set == "all" else [a.set]
    seeds = [None] if a.seeds is None else [int(x) for x in a.seeds.split(",")]
    for which in sets:
        out = os.path.join(a.out, which)
        os.makedirs(out, exist_ok=True)
        cases = TUNE if which == "tune" else HELDOUT
        print(f"\n### {which} set\n")
        print("| case | unguarded | guarded | stable (LR 3e-3) | unguarded vs stable | guarded vs stable | what the guard did |")
        print("|---|---|---|---|---|---|---|")
        for name, kind, lr, extra in cases:
            if a.only and a.only not in name:
                continue
            data = corpus(kind, a.out)
            stable_extra = [x for x in extra if not x.startswith("init.std")]  # the reference: HF's init
            per_seed = []
            for seed in seeds:
                sfx = "" if seed is None else f"-s{seed}"
                try:
                    u = summary(train(a.keel, out, name + sfx + "-unguarded", data, lr, extra, False, seed))
                    g = summary(train(a.keel, out, name + sfx + "-guarded", data, lr, extra, True, seed))
                    s = summary(train(a.keel, out, name + sfx + "-stable", data, STABLE_LR, stable_extra, True, seed))
                except FileNotFoundError as e:
                    print(f"| {name}{sfx} | not run yet ({e}) |")
                    continue
                gv = g["val"] if g["steps"] == STEPS else None
                print(f"| {name}{sfx} | {fmt(u['val'])} | {fmt(gv) if gv is not None else 'gave up at ' + str(g['steps'])} | {fmt(s['val'])} "
                      f"| {pct(u['val'], s['val'])} | {pct(gv, s['val'])} | {g['what']} |", flush=True)
                if gv is not None and u["val"] is not None:
                    per_seed.append((u["val"], gv, s["val"]))
            if len(per_seed) > 1:
                n = len(per_seed)
                mu, mg, ms = (sum(x[k] for x in per_seed) / n for k in range(3))
                better = sum(1 for x in per_seed if x[1] < x[0])
                print(f"| **{name}, mean of {n} seeds** | {fmt(mu)} | {fmt(mg)} | {fmt(ms)} | {pct(mu, ms)} | {pct(mg, ms)} "
                      f"| guarded below unguarded in {better} of {n} seeds |", flush=True)
        if a.no_clean or a.only:
            continue
        kind, extra = CLEAN[which]
        data = corpus(kind, a.out)
        res = []
        for k in range(1, 6):
            try:
                res.append(summary(train(a.keel, out, f"clean-seed{k}", data, STABLE_LR, extra, True, seed=k)))
            except FileNotFoundError:
                pass
        print(f"\nclean runs ({kind} data, LR 3e-3, seeds 1–{len(res)}): actions {[r['actions'] for r in res]}, "
              f"val {', '.join(fmt(r['val']) for r in res)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
