#!/usr/bin/env python3
"""Generate the PyTorch parity fixtures used by keel's Rust tests.

What it makes
-------------
Two small safetensors files (about 1 MB each) in ``tests/fixtures/``:

* ``micro.safetensors``     -- LLaMA with vocab 256, hidden 64, 2 layers,
  4 heads / 2 KV heads (GQA), FFN 172, RoPE theta 1e4, untied lm_head,
  batch 2 x seq 64, seed 0.
* ``gqa_tied.safetensors``  -- same shape but 1 KV head (MQA), RoPE theta
  5e5, tied embeddings (lm_head == embed_tokens), batch 2 x seq 32, seed 1.
* ``qwen3_qknorm.safetensors`` -- ``Qwen3ForCausalLM`` (LLaMA + per-head RMSNorm
  of q and k before RoPE, ``q_norm``/``k_norm`` over head_dim 16), the micro
  shape, batch 2 x seq 32, seed 2 (keel's ``model.qk_norm``).

Each file holds, built with Hugging Face ``transformers.LlamaForCausalLM``
(float32, CPU, eager attention, default init std 0.02, every RMSNorm weight
perturbed to ``1 + 0.1 * randn`` so norm gradients are non-trivial):

* every parameter under its HF name, exactly as ``model.named_parameters()``
  yields it (for the tied model ``lm_head.weight`` is NOT stored; it is
  ``model.embed_tokens.weight``);
* ``input_ids`` and ``targets``: int32 (B, T), independent uniform tokens;
* ``logits``: float32 (B, T, V) from ``model(input_ids).logits``;
* ``loss``: float32 (1,), ``F.cross_entropy(logits.reshape(-1, V),
  targets.reshape(-1))`` (mean over all B*T positions, NO shift);
* ``grad.<param name>``: gradient of that loss (one backward, no clipping);
* ``adamw_losses`` / ``adamw_grad_norms``: float32 (10,) -- loss (before the
  update) and pre-clip global grad norm of 10 AdamW steps on the same batch
  starting from the stored weights: torch.optim.AdamW(lr=3e-3,
  betas=(0.9, 0.95), eps=1e-8, weight_decay 0.1 for ndim>=2 params and 0.0
  for ndim==1 params, foreach=False), clip_grad_norm_(params, 1.0) each step.

Safetensors metadata: ``config`` and ``adamw`` (JSON), ``torch_version``,
``transformers_version``, ``seed``.

Why
---
The Rust parity tests in ``tests/`` load these files and check keel's
forward pass, loss, backward pass and AdamW + grad clipping against PyTorch.
The fixtures are committed, so CI does not need PyTorch; this script only
has to be rerun when the fixture format changes.

Regenerate (from the repository root; needs torch, transformers, safetensors)::

    python3 scripts/make_fixtures.py                  # writes tests/fixtures/
    python3 scripts/make_fixtures.py --out tests/fixtures
"""

import argparse
import json
import math
import os
import struct

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

FIXTURES = [
    dict(name="micro", seed=0, vocab=256, hidden=64, layers=2, heads=4,
         kv_heads=2, ffn=172, max_pos=64, rope_theta=10000.0, tie=False,
         batch=2, seq=64),
    dict(name="gqa_tied", seed=1, vocab=256, hidden=64, layers=2, heads=4,
         kv_heads=1, ffn=172, max_pos=64, rope_theta=500000.0, tie=True,
         batch=2, seq=32),
    dict(name="qwen3_qknorm", seed=2, vocab=256, hidden=64, layers=2, heads=4,
         kv_heads=2, ffn=172, max_pos=64, rope_theta=10000.0, tie=False,
         batch=2, seq=32, qwen3=True),
]

ADAMW = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
             grad_clip=1.0, steps=10)
RMS_NORM_EPS = 1e-5


def make_llama_config(c, cls=LlamaConfig, **extra):
    """LlamaConfig for fixture spec ``c``; handles both rope config forms.

    transformers >= 5 takes ``rope_parameters={"rope_type", "rope_theta"}``;
    older versions take ``rope_theta=``. Older LlamaConfig swallows unknown
    kwargs silently, so the choice is verified afterwards, not only by
    catching TypeError.
    """
    kw = dict(
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        max_position_embeddings=c["max_pos"],
        rms_norm_eps=RMS_NORM_EPS,
        hidden_act="silu",
        tie_word_embeddings=c["tie"],
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=False,
        **extra,
    )
    theta = c["rope_theta"]
    cfg = None
    try:  # transformers >= 5
        cfg = cls(rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)
        rp = getattr(cfg, "rope_parameters", None)
        if not (isinstance(rp, dict) and float(rp.get("rope_theta", -1)) == theta):
            cfg = None
        else:
            form = "rope_parameters"
    except TypeError:
        cfg = None
    if cfg is None:  # older transformers
        cfg = cls(rope_theta=theta, **kw)
        form = "rope_theta"
    cfg._attn_implementation = "eager"
    return cfg, form


def check_rope_theta(model, theta, head_dim):
    """Assert the model's RoPE inverse frequencies really use ``theta``."""
    inv = model.model.rotary_emb.inv_freq.double()
    expect = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    err = (inv - expect).abs().max().item()
    assert err < 1e-6, f"rope theta mismatch (max inv_freq err {err})"


def canonicalize_header(path):
    """Sort the ``__metadata__`` keys in a safetensors header, in place.

    safetensors writes metadata from a Rust HashMap, so its key order (and so
    the file's bytes) changes from run to run even though the tensor data is
    bit-identical. Rewriting it in sorted order keeps the header length
    unchanged and makes the fixtures byte-for-byte reproducible (no spurious
    git diffs on regeneration).
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        assert len(new) <= n, (len(new), n)
        new += b" " * (n - len(new))  # safetensors pads the header with spaces
        f.seek(8)
        f.write(new)


def loss_fn(model, input_ids, targets):
    logits = model(input_ids).logits
    V = logits.shape[-1]
    return logits, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def make_fixture(c, out_dir):
    torch.manual_seed(c["seed"])
    if c.get("qwen3"):
        cfg, rope_form = make_llama_config(
            c, Qwen3Config, head_dim=c["hidden"] // c["heads"], use_sliding_window=False)
        model = Qwen3ForCausalLM(cfg).to(torch.float32)
    else:
        cfg, rope_form = make_llama_config(c)
        model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config._attn_implementation = "eager"
    model.train()
    head_dim = c["hidden"] // c["heads"]
    check_rope_theta(model, c["rope_theta"], head_dim)

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == c["tie"], f"tie mismatch: expected {c['tie']}, got {tied}"

    # Perturb all RMSNorm weights so their gradients are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # layernorms, final norm, q_norm/k_norm
                p.copy_(1.0 + 0.1 * torch.randn_like(p))

    B, T, V = c["batch"], c["seq"], c["vocab"]
    input_ids = torch.randint(0, V, (B, T), dtype=torch.long)
    targets = torch.randint(0, V, (B, T), dtype=torch.long)

    params = list(model.named_parameters())
    tensors = {}
    for name, p in params:
        assert p.dtype == torch.float32
        tensors[name] = p.detach().clone().contiguous()

    # Single forward/backward: logits, loss, unclipped grads.
    model.zero_grad(set_to_none=True)
    logits, loss = loss_fn(model, input_ids, targets)
    loss.backward()
    tensors["input_ids"] = input_ids.to(torch.int32).contiguous()
    tensors["targets"] = targets.to(torch.int32).contiguous()
    tensors["logits"] = logits.detach().clone().contiguous()
    tensors["loss"] = loss.detach().reshape(1).clone()
    for name, p in params:
        tensors["grad." + name] = p.grad.detach().clone().contiguous()

    # 10 AdamW steps on the same batch, from the stored initial weights.
    with torch.no_grad():
        for name, p in params:
            p.copy_(tensors[name])
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    all_params = [p for _, p in params]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=ADAMW["weight_decay"]),
         dict(params=no_decay, weight_decay=0.0)],
        lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
        foreach=False,
    )
    losses, norms = [], []
    for _ in range(ADAMW["steps"]):
        opt.zero_grad(set_to_none=True)
        _, l = loss_fn(model, input_ids, targets)
        l.backward()
        gn = torch.nn.utils.clip_grad_norm_(all_params, ADAMW["grad_clip"])
        opt.step()
        losses.append(l.item())
        norms.append(float(gn))
    assert losses[0] == tensors["loss"].item(), (losses[0], tensors["loss"].item())
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["adamw_grad_norms"] = torch.tensor(norms, dtype=torch.float32)

    config_meta = dict(
        vocab_size=c["vocab"], hidden_size=c["hidden"], num_layers=c["layers"],
        num_heads=c["heads"], num_kv_heads=c["kv_heads"],
        intermediate_size=c["ffn"], rope_theta=c["rope_theta"],
        rms_norm_eps=RMS_NORM_EPS, tie_embeddings=c["tie"],
        batch=B, seq=T, qk_norm=bool(c.get("qwen3")),
    )
    metadata = {
        "config": json.dumps(config_meta),
        "adamw": json.dumps(ADAMW),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seed": str(c["seed"]),
    }
    path = os.path.join(out_dir, c["name"] + ".safetensors")
    save_file(tensors, path, metadata=metadata)
    canonicalize_header(path)

    print(f"== {c['name']} -> {path} ({os.path.getsize(path) / 1e6:.3f} MB)")
    print(f"   rope config form: {rope_form}; tied: {tied}; "
          f"{len(params)} params, {sum(p.numel() for _, p in params)} elements")
    print(f"   loss {tensors['loss'].item():.6f}  ln(V) {math.log(V):.6f}")
    print("   adamw_losses     " + " ".join(f"{x:.5f}" for x in losses))
    print("   adamw_grad_norms " + " ".join(f"{x:.5f}" for x in norms))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures",
                    help="output directory (default: tests/fixtures)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="make only these fixtures (default: all)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for c in FIXTURES:
        if args.only is None or c["name"] in args.only:
            make_fixture(c, args.out)


if __name__ == "__main__":
    main()
