"""The attention signal of models keel has no names for: keel.probe.AttentionObserver watches
every scaled_dot_product_attention call and every softmax over 4-D scores in the forward, so
nanoGPT (fused c_attn; sdpa and its hand-written slow path), HF Llama (sdpa and eager), a
torchtitan-style attention and a model written here with names of its own are measured with
no registration, exactly (against the scores each model computes itself); where nothing can
be measured keel says so once; a probe of the user's own is used; torch.compile is not
recompiled by keel."""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel.probe as kp
import keel.torch as kt
from conftest import small_config


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, flash (sdpa) or its slow path."""

    def __init__(self, d, h, flash, block=32):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head, self.flash = nn.Linear(d, 3 * d), nn.Linear(d, d), h, flash
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))
        self.top = None  # the max score this forward computed itself (sequence 0)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        with torch.no_grad():
            s = (q[:1] @ k[:1].transpose(-2, -1)) / math.sqrt(k.size(-1))
            self.top = s.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).amax()
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, flash=True, vocab=64, layers=3, d=32, h=4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.attn = nn.ModuleList(NanoAttention(d, h, flash) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                 for _ in range(layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for a, ln, m in zip(self.attn, self.ln, self.mlp):
            x = x + a(ln(x))
            x = x + m(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def tops(self):
        return [float(a.top) for a in self.attn]


class Mixer(nn.Module):
    """An attention with names keel has never seen: one `qkv_w` parameter, grouped KV heads
    through sdpa's enable_gqa, an explicit scale and a padding mask."""

    def __init__(self, d=48, heads=6, kv=2):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.qkv_w = nn.Parameter(torch.randn((heads + 2 * kv) * self.hd, d) * 0.3)
        self.out = nn.Linear(d, d, bias=False)
        self.top = None

    def forward(self, x, keep):
        B, T, _ = x.shape
        q, k, v = (x @ self.qkv_w.t()).split([self.heads * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
        q = q.view(B, T, self.heads, self.hd).transpose(1, 2)
        k, v = (z.view(B, T, self.kv, self.hd).transpose(1, 2) for z in (k, v))
        mask = torch.ones(T, T, dtype=torch.bool).tril() & keep[:, None, None, :]  # [B, 1, T, T]
        with torch.no_grad():
            s = q[:1] @ k[:1].repeat_interleave(self.heads // self.kv, 1).transpose(-1, -2) * 0.3
            self.top = s.masked_fill(~mask[:1], float("-inf")).amax()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class Unseen(nn.Module):
    def __init__(self, vocab=50, d=48, depth=2):
        super().__init__()
        self.table = nn.Embedding(vocab, d)
        self.mixers = nn.ModuleList(Mixer(d) for _ in range(depth))
        self.readout = nn.Linear(d, vocab)

    def forward(self, idx, keep):
        h = self.table(idx)
        for m in self.mixers:
            h = h + m(h, keep)
        return self.readout(h)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "eager"])
def test_nanogpt_attention_is_measured_with_no_names(flash):
    torch.manual_seed(0)
    model = NanoGPT(flash=flash)
    with torch.no_grad():
        for a in model.attn:
            a.c_attn.weight.mul_(6.0)  # logits far from zero
    obs = kp.AttentionObserver(model)
    x = torch.randint(0, 64, (3, 20))
    model(x)
    assert obs.layers == 3 and obs.calls == 3
    per = obs.per_layer()
    assert per == pytest.approx(model.tops(), rel=1e-5) and max(per) > 5
    assert float(obs.take()) == pytest.approx(max(model.tops()), rel=1e-5)
    assert obs.take() is None  # read and reset
    # gradient accumulation: the max per layer over the step's forwards
    model(x)
    first = model.tops()
    model(torch.randint(0, 64, (3, 20)))
    assert obs.per_layer() == pytest.approx([max(a, b) for a, b in zip(first, model.tops())], rel=1e-5)
    # off: nothing is measured, the model runs as before
    obs.take()
    obs.on = False
    model(x)
    assert obs.take() is None and obs.calls == 0
    obs.remove()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_is_measured_as_the_named_probe_measures_it(impl):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = small_config()
    cfg._attn_implementation = impl
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(8.0)
    named = kp.AttentionProbe(model, rows=1)
    obs = kp.AttentionObserver(model, rows=1)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 24)))
    assert obs.layers == 3
    assert obs.per_layer() == pytest.approx(named.per_layer(), rel=1e-4)
    assert max(obs.per_layer()) > 5


def test_a_model_with_names_of_its_own_is_measured():
    torch.manual_seed(2)
    model = Unseen()
    obs = kp.AttentionObserver(model)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, 10:] = False  # padding in sequence 0: the mask is honoured
    model(torch.randint(0, 50, (2, 16)), keep)
    assert obs.per_layer() == pytest.approx([float(m.top) for m in model.mixers], rel=1e-5)


def test_a_torchtitan_style_attention_is_measured_through_its_softmax():
    from test_probe import TitanAttention

    torch.manual_seed(1)
    att = TitanAttention()
    with torch.no_grad():
        att.wq.weight.mul_(6.0)
    hd = att.head_dim
    freqs = torch.polar(torch.ones(32, hd // 2),
                        torch.outer(torch.arange(32.0), 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))))
    obs = kp.AttentionObserver(att, rows=3)
    with torch.no_grad():
        att(torch.randn(3, 20, 64), freqs)
    assert float(obs.take()) == pytest.approx(float(att.seen.amax()), rel=1e-5)


def _loop(model, opt, steps, make_batch):
    for _ in range(steps):
        logits, loss = model(*make_batch())
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(loss, gn)
        opt.zero_grad()


def test_the_guard_gets_the_signal_of_a_model_it_has_no_names_for():
    torch.manual_seed(0)
    model = NanoGPT(flash=True)
    with torch.no_grad():
        for a in model.attn:
            a.c_attn.weight.mul_(40.0)  # logits in the hundreds from the first step
    opt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, snapshot_every=5)
    batch = lambda: (torch.randint(0, 64, (2, 20)), torch.randint(0, 64, (2, 20)))  # noqa: E731
    _loop(model, opt, 1, batch)
    assert opt.signals["max_attn_logit"] == pytest.approx(model.tops(), rel=1e-4)
    assert min(model.tops()) > 100
    assert opt.last_action.kind == "rollback", opt.last_action
    assert any(e["kind"] == "warning" and e["detail"]["detector"] == "attn_logit" for e in opt.last_action.events)


def test_a_missing_signal_is_said_once_and_a_required_one_raises(caplog):
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return self.f(x).pow(2).mean()

    model = NoAttention()
    opt = kt.GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with caplog.at_level(logging.WARNING, logger="keel"):
        for _ in range(5):
            loss = model(torch.randn(4, 8))
            loss.backward()
            opt.step(loss)
            opt.zero_grad()
    said = [r.getMessage() for r in caplog.records if "no attention logits" in r.getMessage()]
    assert len(said) == 1, said
    assert "scaled_dot_product_attention" in said[0] and "probe_attention" in said[0]
    req = kt.GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, probe_attention=True)
    loss = model(torch.randn(4, 8))
    loss.backward()
    with pytest.raises(ValueError, match="probe_attention=True"):
        req.step(loss)


def test_a_probe_of_ones_own_is_used():
    torch.manual_seed(0)
    model = NanoGPT(flash=True)
    seen = []

    def qk(m, args, kwargs):  # this attention's own q and k, as probe.add wants them
        x = args[0][:1]  # the first sequence, as the model's own `top` is taken
        b, t, c = x.shape
        q, k, _ = m.c_attn(x).split(c, dim=2)
        q, k = (z.view(b, t, m.n_head, c // m.n_head).transpose(1, 2) for z in (q, k))
        seen.append(1)
        return q, k, 1.0 / math.sqrt(c // m.n_head)

    probe = kp.AttentionProbe(rows=1)
    for a in model.attn:
        probe.add(a, qk)
    opt = kt.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, probe_attention=probe)
    assert opt._probe is probe
    x = torch.randint(0, 64, (2, 20))
    _, loss = model(x, x)
    loss.backward()
    opt.step(loss)
    assert len(seen) == 3
    assert opt.signals["max_attn_logit"] == pytest.approx(model.tops(), rel=1e-4)
    with pytest.raises(ValueError, match="probe_attention"):
        kt.GuardedOptimizer(torch.optim.AdamW(model.parameters()), model=model, probe_attention="yes")


def test_keel_causes_no_recompile_under_torch_compile(caplog):
    import torch._dynamo.testing as dt

    def frames(guarded):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = NanoGPT(flash=True)
        cnt = dt.CompileCounter()
        cmodel = torch.compile(model, backend=cnt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if guarded:  # probes on every early step, then every 10th: they switch on and off
            opt = kt.GuardedOptimizer(opt, model=model, early_window=3, probe_every=2)
        x = torch.randint(0, 64, (2, 20))
        for _ in range(8):
            _, loss = cmodel(x, x)
            loss.backward()
            opt.step(loss) if guarded else opt.step()
            opt.zero_grad()
        if guarded:  # the LM head's logZ is still measured inside the compiled forward
            assert opt.signals["logit_z"] is not None and math.isfinite(opt.signals["logit_z"])
        return cnt.frame_count

    with caplog.at_level(logging.WARNING, logger="keel"):
        assert frames(True) == frames(False)
    said = [r.getMessage() for r in caplog.records if "no attention logits" in r.getMessage()]
    assert len(said) == 1 and "torch.compile" in said[0], said
