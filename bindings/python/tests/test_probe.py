"""keel.probe.AttentionProbe measures the exact max attention logit of live models: the
same numbers the eager attention computes before its softmax, for HF Llama and Qwen3
(q/k norm), under sdpa too, and for a torchtitan-style attention."""

import math

import pytest
import torch

import keel
import keel.probe as kp
from conftest import small_config


def eager_logits(model, x):
    """The logits HF's eager attention feeds its softmax, layer by layer."""
    seen = []
    real = torch.nn.functional.softmax

    def spy(t, *a, **k):
        seen.append(t.detach().clone())
        return real(t, *a, **k)

    torch.nn.functional.softmax = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.nn.functional.softmax = real
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_probe_equals_the_eager_attention_logits(arch):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaForCausalLM

        cfg = small_config()
        cfg._attn_implementation = "eager"
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
        cfg._attn_implementation = "eager"
        model = Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # make the q/k norms matter
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 3.0)
                layer.self_attn.k_norm.weight.uniform_(0.5, 3.0)
    with torch.no_grad():  # larger q/k weights: logits far from zero
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(8.0)
    x = torch.randint(0, 256, (2, 24))
    probe = kp.AttentionProbe(model, rows=2)
    probe.keep_logits = True
    ref = eager_logits(model, x)
    assert len(ref) == probe.layers == 3
    for l in range(3):
        causal = torch.ones(24, 24, dtype=torch.bool).triu(1)
        r = ref[l].masked_fill(causal, float("-inf"))
        ours = probe.last_logits[l]
        assert torch.allclose(ours, r, rtol=1e-5, atol=1e-4), (l, (ours - r).abs().max())
    per = probe.per_layer()
    m = probe.take()
    assert abs(float(m) - max(per)) < 1e-6 and max(per) > 5.0
    assert probe.take() is None  # read and reset
    # sdpa never materialises the logits: the probe gives the same numbers
    model.config._attn_implementation = "sdpa"
    probe.on = True
    with torch.no_grad():
        model(x)
    assert probe.per_layer() == pytest.approx(per, rel=1e-5)
    # off: no measurement, no cost
    probe.take()
    probe.on = False
    with torch.no_grad():
        model(x)
    assert probe.take() is None
    probe.remove()


class TitanAttention(torch.nn.Module):
    """torchtitan's Llama attention, in miniature (complex RoPE, explicit softmax here)."""

    def __init__(self, dim=64, n_heads=4, n_kv=2):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, dim // n_heads
        self.wq = torch.nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, n_kv * self.head_dim, bias=False)
        self.wv = torch.nn.Linear(dim, n_kv * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.seen = None

    def forward(self, x, freqs_cis):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim)

        def rope(u):
            c = torch.view_as_complex(u.float().reshape(*u.shape[:-1], -1, 2))
            return torch.view_as_real(c * freqs_cis[:t].view(1, t, 1, c.shape[-1])).flatten(3)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        v = v.transpose(1, 2).repeat_interleave(self.n_heads // self.n_kv, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        self.seen = s.detach()
        return self.wo((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_probe_follows_a_torchtitan_style_attention():
    torch.manual_seed(1)
    att = TitanAttention()
    with torch.no_grad():
        att.wq.weight.mul_(6.0)
    hd = att.head_dim
    freqs = torch.polar(torch.ones(32, hd // 2), torch.outer(torch.arange(32.0), 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))))
    model = torch.nn.ModuleList([att])
    probe = kp.AttentionProbe(model, rows=3)
    x = torch.randn(3, 20, 64)
    with torch.no_grad():
        att(x, freqs)
    assert float(probe.take()) == pytest.approx(float(att.seen.amax()), rel=1e-5)


def test_a_model_without_attention_is_told_how_to_register_one():
    with pytest.raises(ValueError, match="probe.add"):
        kp.AttentionProbe(torch.nn.Linear(2, 2))


def test_guarded_optimizer_feeds_the_probe_to_the_early_rule():
    import keel.torch as kt
    from transformers import LlamaForCausalLM

    def run(probe, scale):
        torch.manual_seed(0)
        model = LlamaForCausalLM(small_config())
        with torch.no_grad():  # attention logits far past 100 from the first step
            for n, p in model.named_parameters():
                if "q_proj" in n or "k_proj" in n:
                    p.mul_(scale)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = kt.GuardedOptimizer(opt, model=model, probe_attention=probe, probe_every=5, early_window=3)
        kinds, probed, ev = [], [], []
        for step in range(1, 12):
            x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(step))
            probed.append(g._probe.on if probe else None)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            try:
                a = g.step(loss)
            except keel.GaveUp:
                kinds.append("give_up")
                break
            kinds.append(a.kind)
            ev += [e["kind"] for e in a.events]
            g.zero_grad()
        return kinds, probed, ev

    # attention logits of ~400 at init: the early rule rolls back at once; the init itself is
    # what is wrong, so a lower LR does not delay the next warning: the rule stops acting
    # (a warning alone never ends a run) and training goes on, judged by the loss detectors
    kinds, _, ev = run(True, 60.0)
    assert kinds[0] == "rollback" and "give_up" not in kinds, kinds
    assert ev.count("early_rule_off") == 1 and ev.count("rollback") == 1, ev
    kinds, _, _ = run(False, 60.0)
    assert "rollback" not in kinds, kinds  # without the probe the rule has nothing to see
    kinds, probed, _ = run(True, 1.0)
    assert set(kinds) == {"proceed"}, kinds  # a sane init raises nothing
    # measured on the early window's steps, then every probe_every
    assert probed == [True, True, True, False, True, False, False, False, False, True, False], probed
    # after a rollback the early window restarts, and so does measuring every step
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = kt.GuardedOptimizer(opt, model=model, probe_attention=True, probe_every=5, early_window=3)
    for step in range(1, 13):
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=x, labels=x).loss
        if step == 7:
            loss = loss * float("nan")  # three NaNs in a row: persistent → rollback at 9
        if step in (8, 9):
            loss = loss * float("nan")
        loss.backward()
        a = g.step(loss)
        g.zero_grad()
        if step == 9:
            assert a.kind == "rollback", a
        if step in (9, 10, 11):
            assert g._probe.on, step  # steps 10, 11, 12 are inside the restarted window
