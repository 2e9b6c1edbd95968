"""keel.init_ and keel.audit on live torch modules: parameter names are matched to keel's
(Hugging Face) names, values cross to the Rust core as float32 bytes one tensor at a time."""

from __future__ import annotations

import json
import warnings

import torch

from . import _config_json, _init_json, _keel


def _model_config(model, config):
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "this module has no .config; pass config= (an HF LlamaConfig, a dict or a config.json path)"
        )
    return _config_json(config)


def match_names(keel_names, module):
    """keel name -> (torch name, parameter). Accepts the module as HF names it
    (LlamaForCausalLM), or wrapped under a prefix (DDP's `module.`, torch.compile's
    `_orig_mod.`); keel names missing from the module are returned (the caller decides), and
    parameters keel does not know are an error that lists them."""
    params = dict(module.named_parameters())
    names = list(params)
    anchor = "embed_tokens.weight"
    hits = [n for n in names if n == anchor or n.endswith("." + anchor)]
    if len(hits) != 1:
        raise ValueError(
            "cannot find the token embedding (…embed_tokens.weight) among the module's parameters; "
            f"keel knows HF Llama names such as {keel_names[0]}. Parameters: {', '.join(names[:12])}"
            + (" …" if len(names) > 12 else "")
        )
    base = hits[0][: -len(anchor)]  # prefix standing for keel's "model."
    # "model." (LlamaForCausalLM) or "<wrapper>.model."; else the module is the bare LlamaModel
    outer = base[: -len("model.")] if base == "model." or base.endswith(".model.") else base

    def torch_name(k):
        return base + k[len("model."):] if k.startswith("model.") else outer + k

    mapping, missing = {}, []
    for k in keel_names:
        t = torch_name(k)
        if t in params:
            mapping[k] = (t, params[t])
        else:
            missing.append(f"{k} (looked for {t})")
    taken = {t for t, _ in mapping.values()}
    unknown = [n for n in names if n not in taken]
    if unknown:
        raise ValueError(
            f"{len(unknown)} parameters that keel does not know (not in the HF Llama layout of this config): "
            + ", ".join(unknown[:20])
            + (" …" if len(unknown) > 20 else "")
            + f"; keel's names are like {', '.join(keel_names[:3])}"
        )
    return mapping, missing


def init_model(model, scheme, seed, config, init):
    plan = _keel.InitPlan(_model_config(model, config), _init_json(scheme, seed, init))
    info = json.loads(plan.explain_json())
    if info["attn_scale"] is not None or info["logit_scale"] != 1.0 or info["residual_scale"] != 1.0:
        warnings.warn(
            f"init scheme '{scheme}' implies a model variant (attention scale {info['attn_scale']}, "
            f"logit scale {info['logit_scale']:.4g}, residual scale {info['residual_scale']:.4g}) that "
            "transformers' LlamaForCausalLM does not apply; the weights follow keel's plan, the forward "
            "pass is plain Llama",
            stacklevel=3,
        )
    mapping, missing = match_names(plan.names(), model)
    if missing:
        raise ValueError("the module lacks tensors keel's plan has: " + ", ".join(missing))
    with torch.no_grad():
        for k, (_, p) in mapping.items():
            shape = plan.shape(k)
            if list(p.shape) != shape:
                raise ValueError(f"{k}: the module's shape {list(p.shape)} differs from the config's {shape}")
            v = torch.frombuffer(plan.sample(k), dtype=torch.float32).view(shape)
            p.copy_(v)
    return model


def _f32_bytes(p):
    return p.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def audit_model(model, scheme, config, init):
    plan = _keel.InitPlan(_model_config(model, config), _init_json(scheme, 0, init))
    mapping, missing = match_names(plan.names(), model)
    if missing:
        raise ValueError("the module lacks tensors keel's plan has: " + ", ".join(missing))
    rows = [json.loads(plan.audit(k, _f32_bytes(p))) for k, (_, p) in mapping.items()]
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
