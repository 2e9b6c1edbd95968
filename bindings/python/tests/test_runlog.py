"""keel's run directory from PyTorch (keel.torch.RunLogger, GuardedOptimizer(log_dir=), the HF
and Lightning callbacks' log_dir=) and the guard's events on the job's own loggers: the files
are keel's format (`keel report` draws them, `keel watch` follows them), lines are whole
after a kill, only rank 0 writes, and a skip or rollback shows on TensorBoard and W&B at its
step."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import keel
import keel.torch as kt
from conftest import run_keel, small_config

torch.set_num_threads(1)


def need_tensorboard():
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard): the "
                                              "TensorBoard checks read the event files it writes")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def llama(**over):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(small_config(num_hidden_layers=2, **over))


def tokens(i, b=4, t=16):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.arange(t) * (1 + i % 3) + torch.randint(0, 3, (b, t), generator=g)) % 256


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def loop(gopt, model, sched, steps, poison=(), on_step=None):
    """A plain training loop: NaN loss on the `poison` steps (the guard skips, then rolls back)."""
    for i in range(1, steps + 1):
        x = tokens(i)
        loss = model(input_ids=x, labels=x).loss
        if i in poison:
            loss = loss * float("nan")
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = params(model) if on_step else None
        gopt.step(loss, gn)
        gopt.zero_grad()
        if on_step:
            on_step(i, before)


# -- a plain loop ------------------------------------------------------------------------
def test_plain_loop_writes_a_keel_run_that_report_and_watch_read(tmp_path, keel_bin):
    run = tmp_path / "run"
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=5, early_window=4, probe_every=5,
                               log_dir=run, tokens_per_step=64)
    measured, sched_lr = {}, {}

    def on_step(i, before):
        sched_lr[i] = sched.get_last_lr()[0]  # already stepped: the LR of step i + 1
        if i in (2, 10):  # telemetry steps: ‖Δw‖/‖w‖ over every parameter, measured here
            now = params(model)
            d2 = sum(float((now[n] - before[n]).double().pow(2).sum()) for n in now)
            w2 = sum(float(before[n].double().pow(2).sum()) for n in now)
            measured[i] = math.sqrt(d2 / w2)
        if i % 10 == 0:
            gopt.log_val(3.0 + i / 100)

    loop(gopt, model, sched, 24, poison=(13, 14, 15), on_step=on_step)

    lines = read_jsonl(run / "metrics.jsonl")
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 25))
    assert [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m] == [(10, 3.1), (20, 3.2)]
    for m in steps:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "skipped"} <= m.keys(), m
        assert m["tokens"] == 64 * m["step"]
    assert [m["step"] for m in steps if m["skipped"]] == [13, 14, 15]
    assert all(m["loss"] is None and m["grad_norm"] is None for m in steps if m["skipped"])  # NaN: null, as keel writes
    # the LR the update used: the scheduler's, then halved by the rollback at 15 for good
    by = {m["step"]: m for m in steps}
    assert by[12]["lr"] == pytest.approx(sched_lr[11])
    assert by[20]["lr"] == pytest.approx(sched_lr[19] * 0.5)
    # early signals on telemetry steps only (the early window, then every probe_every)
    tel_steps = [m["step"] for m in steps if "max_attn_logit" in m]
    assert tel_steps == [1, 2, 3, 4, 5, 10, 15, 16, 17, 18, 19, 20], tel_steps  # the window restarts at the rollback
    assert by[2]["update_ratio"] == pytest.approx(measured[2], rel=1e-3)
    assert by[10]["update_ratio"] == pytest.approx(measured[10], rel=1e-3)
    tel = {t["step"]: t for t in read_jsonl(run / "telemetry.jsonl")}
    assert sorted(tel) == tel_steps
    assert len(tel[10]["max_attn_logit_per_layer"]) == 2
    assert max(tel[10]["max_attn_logit_per_layer"]) == pytest.approx(by[10]["max_attn_logit"])
    assert tel[10]["logit_z_mean"] == pytest.approx(by[10]["logit_z"])
    assert set(tel[10]["update_ratio"]) == {"embed", "attn", "mlp", "norm", "head"}
    assert tel[15]["update_ratio"] is None  # the rollback step applied no update
    ev = read_jsonl(run / "events.jsonl")
    assert {(e["step"], e["kind"]) for e in ev} >= {(13, "skip"), (15, "rollback"), (15, "restored")}
    assert next(e for e in ev if e["kind"] == "restored")["detail"]["to_step"] == 10

    r = run_keel(keel_bin, "report", run)
    html = (run / "report.html").read_text()
    assert "restored step 10" in html and "rollback" in html
    for name in ("loss", "lr", "grad_norm", "update_ratio", "attn_logit", "logit_drift", "layer_attn_logit"):
        assert (run / "plots" / f"{name}.svg").exists(), (name, r.stderr)
    w = run_keel(keel_bin, "watch", run / "metrics.jsonl")
    assert "handled" in w.stdout + w.stderr and "no unhandled divergence" in w.stderr


def test_events_reach_an_event_hook_and_tensorboard_at_their_step(tmp_path):
    need_tensorboard()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=5)
    seen = []
    gopt.add_event_hook(lambda s, scalars, text: seen.append((s, scalars, text)))
    gopt.add_event_hook(kt.tensorboard_hook(str(tmp_path / "tb")))

    def broken(s, scalars, text):
        raise RuntimeError("logger down")

    gopt.add_event_hook(broken)
    with pytest.warns(UserWarning, match="logger down"):
        loop(gopt, model, None, 16, poison=(8, 11, 12, 13))  # a broken hook warns; training goes on
    assert gopt.step_count == 16
    assert [s for s, _, _ in seen] == [8, 9, 11, 12, 13]  # 9: the NaN at 8 was a bad batch
    s8, s13 = seen[0][1], seen[-1][1]
    assert s8 == {"keel/event/spike": 1.0, "keel/event/skip": 1.0, "keel/lr_factor": 1.0, "keel/rollbacks": 0.0}
    assert s13["keel/event/rollback"] == 1.0 and s13["keel/rollbacks"] == 1.0 and s13["keel/lr_factor"] == 0.5
    assert "restored step 5" in seen[-1][2]
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("keel/event/skip")] == [(8, 1), (11, 1), (12, 1), (13, 1)]
    assert [(e.step, e.value) for e in ea.Scalars("keel/rollbacks")][-1] == (13, 1)
    text = {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors("keel/events/text_summary")}
    assert sorted(text) == [8, 9, 11, 12, 13] and "rollback" in text[13] and "bad_batch" in text[9]


def test_tensorboard_hook_without_tensorboard_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    with pytest.raises(ImportError, match="pip install tensorboard"):
        kt.tensorboard_hook(str(tmp_path / "tb"))


def test_a_guard_writing_elsewhere_is_mirrored_into_the_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    guard = keel.Guard(events=tmp_path / "mine.jsonl")
    gopt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), guard, model=model, snapshot_every=5,
                               log_dir=tmp_path / "run")
    for i in range(1, 15):
        x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(i))
        loss = torch.nn.functional.cross_entropy(model(x), x[:, 0]) * (float("nan") if i in (9, 10, 11) else 1.0)
        loss.backward()
        gopt.step(loss)
        gopt.zero_grad()
    mine = [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "mine.jsonl")]
    run = [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert run == mine and (11, "restored") in run
    # parameter names keel does not know land in the "other" group
    groups = [t["update_ratio"] for t in read_jsonl(tmp_path / "run" / "telemetry.jsonl") if t["update_ratio"]]
    assert groups and all(set(g) == {"other"} for g in groups)


# -- the logger itself -------------------------------------------------------------------
def test_a_resumed_job_replaces_the_steps_it_logs_again(tmp_path):
    log = kt.RunLogger(tmp_path, tokens_per_step=10)
    for s in range(1, 11):
        log.log_step(s, 2.0, grad_norm=1.0, lr=1e-3)
        log.log_telemetry(s, logit_z_mean=1.0)
    log.log_val(1.5, step=5)
    log.close()
    end = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    # resumed from a checkpoint of step 5: steps 6.. are logged again
    log = kt.RunLogger(tmp_path, tokens_per_step=10)
    for s in range(6, 9):
        log.log_step(s, 1.0, grad_norm=float("inf"), lr=1e-3, my_metric=7)
    log.close()
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(m["step"], "val_loss" in m) for m in lines] == [(s, False) for s in range(1, 6)] + [(5, True)] + [
        (s, False) for s in range(6, 9)]
    assert [m["tokens"] for m in lines if "loss" in m] == [10 * s for s in range(1, 9)]  # the count goes on
    assert lines[6]["elapsed_s"] >= lines[4]["elapsed_s"] and end["elapsed_s"] > 0
    assert lines[-1]["grad_norm"] is None and lines[-1]["my_metric"] == 7.0
    assert [t["step"] for t in read_jsonl(tmp_path / "telemetry.jsonl")] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="keel's own fields"):
        kt.RunLogger(tmp_path).log_step(9, 1.0, elapsed_s=3)


def test_a_killed_job_leaves_whole_lines(tmp_path):
    script = textwrap.dedent(f"""
        import keel.torch as kt, sys
        log = kt.RunLogger({str(tmp_path)!r})
        s = 0
        while True:
            s += 1
            log.log_step(s, 1.0 / s, grad_norm=0.5, lr=1e-3, **{{f"m{{i}}": i * 1.5 for i in range(300)}})
            if s == 50:
                print("go", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "go"
        time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) >= 50 and [m["step"] for m in lines] == list(range(1, len(lines) + 1))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    kt.RunLogger(tmp_path / "r1", rank=1).log_step(1, 2.0)
    monkeypatch.setenv("RANK", "3")  # torchrun's rank, before the process group exists
    log = kt.RunLogger(tmp_path / "r3")
    log.log_step(1, 2.0)
    log.log_val(2.0, 1)
    assert not log.enabled and not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()
    monkeypatch.setenv("RANK", "0")
    kt.RunLogger(tmp_path / "r0").log_step(1, 2.0)
    assert read_jsonl(tmp_path / "r0" / "metrics.jsonl")[0]["loss"] == 2.0


def test_under_torch_distributed_only_rank_zero_writes(tmp_path, monkeypatch):
    """Two ranks' wrappers, one process: torch.distributed's rank as each would see it (the
    values are taken as global: reduce=False, no collective)."""
    d = torch.distributed
    monkeypatch.setattr(d, "is_available", lambda: True)
    monkeypatch.setattr(d, "is_initialized", lambda: True)
    monkeypatch.setattr(d, "get_world_size", lambda *a: 2)
    run = tmp_path / "run"
    for rank in (1, 0):
        monkeypatch.setattr(d, "get_rank", lambda *a, r=rank: r)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
        gopt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model=model, reduce=False,
                                   log_dir=run, tokens_per_step=64)
        assert gopt.logger.enabled == (rank == 0) and (gopt.guard.events_path is None) == (rank == 1)
        for step in range(1, 9):
            x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.cross_entropy(model(x), x[:, 0]) * (float("nan") if step == 5 else 1.0)
            loss.backward()
            gopt.step(loss)
            gopt.zero_grad()
        gopt.log_val(2.0 + rank, step=8)
        if rank == 1:
            assert not run.exists()  # rank 1 wrote nothing, not even the directory
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 9))
    assert [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m] == [(8, 2.0)]
    assert [(e["step"], e["kind"]) for e in read_jsonl(run / "events.jsonl")] == [(5, "spike"), (5, "skip"), (6, "bad_batch")]


@pytest.mark.parametrize("name, group", [
    ("model.embed_tokens.weight", "embed"), ("model.layers.0.self_attn.q_proj.weight", "attn"),
    ("model.layers.1.self_attn.k_norm.weight", "norm"), ("model.layers.0.mlp.down_proj.weight", "mlp"),
    ("model.layers.0.post_attention_layernorm.weight", "norm"), ("lm_head.weight", "head"),
    # torchtitan
    ("tok_embeddings.weight", "embed"), ("layers.3.attention.wq.weight", "attn"), ("layers.3.attention_norm.weight", "norm"),
    ("layers.3.feed_forward.w1.weight", "mlp"), ("norm.weight", "norm"), ("output.weight", "head"),
    # nanoGPT, under DDP and torch.compile
    ("module._orig_mod.transformer.wte.weight", "embed"), ("transformer.h.0.ln_1.weight", "norm"),
    ("transformer.h.0.attn.c_attn.weight", "attn"), ("transformer.h.0.mlp.c_fc.bias", "mlp"), ("net.0.weight", "other"),
])
def test_parameters_are_grouped_as_keel_groups_tensors(name, group):
    assert kt._param_group(name) == group


def test_log_val_needs_a_run_directory():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="log_dir="):
        kt.GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model).log_val(1.0)


# -- Hugging Face Trainer ------------------------------------------------------------------
def scalars(logdir):
    """{tag: [(step, value)]} and {tag: {step: text}} of the TensorBoard event files under logdir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents*"), recursive=True)
    assert len(files) == 1, files
    ea = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    sc = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    tx = {t: {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)} for t in ea.Tags()["tensors"]}
    return sc, tx


def hf_run(tmp_path, report_to, poison, max_steps=16, **cb_kw):
    from transformers import Trainer

    import keel.hf

    from test_hf import PoisonAt, Tokens, args

    model = llama()
    p = PoisonAt(model, poison)
    cb = keel.hf.GuardCallback(snapshot_every=5, **cb_kw)
    a = args(tmp_path, max_steps=max_steps, per_device_train_batch_size=4, logging_steps=4, report_to=report_to,
             eval_strategy="steps", eval_steps=8, per_device_eval_batch_size=4)
    tr = Trainer(model=model, args=a, train_dataset=Tokens(), eval_dataset=Tokens(n=8), callbacks=[cb, p])
    tr.train()
    return tr, cb


def test_hf_events_reach_tensorboard_at_their_step_and_the_run_directory(tmp_path, keel_bin):
    need_tensorboard()
    run = tmp_path / "run"
    tr, cb = hf_run(tmp_path, ["tensorboard"], [10, 11, 12], log_dir=run)
    assert [(a.step, a.kind) for a in cb.actions] == [(10, "skip"), (11, "skip"), (12, "rollback")]
    sc, tx = scalars(tmp_path)
    # HF's TensorBoardCallback got them through the Trainer's log (HF prefixes train/)
    assert sc["train/keel/event/skip"] == [(10, 1), (11, 1), (12, 1)]
    assert sc["train/keel/event/spike"] == [(10, 1), (11, 1), (12, 1)]
    assert sc["train/keel/event/rollback"] == [(12, 1)]
    # lr_factor and the rollback count also ride on every training log (steps 4, 8, 12, 16)
    assert dict(sc["train/keel/lr_factor"]) == {4: 1, 8: 1, 10: 1, 11: 1, 12: 0.5, 16: 0.5}
    assert dict(sc["train/keel/rollbacks"]) == {4: 0, 8: 0, 10: 0, 11: 0, 12: 1, 16: 1}
    # the Trainer's own log of step 12 (a logging step with an event) still happens
    assert [s for s, _ in sc["train/loss"]] == [4, 8, 12, 16]
    assert dict(sc["train/keel/skipped_steps"])[12] == 3
    assert {4, 8, 12, 16} <= {s for s, _ in sc["train/keel/max_attn_logit"]}
    text = tx["train/keel/events/text_summary"]
    assert sorted(text) == [10, 11, 12] and "restored step 5" in text[12]
    # keel's run directory: every step, the eval losses, the guard's events
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 17))
    evals = [h for h in tr.state.log_history if "eval_loss" in h]
    assert [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m] == [(h["step"], h["eval_loss"]) for h in evals]
    assert [m["step"] for m in lines if m.get("skipped")] == [10, 11, 12]
    assert all(m["tokens"] == 4 * 32 * m["step"] for m in lines if "loss" in m)  # counted from input_ids
    assert not (tmp_path / "keel-events.jsonl").exists()
    assert ("restored" in {e["kind"] for e in read_jsonl(run / "events.jsonl")})
    run_keel(keel_bin, "report", run)
    assert "restored step 5" in (run / "report.html").read_text()


def test_hf_give_up_is_reported_before_it_raises(tmp_path):
    from transformers import Trainer

    seen = []
    orig = Trainer.log

    def log(self, logs, *a, **k):  # what every report_to integration is handed, at which step
        seen.append((self.state.global_step, dict(logs)))
        return orig(self, logs, *a, **k)

    Trainer.log = log
    try:
        with pytest.raises(keel.GaveUp):
            hf_run(tmp_path, [], range(5, 40), max_rollbacks=0, log_dir=tmp_path / "run")
    finally:
        Trainer.log = orig
    gave_up = [(s, l) for s, l in seen if "keel/event/give_up" in l]
    assert [s for s, _ in gave_up] == [7] and gave_up[0][1]["keel/event/spike"] == 1
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 7  # the give-up step's line is written


def wandb_history(wandb_dir, wait_s=120.0):
    """The history rows of the offline W&B run under wandb_dir, read from its .wandb file
    (LevelDB-log records of wandb's protobuf `Record`). wandb-core, a separate process, writes
    the file; a finished run's file ends with an `exit` record, so this waits for it (a CI run
    once read the file before the rows were in it)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        rows, kinds = _wandb_records(wandb_dir)
        if "exit" in kinds:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"W&B's offline run file has no exit record after {wait_s:.0f} s "
                                 f"(records: {sorted(set(kinds))}): wandb.finish() did not finish writing it")
        time.sleep(0.5)


def _wandb_records(wandb_dir):
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(str(wandb_dir), "wandb", "offline-run-*", "*.wandb"))
    assert len(files) == 1, files
    data = open(files[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, rows, kinds, block = 7, b"", [], [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf = data[pos + 7:pos + 7 + n] if kind in (1, 2) else buf + data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record
            r = pb.Record()
            r.ParseFromString(buf)
            kinds.append(r.WhichOneof("record_type"))
            if kinds[-1] == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows, kinds


def test_hf_events_reach_wandb_offline(tmp_path, monkeypatch):
    try:
        import wandb
    except ImportError:
        pytest.skip("wandb is not installed (pip install wandb): the W&B offline check needs it")
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true", WANDB_PROJECT="keel-test",
                     WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true").items():
        monkeypatch.setenv(k, v)
    # what reached W&B's API, to tell "keel did not send it" from "W&B did not write it"
    from wandb.sdk.wandb_run import Run

    sent, log = [], Run.log

    def spy(self, data, *a, **kw):
        sent.append(dict(data))
        return log(self, data, *a, **kw)

    monkeypatch.setattr(Run, "log", spy)
    try:
        hf_run(tmp_path, ["wandb"], [7], max_steps=8)
    finally:
        wandb.finish()
    ev_sent = [d for d in sent if "train/keel/event/skip" in d]
    assert [(d["train/global_step"], d["train/keel/event/skip"]) for d in ev_sent] == [(7, 1)], sent
    rows = wandb_history(tmp_path)
    ev = [r for r in rows if "train/keel/event/skip" in r]
    assert [(r["train/global_step"], r["train/keel/event/skip"], r["train/keel/lr_factor"]) for r in ev] == [(7, 1, 1)], rows
    text = [r for r in rows if "train/keel/events" in r]
    # 8: the NaN at 7 was a bad batch (the same weights ran step 8 clean)
    assert [r["train/global_step"] for r in text] == [7, 8] and "skip" in text[0]["train/keel/events"]
    assert "bad_batch" in text[1]["train/keel/events"]
    assert any(r.get("train/keel/skipped_steps") == 1 and r["train/global_step"] == 8 for r in rows)


# -- Lightning -----------------------------------------------------------------------------
def lightning_fit(tmp_path, logger, poison, **cb_kw):
    L = pytest.importorskip("lightning.pytorch")
    import keel.lightning

    from test_lightning import Tiny, loader

    class Module(Tiny):
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            self.log("keel_step", float(self.trainer.global_step + 1))  # keel's number for this batch's step
            return loss

        def validation_step(self, batch, i):
            x = batch[0]
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), x[:, 0]))

    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(1))),
        batch_size=4)
    cb = keel.lightning.GuardCallback(snapshot_every=10, **cb_kw)
    tr = L.Trainer(max_steps=30, callbacks=[cb], default_root_dir=tmp_path, logger=logger, log_every_n_steps=1,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   gradient_clip_val=1.0, accelerator="cpu", val_check_interval=10, limit_val_batches=2)
    tr.fit(Module(poison=poison), loader(), val)
    return tr, cb


def test_lightning_events_reach_tensorboard_beside_the_batch_s_own_metrics(tmp_path, keel_bin):
    pytest.importorskip("lightning.pytorch")
    need_tensorboard()
    from lightning.pytorch.loggers import TensorBoardLogger

    run = tmp_path / "run"
    tr, cb = lightning_fit(tmp_path, TensorBoardLogger(tmp_path, name="tb"), [8, 20, 21, 22], log_dir=run,
                           tokens_per_step=32)
    # 8 is a bad batch (9 ran the same weights clean); 20-22 in a row are the weights
    assert [(a.step, a.kind) for a in cb.actions] == [(8, "skip"), (20, "skip"), (21, "skip"), (22, "rollback")]
    sc, tx = scalars(tmp_path / "tb")
    # Lightning logs step s's batch under its count of steps before it: keel's events sit there too
    at = {int(v): s for s, v in sc["keel_step"]}
    assert sc["keel/event/skip"] == [(at[8], 1), (at[20], 1), (at[21], 1), (at[22], 1)]
    assert at[8] == 7
    assert sc["keel/event/rollback"] == [(at[22], 1)] and sc["keel/rollbacks"][-1] == (at[22], 1)
    assert sc["keel/event/lr_backoff"][0] == (at[22], 1) and sc["keel/event/bad_batch"] == [(at[9], 1)]
    text = tx["keel/events/text_summary"]
    assert sorted(text) == [at[s] for s in (8, 9, 20, 21, 22)] and "step 22: rollback" in text[at[22]]
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20, 30]
    assert [m["step"] for m in lines if m.get("skipped")] == [8, 20, 21, 22]
    assert lines[-1]["tokens"] == 30 * 32
    run_keel(keel_bin, "report", run)
    assert "rollback" in (run / "report.html").read_text()


def test_lightning_logger_that_cannot_write_is_named_once_and_training_goes_on(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger, Logger

    class NoPackage(Logger):
        """A logger whose package is missing at its first write of keel's metrics."""

        name, version, experiment = "nopkg", 0, None

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("keel/") for k in metrics):
                raise ModuleNotFoundError("No module named 'wandb'", name="wandb")

        def log_hyperparams(self, *a, **k):
            pass

    csv = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr, cb = lightning_fit(tmp_path, [NoPackage(), csv], [5, 9])
    said = [str(x.message) for x in w if "keel.lightning" in str(x.message)]
    assert len(said) == 1 and "NoPackage" in said[0] and "install the `wandb` package" in said[0], said
    assert tr.global_step == 30 and [(a.step, a.kind) for a in cb.actions] == [(5, "skip"), (9, "skip")]
    import csv as csvmod

    with open(glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)[0]) as f:
        rows = [r for r in csvmod.DictReader(f) if r.get("keel/event/skip")]
    assert [int(r["step"]) for r in rows] == [4, 8]  # the other loggers still got them
