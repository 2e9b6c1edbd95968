#!/usr/bin/env python3
"""Make the Hessian fixture for keel's engine-side sharpness (src/probe/sharpness.rs).

From ``tests/fixtures/micro.safetensors`` (made by ``make_fixtures.py``: HF
``LlamaForCausalLM``, vocab 256, hidden 64, 2 layers, GQA, batch 2 x seq 64) it
rebuilds the same model in **float64**, takes the fixture's loss (cross-entropy
over all B*T positions, no shift) and writes ``tests/fixtures/micro_hvp.safetensors``:

* ``hv.<param name>``: float32, H·v by double backward (``torch.autograd.grad``
  of g·v with ``create_graph=True``), where v is the fixture's own stored
  gradient ``grad.*`` (float32 values, read back) divided by its norm;
* ``rayleigh``: vᵀHv;
* ``lambda_max`` / ``lambda_min``: the extreme eigenvalues of H, by Lanczos with
  full reorthogonalisation in float64 (``LANCZOS`` steps, converged to ~1e-9).

keel computes H·v as a central difference of its exact f32 gradients; the Rust
test (tests/parity.rs) compares both with these. Regenerate (from the repository
root; needs torch, transformers, safetensors)::

    python3 scripts/make_hvp_fixture.py
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import FIXTURES, canonicalize_header, make_llama_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

LANCZOS = 120


def main():
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    spec = [c for c in FIXTURES if c["name"] == "micro"][0]
    src = os.path.join(root, "micro.safetensors")
    cfg, _ = make_llama_config(spec)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    model.config._attn_implementation = "eager"
    model.eval()
    with safe_open(src, "pt") as f:
        params = dict(model.named_parameters())
        for name, p in params.items():
            with torch.no_grad():
                p.copy_(f.get_tensor(name).to(torch.float64))
        x = f.get_tensor("input_ids").long()
        y = f.get_tensor("targets").long()
        v = [f.get_tensor("grad." + n).to(torch.float64) for n in params]
    names = list(params)
    ps = [params[n] for n in names]

    logits = model(x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    g = torch.autograd.grad(loss, ps, create_graph=True)

    def hvp(vec):
        return [t.detach() for t in torch.autograd.grad(g, ps, grad_outputs=vec, retain_graph=True)]

    def dot(a, b):
        return sum(float((s * t).sum()) for s, t in zip(a, b))

    nv = math.sqrt(dot(v, v))
    v = [t / nv for t in v]
    hv = hvp(v)
    out = {"hv." + n: t.to(torch.float32).contiguous() for n, t in zip(names, hv)}
    rayleigh = dot(v, hv)

    # Lanczos with full reorthogonalisation: the extreme eigenvalues to ~1e-9
    gen = torch.Generator().manual_seed(0)
    q = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
    nq = math.sqrt(dot(q, q))
    q = [t / nq for t in q]
    basis, alphas, betas = [q], [], []
    for _ in range(LANCZOS):
        w = hvp(q)
        a = dot(q, w)
        alphas.append(a)
        for _ in range(2):
            for b in basis:
                c = dot(b, w)
                w = [wi - c * bi for wi, bi in zip(w, b)]
        beta = math.sqrt(dot(w, w))
        betas.append(beta)
        q = [t / beta for t in w]
        basis.append(q)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:-1], dtype=torch.float64)
    T += torch.diag(off, 1) + torch.diag(off, -1)
    ev = torch.linalg.eigvalsh(T)
    out["rayleigh"] = torch.tensor([rayleigh], dtype=torch.float32)
    out["lambda_max"] = torch.tensor([float(ev[-1])], dtype=torch.float32)
    out["lambda_min"] = torch.tensor([float(ev[0])], dtype=torch.float32)
    meta = {"source": "micro.safetensors", "lanczos_steps": str(k), "loss": repr(float(loss.detach())),
            "torch_version": torch.__version__, "dtype": "float64"}
    path = os.path.join(root, "micro_hvp.safetensors")
    save_file(out, path, metadata=meta)
    canonicalize_header(path)
    os.chmod(path, 0o644)
    print(f"{path}: loss {float(loss.detach()):.6f}, vᵀHv {rayleigh:.6f}, λ_max {float(ev[-1]):.6f}, "
          f"λ_min {float(ev[0]):.6f} ({k} Lanczos steps)")


if __name__ == "__main__":
    main()
