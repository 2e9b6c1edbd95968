"""Early signals measured on live models and fed to the guard with no user code (on by
default): the max attention logit per layer, the output logZ from the LM head, and the
update/weight ratio per parameter, on telemetry steps (every step of the early window, then
every probe_every). Measuring never changes the numerics; `opt.signals` and the HF Trainer's
logs carry them."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import keel
import keel.probe as kp
import keel.torch as kt
from conftest import small_config


def llama(seed=0, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(small_config(**over))


def tokens(step, b=2, t=24):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(step))


def train(model, gopt, steps, on_step=None):
    losses = []
    for step in range(1, steps + 1):
        x = tokens(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gopt.step(loss, gn)
        gopt.zero_grad()
        losses.append(loss.detach())
        if on_step is not None:
            on_step(step)
    return losses


def test_probing_does_not_change_the_numerics():
    runs = {}
    for on in (True, False):
        model = llama()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        kw = {} if on else dict(probe_attention=False, probe_logits=False, probe_updates=False)
        g = kt.GuardedOptimizer(opt, model=model, **kw)
        losses = train(model, g, 8)
        runs[on] = (losses, {k: v.clone() for k, v in model.state_dict().items()}, g.signals)
    (l1, w1, sig), (l0, w0, sig0) = runs[True], runs[False]
    assert sig["step"] == 8 and set(sig) == {"step", "max_attn_logit", "logit_z", "update_ratio"}  # it measured
    assert sig0 == {}
    assert all(torch.equal(a, b) for a, b in zip(l1, l0))
    assert w1.keys() == w0.keys() and all(torch.equal(w1[k], w0[k]) for k in w1)


def test_signals_are_the_model_s_own_numbers():
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = kt.GuardedOptimizer(opt, model=model)
    fed = []
    inner = g.guard.observe
    g.guard.observe = lambda s, l, n=None, **e: (fed.append(e), inner(s, l, n, **e))[1]
    seen = {}
    model.lm_head.register_forward_hook(lambda m, a, out: seen.__setitem__("logits", out.detach().clone()))
    train(model, g, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = tokens(4)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    g.step(loss)
    sig = g.signals
    assert sig["step"] == 4
    # logZ: the mean over positions of logsumexp over the vocabulary, first row, float32
    ref = torch.logsumexp(seen["logits"][0].float(), dim=-1).mean()
    assert sig["logit_z"] == pytest.approx(float(ref), rel=1e-6) and fed[-1]["logit_z"] == sig["logit_z"]
    # one max attention logit per layer; the guard got the largest
    assert len(sig["max_attn_logit"]) == 3 and fed[-1]["max_attn_logit"] == pytest.approx(max(sig["max_attn_logit"]))
    # ||Δw|| / ||w|| of every parameter across this update, by name
    assert list(sig["update_ratio"]) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        want = float((p.detach() - before[n]).norm() / before[n].norm())
        assert sig["update_ratio"][n] == pytest.approx(want, rel=1e-4, abs=1e-9), n
    assert 0 < max(sig["update_ratio"].values()) < 1


def test_telemetry_steps_are_the_early_window_then_every_probe_every():
    model = llama(num_hidden_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = kt.GuardedOptimizer(opt, model=model, early_window=3, probe_every=5)
    at = []
    train(model, g, 12, on_step=lambda s: at.append(g.signals["step"]))
    assert at == [1, 2, 3, 3, 5, 5, 5, 5, 5, 10, 10, 10]


def test_logit_drift_from_the_live_head_warns(tmp_path):
    model = llama(num_hidden_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)  # logits in the hundreds: |logZ| far above 50
    g = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model=model, events=tmp_path / "e.jsonl")
    train(model, g, 2)
    ev = [json.loads(l) for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    drift = [e for e in ev if e["kind"] == "warning" and e["detail"]["detector"] == "logit_drift"]
    assert drift and drift[0]["step"] == 1 and abs(g.signals["logit_z"]) > 50


def test_defaults_are_quiet_where_the_model_has_no_such_part_and_explicit_asks_are_not():
    seq = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 50))
    g = kt.GuardedOptimizer(torch.optim.AdamW(seq.parameters()), model=seq)
    assert isinstance(g._probe, kp.AttentionObserver) and g._logits is None and g._updates is not None
    x = torch.randint(0, 50, (4, 8))
    torch.nn.functional.cross_entropy(seq(x), x[:, 0]).backward()
    g.step(torch.tensor(3.0))  # (the observer saw no attention: one warning, test_any_model)
    assert set(g.signals) == {"step", "update_ratio"} and list(g.signals["update_ratio"]) == ["0.weight", "2.weight", "2.bias"]
    req = kt.GuardedOptimizer(torch.optim.AdamW(seq.parameters()), model=seq, probe_attention=True)
    seq(x)
    with pytest.raises(ValueError, match=r"probe\.add"):
        req.step(torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"LogitProbe\(head="):
        kt.GuardedOptimizer(torch.optim.AdamW(seq.parameters()), model=seq, probe_logits=True)
    with pytest.raises(ValueError, match="give model="):
        kt.GuardedOptimizer(torch.optim.AdamW(seq.parameters()), probe_attention=True)
    # a head given by hand
    g = kt.GuardedOptimizer(torch.optim.AdamW(seq.parameters()), model=seq, probe_logits=seq[2])
    out = seq(x)
    torch.nn.functional.cross_entropy(out, x[:, 0]).backward()
    g.step(torch.tensor(3.0))
    # [batch, vocab] logits (no sequence axis): every row
    assert g.signals["logit_z"] == pytest.approx(float(torch.logsumexp(out.detach().float(), -1).mean()), rel=1e-6)
    # the head of an HF model wrapped in another module (a LightningModule, DDP) is found
    m = llama(num_hidden_layers=1)
    assert kp.find_lm_head(torch.nn.ModuleDict({"model": m})) is m.lm_head


def test_hf_logs_carry_keels_signals(tmp_path):
    from transformers import Trainer

    import keel.hf
    from test_hf import Tokens, args

    model = llama(num_hidden_layers=2)
    cb = keel.hf.GuardCallback(early_window=3, probe_every=5)
    tr = Trainer(model=model, args=args(tmp_path, max_steps=10, per_device_train_batch_size=4, logging_steps=1),
                 train_dataset=Tokens(), callbacks=[cb])
    tr.train()
    logs = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    keys = {"keel/max_attn_logit", "keel/logit_z", "keel/update_ratio_max"}
    # every step while the LR warms up (to its peak at step 5) and early_window (3) past it,
    # then every probe_every (5)
    for s in range(1, 11):
        assert (keys <= logs[s].keys()) == (s <= 5 + 3 or s == 10), (s, logs[s])
        assert logs[s]["keel/skipped_steps"] == 0
    sig = cb.gopt.signals
    assert logs[10]["keel/logit_z"] == sig["logit_z"] and logs[10]["keel/max_attn_logit"] == max(sig["max_attn_logit"])
    assert logs[10]["keel/update_ratio_max"] == max(sig["update_ratio"].values())


def test_lightning_measures_the_model_inside_the_module(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    import keel.lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = llama(num_hidden_layers=2)

        def training_step(self, batch, i):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 256, (12, 16))), batch_size=4)
    cb = keel.lightning.GuardCallback()
    L.Trainer(max_steps=3, callbacks=[cb], default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(Module(), data)
    sig = cb.gopt.signals
    assert sig["step"] == 3 and len(sig["max_attn_logit"]) == 2 and 4 < sig["logit_z"] < 7  # ~ln(256) at init
    assert "model.lm_head.weight" in sig["update_ratio"]
