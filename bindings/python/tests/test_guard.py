"""keel.Guard is keel train's guard: same detections as `keel watch`, same events as the
live guard of `keel train`, state that round-trips, bad keys refused, NaN acted on."""

import json
import math
import pathlib

import pytest

import keel
from conftest import run_keel


def healthy(i):
    noise = ((i * 2654435761) % 1000) / 1000.0 - 0.5
    return 2.0 + 3.0 * math.exp(-i / 50.0) + 0.05 * noise, 1.0 + 0.1 * noise


def stream():
    """A metric stream with every kind of trouble: NaN, loss spikes, a grad spike,
    attention-logit and logit drift warnings, then a slow climb (divergence)."""
    rows = []
    for i in range(1, 400):
        loss, g = healthy(i)
        row = {"step": i, "loss": loss, "grad_norm": g, "max_attn_logit": 20.0 + i * 0.1, "logit_z": 1.0}
        if i == 120:
            row["loss"] = None  # NaN, as keel logs it
        if i in (150, 151):
            row["loss"] = loss * 3
        if i == 200:
            row["grad_norm"] = 40.0
        if i >= 250:
            row["max_attn_logit"] = 150.0
            row["logit_z"] = -70.0
        if i >= 300:
            row["loss"] = loss * 1.003 ** (i - 300)
        rows.append(row)
    return rows


def feed(guard, rows):
    events = []
    for r in rows:
        loss = math.nan if r["loss"] is None else r["loss"]
        a = guard.observe(r["step"], loss, r["grad_norm"], max_attn_logit=r["max_attn_logit"], logit_z=r["logit_z"])
        events.extend(a.events)
    return events


def test_detections_equal_keel_watch(keel_bin, tmp_path):
    rows = stream()
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_keel(keel_bin, "watch", f, "--json", check=False)
    assert r.returncode == 2, r.stderr  # the climb is a divergence
    watched = [json.loads(l) for l in r.stdout.splitlines()]
    kinds = {d["detector"] for d in watched}
    assert {"nonfinite", "loss_spike", "grad_spike", "attn_logit", "logit_drift", "divergence"} <= kinds, kinds
    # detect-only guard (as watch): its events are exactly watch's, in order, up to the
    # first divergence (where watch stops)
    g = keel.Guard(enabled=False)
    ev = feed(g, rows)
    dets = [e["detail"] for e in ev]
    assert all(e["kind"] in ("spike", "warning", "divergence") for e in ev)
    first_div = next(i for i, d in enumerate(dets) if d["kind"] == "divergence")
    assert dets[: first_div + 1] == watched
    # an acting guard sees the same detections (flagged steps stay out of the windows
    # either way) and adds its actions
    g2 = keel.Guard(events=tmp_path / "events.jsonl")
    ev2 = feed(g2, rows)
    dets2 = [e["detail"] for e in ev2 if e["kind"] in ("spike", "warning", "divergence")]
    assert dets2[: first_div + 1] == watched
    acts = [e["kind"] for e in ev2 if e["kind"] not in ("spike", "warning", "divergence")]
    assert "skip" in acts and "rollback" in acts, acts
    on_disk = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"], e["detail"]) for e in on_disk] == [(e["step"], e["kind"], e["detail"]) for e in ev2]


def test_same_events_as_keel_train(keel_bin, tmp_path):
    """The live guard of `keel train` over a run with injected faults, and keel.Guard over
    that run's metrics.jsonl: the same detections and the same actions at the same steps."""
    run = tmp_path / "run"
    run_keel(
        keel_bin, "--threads", "1", "train", "--preset", "micro", "--steps", "80", "--out", run,
        "--set", "checkpoint.every=20", "--set", "eval.every=0", "--set", "train.report=false",
        "--inject", "nan@30", "--inject", "bad-batch@45", "--inject", "bad-batch@47", "--inject", "bad-batch@49",
    )
    live = [json.loads(l) for l in (run / "events.jsonl").read_text().splitlines()]
    ours = {"spike", "warning", "divergence", "skip", "lr_backoff", "lr_restore", "rollback", "give_up", "bad_batch"}
    live = [(e["step"], e["kind"]) for e in live if e["kind"] in ours]
    assert (30, "skip") in live and any(k == "lr_backoff" for _, k in live), live
    g = keel.Guard()
    mine = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        loss = math.nan if m["loss"] is None else m["loss"]
        gn = math.nan if m["grad_norm"] is None else m["grad_norm"]
        a = g.observe(m["step"], loss, gn, max_attn_logit=m["max_attn_logit"], logit_z=m["logit_z"], lr=m["lr"])
        mine += [(e["step"], e["kind"]) for e in a.events]
    assert mine == live


def test_state_round_trip_resumes_exactly():
    rows = stream()[:330]
    whole = keel.Guard()
    ev_whole = feed(whole, rows)
    a = keel.Guard()
    ev = feed(a, rows[:160])
    saved = json.loads(json.dumps(a.state_dict()))  # survives JSON, as in a checkpoint
    b = keel.Guard()
    b.load_state_dict(saved)
    ev += feed(b, rows[160:])
    strip = lambda es: [(e["step"], e["kind"], e["detail"]) for e in es]
    assert strip(ev) == strip(ev_whole)
    assert b.state_dict()["state"] == whole.state_dict()["state"]


def test_bad_keys_and_values_are_refused():
    with pytest.raises(ValueError, match=r"guard\.loss_zz.*loss_z.*window"):
        keel.Guard(loss_zz=3)
    with pytest.raises(ValueError, match="lr_backoff"):
        keel.Guard(lr_backoff=2.0)
    with pytest.raises(ValueError, match="guard"):
        keel.Guard(loss_z="high")
    # a non-finite setting is named, not "not valid JSON"
    with pytest.raises(ValueError, match=r"guard\.loss_z: must be a finite number, got nan"):
        keel.Guard(loss_z=float("nan"))
    g = keel.Guard()
    with pytest.raises(ValueError, match="unknown metric 'attn'.*max_attn_logit"):
        g.observe(1, 2.0, 1.0, attn=3.0)


def test_nonfinite_is_acted_on_never_raised():
    g = keel.Guard(skips_before_backoff=100)
    for i in range(1, 50):
        g.observe(i, 3.0 - 0.01 * i, 1.0)
    step = 50
    for bad in (math.nan, math.inf, -math.inf, None):  # None: a missing loss
        a = g.observe(step, bad, 1.0)
        assert (a.kind, a.skip) == ("skip", True), a
        assert a.detections[0]["detector"] == "nonfinite"
        g.observe(step + 1, 2.5, 1.0)  # a good step between: no persistence
        step += 2
    a = keel.Guard().observe(1, 2.0, math.nan)
    assert a.skip and a.detections[0]["detector"] == "nonfinite"


def test_policy_escalates_to_give_up():
    g = keel.Guard(max_rollbacks=1)
    kinds = []
    for i in range(1, 40):
        g.observe(i, 3.0, 1.0)
    for i in range(40, 80):
        a = g.observe(i, math.nan, 1.0)
        kinds.append(a.kind)
        if a.kind == "give_up":
            break
    assert kinds[0] == "skip" and "lr_backoff" in kinds and "rollback" in kinds and kinds[-1] == "give_up", kinds
    assert "rollbacks" in a.diagnosis
