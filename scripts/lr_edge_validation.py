#!/usr/bin/env python3
"""Check keel's two predictions of the max stable LR against measurement (issue 22).

For every cell of the edge sweep (``examples/sweep/edge.toml``: widths 64/128/256 ×
{plain, qk-norm}, 2 layers) and of the depth series (``examples/sweep/edge_depth.toml``:
width 128, 2/4/8 layers), it puts side by side:

* the **measured** max stable LR: the sweep's bracket (largest LR that did not diverge, the
  next LR, which did), both seeds;
* the **sharpness route**: ``keel check --sharpness`` on the same config at a safe peak LR
  (``--safe-lr``, default 3e-3, the grid's best region), seed 0: 38/λ_max(P⁻¹H) at the last
  of its measurements; raw, and calibrated by one constant fitted on the *other* cells
  (leave-one-out: what the route is worth if a user calibrates it on their own proxies);
* a **constant**: the geometric mean of the other cells' measured edges, the baseline any
  calibrated route must beat;
* the **scaling route**: a power law of the measured edge in width (or depth) through the
  smaller proxies, evaluated at the largest one (the holdout ``keel sweep`` prints);
* the cost of each route in training steps of that cell (the sweep: all of its trials'
  steps; the sharpness route: its steps plus 2 per Hessian-vector product).

A prediction counts as "within 2×" when it lies within a factor 2 of the measured bracket
(of its stable end when nothing diverged: then only a prediction below half of it fails).

    keel sweep --config examples/sweep/edge.toml --jobs 2 --out runs/edge
    keel sweep --config examples/sweep/edge_depth.toml --jobs 2 --out runs/edge-depth
    python3 scripts/lr_edge_validation.py --sweep runs/edge --depth-sweep runs/edge-depth \\
        --out runs/lr_edge_validation.json
"""

import argparse
import json
import math
import os
import subprocess
import sys


def groups(sweep):
    with open(os.path.join(sweep, "summary.json")) as f:
        s = json.load(f)
    steps = {}
    with open(os.path.join(sweep, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            key = json.dumps({k: v for k, v in r["axes"].items() if k not in ("optim.lr", "train.seed")}, sort_keys=True)
            steps[key] = steps.get(key, 0) + (r.get("steps_done") or 0)
    with open(os.path.join(sweep, "sweep.toml")) as f:
        base = f.read()
    out = []
    for g in s["groups"]:
        key = json.dumps(g["group"], sort_keys=True)
        out.append(dict(group=g["group"], stable=g["max_stable_lr"], unstable=g["first_unstable_lr"],
                        best_lr=g["best_lr"], sweep_steps=steps.get(key, 0)))
    return out, base


def base_sets(sweep_toml):
    """The [base] keys of a sweep file as --set arguments."""
    sets, section = [], None
    for line in sweep_toml.splitlines():
        t = line.split("#", 1)[0].strip()
        if t.startswith("["):
            section = t.strip("[]")
            continue
        if section == "base" and "=" in t:
            k, v = (x.strip() for x in t.split("=", 1))
            sets.append(f"{k}={v}")
    return sets


def sharpness(keel, sets, group, safe_lr, steps, every, iters):
    args = [keel, "check", "--sharpness", "--json", "--lr", str(safe_lr), "--sharpness-steps", str(steps),
            "--sharpness-every", str(every), "--sharpness-iters", str(iters)]
    for s in sets + [f"{k}={json.dumps(v)}" for k, v in group.items()] + ["train.seed=0"]:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mid(stable, unstable):
    return math.sqrt(stable * unstable) if unstable else stable


def within2(pred, stable, unstable):
    if pred is None:
        return None
    if unstable is None:  # only a lower bound was measured
        return pred >= stable / 2
    return stable / 2 <= pred <= unstable * 2


def power_law_at(points, at):
    """log-log line through (x, y) points, evaluated at `at`."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return math.exp(my + b * (math.log(at) - mx))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--depth-sweep")
    ap.add_argument("--keel", default=os.environ.get("KEEL_BIN", "target/release/keel"))
    ap.add_argument("--safe-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    a = ap.parse_args()

    # a previous --out is a cache of the sharpness runs (they cost minutes each)
    cache = {}
    if a.out and os.path.exists(a.out):
        with open(a.out) as fh:
            for c in json.load(fh):
                cache[(c["axis"], json.dumps(c["group"], sort_keys=True))] = c
    cells = []
    for sweep, axis in [(a.sweep, "model.hidden_size"), (a.depth_sweep, "model.num_layers")]:
        if not sweep:
            continue
        gs, toml = groups(sweep)
        sets = base_sets(toml)
        for g in gs:
            hit = cache.get((axis, json.dumps(g["group"], sort_keys=True)))
            if hit:
                r = dict(edge_lr=hit["sharp"], first_lr_edge=hit["sharp_first"], cost_steps=hit["sharp_cost"],
                         points=hit["points"])
            else:
                print(f"sharpness: {g['group']} …", file=sys.stderr)
                r = sharpness(a.keel, sets, g["group"], a.safe_lr, a.steps, a.every, a.iters)
            cells.append(dict(axis=axis, **g, sharp=r.get("edge_lr", r.get("predicted_max_lr")), sharp_first=r["first_lr_edge"],
                              sharp_cost=r["cost_steps"], points=r["points"]))

    # leave-one-out calibration of the sharpness route: one constant, fitted on the other cells
    logs = [math.log(mid(c["stable"], c["unstable"]) / c["sharp"]) for c in cells]
    for i, c in enumerate(cells):
        others = [x for j, x in enumerate(logs) if j != i]
        c["calibration"] = math.exp(sum(others) / len(others)) if others else None
        c["sharp_cal"] = c["sharp"] * c["calibration"] if c["calibration"] else None
        # the baseline a calibrated route must beat: the other cells' measured edge, one constant
        mids = [math.log(mid(x["stable"], x["unstable"])) for j, x in enumerate(cells) if j != i]
        c["constant"] = math.exp(sum(mids) / len(mids)) if mids else None

    # the scaling route: each series (same other axes) holds out its largest proxy
    for c in cells:
        c["scaling"] = None
    series = {}
    for c in cells:
        rest = {k: v for k, v in c["group"].items() if k != c["axis"]}
        series.setdefault((c["axis"], json.dumps(rest, sort_keys=True)), []).append(c)
    for (axis, _), cs in series.items():
        cs.sort(key=lambda c: c["group"][axis])
        if len(cs) < 3:
            continue
        held = cs[-1]
        if any(c["unstable"] is None for c in cs[:-1]):
            held["scaling_note"] = "a smaller proxy never diverged: no fit"
            continue
        held["scaling"] = power_law_at([(c["group"][axis], mid(c["stable"], c["unstable"])) for c in cs[:-1]],
                                       held["group"][axis])
        held["scaling_cost"] = sum(c["sweep_steps"] for c in cs[:-1])

    def f(x):
        return "—" if x is None else f"{x:.3g}"

    hdr = ("cell", "measured", "sharp raw", "×", "2×?", "sharp cal", "2×?", "constant", "2×?", "scaling", "2×?",
           "cost sweep", "cost sharp")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    tally = {"raw": [], "cal": [], "constant": [], "scaling": []}
    for c in cells:
        name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in c["group"].items())
        meas = f"{f(c['stable'])} – {f(c['unstable'])}" if c["unstable"] else f"≥ {f(c['stable'])}"
        w_raw = within2(c["sharp"], c["stable"], c["unstable"])
        w_cal = within2(c["sharp_cal"], c["stable"], c["unstable"])
        w_sc = within2(c["scaling"], c["stable"], c["unstable"])
        w_k = within2(c["constant"], c["stable"], c["unstable"])
        tally["constant"].append(w_k)
        tally["raw"].append(w_raw)
        tally["cal"].append(w_cal)
        if w_sc is not None:
            tally["scaling"].append(w_sc)
        ratio = mid(c["stable"], c["unstable"]) / c["sharp"]
        yn = lambda w: "—" if w is None else ("yes" if w else "no")  # noqa: E731
        print(f"| {name} | {meas} | {f(c['sharp'])} | {ratio:.0f} | {yn(w_raw)} | {f(c['sharp_cal'])} | {yn(w_cal)} "
              f"| {f(c['constant'])} | {yn(w_k)} | {f(c['scaling'])} | {yn(w_sc)} | {c['sweep_steps']} | {c['sharp_cost']:.0f} |")
    for k, v in tally.items():
        if v:
            print(f"{k}: {sum(bool(x) for x in v)} of {len(v)} within 2×")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(cells, fh, indent=1)


if __name__ == "__main__":
    main()
