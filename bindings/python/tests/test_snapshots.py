"""keel's rollback snapshots: copied behind the loop's back yet exactly the state of their
step, failures surfacing at the next step, host buffers reused; and rollbacks to the
trainer's own checkpoints (HF checkpoint-N, Lightning .ckpt, torch.save and
torch.distributed.checkpoint registered by hand) with no in-memory copy beyond the base."""

import json
import os
import threading
import time

import pytest
import torch

import keel.snapshots as ks
import keel.torch as kt


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    return model, opt, sched


def train_step(model, gopt, i, poison=False):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, 50, (4, 8), generator=g)
    loss = torch.nn.functional.cross_entropy(model(x), x[:, 0])
    if poison:
        loss = loss * float("nan")
    loss.backward()
    a = gopt.step(loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    gopt.zero_grad()
    return a


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def opt_state(opt):
    return {(i, k): v.clone() for i, (p, s) in enumerate(opt.state.items()) for k, v in s.items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snap_opt_state(st):
    return {(i, k): v for i, s in st["optimizer"]["state"].items() for k, v in s.items()}


@pytest.fixture
def slow_copy(monkeypatch):
    """Each host tensor's background copy sleeps first: the loop runs on meanwhile."""
    real = ks._copy

    def slow(dst, src):
        time.sleep(0.03)
        real(dst, src)

    monkeypatch.setattr(ks, "_copy", slow)


def watch_updates(gopt, opt):
    """Records, at each optimizer update, whether a snapshot copy was still in flight."""
    seen = []
    inner = opt.step

    def step(*a, **k):
        seen.append(gopt._stager.busy)
        return inner(*a, **k)

    step._wrapped_by_lr_sched = True
    opt.step = step
    return seen


def test_async_snapshot_is_its_steps_state_while_the_next_steps_run(slow_copy):
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10)
    updates = watch_updates(gopt, opt)
    for i in range(1, 11):
        train_step(model, gopt, i)
    at10 = (weights(model), opt_state(opt), sched.state_dict())
    # step 10 returned with its snapshot still being copied: the loop was not stalled
    assert gopt._stager.busy and not gopt._stager.job.future.done()
    assert gopt.snapshots.steps == [0]
    train_step(model, gopt, 11)
    train_step(model, gopt, 12)
    # every update waited for the copy (a copy still running would read half-updated tensors)
    assert not any(updates), updates
    assert gopt.snapshots.steps == [0, 10]
    snap = gopt.snapshots.get(10)
    assert same(at10[0], snap["model"]) and same(at10[1], snap_opt_state(snap))
    assert snap["scheduler"] == at10[2] and snap["step"] == 10
    # bit for bit what the synchronous copy takes
    model2, opt2, sched2 = make()
    g2 = kt.GuardedOptimizer(opt2, model=model2, scheduler=sched2, snapshot_every=10, snapshot_async=False)
    for i in range(1, 13):
        train_step(model2, g2, i)
    assert g2._stager is None and g2.snapshots.steps == [0, 10]
    s2 = g2.snapshots.get(10)
    assert same(s2["model"], snap["model"]) and same(snap_opt_state(s2), snap_opt_state(snap))
    assert same(weights(model), weights(model2))


def test_rollback_after_async_snapshots_restores_exactly_and_reuses_buffers(slow_copy):
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10, keep=2)
    ptrs = {}
    for i in range(1, 42):
        train_step(model, gopt, i)
        if i == 40:
            at40 = (weights(model), opt_state(opt), sched.last_epoch)
        if i in (12, 22, 32):  # the snapshot of i - 2 is complete by now
            st = gopt.snapshots.get(i - 2)
            ptrs[i - 2] = {t.data_ptr() for t in ks._tensors([st["model"], st["optimizer"]], [])}
    # the snapshot pruned (10) lent its host buffers to the next one (30): no new allocation
    assert ptrs[30] == ptrs[10] and not ptrs[20] & ptrs[10]
    assert gopt.snapshots.steps == [0, 30, 40]
    # held: keep=2 snapshots of weights + AdamW's two moments (12 B per parameter) and the base
    # of step 0 (weights only: AdamW has no state before its first step), plus ~10 kB of RNG each
    n = sum(p.numel() for p in model.parameters())
    assert (2 * 12 + 4) * n <= gopt.snapshot_bytes <= (2 * 12 + 4) * n + 3 * 12_000
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (42, 43, 44)]
    assert kinds == ["skip", "skip", "rollback"], kinds
    assert same(at40[0], weights(model)) and same(at40[1], opt_state(opt)) and sched.last_epoch == at40[2]


def test_buffers_a_forward_writes_are_copied_at_once(slow_copy):
    # BatchNorm's running statistics change in the next step's forward, while the weights'
    # copy is still running: they are copied with the snapshot's step, not later
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=5)
    for i in range(1, 8):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()  # the forward moves the running statistics
        gopt.step(model(x).pow(2).mean().detach())
        gopt.zero_grad()
        if i == 5:
            at5 = weights(model)
    assert not same(at5, weights(model))
    assert same(at5, gopt.snapshots.get(5)["model"])


def test_a_failed_background_write_surfaces_at_the_next_step(tmp_path, monkeypatch):
    d = tmp_path / "snaps"
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10, snapshot_dir=d)
    train_step(model, gopt, 1)  # the base, written at once
    real_save = torch.save
    writers = []

    def full(obj, f, *a, **k):
        writers.append(threading.current_thread().name)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    for i in range(2, 11):
        train_step(model, gopt, i)  # step 10's write fails in the background: not here
    with pytest.raises(OSError, match=r"step-00000010\.pt: writing keel's rollback snapshot failed.*snapshot_dir"):
        train_step(model, gopt, 11)
    assert writers and writers[0].startswith("keel-snapshot")  # it was written off the loop's thread
    assert gopt.step_count == 10  # step 11 was not taken
    assert sorted(os.listdir(d)) == ["step-00000000.pt"]  # no half-written file
    # the disk is freed: the snapshot is taken again at the next quiet step
    monkeypatch.setattr(torch, "save", real_save)
    train_step(model, gopt, 11)
    w11 = weights(model)
    train_step(model, gopt, 12)
    assert sorted(os.listdir(d)) == ["step-00000000.pt", "step-00000011.pt"]
    assert same(w11, torch.load(d / "step-00000011.pt", weights_only=True)["model"])


# -- rollback to checkpoints the loop saved itself -------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_rollback_to_a_registered_checkpoint(tmp_path, fmt, world_of_one):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, rollback_from="checkpoints", keep=2)

    def save(step):
        path = tmp_path / f"ckpt-{step}{'.pt' if fmt == 'torch' else ''}"
        if fmt == "torch":
            torch.save({"model": model.state_dict(), "optimizer": gopt.state_dict()}, path)
        else:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path)
        return gopt.register_checkpoint(path, format=fmt)

    for i in range(1, 26):
        train_step(model, gopt, i)
        if i % 10 == 0:
            assert save(i)
        if i == 20:
            at20 = (weights(model), opt_state(opt), sched.last_epoch)
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (26, 27, 28)]
    assert kinds == ["skip", "skip", "rollback"], kinds
    assert same(at20[0], weights(model)) and same(at20[1], opt_state(opt)) and sched.last_epoch == at20[2]
    # no in-memory snapshot beyond the base, and the rollback read the checkpoint
    assert gopt.snapshots.steps == [0] and gopt.checkpoints.steps == [10, 20]
    assert not save(30)  # saved inside the open incident: not a target
    # saved inside the incident, the optimizer's state dict carries the checkpoint as the resume's target
    ref = gopt.state_dict()["keel"]["rollback_base"]
    assert ref["step"] == 20 and ref["checkpoint"]["path"].endswith(f"ckpt-20{'.pt' if fmt == 'torch' else ''}")
    model2, opt2, sched2 = make(seed=3)
    g2 = kt.GuardedOptimizer(opt2, model=model2, scheduler=sched2, rollback_from="checkpoints")
    g2.load_state_dict(gopt.state_dict())
    assert g2.checkpoints.steps == [20]


def test_checkpoint_registration_rules(tmp_path):
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, rollback_from="checkpoints", keep=2)
    with pytest.raises(ValueError, match="format"):
        gopt.register_checkpoint(tmp_path / "x", format="safetensors")
    with pytest.raises(ValueError, match="rollback_from"):
        kt.GuardedOptimizer(opt, rollback_from="disk")
    last = tmp_path / "last.pt"
    for i in range(1, 31):
        train_step(model, gopt, i)
        if i % 10 == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, last)
            gopt.register_checkpoint(last)
    # one file written three times: only its newest content is a target
    assert gopt.checkpoints.steps == [30]
    os.unlink(last)  # a rotation deleted it: no target, the base is
    assert gopt.checkpoints.steps == []
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (31, 32, 33)]
    assert kinds[-1] == "rollback" and gopt.snapshots.steps == [0]
    assert same(weights(model), weights(make()[0]))  # back to the initial weights
    # a registered file damaged since is named when the rollback needs it
    for i in range(34, 50):
        train_step(model, gopt, i)
        if i == 45:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, last)
            assert gopt.register_checkpoint(last)
    with open(last, "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match=r"last\.pt: the checkpoint registered as a rollback target cannot be loaded"):
        for i in range(50, 60):
            train_step(model, gopt, i, poison=True)


# -- the frameworks' own checkpoints ------------------------------------------------------------


def test_hf_rolls_back_to_the_trainers_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    import safetensors.torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback

    import keel.hf
    from conftest import small_config
    from test_hf import PoisonAt, Tokens, args

    class WeightsAt(TrainerCallback):
        def __init__(self, step):
            self.step, self.w = step, None

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step == self.step:
                self.w = weights(model)

    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison, seen = PoisonAt(model, [16, 17, 18]), WeightsAt(18)
    cb = keel.hf.GuardCallback(rollback_from="checkpoints", keep=2)
    a = args(tmp_path, max_steps=25, save_strategy="steps", save_steps=5)
    tr = Trainer(model=model, args=a, train_dataset=Tokens(), callbacks=[cb, poison, seen])
    tr.train()
    assert [(x.step, x.kind) for x in cb.actions] == [(16, "skip"), (17, "skip"), (18, "rollback")]
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    restored = [e["detail"] for e in ev if e["kind"] == "restored"]
    # the incident began at 16: checkpoint-15 may hold its start, checkpoint-10 is the target
    assert [(r["to_step"], os.path.basename(r["from"])) for r in restored] == [(10, "checkpoint-10")]
    # the weights after the rollback are checkpoint-10's, exactly
    saved = safetensors.torch.load_file(str(tmp_path / "checkpoint-10" / "model.safetensors"))
    assert saved.keys() == seen.w.keys() and all(torch.equal(saved[k], seen.w[k]) for k in saved)
    # nothing held beyond the base; checkpoints 20 and 25 were saved inside the incident (not targets)
    assert cb.gopt.snapshots.steps == [0] and cb.gopt.checkpoints.steps == [10, 15]
    assert cb.guard.lr_factor == 0.5


def test_lightning_rolls_back_to_the_model_checkpoint(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    import keel.lightning
    from test_lightning import Tiny, loader

    class Seen(L.Callback):
        w = None

        def on_train_batch_end(self, trainer, module, out, batch, i):
            if trainer.global_step == 42:
                self.w = weights(module)

    m, seen = Tiny(poison=[40, 41, 42]), Seen()
    cb = keel.lightning.GuardCallback(rollback_from="checkpoints", keep=2)
    ck = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1)
    tr = L.Trainer(max_steps=60, callbacks=[cb, ck, seen], default_root_dir=tmp_path, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, accelerator="cpu")
    tr.fit(m, loader())
    assert [(a.step, a.kind) for a in cb.actions][-1] == (42, "rollback"), cb.actions
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    restored = [e["detail"] for e in ev if e["kind"] == "restored"]
    assert [(r["to_step"], os.path.basename(r["from"])) for r in restored] == [(30, "epoch=0-step=30.ckpt")]
    saved = torch.load(tmp_path / "ck" / "epoch=0-step=30.ckpt", weights_only=False)["state_dict"]
    assert same(saved, seen.w)
    assert cb.gopt.snapshots.steps == [0] and 50 not in cb.gopt.checkpoints.steps


def test_a_pickle_planted_in_a_dcp_snapshot_is_refused_not_run(tmp_path):
    """The small per-rank file of a dcp snapshot (RNG, guard, scheduler) is read with
    weights_only: a pickle planted in its place raises instead of running code."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    gopt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, snapshot_every=5,
                               snapshot_format="dcp", snapshot_dir=tmp_path / "snaps")

    def step(i, poison=False):
        loss = model(torch.randn(2, 4, generator=torch.Generator().manual_seed(i))).pow(2).mean()
        loss.backward()
        a = gopt.step(loss * float("nan") if poison else loss)
        gopt.zero_grad()
        return a

    for i in range(1, 11):
        step(i)
    rest = tmp_path / "snaps" / "step-00000010" / "rest-rank0.pt"
    assert rest.exists()
    rest.write_bytes(pickle.dumps({"step": Evil()}))
    with pytest.raises(Exception, match="rest-rank0|step-00000010|weights"):
        for i in range(11, 16):  # three NaNs in a row: a rollback to step 10
            step(i, poison=i >= 12)
    assert not marker.exists()
