"""keel.hf.GuardCallback inside transformers.Trainer: an injected NaN step is skipped (no
update, weights untouched), the rest trains, the events land in keel's format."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import keel
import keel.hf
from conftest import small_config


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=256, t=32):
        g = torch.Generator().manual_seed(0)
        base = torch.arange(t) % 17
        self.x = [(base * (1 + i % 5) + torch.randint(0, 3, (t,), generator=g)) % 256 for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class PoisonAt(TrainerCallback):
    """Makes the loss (and so every gradient) NaN during the given optimizer steps."""

    def __init__(self, model, steps):
        self.steps, self.active, self.before, self.unchanged = set(steps), False, None, {}
        model.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        if self.active and module.training:
            out["loss"] = out["loss"] * float("nan")
        return out

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.active = state.global_step + 1 in self.steps
        if self.active:
            self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.active:
            now = model.state_dict()
            self.unchanged[state.global_step] = all(torch.equal(v, now[k]) for k, v in self.before.items())
        self.active = False


def args(tmp_path, **over):
    a = dict(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
             lr_scheduler_type="cosine", warmup_steps=4, logging_steps=1000, save_strategy="no", report_to=[],
             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    a.update(over)
    return TrainingArguments(**a)


def test_guard_callback_skips_a_nan_step(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison = PoisonAt(model, [25])
    cb = keel.hf.GuardCallback(snapshot_every=10)
    tr = Trainer(model=model, args=args(tmp_path), train_dataset=Tokens(), callbacks=[cb, poison])
    out = tr.train()
    assert poison.unchanged == {25: True}
    assert [(a.step, a.kind) for a in cb.actions] == [(25, "skip")]
    assert torch.isfinite(torch.tensor(out.training_loss))
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["kind"]) for e in ev] == [(25, "spike"), (25, "skip"), (26, "bad_batch")]
    assert ev[0]["detail"]["detector"] == "nonfinite"
    # the optimizer is unwrapped at the end
    assert "GuardCallback" not in getattr(tr.optimizer.step, "__qualname__", "")
    assert "training_step" not in tr.__dict__


def test_guard_callback_rolls_back_and_keeps_training(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison = PoisonAt(model, [31, 32, 33])
    cb = keel.hf.GuardCallback(snapshot_every=10, keep=2)
    tr = Trainer(model=model, args=args(tmp_path, gradient_accumulation_steps=2), train_dataset=Tokens(),
                 callbacks=[cb, poison])
    tr.train()
    assert [(a.step, a.kind) for a in cb.actions] == [(31, "skip"), (32, "skip"), (33, "rollback")]
    assert cb.guard.lr_factor == 0.5
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    assert [e["detail"]["to_step"] for e in ev if e["kind"] == "restored"] == [20]


def test_guard_state_resumes_with_the_trainer_checkpoint(tmp_path):
    """trainer_state.json carries the guard (windows, policy, step count): a resumed run
    numbers its events on from the checkpoint and keeps the LR lowered by a rollback."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison = PoisonAt(model, [11, 12, 13])
    cb = keel.hf.GuardCallback(snapshot_every=5)
    a = args(tmp_path, max_steps=20, save_strategy="steps", save_steps=20)
    Trainer(model=model, args=a, train_dataset=Tokens(), callbacks=[cb, poison]).train()
    assert cb.guard.lr_factor == 0.5 and cb.gopt.step_count == 20
    torch.manual_seed(0)
    model2 = LlamaForCausalLM(small_config())
    poison2 = PoisonAt(model2, [27])
    cb2 = keel.hf.GuardCallback(snapshot_every=5)
    tr = Trainer(model=model2, args=args(tmp_path, max_steps=30), train_dataset=Tokens(), callbacks=[cb2, poison2])
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-20"))
    live = next(c for c in tr.callback_handler.callbacks if isinstance(c, keel.hf.GuardCallback))
    assert live.gopt.step_count == 30 and live.guard.lr_factor == 0.5
    assert [(x.step, x.kind) for x in live.actions] == [(27, "skip")]


def test_gave_up_leaves_the_trainer_unwrapped(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison = PoisonAt(model, range(15, 40))
    cb = keel.hf.GuardCallback(snapshot_every=10, max_rollbacks=0)
    tr = Trainer(model=model, args=args(tmp_path), train_dataset=Tokens(), callbacks=[cb, poison])
    with pytest.raises(keel.GaveUp) as e:
        tr.train()
    assert e.value.step == 17
    assert "training_step" not in tr.__dict__
    assert "GuardCallback" not in getattr(tr.optimizer.step, "__qualname__", "")


def test_bad_guard_keys_fail_when_the_callback_is_made():
    with pytest.raises(ValueError, match="loss_zz"):
        keel.hf.GuardCallback(loss_zz=3)


def test_guard_callback_feeds_the_attention_probe_to_the_early_rule(tmp_path):
    # attention logits past 100 from the start: with the probe the early rule acts at step 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(60.0)
    cb = keel.hf.GuardCallback(probe_attention=True)
    t = Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=Tokens(), callbacks=[cb])
    t.train()  # the init is what is wrong: after one futile cut the rule stops acting
    kinds = [a.kind for a in cb.actions]
    assert kinds[0] == "rollback", kinds
    ev = [json.loads(l) for l in (tmp_path / "keel-events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "warning" and e["detail"]["detector"] == "attn_logit" for e in ev), ev
    assert [e["kind"] for e in ev].count("early_rule_off") == 1, ev


def test_the_trainer_logs_the_lr_the_update_used(tmp_path):
    # after a rollback the guard lowers the LR for good: the logged LR says so
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    poison = PoisonAt(model, [21, 22, 23])
    cb = keel.hf.GuardCallback(snapshot_every=10)
    tr = Trainer(model=model, args=args(tmp_path, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1),
                 train_dataset=Tokens(), callbacks=[cb, poison])
    tr.train()
    assert (23, "rollback") in [(a.step, a.kind) for a in cb.actions]
    lrs = {h["step"]: h["learning_rate"] for h in tr.state.log_history if "learning_rate" in h}
    assert lrs[10] == pytest.approx(3e-3) and lrs[30] == pytest.approx(1.5e-3), lrs
