#!/usr/bin/env python3
"""Early warning in a keel sweep: over its diverged trials, how many steps before the
divergence did each signal speak? Reads DIR/trials/*/metrics.jsonl and events.jsonl (the
sweep's trials run with the guard's detectors logging, not acting).

Signals, per diverged trial (diverged_at = the step the sweep's rule fired):
  loss_up      first step the training loss rose 10% above its running minimum after warm-up
               (the loss "moving")
  loss_spike   first loss_spike detection (the guard's robust-z / 2x rule)
  attn_100     first step the max attention logit exceeded 100 (guard.attn_logit_max)
  attn_x4      first step the max attention logit reached 4x its value at the end of warm-up
               (a growth-trend rule, no absolute threshold)
  logit_z_10   first step |mean output log-partition| exceeded 10
and, over the trials that did NOT diverge, how often each trend rule fired anyway (its
false-alarm rate at this scale).

    python3 scripts/early_warning.py runs/sweep-stability [--warmup 10] [--json out.json]
"""

import argparse
import json
import pathlib
import statistics


def jsonl(p):
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def signals(metrics, warmup):
    s = {}
    best = None
    attn0 = None
    for m in metrics:
        step, loss, attn, z = m["step"], m.get("loss"), m.get("max_attn_logit"), m.get("logit_z")
        if step == warmup and attn is not None:
            attn0 = attn
        if loss is not None and step > warmup:
            if best is not None and loss > 1.1 * best and "loss_up" not in s:
                s["loss_up"] = step
            best = loss if best is None else min(best, loss)
        if attn is not None and attn > 100 and "attn_100" not in s:
            s["attn_100"] = step
        if attn0 and attn is not None and step > warmup and attn >= 4 * attn0 and "attn_x4" not in s:
            s["attn_x4"] = step
        if z is not None and abs(z) > 10 and "logit_z_10" not in s:
            s["logit_z_10"] = step
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    d = pathlib.Path(a.dir)
    results = jsonl(d / "results.jsonl")
    names = ["loss_up", "loss_spike", "attn_100", "attn_x4", "logit_z_10"]
    lead = {n: [] for n in names}
    seen = {n: 0 for n in names}
    false_alarm = {n: 0 for n in names}
    n_div = n_ok = 0
    rows = []
    for r in results:
        tdir = d / "trials" / r["id"]
        s = signals(jsonl(tdir / "metrics.jsonl"), a.warmup)
        if r.get("first_loss_spike") is not None:
            s["loss_spike"] = r["first_loss_spike"]
        if r["status"] == "diverged" and r.get("diverged_at"):
            n_div += 1
            at = r["diverged_at"]
            row = {"id": r["id"], "diverged_at": at}
            for n in names:
                if n in s and s[n] <= at:
                    seen[n] += 1
                    lead[n].append(at - s[n])
                    row[n] = at - s[n]
            rows.append(row)
        elif r["status"] == "finished":
            n_ok += 1
            for n in names:
                false_alarm[n] += n in s
    print(f"{n_div} diverged trials, {n_ok} finished")
    print(f"{'signal':<12} {'fired before divergence':>24} {'median lead (steps)':>20} {'min':>5} {'max':>5} {'fired in finished trials':>26}")
    summary = {}
    for n in names:
        l = lead[n]
        med = statistics.median(l) if l else None
        summary[n] = {"fired": seen[n], "of": n_div, "median_lead": med, "min_lead": min(l) if l else None,
                      "max_lead": max(l) if l else None, "false_alarms": false_alarm[n], "finished": n_ok}
        print(f"{n:<12} {seen[n]:>12} of {n_div:<9} {'' if med is None else f'{med:.0f}':>20} "
              f"{'' if not l else min(l):>5} {'' if not l else max(l):>5} {false_alarm[n]:>14} of {n_ok}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
