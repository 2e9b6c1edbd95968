"""fp16 loss scaling (GradScaler) under keel, in a plain loop, the HF Trainer and Lightning
16-mixed, on the CPU: an overflow the scaler skips never reaches keel (no event, no incident,
no GaveUp however many), keel judges the unscaled loss and gradient norm, a real spike after
it is still caught, and keel's step numbers are the loop's. Also: the loop's own step numbers
and gradient accumulation (record() sums) in GuardedOptimizer.

The HF test injects the GradScaler accelerate would make on a GPU (accelerate makes none for
fp16 on the CPU and silently trains in fp32); everything else is accelerate's real fp16 path:
its AcceleratedOptimizer with the scaler, `accelerator.backward` scaling, `clip_grad_norm_`
unscaling, CPU autocast in float16."""

import json

import pytest
import torch

import keel
import keel.torch as kt
from conftest import small_config

# one overflow on the first step (a scale of 2^100 overflows float16 gradients), then a
# scale of 2^10 that does not: the backoff factor takes it there in one update
HUGE, BACKOFF = 2.0**100, 2.0**-90


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=HUGE, backoff_factor=BACKOFF, growth_interval=10**6)


def spy(guard):
    """Record what the guard is asked to judge: (step, loss, grad_norm)."""
    seen = []
    inner = guard.observe

    def observe(step, loss, grad_norm=None, **extra):
        seen.append((step, float(loss), None if grad_norm is None else float(grad_norm)))
        return inner(step, loss, grad_norm, **extra)

    guard.observe = observe
    return seen


def events(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def batch(i):
    x = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1000 + i))
    return x, x[:, 0]


@pytest.mark.parametrize(
    "style", ["zero_grad_at_end", "zero_grad_at_start_no_step_numbers", "model_zero_grad", "fused_adamw"]
)
def test_plain_loop_overflows_are_the_scalers_and_spikes_are_keels(tmp_path, style):
    """zero_grad at the end; at the start without step numbers (zero_grad drops a
    scaler-skipped step's loss); model.zero_grad() only (record(step=) drops it); a fused
    AdamW (which unscales in its own step: the scaler must still check the wrapper's)."""
    model, opt = tiny()
    if style == "fused_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        assert opt._step_supports_amp_scaling
    ev = tmp_path / "events.jsonl"
    gopt = kt.GuardedOptimizer(opt, model=model, events=ev, min_history=8)
    seen = spy(gopt.guard)
    sc = scaler()
    pass_step = style != "zero_grad_at_start_no_step_numbers"
    losses, norms, overflowed = {}, {}, []
    for it in range(1, 21):
        if style == "zero_grad_at_start_no_step_numbers":
            gopt.zero_grad()
        x, y = batch(it)
        with torch.autocast("cpu", torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if it == 17:
            loss = loss * 20  # a real spike: finite, the scaler lets it through
        scale = sc.get_scale()
        sc.scale(loss).backward()
        gopt.record(loss, step=it if pass_step else None)
        sc.unscale_(gopt)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sc.step(gopt, grad_norm=gn)
        sc.update()
        if sc.get_scale() < scale:
            overflowed.append(it)
        if style in ("zero_grad_at_end", "fused_adamw"):
            gopt.zero_grad()
        elif style == "model_zero_grad":
            model.zero_grad()
        if it == 8:
            sc.update(new_scale=HUGE)  # and another overflow at 9
        losses[it], norms[it] = float(loss.detach()), float(gn)
    assert overflowed == [1, 9]
    taken = [it for it in range(1, 21) if it not in overflowed]
    # the loop's step numbers, or keel's own count of the steps it saw
    numbers = taken if pass_step else list(range(1, len(taken) + 1))
    assert [s for s, _, _ in seen] == numbers
    # each judged alone (an overflow's loss never joins the next step's), unscaled
    assert [l for _, l, _ in seen] == pytest.approx([losses[it] for it in taken], rel=1e-6)
    assert [g for _, _, g in seen] == pytest.approx([norms[it] for it in taken], rel=1e-6)
    assert all(norms[it] < 20 for it in taken if it != 17)  # x 2^10 they would be thousands
    spike = numbers[taken.index(17)]
    assert {e["step"] for e in events(ev)} == {spike}
    assert [e["kind"] for e in events(ev) if e["kind"] != "warning"] == ["spike", "skip"]
    assert gopt.step_count == numbers[-1]


def test_overflows_alone_never_end_in_gave_up(tmp_path):
    # before: each overflow was a NaN incident to keel, and a scaler working its way down
    # from a too-large scale ended in GaveUp after three rollbacks
    model, opt = tiny()
    gopt = kt.GuardedOptimizer(opt, model=model, events=tmp_path / "e.jsonl")
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=0.5, growth_interval=10**6)
    skipped = 0
    for it in range(1, 61):
        x, y = batch(it)
        with torch.autocast("cpu", torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scale = sc.get_scale()
        sc.scale(loss).backward()
        gopt.record(loss, step=it)
        sc.step(gopt)
        sc.update()
        skipped += sc.get_scale() < scale
        gopt.zero_grad()
    assert skipped >= 20  # many overflows in a row
    assert events(tmp_path / "e.jsonl") == [] and gopt.last_action.kind == "proceed"


def test_step_numbers_are_the_loops_and_must_increase(tmp_path):
    model, opt = tiny()
    ev = tmp_path / "events.jsonl"
    gopt = kt.GuardedOptimizer(opt, model=model, events=ev, min_history=8)
    for it in range(0, 40, 2):  # nanoGPT counts from 0; any increasing numbers will do
        x, y = batch(it)
        loss = torch.nn.functional.cross_entropy(model(x), y) * (float("nan") if it == 30 else 1.0)
        loss.backward()
        a = gopt.step(loss, step=it)
        gopt.zero_grad()
        assert a.step == it
    # the next step (32) ran the same weights clean: the batch at 30 was bad, not the LR
    assert [(e["step"], e["kind"]) for e in events(ev)] == [(30, "spike"), (30, "skip"), (32, "bad_batch")]
    assert gopt.step_count == 38
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"step=38: keel's step numbers must increase \(the last step was 38\)"):
        gopt.step(torch.tensor(1.0), step=38)
    # no step number: keel's own count goes on from the loop's
    assert gopt.step(torch.tensor(1.0)).step == 39


def test_accumulation_judges_the_sum_of_what_was_recorded():
    model, opt = tiny()
    gopt = kt.GuardedOptimizer(opt, model=model)
    seen = spy(gopt.guard)
    accum = 4
    for it in range(1, 4):
        parts = []
        for micro in range(accum):
            x, y = batch(10 * it + micro)
            loss = torch.nn.functional.cross_entropy(model(x), y) / accum  # nanoGPT's
            loss.backward()
            gopt.record(loss, step=it)
            parts.append(float(loss.detach()))
        gopt.step()
        gopt.zero_grad()
        assert seen[-1][0] == it and seen[-1][1] == pytest.approx(sum(parts), rel=1e-6)  # the mean
        assert gopt._loss is None
    # floats are summed too
    gopt.record(1.5)
    gopt.record(2.0)
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    gopt.step()
    assert seen[-1][1] == 3.5


# -- HF Trainer, fp16 --------------------------------------------------------------------


class HFSpike:
    """A TrainerCallback: a finite loss spike (x20) at the given steps (the scaler lets it
    through; keel must not), the scale set back to 2^100 after `reset_after` (an overflow
    on the next step), and a spy on keel's guard."""

    def __new__(cls, model, cb, spikes, reset_after=None):
        from transformers import TrainerCallback

        class Spike(TrainerCallback):
            def __init__(self):
                self.active, self.seen, self.sc = False, None, None
                model.register_forward_hook(self.hook)

            def hook(self, m, a, out):
                if self.active and m.training:
                    out["loss"] = out["loss"] * 20
                return out

            def on_train_begin(self, args, state, control, **kw):
                self.seen = spy(cb.gopt.guard)

            def on_step_begin(self, args, state, control, **kw):
                self.active = state.global_step + 1 in spikes

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == reset_after:
                    self.sc.update(new_scale=HUGE)

        return Spike()


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_hf_fp16_overflows_are_the_scalers_and_spikes_are_keels(tmp_path, optim):
    """Both of the scaler's paths: a fused AdamW unscales in its own step and is called on
    every step (found_inf set on it); a plain one is called only on finite gradients."""
    from transformers import LlamaForCausalLM, Trainer

    import keel.hf
    from test_hf import Tokens, args

    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config(num_hidden_layers=2))
    cb = keel.hf.GuardCallback(snapshot_every=10, min_history=8)
    sp = HFSpike(model, cb, spikes={14}, reset_after=6)
    a = args(tmp_path, max_steps=16, per_device_train_batch_size=4, fp16=True, logging_steps=1, optim=optim,
             lr_scheduler_type="linear", warmup_steps=0)
    tr = Trainer(model=model, args=a, train_dataset=Tokens(), callbacks=[cb, sp])
    assert tr.accelerator.scaler is None  # accelerate makes no scaler on the CPU: inject one
    sp.sc = tr.accelerator.scaler = scaler()
    tr.accelerator.native_amp = True
    tr.train()
    assert getattr(tr.optimizer.optimizer, "_step_supports_amp_scaling", False) == (optim == "adamw_torch_fused")
    # the Trainer saw two overflows (its grad_norm is NaN there) and logged every step
    logged = {h["step"]: h for h in tr.state.log_history if "grad_norm" in h}
    overflowed = sorted(s for s, h in logged.items() if h["grad_norm"] != h["grad_norm"])
    assert overflowed == [1, 7]
    # keel saw every other step, under the Trainer's numbers, unscaled
    assert [s for s, _, _ in sp.seen] == [s for s in range(1, 17) if s not in overflowed]
    assert all(g < 20 for s, _, g in sp.seen if s != 14)  # x 2^10 they would be thousands
    assert [(a.step, a.kind) for a in cb.actions] == [(14, "skip")]
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    assert {e["step"] for e in ev} == {14}
    assert [e["kind"] for e in ev if e["kind"] != "warning"] == ["spike", "skip"]  # a grad_spike warning may join
    assert "keel/skipped_steps" in logged[14] and "loss" not in logged[14]  # keel's skip: no applied step
    if optim == "adamw_torch":
        # keel's skip is no overflow to the Trainer: its scheduler stepped (on the overflows not)
        assert tr.lr_scheduler.last_epoch == 16 - len(overflowed)
    # unwrapped at the end
    assert "GuardCallback" not in tr.optimizer._optimizer_patched_step_method.__qualname__
    assert "log" not in tr.__dict__


def test_hf_logged_loss_leaves_out_the_steps_keel_skipped(tmp_path):
    """The Trainer's running loss includes every batch; keel takes out a skipped step's, so
    the logged loss is the mean over the applied steps of the interval, and the run's
    training_loss counts a skipped step at its interval's mean."""
    from transformers import LlamaForCausalLM, Trainer

    import keel.hf
    from test_hf import Tokens, args

    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config(num_hidden_layers=2))
    cb = keel.hf.GuardCallback(snapshot_every=10, min_history=8)
    sp = HFSpike(model, cb, spikes={10, 15})
    tr = Trainer(model=model, args=args(tmp_path, max_steps=16, per_device_train_batch_size=4, logging_steps=4),
                 train_dataset=Tokens(), callbacks=[cb, sp])
    out = tr.train()
    assert [(a.step, a.kind) for a in cb.actions] == [(10, "skip"), (15, "skip")]
    loss = {s: l for s, l, _ in sp.seen}
    logs = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    for end, skipped in ((4, ()), (8, ()), (12, (10,)), (16, (15,))):
        kept = [loss[s] for s in range(end - 3, end + 1) if s not in skipped]
        assert logs[end]["loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-5), end
        assert logs[end]["keel/skipped_steps"] == len(skipped)
    # the run's mean: each interval's mean, weighted by its steps
    assert out.training_loss == pytest.approx(sum(logs[e]["loss"] for e in (4, 8, 12, 16)) / 4, rel=1e-5)


# -- Lightning 16-mixed ------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_lightning_16_mixed_overflows_are_the_scalers_and_spikes_are_keels(tmp_path, fused):
    """The precision plugin's real 16-mixed path with the CPU scaler: it runs the closure,
    unscales (a fused AdamW unscales in its own step, and Lightning then refuses clipping),
    calls scaler.step(optimizer)."""
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    import keel.lightning
    from test_lightning import Tiny, loader

    class Spiky(Tiny):
        def training_step(self, batch, i):
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[0][:, 0])
            if self.trainer.global_step + 1 == 14:
                loss = loss * 20
            self.losses[self.trainer.global_step + 1] = float(loss.detach())
            return loss

        def on_train_batch_end(self, out, batch, i):
            if self.trainer.global_step == 6:
                sc.update(new_scale=HUGE)  # an overflow at 7

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3, fused=fused)

    class Spy(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.seen = spy(cb.gopt.guard)

    sc = scaler()
    m = Spiky()
    m.losses = {}
    cb = keel.lightning.GuardCallback(snapshot_every=10, min_history=8)
    s = Spy()
    tr = L.Trainer(max_steps=16, callbacks=[cb, s], default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=None if fused else 1.0,
                   accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler=sc)])
    tr.fit(m, loader())
    assert tr.global_step == 16
    steps = [st for st, _, _ in s.seen]
    assert steps == [st for st in range(1, 17) if st not in (1, 7)]  # Lightning's numbers
    # the unscaled loss (the hook sees scaler.scale(loss)) and the unscaled norm
    assert [l for _, l, _ in s.seen] == pytest.approx([m.losses[st] for st in steps], rel=1e-5)
    assert all(g < 20 for st, _, g in s.seen if st != 14)  # x 2^10 they would be thousands
    assert [(a.step, a.kind) for a in cb.actions] == [(14, "skip")]
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    assert {e["step"] for e in ev} == {14}
    assert [e["kind"] for e in ev if e["kind"] != "warning"] == ["spike", "skip"]


@pytest.mark.parametrize("style", ["zero_grad_at_end", "record_with_step_numbers_only"])
def test_a_long_run_of_scaler_skips_after_training_began_is_an_incident(tmp_path, style):
    """How fp16 runs diverge: the gradients overflow at every scale the scaler tries, it skips
    step after step, and no loss ever reaches the guard. keel counts the steps whose loss was
    recorded but whose update never came: a warning at 5 in a row, an incident at 10 (a
    rollback, the LR cut), and the scaler's own skips before the first update are no signal."""
    model, opt = tiny()
    ev = tmp_path / "events.jsonl"
    gopt = kt.GuardedOptimizer(opt, model=model, events=ev, snapshot_every=5, snapshot_async=False)
    sc = scaler()  # overflows at step 1, before any update: the scaler finding its scale
    broken = range(21, 33)  # every step from 21 on overflows: the weights blew up
    for it in range(1, 41):
        x, y = batch(it)
        with torch.autocast("cpu", torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if it in broken:
            sc.update(new_scale=HUGE)  # any scale overflows now
        sc.scale(loss).backward()
        gopt.record(loss, step=it)
        sc.unscale_(gopt)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sc.step(gopt, grad_norm=gn)
        sc.update()
        if style == "zero_grad_at_end":
            gopt.zero_grad()
        else:
            model.zero_grad()
    got = [(e["step"], e["kind"], e.get("detail", {}).get("detector")) for e in events(ev)]
    warn = [s for s, k, d in got if k == "warning" and d == "scaler_overflow"]
    div = [s for s, k, d in got if k == "divergence" and d == "scaler_overflow"]
    assert warn == [25] and div == [30], got
    assert any(k == "rollback" for _, k, _ in got) and gopt.rollbacks == 1
    assert gopt.guard.lr_factor == 0.5
    assert all(s != 1 for s, _, _ in got)  # the overflow before the first update said nothing
