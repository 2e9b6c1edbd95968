"""keel.torch.GuardedOptimizer: a skip leaves weights and optimizer state untouched, a
back-off scales every group's LR for the update and restores it, a rollback restores model,
optimizer, scheduler and RNG state from the snapshot, giving up raises keel.GaveUp, disk
snapshots are never half-written, and the guard's state resumes with the checkpoint."""

import functools
import io
import os

import pytest
import torch

import keel
import keel.torch as kt


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    opt = torch.optim.AdamW([
        {"params": model[0].parameters(), "lr": 1e-2},
        {"params": model[2].parameters(), "lr": 3e-3},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    return model, opt, sched


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, 50, (4, 8), generator=g)
    return x, x[:, 0]


def train_step(model, gopt, i, poison=False, spike=False):
    x, y = batch(i)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("nan")
    if spike:  # a finite loss spike: the loss detectors' business, not a bad batch's
        loss = loss * 1e4
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    a = gopt.step(loss, gn)
    gopt.zero_grad()
    return a


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def opt_state(opt):
    return {(i, k): v.clone() for i, (p, s) in enumerate(opt.state.items()) for k, v in s.items()}


def test_skip_leaves_weights_and_optimizer_state_untouched():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched)
    for i in range(1, 31):
        assert train_step(model, gopt, i).kind == "proceed"
    w, st, epoch = weights(model), opt_state(opt), sched.last_epoch
    a = train_step(model, gopt, 31, poison=True)
    assert (a.kind, a.skip) == ("skip", True) and a.detections[0]["detector"] == "nonfinite"
    assert same(w, weights(model)) and same(st, opt_state(opt))
    assert sched.last_epoch == epoch + 1  # the schedule follows the step count
    assert train_step(model, gopt, 32).kind == "proceed" and not same(w, weights(model))


def test_nans_with_clean_steps_between_are_bad_batches_and_keep_the_lr():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched)
    for i in range(1, 31):
        train_step(model, gopt, i)
    events = []
    for i in range(31, 37):  # three NaNs, each followed by a clean step with the same weights
        a = train_step(model, gopt, i, poison=(i % 2 == 1))
        assert a.kind == ("skip" if i % 2 else "proceed")
        events += [(e["step"], e["kind"]) for e in a.events if e["kind"] == "bad_batch"]
    assert events == [(32, "bad_batch"), (34, "bad_batch"), (36, "bad_batch")]
    assert gopt.guard.lr_factor == 1.0 and not gopt.guard.in_incident


def test_backoff_scales_every_group_and_restores():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, backoff_steps=5)
    seen = []
    inner = opt.step

    @functools.wraps(inner)  # keeps the scheduler's marker on the step
    def recording_step(*a, **k):
        seen.append([g["lr"] for g in opt.param_groups])
        return inner(*a, **k)

    opt.step = recording_step
    for i in range(1, 31):
        train_step(model, gopt, i)
    kinds = []
    for i in range(31, 37):  # three loss spikes with good steps between: skip, skip, lr_backoff
        kinds.append(train_step(model, gopt, i, spike=(i % 2 == 1)).kind)
    assert kinds == ["skip", "proceed", "skip", "proceed", "lr_backoff", "proceed"], kinds
    assert gopt.guard.lr_factor == 0.5
    sched_lrs = sched.get_last_lr()
    n = len(seen)
    train_step(model, gopt, 37)
    assert seen[n] == pytest.approx([0.5 * lr for lr in sched_lrs])  # the update used half
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(sched.get_last_lr())  # and the scheduler keeps its own
    for i in range(38, 44):
        a = train_step(model, gopt, i)
        if any(e["kind"] == "lr_restore" for e in a.events):
            break
    assert a.step == 41 and gopt.guard.lr_factor == 1.0  # back-off at 35 for 5 steps


def run_to_rollback(tmp_path=None, **kw):
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10, keep=2, **kw)
    at = {}
    for i in range(1, 26):
        train_step(model, gopt, i)
        if i == 20:
            at = dict(w=weights(model), st=opt_state(opt), epoch=sched.last_epoch, rng=torch.get_rng_state())
    torch.rand(5)  # move the RNG on
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (26, 27, 28)]
    return model, opt, sched, gopt, at, kinds


def test_rollback_restores_model_optimizer_scheduler_not_the_rng():
    model, opt, sched, gopt, at, kinds = run_to_rollback()
    assert kinds == ["skip", "skip", "rollback"], kinds
    assert same(at["w"], weights(model)) and same(at["st"], opt_state(opt))
    assert sched.last_epoch == at["epoch"]
    # the RNG moves on: a sampler drawing from it must not replay the incident's batches
    assert not torch.equal(torch.get_rng_state(), at["rng"])
    assert gopt.guard.lr_factor == 0.5  # a rollback lowers the LR for good
    assert train_step(model, gopt, 29).kind == "proceed"


def test_disk_snapshots_are_atomic_and_pruned(tmp_path, monkeypatch):
    d = tmp_path / "snaps"
    model, opt, sched, gopt, at, kinds = run_to_rollback(snapshot_dir=d)
    assert kinds[-1] == "rollback" and same(at["w"], weights(model))
    assert sorted(os.listdir(d)) == ["step-00000000.pt", "step-00000010.pt", "step-00000020.pt"]
    # a write that fails half way leaves the earlier snapshots and no stray file
    real_save = torch.save

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    # the message names the snapshot file and the fix
    with pytest.raises(OSError, match=r"step-00000\d+\.pt: writing keel's rollback snapshot failed.*snapshot_dir"):
        # the snapshot due at step 30 waits until the incident closes: the rollback at 28
        # restored clean weights, so guard.clean_after_rollback (10) quiet steps close it
        for i in range(29, 120):
            train_step(model, gopt, i)
    assert gopt.step_count == 38
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(d)) == ["step-00000000.pt", "step-00000010.pt", "step-00000020.pt"]
    torch.load(d / "step-00000020.pt", weights_only=True)
    # a snapshot truncated on disk is named when it is needed
    with open(d / "step-00000020.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match=r"step-00000020\.pt: keel's rollback snapshot cannot be read"):
        gopt.snapshots.get(20)
    # a state dict of neither shape is refused naming what it got, not a bare KeyError
    with pytest.raises(ValueError, match=r"got \['model', 'step'\]"):
        gopt.load_state_dict({"model": {}, "step": 3})


def test_give_up_raises():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, max_rollbacks=0)
    for i in range(1, 21):
        train_step(model, gopt, i)
    with pytest.raises(keel.GaveUp, match="gave up at step 23") as e:
        for i in range(21, 30):
            train_step(model, gopt, i, poison=True)
    assert "rollbacks" in e.value.diagnosis


def test_state_dict_resumes_the_guard():
    model, opt, sched = make()
    g1 = kt.GuardedOptimizer(opt, model=model)
    for i in range(1, 41):
        train_step(model, g1, i, poison=(i == 35))
    buf = io.BytesIO()
    torch.save(g1.state_dict(), buf)  # as a checkpoint holds it
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2, opt2, _ = make()
    model2.load_state_dict(model.state_dict())
    g2 = kt.GuardedOptimizer(opt2, model=model2)
    g2.load_state_dict(sd)
    assert g2.step_count == 40 and g2.guard.state_dict() == g1.guard.state_dict()
    for i in range(41, 46):
        a1, a2 = train_step(model, g1, i, poison=(i == 43)), train_step(model2, g2, i, poison=(i == 43))
        assert (a1.kind, a1.step) == (a2.kind, a2.step)
    assert same(weights(model), weights(model2))


def test_bad_arguments():
    model, opt, _ = make()
    with pytest.raises(ValueError, match="loss_zz"):
        kt.GuardedOptimizer(opt, loss_zz=1)
    with pytest.raises(ValueError, match="not both"):
        kt.GuardedOptimizer(opt, keel.Guard(), loss_z=5)
    with pytest.raises(ValueError, match="snapshot_every"):
        kt.GuardedOptimizer(opt, snapshot_every=0)


def test_rollback_to_the_initial_state_judges_it_by_its_own_history():
    """The detectors' windows come back with the weights: the initial weights' higher loss
    after a rollback to step 0 is not a spike against the trained weights' losses."""
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=1000)
    for i in range(1, 61):
        train_step(model, gopt, i)
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (61, 62, 63)]
    assert kinds == ["skip", "skip", "rollback"]
    after = [train_step(model, gopt, i).kind for i in range(64, 90)]
    assert after == ["proceed"] * len(after), after


def test_one_host_read_per_step(monkeypatch):
    """The guard reads the loss and the gradient norm the loop already has, in one transfer
    (`tolist` of a 2-element tensor): no other `.item()`, `float()`, `bool()` or `.tolist()`
    on a tensor, on healthy steps and skipped ones alike. Floats cost no read at all."""
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched)
    reads, inside = [], [False]
    inner = opt.step

    @functools.wraps(inner)
    def optimizer_step(*a, **k):  # the optimizer's own reads (AdamW's step counter) are not ours
        inside[0] = True
        try:
            return inner(*a, **k)
        finally:
            inside[0] = False

    opt.step = optimizer_step
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if not inside[0]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step = []
    for i in range(1, 40):
        x, y = batch(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i == 30:
            loss = loss * float("nan")
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        reads.clear()
        gopt.step(loss, gn)
        per_step.append(list(reads))
        gopt.zero_grad()
    assert all(r == ["tolist"] for r in per_step), per_step
    reads.clear()
    gopt.step(2.5, 1.0)
    assert reads == []


def test_two_rollbacks_to_one_snapshot_restore_the_same_state():
    """A rollback must not leave the optimizer sharing tensors with the snapshot (torch's
    load_state_dict keeps tensors whose dtype and device match): the second rollback to the
    same snapshot restores exactly what the first did."""
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10)
    for i in range(1, 11):
        train_step(model, gopt, i)
    at10 = (weights(model), opt_state(opt))
    for i in range(11, 21):  # no snapshot at 20: the rollbacks below keep the incident open
        train_step(model, gopt, i, poison=(i in (18, 19, 20)))
    assert gopt.last_action.kind == "rollback"
    assert same(at10[0], weights(model)) and same(at10[1], opt_state(opt))
    for i in range(21, 24):
        train_step(model, gopt, i)  # moves the moments on
    kinds = [train_step(model, gopt, i, poison=True).kind for i in (24, 25, 26)]
    assert kinds[-1] == "rollback", kinds
    assert same(at10[0], weights(model)) and same(at10[1], opt_state(opt))


def test_resume_rolls_back_to_the_resumed_state_not_the_initial_one():
    model, opt, sched = make()
    g1 = kt.GuardedOptimizer(opt, model=model)
    for i in range(1, 31):
        train_step(model, g1, i)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": g1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2, _ = make(seed=5)  # different weights until loaded
    g2 = kt.GuardedOptimizer(opt2, model=model2)
    model2.load_state_dict(ck["model"])
    g2.load_state_dict(ck["opt"])
    assert g2.snapshots.steps == [30]
    resumed = weights(model2)
    kinds = [train_step(model2, g2, i, poison=True).kind for i in (31, 32, 33)]
    assert kinds[-1] == "rollback" and same(resumed, weights(model2))


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_run_resumed_inside_an_incident_rolls_back_where_the_uninterrupted_one_does(tmp_path, fmt):
    poison = {12, 13, 27, 28, 29}  # two in a row at 12: an incident (one alone is a bad batch)
    kw = {} if fmt == "torch" else {"snapshot_format": "dcp"}

    def run(model, opt, sched, gopt, steps):
        return [train_step(model, gopt, i, poison=i in poison).kind for i in steps]

    def snaps(name):
        return {} if fmt == "torch" else {"snapshot_dir": tmp_path / name}

    model, opt, sched = make()
    ga = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10, keep=2, **kw, **snaps("a"))
    kinds = run(model, opt, sched, ga, range(1, 61))
    assert kinds[28] == "rollback", kinds
    final_a = weights(model)
    # B: saved at step 28, inside the incident that began at 12, then resumed elsewhere
    model, opt, sched = make()
    gb = kt.GuardedOptimizer(opt, model=model, scheduler=sched, snapshot_every=10, keep=2, **kw, **snaps("b"))
    run(model, opt, sched, gb, range(1, 29))
    assert gb.guard.in_incident
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": gb.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    assert ck["opt"]["keel"]["rollback_base"]["step"] == 10
    model2, opt2, sched2 = make(seed=5)
    g2 = kt.GuardedOptimizer(opt2, model=model2, scheduler=sched2, snapshot_every=10, keep=2, **kw, **snaps("b"))
    model2.load_state_dict(ck["model"])
    sched2.load_state_dict(ck["sched"])
    g2.load_state_dict(ck["opt"])
    assert g2.snapshots.steps == [10]
    kinds_b = run(model2, opt2, sched2, g2, range(29, 61))
    assert kinds_b == kinds[28:], (kinds_b, kinds[28:])
    assert same(final_a, weights(model2))


def test_gave_up_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(keel.GaveUp("too many rollbacks", 42)))
    assert (e.diagnosis, e.step) == ("too many rollbacks", 42) and "step 42" in str(e)


def test_a_global_rng_sampler_sees_new_batches_after_a_rollback():
    # nanoGPT draws its batch offsets from the global torch RNG
    torch.manual_seed(0)
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=5)
    seen = {}
    for step in range(1, 31):
        x = torch.randint(0, 50, (4, 8))  # the global RNG
        seen[step] = x
        loss = torch.nn.functional.cross_entropy(model(x), x[:, 0])
        if step in (12, 13, 14):
            loss = loss * float("nan")
        loss.backward()
        a = gopt.step(loss)
        gopt.zero_grad()
        if a.kind == "rollback":
            at = step
    assert at == 14
    before = [seen[s] for s in range(1, at + 1)]
    for s in range(at + 1, 31):
        assert not any(torch.equal(seen[s], b) for b in before), f"step {s} replays an earlier batch"
    # a seeded DataLoader is an iterator of its own: it moves on too
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 50, (64, 8), generator=g)
    loader = iter(torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)))
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, snapshot_every=5)
    batches = []
    for step in range(1, 16):
        x = next(loader)
        batches.append(x)
        loss = torch.nn.functional.cross_entropy(model(x), x[:, 0]) * (float("nan") if step in (7, 8, 9) else 1.0)
        loss.backward()
        gopt.step(loss)
        gopt.zero_grad()
    assert all(not torch.equal(batches[i], batches[j]) for i in range(15) for j in range(i))


def test_state_dicts_interchange_with_the_raw_optimizer():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model)
    for i in range(1, 21):
        train_step(model, gopt, i, poison=(i == 15))
    sd = gopt.state_dict()
    # nanoGPT resumes with the raw optimizer: the wrapper's state dict loads into it
    raw = torch.optim.AdamW(make()[0].parameters())
    _, opt2, _ = make()
    opt2.load_state_dict(sd)
    assert opt_state(opt2).keys() == opt_state(opt).keys()
    assert all(torch.equal(opt_state(opt2)[k], opt_state(opt)[k]) for k in opt_state(opt))
    # and the raw optimizer's into the wrapper (keel starts a fresh guard history)
    _, opt3, _ = make()
    g3 = kt.GuardedOptimizer(opt3, model=make()[0])
    g3.load_state_dict(opt.state_dict())
    assert g3.step_count == 0
    # the wrapper's into the wrapper: the guard and the step count ride along
    _, opt4, _ = make()
    g4 = kt.GuardedOptimizer(opt4, model=make()[0])
    g4.load_state_dict(sd)
    assert g4.step_count == 20 and g4.guard.state_dict() == gopt.guard.state_dict()
    assert raw is not None


def test_step_without_arguments_passes_through_scalers_and_closures():
    # a disabled GradScaler calls opt.step() with no loss: the loss comes from record()
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for i in range(1, 6):
        x, y = batch(i)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i == 3:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        gopt.record(loss)
        scaler.step(gopt)
        scaler.update()
        gopt.zero_grad()
        assert gopt.last_action.step == i
        assert gopt.last_action.skip == (i == 3)
    # a Lightning-style closure runs forward and backward once and gives the loss
    calls = []

    def closure():
        calls.append(1)
        x, y = batch(9)
        gopt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    a = gopt.step(closure=closure)
    assert a.kind == "proceed" and len(calls) == 1
    # no loss at all: a clear error, not a TypeError
    with pytest.raises(ValueError, match="record"):
        gopt.step()


def test_a_scheduler_stepped_by_keel_and_by_the_loop_is_named():
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched)  # keel steps it
    train_step(model, gopt, 1)
    sched.step()  # and the loop too: the schedule would run twice as fast
    with pytest.raises(ValueError, match=r"LambdaLR.*stepped outside keel.*step_scheduler=False"):
        train_step(model, gopt, 2)
    # the loop that keeps its own scheduler.step() says so, and nothing is raised
    model, opt, sched = make()
    gopt = kt.GuardedOptimizer(opt, model=model, scheduler=sched, step_scheduler=False)
    for i in range(1, 4):
        train_step(model, gopt, i)
        sched.step()
    assert sched.last_epoch == 3
