"""keel.sharpness: λ_max of H and of Adam's P⁻¹H by power iteration on Hessian-vector
products, checked against dense eigenvalues and finite differences; the predicted edge LR
against real optimizer runs; and that measuring changes nothing in the run."""

import json
import math
import subprocess
import sys

import pytest
import torch

import keel
from conftest import small_config

torch.set_num_threads(1)


def _param(x):
    m = torch.nn.Module()
    m.x = torch.nn.Parameter(x.clone())
    return m


def _quad(A):
    return lambda m, batch: 0.5 * m.x @ A @ m.x


def _sym(n, eigs, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


def _top(M):
    return float(torch.linalg.eigvalsh(0.5 * (M + M.T)).max())


def test_import_keel_stays_torch_free_and_both_spellings_work():
    code = (
        "import sys, keel\n"
        "assert 'torch' not in sys.modules, 'import keel pulled in torch'\n"
        "from keel.sharpness import track, Sharpness\n"  # the submodule first...
        "import torch\n"
        "m = torch.nn.Linear(2, 1)\n"
        "s = keel.sharpness(m, lambda m, b: (m(b) ** 2).mean(), torch.ones(3, 2))\n"  # ...still callable
        "assert isinstance(s, Sharpness) and callable(keel.sharpness.track)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_quadratic_hessian_known_eigenvalues():
    A = _sym(6, [10.0, 4.0, 1.0, 0.5, 0.2, 0.1], seed=1)
    s = keel.sharpness(_param(torch.randn(6, dtype=torch.float64)), _quad(A), None, iters=300, tol=1e-9)
    assert s.lambda_max == pytest.approx(10.0, rel=1e-3)
    assert s.converged and s.rule == "gd" and s.lr_edge == pytest.approx(0.2, rel=1e-3)
    assert s.cost_steps == 1 + 2 * s.hvps

    # a negative eigenvalue larger in magnitude than the top one: the result is still the top
    # (most positive) eigenvalue, the one that bounds the stable LR
    A = _sym(6, [-5.0, 3.0, 1.0, 0.5, 0.2, 0.1], seed=2)
    for method in ("lanczos", "power"):
        s = keel.sharpness(_param(torch.randn(6, dtype=torch.float64)), _quad(A), None, iters=400, tol=1e-10,
                           method=method)
        assert s.lambda_max == pytest.approx(3.0, rel=1e-3), method


def _adam_P(v, step, b2, eps):
    return v.sqrt() / math.sqrt(1 - b2**step) + eps


@pytest.mark.parametrize("kind", ["adam", "adamw-amsgrad", "first-step"])
def test_quadratic_preconditioned_matches_dense(kind):
    n = 6
    A = _sym(n, [8.0, 3.0, 1.0, 0.5, 0.2, 0.05], seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, dtype=torch.float64, generator=g)
    m = _param(x0)
    b2, eps, step = 0.95, 1e-2, 10  # bias correction (1-0.95^10 = 0.40) and ε both matter here
    v = torch.logspace(-4, 0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    if kind == "adam":
        opt = torch.optim.Adam([m.x], lr=1e-2, betas=(0.8, b2), eps=eps)
        opt.state[m.x] = dict(step=torch.tensor(float(step)), exp_avg=torch.zeros(n, dtype=torch.float64),
                              exp_avg_sq=v.clone())
        P = _adam_P(v, step, b2, eps)
    elif kind == "adamw-amsgrad":
        opt = torch.optim.AdamW([m.x], lr=1e-2, betas=(0.8, b2), eps=eps, amsgrad=True)
        vmax = v * 3.0  # amsgrad divides by the running max, not exp_avg_sq
        opt.state[m.x] = dict(step=torch.tensor(float(step)), exp_avg=torch.zeros(n, dtype=torch.float64),
                              exp_avg_sq=v.clone(), max_exp_avg_sq=vmax)
        P = _adam_P(vmax, step, b2, eps)
    else:  # no state yet: P is what Adam's first step divides by, |g| + ε
        opt = torch.optim.Adam([m.x], lr=1e-2, betas=(0.8, b2), eps=eps)
        P = (A @ x0).abs() + eps
    s = keel.sharpness(m, _quad(A), None, opt, iters=500, tol=1e-10)
    Ph = P.rsqrt()
    want = _top(Ph[:, None] * A * Ph[None, :])
    assert s.lambda_precond == pytest.approx(want, rel=1e-3)
    assert s.lambda_max == pytest.approx(8.0, rel=1e-3)
    coef = (2 + 2 * 0.8) / (1 - 0.8)
    assert s.coefficient == pytest.approx(coef) and s.rule == "adam"
    assert s.lr_edge == pytest.approx(coef / want, rel=1e-3)
    assert s.edge_ratio == pytest.approx(1e-2 * want / coef, rel=1e-3)
    assert s.preconditioner == ("first-step estimate" if kind == "first-step" else "adam state")
    # the preconditioning is not a uniform rescale here (else this test could not tell)
    assert abs(want / 8.0 - float(1 / P.mean())) > 0.1 * want / 8.0


def test_param_groups_at_different_lrs_scale_the_preconditioner():
    n = 4
    A = _sym(2 * n, [5.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1], seed=5)
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    m.b = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    lf = lambda m, _: 0.5 * torch.cat([m.a, m.b]) @ A @ torch.cat([m.a, m.b])
    opt = torch.optim.Adam([{"params": [m.a], "lr": 1e-3}, {"params": [m.b], "lr": 4e-3}], betas=(0.9, 0.999), eps=1e-8)
    v = torch.rand(2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.1
    for p, vp in ((m.a, v[:n]), (m.b, v[n:])):
        opt.state[p] = dict(step=torch.tensor(1e6), exp_avg=torch.zeros(n, dtype=torch.float64), exp_avg_sq=vp.clone())
    s = keel.sharpness(m, lf, None, opt, iters=500, tol=1e-10)
    d = torch.cat([torch.full((n,), 0.25), torch.full((n,), 1.0)]).double() / (v.sqrt() + 1e-8)
    want = _top(d.sqrt()[:, None] * A * d.sqrt()[None, :])
    assert s.lambda_precond == pytest.approx(want, rel=1e-3)
    assert s.lr == 4e-3 and s.lr_edge == pytest.approx(38 / want, rel=1e-3)


def _mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return net, (x, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])


def _fd_rayleigh(model, loss_fn, batch, params, v, h=1e-3):
    """vᵀ(g(θ+hv) − g(θ−hv))/(2h) at h and 2h, Richardson-extrapolated (the O(h²) term is 1e-4
    relative at h=1e-3 on the Llama; smaller h drowns in its float32 RMSNorm): the Hessian's
    Rayleigh quotient along v, without double backward."""
    a, b = _fd_central(model, loss_fn, batch, params, v, h), _fd_central(model, loss_fn, batch, params, v, 2 * h)
    return (4 * a - b) / 3


def _fd_central(model, loss_fn, batch, params, v, h):

    def grad_at(sign):
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(sign * h * vi)
        g = torch.autograd.grad(loss_fn(model, batch), params)
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(sign * h * vi)
        return g

    gp, gm = grad_at(1.0), grad_at(-1.0)
    return sum(float((vi * (a - b)).sum()) for vi, a, b in zip(v, gp, gm)) / (2 * h)


def test_mlp_matches_dense_hessian_and_finite_differences():
    net, batch, lf = _mlp()
    params = list(net.parameters())
    s = keel.sharpness(net, lf, batch, iters=1000, tol=1e-10, return_vector=True)

    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def f(flat):
        ps = [t.reshape(sh) for t, sh in zip(flat.split(sizes), shapes)]
        names = [n for n, _ in net.named_parameters()]
        return lf(lambda x: torch.func.functional_call(net, dict(zip(names, ps)), (x,)), batch)

    H = torch.autograd.functional.hessian(f, flat0)
    assert H.shape[0] == sum(sizes) < 200
    dense = _top(H)
    assert s.lambda_max == pytest.approx(dense, rel=1e-3)
    assert sum(float((v * v).sum()) for v in s.vector) == pytest.approx(1.0, rel=1e-9)
    fd = _fd_rayleigh(net, lf, batch, params, s.vector)
    assert fd == pytest.approx(s.lambda_max, rel=1e-6)
    p = keel.sharpness(net, lf, batch, iters=2000, tol=1e-12, method="power")
    assert p.lambda_max == pytest.approx(dense, rel=1e-3)


def _tiny_llama(dtype=torch.float64, **over):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = small_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **over)
    model = LlamaForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}, (lambda m, b: m(**b).loss)


def test_tiny_llama_sdpa_matches_finite_differences():
    model, batch, lf = _tiny_llama()
    assert model.config._attn_implementation == "sdpa"  # the CPU flash kernel has no double backward
    s = keel.sharpness(model, lf, batch, iters=200, tol=1e-8, return_vector=True)
    assert s.converged and s.lambda_max > 0
    fd = _fd_rayleigh(model, lf, batch, list(model.parameters()), s.vector)
    assert fd == pytest.approx(s.lambda_max, rel=1e-5)
    # the math backend only changes the kernel: eager attention, same weights, same λ
    model.config._attn_implementation = "eager"
    e = keel.sharpness(model, lf, batch, iters=200, tol=1e-8)
    assert e.lambda_max == pytest.approx(s.lambda_max, rel=1e-6)


def _train(model, opt, batch, lf, steps, measure_at=()):
    losses = []
    for i in range(steps):
        loss = lf(model, batch)
        loss.backward()
        if i in measure_at:  # grads in .grad, before the step: must be left alone
            # a loss that draws from the global RNG (random masking, say): the draw must not
            # shift the run's stream
            noisy = lambda m, b: lf(m, b) + 0.0 * torch.rand(())
            keel.sharpness(model, noisy, batch, opt, iters=4, seed=i)
        opt.step()
        opt.zero_grad()
        if i in measure_at:  # between steps, and from inside no_grad
            with torch.no_grad():
                keel.sharpness(model, lf, batch, opt, iters=4)
        losses.append(loss.item())
    return losses


def test_measuring_changes_nothing():
    # attention dropout on: a measurement in train mode or one drawing from the global RNG would
    # change the following steps
    runs = []
    for measure in (False, True):
        model, batch, lf = _tiny_llama(torch.float32, attention_dropout=0.2)
        model.train()
        model.model.layers[1].mlp.eval()  # a mixed-mode model: each module's flag is restored
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        torch.manual_seed(123)
        losses = _train(model, opt, batch, lf, 6, measure_at=(2,) if measure else ())
        flags = [m.training for m in model.modules()]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], opt.state_dict(), torch.get_rng_state(), flags))
    (la, pa, sa, ra, fa), (lb, pb, sb, rb, fb) = runs
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    for k in sa["state"]:
        for name, t in sa["state"][k].items():
            assert torch.equal(t, sb["state"][k][name]), (k, name)
    assert torch.equal(ra, rb)
    assert fa == fb and fa[0] is True and not all(fa)


def test_measures_in_eval_mode_and_leaves_buffers_alone():
    # dropout off during the measurement: a train-mode model measures the same as in eval mode
    model, batch, lf = _tiny_llama(torch.float32, attention_dropout=0.3)
    model.train()
    a = keel.sharpness(model, lf, batch, iters=8)
    model.eval()
    b = keel.sharpness(model, lf, batch, iters=8)
    assert a.lambda_max == b.lambda_max
    # BatchNorm's running statistics are not updated by the measurement's forward
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    keel.sharpness(net, lambda m, b: m(b).pow(2).mean(), x, iters=4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training


@pytest.mark.parametrize(
    "opt_kw",
    [
        dict(cls=torch.optim.Adam, betas=(0.9, 0.99999)),
        dict(cls=torch.optim.AdamW, betas=(0.5, 0.99999), weight_decay=0.0),
        dict(cls=torch.optim.SGD),
        dict(cls=torch.optim.SGD, momentum=0.9),
        dict(cls=torch.optim.SGD, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "adamw-b0.5", "sgd", "sgd-momentum", "sgd-nesterov"],
)
def test_lr_edge_separates_stable_from_unstable_runs(opt_kw):
    """Run the real optimizer on a quadratic from a measured state at 0.75× and 1.33× the
    predicted edge: below it the loss never rises, above it the loss blows up. Adam's state is
    hand-set with a very slow β₂ so its preconditioner stays put over the run (real Adam
    self-stabilises above the edge by growing v̂; the spike it takes to do so is what we see)."""
    kw = dict(opt_kw)
    cls = kw.pop("cls")
    n = 8
    A = _sym(n, torch.logspace(-1, 1, n), seed=7)
    g = torch.Generator().manual_seed(8)
    v = torch.logspace(-4, 0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x0 = torch.randn(n, dtype=torch.float64, generator=g) * 1e-2
    lf = _quad(A)

    def setup(lr):
        m = _param(x0)
        opt = cls([m.x], lr=lr, **kw)
        if cls is not torch.optim.SGD:
            opt.state[m.x] = dict(step=torch.tensor(1e7, dtype=torch.float64),
                                  exp_avg=torch.zeros(n, dtype=torch.float64), exp_avg_sq=v.clone())
        return m, opt

    def peak(lr, steps=300):
        m, opt = setup(lr)
        l0 = top = lf(m, None).item()
        for _ in range(steps):
            opt.zero_grad()
            loss = lf(m, None)
            loss.backward()
            opt.step()
            top = max(top, loss.item())
        return top / l0

    m, opt = setup(1.0)
    s = keel.sharpness(m, lf, None, opt, iters=500, tol=1e-10)
    assert s.lr_edge is not None and s.edge_ratio == pytest.approx(1.0 / s.lr_edge)
    assert peak(0.75 * s.lr_edge) < 10
    assert peak(1.33 * s.lr_edge) > 1e3


def test_unwraps_guarded_optimizer_and_compiled_or_ddp_like_wrappers():
    import keel.torch as kt

    net, batch, lf = _mlp()
    inner = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        lf(net, batch).backward()
        inner.step()
        inner.zero_grad()
    direct = keel.sharpness(net, lf, batch, inner, iters=30)
    wrapped = keel.sharpness(net, lf, batch, kt.GuardedOptimizer(inner), iters=30)
    assert wrapped.lambda_precond == direct.lambda_precond and wrapped.rule == "adam"


def test_track_logs_every_k_steps(tmp_path):
    net, batch, lf = _mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lines = []
    tracker = keel.sharpness.track(net, lf, opt, every=2, iters=5, path=tmp_path / "sharp.jsonl", log=lines.append)
    for step in range(5):
        lf(net, batch).backward()
        opt.step()
        opt.zero_grad()
        tracker(step, batch)
    assert [st for st, _ in tracker.history] == [0, 2, 4]
    assert len(lines) == 3 and "vs edge 38" in lines[0] and "λ_precond" in lines[0]
    rows = [json.loads(x) for x in (tmp_path / "sharp.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[-1]["rule"] == "adam"
    assert rows[-1]["edge_ratio"] == pytest.approx(1e-2 * rows[-1]["lambda_precond"] / 38, rel=1e-6)


def test_errors_name_the_problem():
    net, batch, _ = _mlp()
    with pytest.raises(ValueError, match="0-d loss"):
        keel.sharpness(net, lambda m, b: m(b[0]), batch)
    with pytest.raises(ValueError, match="Adam"):
        keel.sharpness(net, lambda m, b: m(b[0]).sum(), batch, torch.optim.SGD(net.parameters(), lr=0.1),
                       preconditioned=True)
    s = keel.sharpness(net, lambda m, b: m(b[0]).pow(2).mean(), batch, torch.optim.Adagrad(net.parameters()), iters=3)
    assert s.lr_edge is None and "Adagrad" in s.note and s.lambda_max > 0
