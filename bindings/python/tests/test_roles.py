"""keel.init_ / keel.audit beyond HF names: torchtitan's Llama taken natively (config derived
from the module), any Llama through `names=` (patterns, a callable, None for a tensor keel
leaves alone, a list for a fused tensor), a clear refusal of a non-Llama `.config` (nanoGPT's
GPT), and torch.compile'd modules (init, audit and the attention probe's hooks)."""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

import keel
from conftest import small_config
from keel.probe import AttentionProbe

# ---------------------------------------------------------------- torchtitan's Llama (llama3/model)


@dataclass
class TransformerModelArgs:
    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: Optional[int] = 2
    vocab_size: int = 256
    multiple_of: int = 32
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 64
    head_dim: Optional[int] = None


def precompute_freqs_cis(dim, end, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs).float())  # complex64


def precompute_cos_sin(dim, end, theta):
    # torchtitan's CosSinRoPE: a real cache, halves rotated as HF does
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    f = torch.outer(torch.arange(end).float(), inv)
    f = torch.cat([f, f], dim=-1)
    return torch.cat([f.cos(), f.sin()], dim=-1)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def apply_rotary_emb(xq, xk, freqs_cis):
    if not freqs_cis.is_complex():
        hd = xq.shape[-1]
        c = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, 2 * hd)
        cos, sin = c[..., :hd], c[..., hd:]
        return xq * cos + _rotate_half(xq) * sin, xk * cos + _rotate_half(xk) * sin
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_.shape[-1])
    return torch.view_as_real(xq_ * f).flatten(3).type_as(xq), torch.view_as_real(xk_ * f).flatten(3).type_as(xk)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads = a.n_heads
        self.n_kv_heads = a.n_heads if a.n_kv_heads is None else a.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = a.dim // a.n_heads if a.head_dim is None else a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        xk = xk.repeat_interleave(self.n_rep, dim=2)
        xv = xv.repeat_interleave(self.n_rep, dim=2)
        o = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, multiple_of, ffn_dim_multiplier):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id, a):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a.dim, 4 * a.dim, a.multiple_of, a.ffn_dim_multiplier)
        self.attention_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.ffn_norm = nn.RMSNorm(a.dim, eps=a.norm_eps)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a, tied=False, cos_sin=False):
        super().__init__()
        self.model_args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        hd = a.dim // a.n_heads if a.head_dim is None else a.head_dim
        rope = precompute_cos_sin if cos_sin else precompute_freqs_cis
        self.register_buffer("freqs_cis", rope(hd, a.max_seq_len, a.rope_theta), persistent=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, a) for i in range(a.n_layers)})
        self.norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


# int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 32
TITAN_FFN = 192


def titan_hf_config(**over):
    return small_config(intermediate_size=TITAN_FFN, **over)


def titan_to_hf(sd, n_heads=4, n_kv_heads=2, dim=64):
    """torchtitan's Llama3StateDictAdapter.to_hf, written out (names, and the RoPE row
    permutation of wq/wk); the reference the native mapping is checked against."""
    rename = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    layer = {
        "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }

    def permute(w, h):
        d1, d2 = w.shape
        return w.view(h, d1 // h // 2, 2, d2).transpose(1, 2).reshape(d1, d2)

    out = {}
    for k, v in sd.items():
        if k in rename:
            out[rename[k]] = v
            continue
        _, i, suffix = k.split(".", 2)
        if suffix in layer:
            out[f"model.layers.{i}.{layer[suffix]}"] = v
        elif suffix == "attention.wq.weight":
            out[f"model.layers.{i}.self_attn.q_proj.weight"] = permute(v, n_heads)
        elif suffix == "attention.wk.weight":
            out[f"model.layers.{i}.self_attn.k_proj.weight"] = permute(v, n_kv_heads)
        else:
            raise AssertionError(f"unexpected torchtitan name {k}")
    return out


def _clean_sd(m):
    return {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v.detach() for k, v in m.named_parameters()}


@pytest.mark.parametrize("scheme", ["normal", "mitchell", "depth-scaled", "megatron", "orthogonal"])
@pytest.mark.parametrize("tied", [False, True])
def test_torchtitan_llama_is_the_hf_llama_keel_inits(scheme, tied):
    torch.manual_seed(0)
    titan = keel.init_(Transformer(TransformerModelArgs(), tied=tied), scheme, seed=5)
    hf = keel.init_(LlamaForCausalLM(titan_hf_config(tie_word_embeddings=tied)), scheme, seed=5)
    ref = dict(hf.named_parameters())
    conv = titan_to_hf(_clean_sd(titan))
    assert set(conv) == set(ref), set(conv) ^ set(ref)
    for k, v in conv.items():
        assert torch.equal(v, ref[k].detach()), f"{scheme}: {k} differs"
    if tied:
        assert titan.output.weight is titan.tok_embeddings.weight
    # the same network, not only the same numbers: wq/wk are in torchtitan's RoPE row order
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(titan(x), hf(x).logits, atol=2e-5, rtol=1e-4)


def test_torchtitan_with_rotate_half_rope_keeps_hf_row_order():
    # torchtitan's CosSinRoPE rotates halves like HF: wq/wk are HF's rows as they are
    titan = keel.init_(Transformer(TransformerModelArgs(), cos_sin=True), "normal", 5)
    hf = keel.init_(LlamaForCausalLM(titan_hf_config()), "normal", 5)
    assert torch.equal(titan.layers["1"].attention.wq.weight, hf.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(titan.layers["1"].attention.wk.weight, hf.model.layers[1].self_attn.k_proj.weight)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(titan(x), hf(x).logits, atol=2e-5, rtol=1e-4)


def test_torchtitan_audit_agrees_with_hf_and_names_layers_by_depth():
    titan = keel.init_(Transformer(TransformerModelArgs()), "mitchell", 3)
    hf = keel.init_(LlamaForCausalLM(titan_hf_config()), "mitchell", 3)

    def verdicts(r):
        return {t["name"]: t["verdict"] for t in r["tensors"]}

    rt, rh = keel.audit(titan, "mitchell"), keel.audit(hf, "mitchell")
    assert rt["verdict"] == "Pass" and verdicts(rt) == verdicts(rh)
    assert {t["name"]: t["param"] for t in rt["tensors"]}["model.layers.2.mlp.gate_proj.weight"] == "layers.2.feed_forward.w1.weight"
    # mitchell's output projections shrink with depth (1/√(2(l+1))): layers 0 and 2 swapped
    # are wrong for their depth, and named as such on both models
    with torch.no_grad():
        for a, b in [(titan.layers["0"].attention.wo, titan.layers["2"].attention.wo),
                     (hf.model.layers[0].self_attn.o_proj, hf.model.layers[2].self_attn.o_proj)]:
            w = a.weight.clone()
            a.weight.copy_(b.weight)
            b.weight.copy_(w)
    rt, rh = keel.audit(titan, "mitchell"), keel.audit(hf, "mitchell")
    bad = {f["param"] for f in rt["findings"]}
    assert bad == {"layers.0.attention.wo.weight", "layers.2.attention.wo.weight"}, bad
    assert verdicts(rt) == verdicts(rh)


def test_torchtitan_config_comes_from_the_module():
    # newer torchtitan keeps a non-HF `.config` (Decoder.Config) and no model_args: still
    # derived, not refused; eps and theta follow the module
    @dataclass
    class DecoderConfig:
        dim: int = 64
        n_layers: int = 3
        norm_eps: float = 1e-6

    a = TransformerModelArgs(rope_theta=500000.0)
    titan = Transformer(a)
    del titan.model_args
    titan.config = DecoderConfig()
    keel.init_(titan, "normal", 1)
    hf = keel.init_(LlamaForCausalLM(titan_hf_config()), "normal", 1)
    for k, v in titan_to_hf(_clean_sd(titan)).items():
        assert torch.equal(v, dict(hf.named_parameters())[k].detach()), k
    from keel._model import _titan_config, _clean

    c = _titan_config(Transformer(a), {_clean(n): p for n, p in Transformer(a).named_parameters()}, "")
    assert c["intermediate_size"] == TITAN_FFN and c["num_attention_heads"] == 4 and c["num_key_value_heads"] == 2
    assert c["rope_theta"] == 500000.0 and c["rms_norm_eps"] == 1e-5 and c["num_hidden_layers"] == 3


def test_torchtitan_unknown_parameters_name_the_fix():
    titan = Transformer(TransformerModelArgs())
    titan.layers["1"].attention.register_parameter("gate", nn.Parameter(torch.full((4,), 0.5)))
    with pytest.raises(ValueError, match=r"does not know.*layers\.1\.attention\.gate.*names="):
        keel.init_(titan, "normal")
    # an exception map is enough: the rest stays native
    keel.init_(titan, "normal", names={"layers.{i}.attention.gate": None})
    assert torch.equal(titan.layers["1"].attention.gate, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight maps to model\.layers\.0\.self_attn\.query\.weight"):
        keel.init_(Transformer(TransformerModelArgs()), "normal",
                   names={"layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.query.weight"})


# ---------------------------------------------------------------- a custom (nanoGPT-style) Llama


@dataclass
class MyConfig:
    n_layer: int = 3
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 64
    n_ffn: int = 160
    vocab_size: int = 256


class MyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        hd = c.n_embd // c.n_head
        self.ln_1 = nn.RMSNorm(c.n_embd)
        self.c_attn = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * hd, bias=True)  # fused q, k, v
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.ln_2 = nn.RMSNorm(c.n_embd)
        self.c_fc = nn.Linear(c.n_embd, 2 * c.n_ffn, bias=False)  # fused gate, up
        self.mlp_proj = nn.Linear(c.n_ffn, c.n_embd, bias=False)


class MyLlama(nn.Module):
    def __init__(self, c=MyConfig()):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            h=nn.ModuleList(MyBlock(c) for _ in range(c.n_layer)),
            ln_f=nn.RMSNorm(c.n_embd),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)


L = "model.layers.{i}."
MY_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{i}.ln_1.weight": L + "input_layernorm.weight",
    "transformer.h.{i}.c_attn.weight": [L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"],
    "transformer.h.{i}.c_attn.bias": None,
    "transformer.h.{i}.c_proj.weight": L + "self_attn.o_proj.weight",
    "transformer.h.{i}.ln_2.weight": L + "post_attention_layernorm.weight",
    "transformer.h.{i}.c_fc.weight": (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
    "transformer.h.{i}.mlp_proj.weight": L + "mlp.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def my_names_fn(name):
    # the same map as a callable
    if name.startswith("transformer.h."):
        i, rest = name[len("transformer.h."):].split(".", 1)
        v = MY_NAMES["transformer.h.{i}." + rest]
        return None if v is None else (v.replace("{i}", i) if isinstance(v, str) else [k.replace("{i}", i) for k in v])
    return MY_NAMES[name]


@pytest.mark.parametrize("names", [MY_NAMES, my_names_fn], ids=["dict", "callable"])
def test_role_map_fused_tensors_equal_the_hf_parts_and_leave_biases_alone(names):
    cfg = small_config()
    m = MyLlama()
    biases = [b.c_attn.bias.detach().clone() for b in m.transformer.h]
    keel.init_(m, "mitchell", 11, config=cfg, names=names)
    hf = dict(keel.init_(LlamaForCausalLM(cfg), "mitchell", 11).named_parameters())
    for i, b in enumerate(m.transformer.h):
        p = f"model.layers.{i}."
        assert torch.equal(b.c_attn.weight, torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(b.c_fc.weight, torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]))
        assert torch.equal(b.c_proj.weight, hf[p + "self_attn.o_proj.weight"])
        assert torch.equal(b.mlp_proj.weight, hf[p + "mlp.down_proj.weight"])
        assert torch.equal(b.c_attn.bias, biases[i]), "a None role must leave the tensor alone"
    assert torch.equal(m.transformer.wte.weight, hf["model.embed_tokens.weight"])
    assert torch.equal(m.lm_head.weight, hf["lm_head.weight"])


def test_role_map_audit_splits_fused_tensors():
    cfg = small_config(hidden_size=128, intermediate_size=320)
    c = MyConfig(n_embd=128, n_ffn=320)
    m = keel.init_(MyLlama(c), "mitchell", 2, config=cfg, names=MY_NAMES)
    hf = keel.init_(LlamaForCausalLM(cfg), "mitchell", 2)
    r, rh = keel.audit(m, "mitchell", config=cfg, names=MY_NAMES), keel.audit(hf, "mitchell")
    assert r["verdict"] == "Pass", r["findings"]
    assert {t["name"]: t["verdict"] for t in r["tensors"]} == {t["name"]: t["verdict"] for t in rh["tensors"]}
    # a bug in the k rows of layer 1's fused qkv is named as k_proj, and only it
    with torch.no_grad():
        m.transformer.h[1].c_attn.weight[128:192].mul_(8.0)
    r = keel.audit(m, "mitchell", config=cfg, names=MY_NAMES)
    assert [(f["name"], f["param"]) for f in r["findings"]] == [("model.layers.1.self_attn.k_proj.weight", "transformer.h.1.c_attn.weight")]


def test_role_map_errors_say_what_and_how():
    cfg = small_config()
    partial = {k: v for k, v in MY_NAMES.items() if "c_attn.bias" not in k}
    with pytest.raises(ValueError, match=r"does not know.*transformer\.h\.0\.c_attn\.bias.*names="):
        keel.init_(MyLlama(), "normal", config=cfg, names=partial)
    with pytest.raises(ValueError, match=r"lacks tensors.*lm_head\.weight.*tie_word_embeddings"):
        keel.init_(MyLlama(), "normal", config=cfg, names={**MY_NAMES, "lm_head.weight": None})
    with pytest.raises(ValueError, match=r"c_fc\.weight.*shape \[320, 64\].*\[320, 64\]|c_fc\.weight.*differs"):
        keel.init_(MyLlama(), "normal", config=small_config(intermediate_size=100), names=MY_NAMES)
    with pytest.raises(ValueError, match="mapped from two parameters"):
        keel.init_(MyLlama(), "normal", config=cfg, names={**MY_NAMES, "transformer.h.{i}.c_proj.weight": L + "mlp.down_proj.weight"})
    # roles= is keel's per-role init options; a name map given there is pointed at names=
    with pytest.raises(ValueError, match=r"roles= sets per-role init options.*names="):
        keel.init_(MyLlama(), "normal", config=cfg, roles=MY_NAMES)


# ---------------------------------------------------------------- nanoGPT's GPT (GPT-2): refused, clearly


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    """nanoGPT's model.GPT, parameters only: learned positions, LayerNorm, GELU MLP, tied head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, d),
            wpe=nn.Embedding(config.block_size, d),
            h=nn.ModuleList(nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(d, bias=config.bias),
                attn=nn.ModuleDict(dict(c_attn=nn.Linear(d, 3 * d, bias=config.bias), c_proj=nn.Linear(d, d, bias=config.bias))),
                ln_2=nn.LayerNorm(d, bias=config.bias),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d, bias=config.bias), c_proj=nn.Linear(4 * d, d, bias=config.bias))),
            )) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(d, bias=config.bias),
        ))
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight


def test_nanogpt_gets_a_clear_error_not_expected_an_hf_config():
    gpt = GPT(GPTConfig())
    for call in (lambda: keel.init_(gpt, "normal"), lambda: keel.audit(gpt, "normal")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "expected an HF config" not in msg
        for want in ("GPTConfig", "n_layer", "LLaMA architecture", "config=", "names="):
            assert want in msg, (want, msg)
    # with a Llama config but its own names: the names it does not know, and the fix
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight.*names="):
        keel.init_(gpt, "normal", config=small_config())


# ---------------------------------------------------------------- torch.compile and other wrappers


def test_compiled_and_wrapped_modules_init_and_audit_like_the_bare_ones():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = small_config()
    ref = dict(keel.init_(LlamaForCausalLM(cfg), "mitchell", 4).named_parameters())
    hf = torch.compile(LlamaForCausalLM(cfg), backend="eager")
    keel.init_(hf, "mitchell", 4)
    assert all(n.startswith("_orig_mod.") for n, _ in hf.named_parameters())
    for n, p in hf.named_parameters():
        assert torch.equal(p, ref[n[len("_orig_mod."):]]), n
    assert keel.audit(hf, "mitchell")["verdict"] == "Pass"

    # torchtitan's way: activation checkpointing and torch.compile per block, then the whole
    bare = keel.init_(Transformer(TransformerModelArgs()), "mitchell", 4)
    titan = Transformer(TransformerModelArgs())
    for k, block in list(titan.layers.items()):
        titan.layers[k] = torch.compile(checkpoint_wrapper(block), backend="eager")
    titan = torch.compile(titan, backend="eager")
    assert any("_checkpoint_wrapped_module" in n for n, _ in titan.named_parameters())
    keel.init_(titan, "mitchell", 4)
    got = _clean_sd(titan)
    for n, p in bare.named_parameters():
        assert torch.equal(got[n], p), n
    assert keel.audit(titan, "mitchell")["verdict"] == "Pass"

    # a role-mapped module: the map names the bare module's parameters
    my = torch.compile(MyLlama(), backend="eager")
    keel.init_(my, "mitchell", 4, config=cfg, names=MY_NAMES)
    assert torch.equal(my.transformer.h[2].c_proj.weight, ref["model.layers.2.self_attn.o_proj.weight"])


XS = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]


def test_attention_probe_on_a_compiled_llama_measures_what_the_eager_one_does():
    torch._dynamo.reset()
    model = keel.init_(LlamaForCausalLM(small_config(num_hidden_layers=2)), "normal", 0).eval()
    xs = XS
    probe = AttentionProbe(model)
    want = []
    for x in xs:
        with torch.no_grad():
            model(x)
        want.append((probe.per_layer(), float(probe.take())))
    compiled = torch.compile(model, backend="eager")  # the probe's hooks are on the modules it compiles
    for x, (layers, top) in zip(xs, want):
        with torch.no_grad():
            compiled(x)
        assert probe.per_layer() == pytest.approx(layers, rel=1e-5) and float(probe.take()) == pytest.approx(top, rel=1e-5)
    # switched off, the compiled model measures nothing (no stale graph keeps the hooks on)
    probe.on = False
    with torch.no_grad():
        compiled(xs[0])
    assert probe.take() is None
    probe.remove()


def test_attention_probe_finds_torchtitan_attention_through_compile():
    xs = XS
    titan = keel.init_(Transformer(TransformerModelArgs()), "normal", 0).eval()
    tp = AttentionProbe(titan)
    with torch.no_grad():
        eager_logits = titan(xs[0])
    top = float(tp.take())
    tp.remove()
    ct = torch.compile(titan, backend="eager")
    tp = AttentionProbe(ct)
    assert tp.layers == 3
    with torch.no_grad():
        torch.testing.assert_close(ct(xs[0]), eager_logits)
    assert float(tp.take()) == pytest.approx(top, rel=1e-5) and math.isfinite(top)
