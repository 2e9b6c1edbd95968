"""keel.init_ and keel.audit on live torch modules. Parameter names are matched to keel's
(Hugging Face Llama) names; values cross to the Rust core as float32 bytes one tensor at a time.

Accepted, with nothing to declare:
- HF names (LlamaForCausalLM, a bare LlamaModel, or either under a wrapper prefix such as DDP's
  `module.`), config from the module's `.config`;
- torchtitan's Llama names (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`,
  ...), config derived from the module (its weight shapes and attention modules, and its
  `model_args` or `config` where they say more);
- wrappers' name segments anywhere (torch.compile's `_orig_mod`, activation checkpointing's
  `_checkpoint_wrapped_module`, FSDP1's `_fsdp_wrapped_module`).
Any other LLaMA-architecture module: `names=` maps its parameter names to keel's (a dict of
patterns with `{i}` for the layer, or a callable); entries there take precedence over the
native names, so a map can also just add exceptions (None: not keel's tensor)."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import torch

from . import _config_json, _init_json, _keel

# segments wrappers insert into parameter names; the tensors under them are the model's own
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

# torchtitan's Llama (torchtitan/models/llama3) -> keel's HF names; q_norm/k_norm: its qk-norm option
TITAN_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_NO = object()  # no pattern matched (distinct from None: "matched, not keel's tensor")

_NAMES_HELP = (
    "names={'blocks.{i}.attn.q.weight': 'model.layers.{i}.self_attn.q_proj.weight', ...} (or a callable "
    "name -> keel name); None leaves a tensor alone, a list of keel names is a tensor fused along dim 0"
)


def _clean(name):
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def _unwrap(model):
    """The module under torch.compile's OptimizedModule and (Distributed)DataParallel: its
    `.config` and parameter names are the user's."""
    while True:
        inner = model._modules.get("_orig_mod") if isinstance(model, torch.nn.Module) else None
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _target(name, value):
    """A map value as a tuple of keel names, or None (leave alone)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(
        f"names: {name} maps to {value!r}; give a keel name (str), None (leave it alone) or a non-empty "
        "list of keel names (a tensor fused along dim 0)"
    )


def _pattern_map(table, what="names"):
    """{pattern: target} -> fn(name) -> tuple of keel names / None / _NO. `{i}` in a pattern
    matches a layer index and is filled into the target; the first matching pattern wins."""
    compiled = []
    for pat, value in table.items():
        if not isinstance(pat, str):
            raise ValueError(f"{what}: keys are parameter name patterns (str), got {pat!r}")
        _target(pat, value)
        parts = pat.split("{i}")
        if len(parts) == 1 and value is not None and any("{i}" in v for v in _target(pat, value)):
            raise ValueError(f"{what}: {value!r} uses {{i}} but its pattern {pat!r} has none")
        rx = re.escape(parts[0])
        for j, p in enumerate(parts[1:]):
            rx += (r"(?P<i>\d+)" if j == 0 else r"(?P=i)") + re.escape(p)
        compiled.append((re.compile(rx + r"\Z"), value))

    def lookup(name):
        for rx, value in compiled:
            m = rx.match(name)
            if m:
                t = _target(name, value)
                if t is None or "i" not in rx.groupindex:
                    return t
                return tuple(k.replace("{i}", m.group("i")) for k in t)
        return _NO

    return lookup


def _user_map(names):
    if names is None:
        return None
    if callable(names):
        return lambda n: _target(n, names(n))
    if isinstance(names, dict):
        return _pattern_map(names)
    raise ValueError(f"names: expected a dict of name patterns or a callable, got {type(names).__name__}")


def _native(params):
    """("hf" | "titan", prefix) when the module names its token embedding the HF or the
    torchtitan way (exactly once), else (None, None)."""
    for kind, anchor in (("hf", "embed_tokens.weight"), ("titan", "tok_embeddings.weight")):
        hits = [n for n in params if n == anchor or n.endswith("." + anchor)]
        if len(hits) == 1:
            return kind, hits[0][: -len(anchor)]
    return None, None


def _is_hf_config(c):
    return isinstance(c, dict) or (hasattr(c, "to_dict") and hasattr(c, "model_type"))


def _describe(c):
    t = type(c)
    if dataclasses.is_dataclass(c):
        fields = [f.name for f in dataclasses.fields(c)]
    else:
        fields = [k for k in vars(c) if not k.startswith("_")] if hasattr(c, "__dict__") else []
    more = f" with fields {', '.join(fields[:8])}" + (" …" if len(fields) > 8 else "") if fields else ""
    return f"a {t.__module__}.{t.__qualname__}{more}"


def _get(obj, *path):
    for p in path:
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def _titan_config(model, params, base):
    """An HF LlamaConfig-style dict for a torchtitan Llama: sizes from the weights, heads from
    the attention module's head_dim (else the model's args), the rest from `model_args`
    (torchtitan <= 0.2) or `config` (its newer Decoder.Config) where present."""

    def w(rel):
        p = params.get(base + rel)
        return None if p is None else p.shape

    emb = w("tok_embeddings.weight")
    layers = sorted({int(m.group(1)) for n in params if (m := re.match(re.escape(base) + r"layers\.(\d+)\.", n))})
    q, k, ff = w("layers.0.attention.wq.weight"), w("layers.0.attention.wk.weight"), w("layers.0.feed_forward.w1.weight")
    if not layers or q is None or k is None or ff is None:
        raise ValueError(
            "torchtitan-style names (tok_embeddings.weight) but no layers.0.attention.wq/wk and "
            "layers.0.feed_forward.w1 weights to read the config from; pass config="
        )
    args = getattr(model, "model_args", None)
    cfg = getattr(model, "config", None)
    attn = next((m for n, m in model.named_modules() if _clean(n) == base + "layers.0.attention"), None)
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int):
        n_heads = getattr(attn, "n_heads", None) or _get(args, "n_heads") or _get(cfg, "layer", "attention", "n_heads")
        if not n_heads:
            raise ValueError("torchtitan model: cannot tell its number of heads (no attention.head_dim or n_heads); pass config=")
        hd = q[0] // n_heads
    out = {
        "model_type": "llama",
        "vocab_size": emb[0],
        "hidden_size": emb[1],
        "intermediate_size": ff[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": q[0] // hd,
        "num_key_value_heads": k[0] // hd,
        "head_dim": hd,
        "tie_word_embeddings": base + "output.weight" not in params,
    }
    if base + "layers.0.attention.q_norm.weight" in params:
        out["model_type"] = "qwen3"  # keel's Llama + per-head q/k norm
    eps = _get(args, "norm_eps") or _get(cfg, "norm_eps")
    if eps is None:
        norm = next((m for n, m in model.named_modules() if _clean(n) == base + "norm"), None)
        eps = getattr(norm, "eps", None)
        if eps is None and norm is not None and getattr(norm, "weight", None) is not None:
            eps = torch.finfo(norm.weight.dtype).eps  # nn.RMSNorm(eps=None)
    if eps is not None:
        out["rms_norm_eps"] = float(eps)
    theta = _get(args, "rope_theta") or _get(cfg, "rope", "theta")
    if theta is not None:
        out["rope_theta"] = float(theta)
    seq = _get(args, "max_seq_len") or _get(cfg, "rope", "max_seq_len")
    if seq is not None:
        out["max_position_embeddings"] = int(seq)
    return out


def _interleaved_rope(model):
    """torchtitan's Llama rotates adjacent pairs (complex freqs_cis) where HF rotates halves;
    its newer CosSinRoPE rotates halves like HF. A real cache means halves."""
    for n, b in model.named_buffers():
        if n.endswith("freqs_cis") or n.endswith("rope.cache"):
            return b.is_complex()
    return True  # torchtitan's Llama 3 default (ComplexRoPE)


def _hf_to_interleaved(w, heads):
    # torchtitan's Llama3StateDictAdapter.from_hf (_reverse_permute): HF's rotate-half row
    # order within each head -> adjacent pairs
    d0, d1 = w.shape
    return w.view(heads, 2, d0 // heads // 2, d1).transpose(1, 2).reshape(d0, d1)


class _Entry:
    __slots__ = ("name", "param", "keys", "heads")

    def __init__(self, name, param, keys, heads=None):
        self.name, self.param, self.keys, self.heads = name, param, keys, heads


def _model_config(model, config):
    """The config as JSON for the core: config=, else the module's HF `.config`, else
    derived from a torchtitan Llama; any other `.config` is refused, said what it is."""
    if config is not None:
        return _config_json(config)
    c = getattr(model, "config", None)
    if c is not None and _is_hf_config(c):
        return _config_json(c)
    params = {_clean(n): p for n, p in model.named_parameters()}
    kind, base = _native(params)
    if kind == "titan":
        return json.dumps(_titan_config(model, params, base))
    if c is None:
        raise ValueError(
            "this module has no .config; pass config= (an HF LlamaConfig, a dict of its keys or a "
            "config.json path)" + ("" if kind else f", and, unless its names are HF's or torchtitan's, {_NAMES_HELP}")
        )
    raise ValueError(
        f"this module's .config is {_describe(c)}, not a Hugging Face LlamaConfig. keel's init plans "
        "are for the LLaMA architecture (RMSNorm, RoPE attention q/k/v/o, SwiGLU MLP gate/up/down, no "
        "biases; a GPT-2 with LayerNorm, learned positions and a GELU MLP has no keel plan). For a "
        "LLaMA-architecture model of your own, pass config= (an HF LlamaConfig, a dict with vocab_size, "
        "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, "
        f"tie_word_embeddings, or a config.json path) and, unless its names are HF's or torchtitan's, {_NAMES_HELP}"
    )


def resolve(model, plan, cfg, names=None):
    """The module's parameters as keel's tensors: a list of _Entry (parameter -> keel names
    it holds, fused along dim 0 when several) in keel's order. Unknown parameters, keel
    tensors the module lacks and keel names mapped twice are errors that list them."""
    keel_names = plan.names()
    plan_set = set(keel_names)
    user = _user_map(names)
    params = {_clean(n): p for n, p in model.named_parameters()}
    kind, base = _native(params)
    native = {}
    if kind == "hf":
        # base stands for keel's "model."; the head sits beside it ("model." (LlamaForCausalLM),
        # "<wrapper>.model."), else the module is the bare LlamaModel
        outer = base[: -len("model.")] if base == "model." or base.endswith(".model.") else base
        for k in keel_names:
            native[base + k[len("model."):] if k.startswith("model.") else outer + k] = (k,)
    elif kind == "titan":
        titan = _pattern_map(TITAN_NAMES, "TITAN_NAMES")
        for n in params:
            if n.startswith(base):
                t = titan(n[len(base):])
                if t is not _NO:
                    native[n] = t
    rope_heads = {}
    if kind == "titan" and _interleaved_rope(model):
        rope_heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}

    entries, unknown, seen = {}, [], {}
    for n, p in params.items():
        t = user(n) if user is not None else _NO
        heads = None
        if t is _NO:
            t = native.get(n, _NO)
            if t is not _NO and kind == "titan" and len(t) == 1:
                heads = rope_heads.get(t[0].rsplit(".", 2)[-2])
        if t is _NO:
            unknown.append(n)
            continue
        if t is None:
            continue
        for k in t:
            if k not in plan_set:
                raise ValueError(
                    f"{n} maps to {k}, which is not a tensor of keel's plan for this config "
                    f"(tie_word_embeddings={cfg.get('tie_word_embeddings', False)}); keel's names are like "
                    + ", ".join(keel_names[:3])
                )
            if k in seen:
                raise ValueError(f"{k} is mapped from two parameters: {seen[k]} and {n}")
            seen[k] = n
        entries[t[0]] = _Entry(n, p, t, heads)
    if unknown:
        if kind is None and user is None:
            head = (
                "cannot find the token embedding (…embed_tokens.weight as HF names it, or torchtitan's "
                "tok_embeddings.weight) among the module's parameters"
            )
        else:
            head = f"{len(unknown)} parameters that keel does not know (not in the HF Llama layout of this config)"
        raise ValueError(
            head + ": " + ", ".join(unknown[:20]) + (" …" if len(unknown) > 20 else "")
            + f"; keel's names are like {', '.join(keel_names[:3])}. Map yours with {_NAMES_HELP}"
        )
    missing = [k for k in keel_names if k not in seen]
    if missing:
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " (a head tied to the embedding needs tie_word_embeddings=True in the config)"
        raise ValueError("the module lacks tensors keel's plan has: " + ", ".join(missing[:20]) + hint)
    return [entries[k] for k in keel_names if k in entries]


def _expected_shape(plan, e):
    shapes = [plan.shape(k) for k in e.keys]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"{e.name}: the fused tensors {', '.join(e.keys)} differ beyond dim 0 ({shapes})")
    return [sum(s[0] for s in shapes)] + shapes[0][1:]


def _plan(model, scheme, seed, config, init, names):
    if "roles" in init and (
        callable(init["roles"])
        or (isinstance(init["roles"], dict) and any(not isinstance(v, dict) for v in init["roles"].values()))
    ):
        raise ValueError(
            "roles= sets per-role init options (roles={'head': {'std': 0.001}}, roles named embed, attn-q, "
            "attn-out, mlp-out, head, ...); to map your parameter names to keel's use names="
        )
    model = _unwrap(model)
    plan = _keel.InitPlan(_model_config(model, config), _init_json(scheme, seed, init))
    cfg = json.loads(plan.explain_json())["config"]
    return plan, resolve(model, plan, cfg, names)


def init_model(model, scheme, seed, config, init, names=None):
    plan, entries = _plan(model, scheme, seed, config, init, names)
    info = json.loads(plan.explain_json())
    if info["attn_scale"] is not None or info["logit_scale"] != 1.0 or info["residual_scale"] != 1.0:
        warnings.warn(
            f"init scheme '{scheme}' implies a model variant (attention scale {info['attn_scale']}, "
            f"logit scale {info['logit_scale']:.4g}, residual scale {info['residual_scale']:.4g}) that "
            "transformers' LlamaForCausalLM does not apply; the weights follow keel's plan, the forward "
            "pass is plain Llama",
            stacklevel=3,
        )
    with torch.no_grad():
        for e in entries:
            shape = _expected_shape(plan, e)
            if list(e.param.shape) != shape:
                what = e.keys[0] if len(e.keys) == 1 else " + ".join(e.keys)
                raise ValueError(f"{e.name} ({what}): the module's shape {list(e.param.shape)} differs from the config's {shape}")
            parts = [torch.frombuffer(plan.sample(k), dtype=torch.float32).view(plan.shape(k)) for k in e.keys]
            v = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            if e.heads:
                v = _hf_to_interleaved(v, e.heads)
            e.param.copy_(v)
    return model


def _f32(p):
    return p.detach().to(device="cpu", dtype=torch.float32)


def audit_model(model, scheme, config, init, names=None):
    plan, entries = _plan(model, scheme, 0, config, init, names)
    rows = []
    for e in entries:
        shape = _expected_shape(plan, e)
        if list(e.param.shape) != shape:
            raise ValueError(f"{e.name}: the module's shape {list(e.param.shape)} differs from the config's {shape}")
        # torchtitan's wq/wk are audited in its row order: a row order changes no statistic
        w = _f32(e.param)
        for k, part in zip(e.keys, torch.split(w, [plan.shape(k)[0] for k in e.keys], 0)):
            r = json.loads(plan.audit(k, part.contiguous().numpy().tobytes()))
            r["param"] = e.name
            rows.append(r)
    order = {"Pass": 0, "Warn": 1, "Fail": 2}
    worst = max((r["verdict"] for r in rows), key=order.__getitem__, default="Pass")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in order}
    return {
        "scheme": scheme,
        "verdict": worst,
        "counts": counts,
        "tensors": rows,
        "findings": [r for r in rows if r["verdict"] != "Pass"],
    }
