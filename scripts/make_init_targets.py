#!/usr/bin/env python3
"""Generate ``tests/fixtures/init_targets.json``: reference initialisation targets.

What it makes
-------------
For three LLaMA shapes (HF ``LlamaForCausalLM`` parameter names, linear weights
stored [out, in], float32) and fourteen initialisation schemes, the TARGET
standard deviation -- and for uniform schemes the bound -- of every parameter
tensor, computed the way PyTorch / Hugging Face / torchtitan / Megatron-LM /
GPT-NeoX / OLMo / DeepNet compute it.  keel's Rust test
``tests/init_schemes.rs::formulas_match_the_pytorch_reference`` compares keel's
own per-tensor plan against these numbers, so keel's formulas are checked
against an independent implementation.

Configs (``tie_word_embeddings`` false unless stated):

* ``micro``    vocab 256,  hidden 64,  2 layers, 4 heads, 2 KV heads, FFN 172
* ``tiny``     vocab 4096, hidden 256, 4 layers, 4 heads, 4 KV heads, FFN 688
* ``gqa_tied`` vocab 512,  hidden 128, 3 layers, 8 heads, 2 KV heads, FFN 344,
  tied embeddings (no ``lm_head.weight`` tensor)

Every fan is torch's own: the script builds the real tensors
(``torch.empty(shape)``) and asks ``torch.nn.init._calculate_fan_in_and_fan_out``
(fan_in = size(1), fan_out = size(0)), ``_calculate_correct_fan`` and
``calculate_gain``.  NOTE the embedding: torch treats ``embed_tokens.weight``
[V, d] like any 2-D weight, i.e. fan_in = d, fan_out = V; that is what is
recorded.  L = number of layers, l = 0-based layer index, d = hidden size,
F = intermediate size.  Norm weights are always ones: ``{"kind": "ones",
"std": 0, "mean": 1}``.

Schemes (JSON key -> rule; "out-proj" = o_proj and down_proj):

* ``xavier-uniform``            gain 1: U(+-b), b = gain*sqrt(6/(fan_in+fan_out)),
                                std = b/sqrt(3)  [torch.nn.init.xavier_uniform_]
* ``xavier-normal``             gain 1: std = gain*sqrt(2/(fan_in+fan_out))
* ``xavier-normal@gain=0.5``    same with gain 0.5 [torch.nn.init.xavier_normal_]
* ``kaiming-uniform``           torch defaults a=0, mode fan_in, leaky_relu ->
                                gain sqrt(2); std = gain/sqrt(fan_in),
                                b = sqrt(3)*std [torch.nn.init.kaiming_uniform_]
* ``kaiming-normal@mode=fan_out`` nonlinearity relu (gain sqrt(2)):
                                std = gain/sqrt(fan_out) [kaiming_normal_]
* ``lecun-normal``              std = 1/sqrt(fan_in) (torch has no helper; the
                                realised check uses kaiming_normal_ with
                                nonlinearity 'linear', i.e. gain 1)
* ``normal``                    HF LlamaPreTrainedModel._init_weights:
                                N(0, initializer_range = 0.02) for every Linear and
                                Embedding weight; checked on a real
                                LlamaForCausalLM (realized_std is measured on it)
* ``depth-scaled``              torchtitan llama ``depth_init=True`` RULE AS
                                ENCODED HERE: out-proj of layer l get
                                0.02/sqrt(2(l+1)); every other linear weight,
                                embedding and lm_head get 0.02, plain normal.
                                torchtitan's real code differs: it uses
                                trunc_normal_ (absolute cut-offs +-2, i.e. no
                                effective truncation at these stds), ALSO scales
                                the FFN up projection w3 (= up_proj) by the depth
                                factor, initialises the embedding with N(0, 1) and
                                the output layer with std d^-0.5 truncated at 3
                                std.  Only the rule above is encoded.
* ``megatron``                  Megatron-LM init_method_normal(0.02) everywhere,
                                out-proj scaled_init_method_normal:
                                0.02/sqrt(2L)
* ``small-init``                GPT-NeoX small_init_init_method (Nguyen & Salazar):
                                std = sqrt(2/(5d)) for every 2-D tensor
* ``wang``                      GPT-NeoX wang_init_method for out-proj:
                                std = 2/(L*sqrt(d)); every other 2-D tensor
                                small-init sqrt(2/(5d))
* ``mitchell``                  OLMo v1 init_fn mitchell: q,k,v,gate,up
                                1/sqrt(fan_in); out-proj of layer l
                                1/sqrt(fan_in)/sqrt(2(l+1)) (fan_in = d for o_proj,
                                F for down_proj); embedding and lm_head 1/sqrt(d).
                                trunc_normal_ cut at +-3 std: "kind":
                                "trunc_normal", "cutoff_sigma": 3, and "std" is the
                                std PARAMETER passed to trunc_normal_ (torch does
                                not re-normalise: the realised std is
                                0.98658*std, recorded as "effective_std")
* ``deepnorm``                  DeepNet (Wang et al. 2022), decoder-only:
                                beta = (8L)^(-1/4), alpha = (2L)^(1/4) (recorded at
                                scheme level); v_proj, o_proj, gate, up, down:
                                xavier_normal gain beta; q_proj, k_proj, embedding,
                                lm_head: xavier_normal gain 1
* ``orthogonal``                torch.nn.init.orthogonal_ gain 1; entries of a
                                (semi-)orthogonal rows x cols matrix have mean
                                square gain^2/max(rows, cols), so std =
                                gain/sqrt(max(rows, cols)); verified exactly (to
                                float32 round-off) on the realised matrix

Per tensor: ``kind`` (uniform | normal | trunc_normal | orthogonal | ones),
``fan_in``, ``fan_out``, ``std``, ``bound`` (uniform only), ``realized_std``
(sqrt(mean(w^2)) of the tensor filled by the real torch.nn.init function, or of
the real HF model for ``normal``, with a fixed seed).  Each realised std is
asserted to lie within 5 standard errors (se = std/sqrt(2n)) of the expected
value for tensors with n >= 4096 elements; uniform tensors are also checked to
stay inside, and reach close to, their bound; trunc_normal tensors inside
+-3 std; orthogonal ones to match std to 1e-5 relative and to satisfy
W W^T = gain^2 I (or W^T W).  Floats are rounded to 9 significant digits.

Regenerate (from the repository root; needs torch and transformers, CPU only,
about 15 s; torch runs single-threaded so the output is byte-for-byte
reproducible -- the orthogonal realized_std values change in the last digits
with the thread count)::

    python3 scripts/make_init_targets.py

Options: ``--out PATH`` (default tests/fixtures/init_targets.json),
``--seed N`` (default 0; only the realized_std values depend on it).
"""

import argparse
import json
import math
import os

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

INIT = torch.nn.init

CONFIGS = [
    dict(name="micro", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
         num_kv_heads=2, intermediate_size=172, tie_embeddings=False),
    dict(name="tiny", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
         num_kv_heads=4, intermediate_size=688, tie_embeddings=False),
    dict(name="gqa_tied", vocab_size=512, hidden_size=128, num_layers=3, num_heads=8,
         num_kv_heads=2, intermediate_size=344, tie_embeddings=True),
]

HF_STD = 0.02           # LlamaConfig.initializer_range default, checked below
MITCHELL_CUTOFF = 3   # OLMo init_cutoff_factor default for mitchell
MIN_N_FOR_ASSERT = 4096
N_SE = 5.0
OUT_ROLES = ("o", "down")


def r9(x):
    """Round a float to 9 significant digits (ints/bools/None untouched)."""
    if isinstance(x, float):
        return float(f"{x:.9g}")
    return x


def tensor_specs(c):
    """[(name, shape, role, layer)] in HF named_parameters() order."""
    d, V, F = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    hd = d // c["num_heads"]
    kv = c["num_kv_heads"] * hd
    specs = [("model.embed_tokens.weight", (V, d), "embed", None)]
    for l in range(c["num_layers"]):
        p = f"model.layers.{l}."
        specs += [
            (p + "self_attn.q_proj.weight", (d, d), "q", l),
            (p + "self_attn.k_proj.weight", (kv, d), "k", l),
            (p + "self_attn.v_proj.weight", (kv, d), "v", l),
            (p + "self_attn.o_proj.weight", (d, d), "o", l),
            (p + "mlp.gate_proj.weight", (F, d), "gate", l),
            (p + "mlp.up_proj.weight", (F, d), "up", l),
            (p + "mlp.down_proj.weight", (d, F), "down", l),
            (p + "input_layernorm.weight", (d,), "norm", l),
            (p + "post_attention_layernorm.weight", (d,), "norm", l),
        ]
    specs.append(("model.norm.weight", (d,), "norm", None))
    if not c["tie_embeddings"]:
        specs.append(("lm_head.weight", (V, d), "head", None))
    return specs


def trunc_effective_std(std, c):
    """Std of N(0, std^2) truncated to [-c std, c std] (torch does not rescale)."""
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    return std * math.sqrt(1 - 2 * c * phi / mass)


# ---------------------------------------------------------------------------
# Schemes.  Each returns (entry, fill) for one 2-D tensor: entry is the target
# record, fill(t, g) fills t with the real torch.nn.init function (or None when
# the realised values come from elsewhere, i.e. the HF model).
# ---------------------------------------------------------------------------

def fans(t):
    return INIT._calculate_fan_in_and_fan_out(t)


def normal_entry(t, std, fill):
    fi, fo = fans(t)
    return dict(kind="normal", fan_in=fi, fan_out=fo, std=std), fill


def xavier_uniform(c, t, role, layer, gain=1.0):
    fi, fo = fans(t)
    bound = gain * math.sqrt(6.0 / (fi + fo))
    e = dict(kind="uniform", fan_in=fi, fan_out=fo, std=bound / math.sqrt(3), bound=bound)
    return e, lambda w, g: INIT.xavier_uniform_(w, gain=gain, generator=g)


def xavier_normal(c, t, role, layer, gain=1.0):
    fi, fo = fans(t)
    std = gain * math.sqrt(2.0 / (fi + fo))
    return normal_entry(t, std, lambda w, g: INIT.xavier_normal_(w, gain=gain, generator=g))


def kaiming_uniform(c, t, role, layer):
    # torch defaults: a=0, mode="fan_in", nonlinearity="leaky_relu"
    gain = INIT.calculate_gain("leaky_relu", 0)
    fan = INIT._calculate_correct_fan(t, "fan_in")
    std = gain / math.sqrt(fan)
    fi, fo = fans(t)
    e = dict(kind="uniform", fan_in=fi, fan_out=fo, std=std, bound=math.sqrt(3.0) * std)
    return e, lambda w, g: INIT.kaiming_uniform_(w, generator=g)


def kaiming_normal_fan_out(c, t, role, layer):
    gain = INIT.calculate_gain("relu")
    fan = INIT._calculate_correct_fan(t, "fan_out")
    return normal_entry(t, gain / math.sqrt(fan), lambda w, g: INIT.kaiming_normal_(
        w, mode="fan_out", nonlinearity="relu", generator=g))


def lecun_normal(c, t, role, layer):
    fi, _ = fans(t)
    # independent torch path: kaiming_normal_ with gain('linear') = 1, mode fan_in
    return normal_entry(t, 1.0 / math.sqrt(fi), lambda w, g: INIT.kaiming_normal_(
        w, mode="fan_in", nonlinearity="linear", generator=g))


def hf_normal(c, t, role, layer):
    return normal_entry(t, HF_STD, None)  # realised on the real LlamaForCausalLM


def normal_fill(std):
    return lambda w, g: INIT.normal_(w, mean=0.0, std=std, generator=g)


def depth_scaled(c, t, role, layer):
    std = 0.02 / math.sqrt(2 * (layer + 1)) if role in OUT_ROLES else 0.02
    return normal_entry(t, std, normal_fill(std))


def megatron(c, t, role, layer):
    L = c["num_layers"]
    std = 0.02 / math.sqrt(2 * L) if role in OUT_ROLES else 0.02
    return normal_entry(t, std, normal_fill(std))


def small_init_std(c):
    return math.sqrt(2.0 / (5.0 * c["hidden_size"]))


def small_init(c, t, role, layer):
    std = small_init_std(c)
    return normal_entry(t, std, normal_fill(std))


def wang(c, t, role, layer):
    L, d = c["num_layers"], c["hidden_size"]
    std = 2.0 / (L * math.sqrt(d)) if role in OUT_ROLES else small_init_std(c)
    return normal_entry(t, std, normal_fill(std))


def mitchell(c, t, role, layer):
    fi, fo = fans(t)
    d = c["hidden_size"]
    if role in ("embed", "head"):
        std = 1.0 / math.sqrt(d)
    elif role in OUT_ROLES:
        std = 1.0 / math.sqrt(fi) / math.sqrt(2 * (layer + 1))
    else:
        std = 1.0 / math.sqrt(fi)
    cut = MITCHELL_CUTOFF
    e = dict(kind="trunc_normal", fan_in=fi, fan_out=fo, std=std, cutoff_sigma=cut,
             effective_std=trunc_effective_std(std, cut))
    return e, lambda w, g: INIT.trunc_normal_(w, mean=0.0, std=std, a=-cut * std, b=cut * std,
                                              generator=g)


def deepnorm_beta(c):
    return (8.0 * c["num_layers"]) ** -0.25


def deepnorm(c, t, role, layer):
    gain = deepnorm_beta(c) if role in ("v", "o", "gate", "up", "down") else 1.0
    return xavier_normal(c, t, role, layer, gain=gain)


def orthogonal(c, t, role, layer, gain=1.0):
    fi, fo = fans(t)
    rows, cols = t.shape
    e = dict(kind="orthogonal", fan_in=fi, fan_out=fo, std=gain / math.sqrt(max(rows, cols)))
    return e, lambda w, g: INIT.orthogonal_(w, gain=gain, generator=g)


SQRT2 = math.sqrt(2.0)
SCHEMES = [
    # (JSON key, params, per-tensor rule, source)
    ("xavier-uniform", {"gain": 1.0}, xavier_uniform, "torch.nn.init.xavier_uniform_"),
    ("xavier-normal", {"gain": 1.0}, xavier_normal, "torch.nn.init.xavier_normal_"),
    ("xavier-normal@gain=0.5", {"gain": 0.5},
     lambda c, t, r, l: xavier_normal(c, t, r, l, gain=0.5), "torch.nn.init.xavier_normal_"),
    ("kaiming-uniform",
     {"a": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu",
      "gain": INIT.calculate_gain("leaky_relu", 0)},
     kaiming_uniform, "torch.nn.init.kaiming_uniform_ (defaults)"),
    ("kaiming-normal@mode=fan_out",
     {"mode": "fan_out", "nonlinearity": "relu", "gain": INIT.calculate_gain("relu")},
     kaiming_normal_fan_out, "torch.nn.init.kaiming_normal_"),
    ("lecun-normal", {}, lecun_normal,
     "1/sqrt(fan_in); realised via kaiming_normal_(nonlinearity='linear')"),
    ("normal", {"std": HF_STD}, hf_normal,
     "transformers LlamaPreTrainedModel._init_weights (initializer_range)"),
    ("depth-scaled", {"std": 0.02}, depth_scaled,
     "torchtitan llama depth_init=True rule: o_proj/down_proj 0.02/sqrt(2(l+1)), rest 0.02"),
    ("megatron", {"std": 0.02}, megatron,
     "Megatron-LM init_method_normal / scaled_init_method_normal 0.02/sqrt(2L)"),
    ("small-init", {}, small_init, "GPT-NeoX small_init_init_method sqrt(2/(5d))"),
    ("wang", {}, wang, "GPT-NeoX wang_init_method 2/(L sqrt(d)) on o_proj/down_proj"),
    ("mitchell", {"cutoff_sigma": MITCHELL_CUTOFF}, mitchell,
     "OLMo v1 init_fn=mitchell, torch.nn.init.trunc_normal_(a=-3std, b=3std)"),
    ("deepnorm", {}, deepnorm,
     "DeepNet decoder-only: xavier_normal_ gain beta=(8L)^-1/4 on v,o,gate,up,down"),
    ("orthogonal", {"gain": 1.0}, orthogonal, "torch.nn.init.orthogonal_"),
]


def rms(w):
    return math.sqrt(w.double().pow(2).mean().item())


def check_realized(where, e, w):
    """Assert the realised tensor agrees with the entry's target."""
    n = w.numel()
    got = e["realized_std"]
    kind = e["kind"]
    maxabs = w.abs().max().item()
    if kind == "orthogonal":
        rel = abs(got / e["std"] - 1)
        assert rel < 1e-5, f"{where}: orthogonal rms {got} vs {e['std']} (rel {rel:.2e})"
        rows, cols = w.shape
        gram = (w.double() @ w.double().T) if rows <= cols else (w.double().T @ w.double())
        eye = torch.eye(min(rows, cols), dtype=torch.float64) * (e["std"] ** 2 * max(rows, cols))
        err = (gram - eye).abs().max().item()
        assert err < 1e-5, f"{where}: not orthogonal, max |W W^T - g^2 I| = {err:.2e}"
        return
    want = e.get("effective_std", e["std"])
    if kind == "uniform":
        b = e["bound"]
        assert maxabs <= b * (1 + 1e-6), f"{where}: max |w| {maxabs} beyond bound {b}"
        if n >= MIN_N_FOR_ASSERT:
            # P(max |w| < b (1 - 20/n)) = (1 - 20/n)^n ~ e^-20
            assert maxabs > b * (1 - 20.0 / n), f"{where}: max |w| {maxabs} far below {b}"
    if kind == "trunc_normal":
        lim = e["cutoff_sigma"] * e["std"]
        assert maxabs <= lim * (1 + 1e-6), f"{where}: max |w| {maxabs} beyond {lim}"
    if n >= MIN_N_FOR_ASSERT:
        se = want / math.sqrt(2 * n)
        z = (got - want) / se
        assert abs(z) <= N_SE, f"{where}: realised std {got} vs {want} ({z:+.1f} se, n={n})"


def hf_model(c, seed):
    """A real LlamaForCausalLM with HF's own init; returns (model, params by name)."""
    cfg = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        tie_word_embeddings=c["tie_embeddings"], max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    assert model.config.initializer_range == HF_STD, model.config.initializer_range
    assert model.config.pad_token_id is None, "a padding row would be zeroed by _init_weights"
    return model, dict(model.named_parameters())


def build_config(c, seed):
    specs = tensor_specs(c)
    model, hf_params = hf_model(c, seed)
    # Our tensor list must be exactly HF's parameter list (names, shapes, order).
    assert [(n, tuple(s)) for n, s, _, _ in specs] == \
        [(n, tuple(p.shape)) for n, p in hf_params.items()], "tensor list differs from HF"
    L = c["num_layers"]
    schemes = {}
    for si, (key, params, fn, source) in enumerate(SCHEMES):
        g = torch.Generator().manual_seed(seed * 1000 + si)
        tensors = {}
        for name, shape, role, layer in specs:
            if role == "norm":
                if key == "normal":
                    assert torch.all(hf_params[name] == 1), f"HF {name} not ones"
                tensors[name] = {"kind": "ones", "std": 0, "mean": 1}
                continue
            t = torch.empty(shape, dtype=torch.float32)
            e, fill = fn(c, t, role, layer)
            if fill is None:
                w = hf_params[name].detach()
            else:
                fill(t, g)
                w = t
            e["realized_std"] = rms(w)
            check_realized(f"{c['name']}/{key}/{name}", e, w)
            tensors[name] = {k: r9(v) for k, v in e.items()}
        entry = {"params": {k: r9(v) for k, v in params.items()}, "source": source}
        if key == "deepnorm":
            entry["alpha"] = r9((2.0 * L) ** 0.25)
            entry["beta"] = r9(deepnorm_beta(c))
        if key == "normal":
            entry["hf_initializer_range"] = r9(float(model.config.initializer_range))
        entry["tensors"] = tensors
        schemes[key] = entry
    model_cfg = {k: v for k, v in c.items() if k != "name"}
    return {"name": c["name"], "model": model_cfg, "schemes": schemes}


def dumps(doc):
    """JSON with one line per tensor entry (keeps the file small and diffable)."""
    def enc(o, ind, inline):
        if inline or not isinstance(o, (dict, list)):
            return json.dumps(o, separators=(",", ":"))
        pad, pad1 = " " * ind, " " * (ind + 1)
        if isinstance(o, list):
            return "[\n" + ",\n".join(pad1 + enc(v, ind + 1, False) for v in o) + "\n" + pad + "]"
        items = []
        for k, v in o.items():
            inl = k in ("params", "model") or (isinstance(v, dict) and "kind" in v)
            items.append(pad1 + json.dumps(k) + ": " + enc(v, ind + 1, inl))
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return enc(doc, 0, False) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "init_targets.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)  # tiny tensors; more threads only slow QR down on small boxes
    doc = {
        "generator": (f"scripts/make_init_targets.py (torch {torch.__version__}, "
                      f"transformers {transformers.__version__}, seed {args.seed})"),
        "notes": ("fans are torch's: fan_in = size(1), fan_out = size(0); embed_tokens [V,d] -> "
                  "fan_in d, fan_out V. std is the target std (for trunc_normal: the std "
                  "parameter). realized_std = sqrt(mean(w^2)) of one torch-initialised sample."),
        "configs": [build_config(c, args.seed) for c in CONFIGS],
    }
    text = dumps(doc)
    json.loads(text)  # round-trip sanity
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    n = sum(len(s["tensors"]) for c in doc["configs"] for s in c["schemes"].values())
    print(f"wrote {args.out}: {len(text)} bytes, {len(doc['configs'])} configs, "
          f"{len(SCHEMES)} schemes, {n} tensor entries")


if __name__ == "__main__":
    main()
