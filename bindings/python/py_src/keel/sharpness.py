"""Sharpness of a live model, and the largest stable learning rate it predicts.

    s = keel.sharpness(model, loss_fn, batch, optimizer)   # loss_fn(model, batch) -> 0-d loss
    s.lambda_max      # λ_max(H), the top eigenvalue of the loss Hessian on this batch
    s.lambda_precond  # λ_max(P⁻¹H) under Adam/AdamW: P = sqrt(v̂) + ε, Adam's own denominator
    s.lr_edge         # the predicted max stable LR; s.edge_ratio = current LR / lr_edge

What it measures. λ_max(H) and, under Adam/AdamW, the top eigenvalue of the preconditioned
Hessian P⁻¹H, where P = diag(sqrt(v̂) + ε) is the denominator Adam divides by at its next
step (v̂ = exp_avg_sq / (1 − β₂^step), `max_exp_avg_sq` under amsgrad, exactly as torch
computes it). P⁻¹H is not symmetric; its eigenvalues are those of P^{-1/2} H P^{-1/2}, which
is the operator iterated. Each iteration is one Hessian-vector product by double backward
(the gradient is taken once with create_graph=True, then each HVP is the gradient of g·v).
The top eigenvalue is found by Lanczos (default) from a seeded random start: the largest
Ritz value, stopping when its residual bound falls below `tol` (relative) or after `iters`
products. Lanczos rather than plain power iteration because network Hessians have clustered
top eigenvalues: power iteration's error shrinks like (λ₂/λ₁)^{2k} and, stopped early, it
*under*-estimates λ_max, i.e. over-estimates the safe LR; Lanczos converges far faster for the
same HVPs and memory (three vectors), and is not confused by a negative eigenvalue of similar
size (on a 2-layer Llama at init, λ_max 13.78 and λ_min −13.42, Lanczos had 13.7827 to 1e-6
after 30 HVPs; power iteration read 12.6 after 40 and 5.2 after 60). `method="power"` is
power iteration with Rayleigh quotients (rerun on H + |μ|·I when it lands on a dominant
negative eigenvalue μ); both return the largest (most positive) eigenvalue, the one that bounds stability.

The prediction. Gradient descent on a quadratic is stable while η·λ_max(H) < 2 (with heavy-
ball momentum μ, dampening d: η·λ < 2(1+μ)/(1−d); Nesterov: 2(1+μ)/(1+2μ)). Adam with a
frozen preconditioner is EMA-momentum descent on P⁻¹H and is stable while

    η · λ_max(P⁻¹H) < (2 + 2β₁) / (1 − β₁)        (= 38 for β₁ = 0.9)

Cohen et al., "Adaptive gradient methods at the edge of stability" (2022), show that under
full-batch Adam the preconditioned sharpness rises to this threshold and hovers there
("adaptive edge of stability"). So lr_edge = (2 + 2β₁) / ((1 − β₁) · λ_max(P⁻¹H)) under
Adam/AdamW, and 2/λ_max(H) (momentum-adjusted as above) under SGD or with no optimizer.
With param groups at different LRs, P⁻¹ carries each group's LR relative to the largest
(D = (lr_g / lr_max) / P) and lr_edge is the largest group's LR at the edge, the others kept
in proportion. Groups with different β₁ are folded in the same way (exact when H is block-
diagonal across groups, an approximation otherwise).

Caveats.
- The edge is where the preconditioned sharpness *settles* under training; a measurement at
  init predicts the initial edge only. Warm-up, the LR schedule and the growth of v̂ all move
  it (v̂ reacts to oscillation: real Adam self-stabilises above the edge instead of
  diverging, as the paper describes, so "unstable" means loss spikes, not always a blow-up).
  Track it over the run (`track`) rather than trusting one number.
- Before the optimizer's first step there is no v̂; P is then what Adam's first step would
  use, v̂ = g² of this batch (`preconditioner == "first-step estimate"`). It is pessimistic:
  gradients grow in the first steps and v̂ with them (tiny Llama, AdamW β=(0.9, 0.95):
  λ_precond 4.2e4 at init, 7.6e3 ten steps later, so lr_edge 9e-4 at init while lr 1e-2
  trained smoothly). For a usable prediction measure after ~10 steps, and track it.
- Sharpness of one batch (a minibatch Hessian) is noisier and usually larger than the full-
  batch one; use the batch size you train with, or several batches.
- Decoupled weight decay (AdamW) and coupled L2 are not added to H (both are ~wd·I, tiny next
  to λ_max in practice). bf16/fp16 models give noisy HVPs: measure an fp32 copy if it matters.
- The measurement is of the eval-mode function: dropout off, and BatchNorm (not in LLaMA)
  on its running statistics rather than the batch's.
- Forward hooks on the model (keel's probes among them) fire during the measurement's
  forward: measure between steps, after the probes have been read (after `opt.step`).

Cost. One forward+backward with create_graph (≈ 1 training step of compute, with the
double-backward graph kept in memory: ≈ 2–3× a step's activation memory), then one backward
through that graph per HVP (≈ 2 gradient evaluations each). `cost_steps` = 1 + 2·hvps in
training-step (forward+backward) units; `seconds` is the measured wall time. Defaults
(iters=20) with Adam: up to 40 HVPs, ≈ 80 steps of compute; measure every few hundred steps
or on a smaller batch.

Numerics are never changed: parameters, their .grad, optimizer state, buffers, the global
(CPU and CUDA) RNG and every module's train/eval flag are as they were. The measurement runs
in eval mode (dropout off), with scaled_dot_product_attention forced to its math backend
(the flash and memory-efficient kernels have no double backward), unwrapping DDP and
torch.compile (both lack double backward) to the module underneath; FSDP / DTensor
parameters are not supported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch

__all__ = ["Sharpness", "sharpness", "track", "Tracker", "edge_coefficient"]


@dataclass(frozen=True)
class Sharpness:
    """One measurement.

    lambda_max: top eigenvalue of the loss Hessian H on the batch (w.r.t. the measured params).
    lambda_precond: top eigenvalue of P⁻¹H (Adam/AdamW; or of the group-LR-scaled H under SGD
        with unequal group LRs); None when there is no preconditioner.
    lr_edge: predicted max stable LR (the largest param group's LR), `coefficient / λ` with λ
        the sharpness the optimizer sees; None for an optimizer with no known rule.
    lr: the optimizer's current (largest group) LR; None without an optimizer.
    edge_ratio: lr / lr_edge = lr·λ/coefficient (1.0 = at the edge; Adam hovers near 1 at the
        adaptive edge of stability); None without an LR.
    coefficient: the threshold on lr·λ: (2+2β₁)/(1−β₁) for Adam (38 at β₁=0.9), 2 for plain
        GD/SGD, 2(1+μ)/(1−d) with momentum, 2(1+μ)/(1+2μ) with Nesterov.
    rule: "adam", "sgd", "sgd-momentum", "sgd-nesterov", "gd" (no optimizer) or None.
    preconditioner: "adam state", "first-step estimate" (no Adam state yet: v̂ = g²),
        "group lr" (SGD with unequal group LRs) or "none".
    hvps: Hessian-vector products used (both power iterations).
    cost_steps: compute in training steps (forward+backward): 1 + 2·hvps (each HVP ≈ 2
        gradient evaluations; the 1 is the gradient with create_graph).
    seconds: wall time of the measurement.
    converged: every eigenvalue met `tol` within `iters` (else the values are lower bounds in
        practice: both methods approach λ_max from below).
    loss: the batch loss at which it was measured.
    vector: the top eigenvector of H (tuple of tensors shaped like the params, unit norm),
        only with `return_vector=True`.
    note: why lambda_precond / lr_edge is missing, when it is.
    """

    lambda_max: float
    lambda_precond: Optional[float]
    lr_edge: Optional[float]
    lr: Optional[float]
    edge_ratio: Optional[float]
    coefficient: Optional[float]
    rule: Optional[str]
    preconditioner: str
    hvps: int
    cost_steps: float
    seconds: float
    converged: bool
    loss: float
    vector: Optional[tuple] = field(default=None, repr=False)
    note: Optional[str] = None

    def as_dict(self) -> dict:
        """Every field but `vector`."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "vector"}


def edge_coefficient(optimizer) -> tuple:
    """(rule, coefficient) of the optimizer's first param group: the bound on lr·λ below which
    its update is stable on a quadratic (see the module docstring); (None, None) if unknown."""
    opt = _unwrap_optimizer(optimizer)
    if opt is None:
        return "gd", 2.0
    return _group_rule(opt, opt.param_groups[0])


# ---------------------------------------------------------------------------------------------
# helpers


def _unwrap_optimizer(opt):
    # keel's GuardedOptimizer, accelerate's AcceleratedOptimizer, Lightning's wrappers all keep
    # the torch optimizer in `.optimizer`
    seen = 0
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer") and seen < 8:
        opt = opt.optimizer
        seen += 1
    if opt is not None and not hasattr(opt, "param_groups"):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer (or a wrapper with .optimizer), got {type(opt).__name__}")
    return opt


def _unwrap_model(model):
    # DDP / DataParallel and torch.compile have no double backward: measure the module inside
    # (same Parameter objects, so the optimizer's state still lines up)
    for _ in range(8):
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    if type(model).__name__ == "FullyShardedDataParallel":
        raise NotImplementedError(
            "keel.sharpness: FSDP-wrapped models are not supported (sharded flat parameters have no "
            "double backward); measure a single-device copy of the model"
        )
    return model


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _group_rule(opt, group) -> tuple:
    """(rule, coefficient) for one param group."""
    if isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam
        b1 = _f(group["betas"][0])
        return "adam", (2.0 + 2.0 * b1) / (1.0 - b1)
    if isinstance(opt, torch.optim.SGD):
        mu = _f(group.get("momentum", 0.0) or 0.0)
        if mu == 0.0:
            return "sgd", 2.0
        if group.get("nesterov", False):
            return "sgd-nesterov", 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu)
        d = _f(group.get("dampening", 0.0) or 0.0)
        if d >= 1.0:
            return None, None
        return "sgd-momentum", 2.0 * (1.0 + mu) / (1.0 - d)
    return None, None


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    s = 0.0
    for x, y in zip(a, b):
        if x.dtype in (torch.float16, torch.bfloat16):  # products in fp32, float64 sums
            x, y = x.float(), y.float()
        s += float((x * y).sum(dtype=torch.float64))
    return s


def _scale(a: Sequence[torch.Tensor], c: float) -> list:
    return [x * c for x in a]


def _power_iteration(matvec: Callable, like: Sequence[torch.Tensor], gen: torch.Generator, iters: int, tol: float):
    """Largest-magnitude eigenvalue of the symmetric operator `matvec` by power iteration with
    Rayleigh quotients; if that is negative, the largest (most positive) eigenvalue by rerunning
    on matvec + |μ|·I. Returns (λ, unit vector, matvecs used, converged)."""

    def run(shift: float):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype) for p in like]
        n = math.sqrt(_dot(v, v))
        v = _scale(v, 1.0 / n)
        lam, prev, used, conv = 0.0, None, 0, False
        for _ in range(max(1, iters)):
            w = matvec(v)
            used += 1
            if shift:
                w = [wi + shift * vi for wi, vi in zip(w, v)]
            lam = _dot(v, w)  # Rayleigh quotient (|v| = 1)
            nw = math.sqrt(_dot(w, w))
            if not math.isfinite(lam) or not math.isfinite(nw):
                raise FloatingPointError(
                    "keel.sharpness: a Hessian-vector product is not finite (the loss or its "
                    "gradient is NaN/inf at these weights, or the model's dtype overflows); "
                    "measure at finite weights, in float32"
                )
            if nw == 0.0:  # v is in H's null space (e.g. a linear loss): λ = 0 along it
                conv = True
                break
            if prev is not None and abs(lam - prev) <= tol * max(abs(lam), 1e-30):
                conv = True
                break  # v (not the next iterate) is the vector whose Rayleigh quotient is lam
            prev = lam
            v = _scale(w, 1.0 / nw)
        return lam - shift, v, used, conv

    lam, v, used, conv = run(0.0)
    if lam < 0.0:
        # power iteration found a negative eigenvalue μ with |μ| > λ_max: shift the spectrum by
        # |μ| so the top is λ_max + |μ| (positive, largest in magnitude) and iterate again
        lam2, v2, used2, conv2 = run(-lam)
        return lam2, v2, used + used2, conv and conv2
    return lam, v, used, conv


def _lanczos(matvec: Callable, like: Sequence[torch.Tensor], gen: torch.Generator, iters: int, tol: float,
             keep: bool):
    """Largest eigenvalue of the symmetric operator `matvec` by Lanczos: the top Ritz value of
    the tridiagonal T_k. Stops when the Ritz pair's residual bound β_k·|e_kᵀy| (an upper bound
    on its distance to an eigenvalue) is below tol·|θ|. Three vectors live at a time (the
    three-term recurrence; the extreme Ritz value stays reliable without reorthogonalisation);
    with `keep` every Lanczos vector is kept, fully reorthogonalised, for the Ritz vector.
    Returns (θ, unit Ritz vector or None, matvecs used, converged)."""
    q = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype) for p in like]
    q = _scale(q, 1.0 / math.sqrt(_dot(q, q)))
    q_prev, beta = None, 0.0
    alphas: list = []
    betas: list = []
    basis = [q] if keep else None
    theta, y, used, conv = 0.0, None, 0, False
    for _ in range(max(1, iters)):
        w = matvec(q)
        used += 1
        alpha = _dot(q, w)
        if not math.isfinite(alpha):
            raise FloatingPointError(
                "keel.sharpness: a Hessian-vector product is not finite (the loss or its gradient is "
                "NaN/inf at these weights, or the model's dtype overflows); measure at finite weights, "
                "in float32"
            )
        w = [wi - alpha * qi for wi, qi in zip(w, q)]
        if q_prev is not None:
            w = [wi - beta * pi for wi, pi in zip(w, q_prev)]
        if keep:
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                for b in basis:
                    c = _dot(b, w)
                    w = [wi - c * bi for wi, bi in zip(w, b)]
        alphas.append(alpha)
        k = len(alphas)
        T = torch.zeros(k, k, dtype=torch.float64)
        T[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
        if k > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T[range(1, k), range(k - 1)] = off
            T[range(k - 1), range(1, k)] = off
        ev, evec = torch.linalg.eigh(T)
        theta, y = float(ev[-1]), evec[:, -1]
        beta = math.sqrt(max(_dot(w, w), 0.0))
        scale = max(abs(theta), float(ev.abs().max()), 1e-30)
        if beta * abs(float(y[-1])) <= tol * max(abs(theta), 1e-30) or beta <= 1e-12 * scale:
            conv = True  # residual bound met, or an invariant subspace (T's spectrum is exact)
            break
        betas.append(beta)
        q_prev, q = q, _scale(w, 1.0 / beta)
        if keep:
            basis.append(q)
    vec = None
    if keep:
        vec = [torch.zeros_like(p) for p in like]
        for c, b in zip(y.tolist(), basis):
            vec = [vi + c * bi for vi, bi in zip(vec, b)]
        vec = _scale(vec, 1.0 / math.sqrt(_dot(vec, vec)))
    return theta, vec, used, conv


def _adam_denominator(opt, p: torch.Tensor, group: dict, grad: torch.Tensor) -> tuple:
    """Adam's per-element denominator for `p` at its next step, as torch computes it:
    sqrt(v) / sqrt(1 − β₂^step) + ε; without state yet, the first step's: |g| + ε."""
    st = opt.state.get(p, {})
    eps = _f(group["eps"])
    b2 = _f(group["betas"][1])
    v = st.get("max_exp_avg_sq") if group.get("amsgrad", False) else st.get("exp_avg_sq")
    if v is None or "step" not in st:
        return grad.detach().abs() + eps, False
    step = _f(st["step"])
    if step <= 0:
        return grad.detach().abs() + eps, False
    bc2 = 1.0 - b2**step
    return v.detach().sqrt() / math.sqrt(bc2) + eps, True


@contextlib.contextmanager
def _measurement_mode(model: torch.nn.Module, params: Sequence[torch.Tensor], math_sdpa: bool):
    """eval mode, forked RNG, grad enabled and the math sdpa backend; everything put back."""
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        with contextlib.ExitStack() as stack:
            # the loss function or the model may draw random numbers (dropout is off, but
            # e.g. random masking): their draws must not shift the run's RNG stream
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.enable_grad())
            if math_sdpa:
                try:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                except ImportError:  # torch < 2.3: the older context manager
                    stack.enter_context(
                        torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
                    )
            model.eval()
            yield
    finally:
        for m, t in modes:
            m.training = t


def _loss_scalar(out) -> torch.Tensor:
    loss = out
    if not isinstance(out, torch.Tensor):  # an HF ModelOutput (a dict with .loss) or the like
        loss = out["loss"] if isinstance(out, dict) and "loss" in out else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"keel.sharpness: loss_fn(model, batch) must return a 0-d loss tensor (or an output with "
            f".loss), got {shape}; reduce it (e.g. .mean()) inside loss_fn"
        )
    if not loss.requires_grad:
        raise ValueError(
            "keel.sharpness: the loss does not depend on the measured parameters (no grad): check that "
            "loss_fn uses the model it is given and that the parameters require grad"
        )
    return loss


# ---------------------------------------------------------------------------------------------
# the measurement


def sharpness(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Any,
    optimizer=None,
    *,
    iters: int = 20,
    tol: float = 1e-3,
    params: Optional[Iterable[torch.Tensor]] = None,
    preconditioned: Optional[bool] = None,
    seed: int = 0,
    math_sdpa: bool = True,
    return_vector: bool = False,
    method: str = "lanczos",
) -> Sharpness:
    """λ_max of the Hessian and of Adam's preconditioned Hessian P⁻¹H on `batch`, and the max
    stable LR they predict (see the module docstring for the formulas, cost and caveats).

    model: the live module (DDP / torch.compile wrappers are looked through).
    loss_fn: loss_fn(model, batch) -> 0-d loss (or an output with `.loss`, e.g. an HF model's).
    optimizer: torch Adam/AdamW (preconditioned + adaptive edge), SGD (2/λ, momentum-adjusted),
        a wrapper with `.optimizer` (keel's GuardedOptimizer), or None (plain GD rule).
    iters: max Hessian-vector products per eigenvalue (H, then P⁻¹H); tol: relative accuracy
        at which to stop (Lanczos: the Ritz residual bound; power: the change of the Rayleigh
        quotient).
    method: "lanczos" (default: far faster convergence when the top eigenvalues are close, as
        they are in networks, for the same memory) or "power" (power iteration, shifted when a
        negative eigenvalue dominates).
    params: the parameters to measure over (default: the optimizer's, else every parameter that
        requires grad).
    preconditioned: measure P⁻¹H (default: when the optimizer is Adam/AdamW); True with a
        non-Adam optimizer raises; False measures H only.
    seed: of the power iteration's start vector (its own generator: the global RNG is untouched).
    math_sdpa: force scaled_dot_product_attention's math backend during the measurement (the
        fused kernels lack double backward); turn off only for models without sdpa.
    return_vector: keep H's top eigenvector in the result (one parameter-sized copy; with
        Lanczos every Lanczos vector is kept during the measurement, `iters` copies).
    """
    t0 = time.perf_counter()
    if iters < 1:
        raise ValueError(f"keel.sharpness: iters must be >= 1, got {iters}")
    if not tol > 0:
        raise ValueError(f"keel.sharpness: tol must be > 0, got {tol}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"keel.sharpness: method must be 'lanczos' or 'power', got {method!r}")

    def top_eig(matvec, keep):
        if method == "power":
            return _power_iteration(matvec, ps, gen, iters, tol)
        return _lanczos(matvec, ps, gen, iters, tol, keep)

    net = _unwrap_model(model)
    opt = _unwrap_optimizer(optimizer)

    # which parameters, and the param group of each
    group_of = {}
    if opt is not None:
        for g in opt.param_groups:
            for p in g["params"]:
                group_of[p] = g
    if params is not None:
        plist = list(params)
    elif opt is not None:
        plist = [p for g in opt.param_groups for p in g["params"]]
    else:
        plist = list(net.parameters())
    seen, ps = set(), []
    for p in plist:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            ps.append(p)
    if not ps:
        raise ValueError("keel.sharpness: no parameter requires grad (pass params= or unfreeze some)")
    for p in ps:
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise NotImplementedError(
                "keel.sharpness: DTensor (FSDP2 / tensor-parallel) parameters are not supported; "
                "measure a single-device copy of the model"
            )

    # the optimizer's rule
    rule, coef, note = None, None, None
    is_adam = opt is not None and isinstance(opt, torch.optim.Adam)
    if opt is None:
        rule, coef = "gd", 2.0
    if preconditioned is None:
        preconditioned = is_adam
    if preconditioned and not is_adam:
        raise ValueError(
            f"keel.sharpness: preconditioned=True needs a torch Adam/AdamW optimizer (its exp_avg_sq "
            f"defines P), got {type(opt).__name__ if opt is not None else None}"
        )
    group_scale = None  # per measured param: (lr_g / lr_ref) · (coef_ref / coef_g)
    lr = None
    if opt is not None:
        groups = []
        for p in ps:
            g = group_of.get(p)
            if g is None:
                raise ValueError(
                    "keel.sharpness: params= includes a tensor the optimizer does not hold; measure "
                    "the optimizer's parameters (the rule applies to what it updates)"
                )
            groups.append(g)
        rules = [_group_rule(opt, g) for g in groups]
        lrs = [_f(g["lr"]) for g in groups]
        if any(c is None for _, c in rules):
            note = f"no stability rule known for {type(opt).__name__}: lambda_max only"
        else:
            lr = max(lrs)
            ref = lrs.index(lr)
            rule, coef = rules[ref]
            if lr > 0:
                group_scale = [(l / lr) * (coef / c) for l, (_, c) in zip(lrs, rules)]
            if is_adam and not preconditioned:
                note = "preconditioned=False: lr_edge not predicted (Adam's rule needs λ_max(P⁻¹H))"
                rule, coef = None, None
            elif lr <= 0:
                note = "every measured group has lr 0: nothing to predict"

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))

    with _measurement_mode(net, ps, math_sdpa):
        loss = _loss_scalar(loss_fn(net, batch))
        try:
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
        except RuntimeError as e:
            raise RuntimeError(f"keel.sharpness: the gradient with create_graph failed: {e}") from e
        gz = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
        live = [i for i, g in enumerate(gz) if g.requires_grad]

        def hvp(v):
            if not live:  # the gradient does not depend on the weights: H = 0
                return [torch.zeros_like(p) for p in ps]
            dot = sum((gz[i] * v[i]).sum() for i in live)
            try:
                hv = torch.autograd.grad(dot, ps, retain_graph=True, allow_unused=True)
            except RuntimeError as e:
                hint = (
                    "math_sdpa=False left scaled_dot_product_attention on a fused kernel: pass math_sdpa=True"
                    if not math_sdpa and "scaled_dot_product" in str(e)
                    else "a fused kernel without double backward is likely (flash-attention-2, a fused loss "
                    "or norm): load the model with attn_implementation='sdpa' or 'eager' and unfused ops "
                    "for the measurement"
                )
                raise RuntimeError(f"keel.sharpness: a Hessian-vector product (double backward) failed: {e}. {hint}") from e
            return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(ps, hv)]

        lam, vec, n1, conv = top_eig(hvp, return_vector)
        hvps = n1

        lam_p, precond = None, "none"
        d_half = None
        if preconditioned:
            d_half, from_state = [], []
            for p, g, s in zip(ps, gz, group_scale or [1.0] * len(ps)):
                den, ok = _adam_denominator(opt, p, group_of[p], g)
                from_state.append(ok)
                d_half.append((s / den).sqrt().to(p.dtype))
            precond = "adam state" if all(from_state) else "first-step estimate"
            if any(from_state) and not all(from_state):
                precond = "adam state (first-step estimate for parameters without state)"
        elif group_scale is not None and rule is not None and any(s != 1.0 for s in group_scale):
            d_half = [torch.full_like(p, math.sqrt(s)) for p, s in zip(ps, group_scale)]
            precond = "group lr"
        if d_half is not None:

            def phvp(u):
                hv = hvp([d * x for d, x in zip(d_half, u)])
                return [d * x for d, x in zip(d_half, hv)]

            lam_p, _, n2, conv2 = top_eig(phvp, False)
            hvps += n2
            conv = conv and conv2
        loss_val = float(loss.detach())  # the double-backward graph goes when this returns

    sharp = lam_p if lam_p is not None else lam
    lr_edge = None
    if coef is not None and sharp > 0 and note is None:
        lr_edge = coef / sharp
    elif coef is not None and sharp <= 0 and note is None:
        lr_edge = math.inf  # no positive curvature: no LR bound from this batch
    ratio = None if (lr is None or lr_edge is None) else (lr / lr_edge if lr_edge != math.inf else 0.0)
    return Sharpness(
        lambda_max=lam,
        lambda_precond=lam_p,
        lr_edge=lr_edge,
        lr=lr,
        edge_ratio=ratio,
        coefficient=coef,
        rule=rule,
        preconditioner=precond,
        hvps=hvps,
        cost_steps=1.0 + 2.0 * hvps,
        seconds=time.perf_counter() - t0,
        converged=conv,
        loss=loss_val,
        vector=tuple(v.detach().clone() for v in vec) if (return_vector and vec is not None) else None,
        note=note,
    )


# ---------------------------------------------------------------------------------------------
# over a run


class Tracker:
    """Measure every `every` steps from inside a training loop; see `track`."""

    def __init__(self, model, loss_fn, optimizer=None, *, every: int = 50, path: Optional[os.PathLike] = None,
                 log: Optional[Callable[[str], Any]] = print, **kwargs: Any):
        if every < 1:
            raise ValueError(f"keel.sharpness.track: every must be >= 1, got {every}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.every, self.log, self.kwargs = int(every), log, kwargs
        self.path = None if path is None else os.fspath(path)
        self.history: List[tuple] = []  # (step, Sharpness)

    def __call__(self, step: int, batch) -> Optional[Sharpness]:
        """Measure on `batch` if `step` is a multiple of `every`; returns the Sharpness or None."""
        if int(step) % self.every:
            return None
        s = sharpness(self.model, self.loss_fn, batch, self.optimizer, **self.kwargs)
        self.history.append((int(step), s))
        if self.log is not None:
            self.log(_line(int(step), s))
        if self.path is not None:
            with open(self.path, "a") as f:
                row = {"step": int(step), **s.as_dict()}
                # strict JSON: an infinite edge (no positive curvature) is written as null
                row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                f.write(json.dumps(row) + "\n")
        return s


def _line(step: int, s: Sharpness) -> str:
    sharp = s.lambda_precond if s.lambda_precond is not None else s.lambda_max
    name = "λ_precond" if s.lambda_precond is not None else "λ_max"
    parts = [f"step {step}: loss {s.loss:.4g}", f"λ_max {s.lambda_max:.4g}"]
    if s.lambda_precond is not None:
        parts.append(f"λ_precond {s.lambda_precond:.4g}")
    if s.lr is not None and s.coefficient is not None:
        parts.append(f"{name}·lr {sharp * s.lr:.4g} vs edge {s.coefficient:.4g} ({s.edge_ratio:.2f} of it)")
    if s.lr_edge is not None:
        parts.append(f"lr_edge {s.lr_edge:.3g}")
    if not s.converged:
        parts.append("(not converged)")
    return ", ".join(parts)


def track(model, loss_fn, optimizer=None, *, every: int = 50, path: Optional[os.PathLike] = None,
          log: Optional[Callable[[str], Any]] = print, **kwargs: Any) -> Tracker:
    """A callable `tracker(step, batch)` that measures sharpness every `every` steps, prints a
    line (λ_precond·lr against the edge coefficient, 38 for Adam at β₁=0.9) through `log`, appends
    a JSON line to `path` if given, and keeps `tracker.history`. `**kwargs` go to `sharpness`
    (iters, tol, params, seed, ...). Call it between steps (after `opt.step()`), e.g. in warm-up:

        tracker = keel.sharpness.track(model, loss_fn, opt, every=20, iters=10)
        for step, batch in enumerate(loader):
            loss = loss_fn(model, batch); loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
            tracker(step, batch)   # "step 40: ... λ_precond·lr 21.3 vs edge 38 (0.56 of it), ..."

    Under Adam, edge_ratio climbing to ~1 and staying there is the adaptive edge of stability;
    well above 1 for long, loss spikes are likely; a warm-up that keeps it below 1 is doing its
    job."""
    return Tracker(model, loss_fn, optimizer, every=every, path=path, log=log, **kwargs)


class _CallableModule(types.ModuleType):
    """`keel.sharpness(...)` measures, `keel.sharpness.track(...)` tracks: the module is callable,
    so both spellings work whichever was imported first (a function of the same name in keel's
    __init__ would be replaced by this module on `import keel.sharpness`)."""

    def __call__(self, *args, **kwargs) -> Sharpness:
        return sharpness(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
