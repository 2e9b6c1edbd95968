"""Cost of the guard per step: keel.Guard.observe on a healthy stream (floats in, Action out)
and keel.torch.GuardedOptimizer.step's own work beyond the optimizer's (a 2-scalar read
and the decision), on the CPU. Prints medians over several rounds.

    python3 bindings/python/bench/observe.py
"""

import math
import statistics
import time

import keel


def stream(n):
    for i in range(1, n + 1):
        noise = ((i * 2654435761) % 1000) / 1000.0 - 0.5
        yield i, 2.0 + 3.0 * math.exp(-i / 500.0) + 0.05 * noise, 1.0 + 0.1 * noise


def bench_observe(n=20000, rounds=5, **extra):
    out = []
    for _ in range(rounds):
        g = keel.Guard()
        data = list(stream(n))
        t = time.perf_counter()
        for i, loss, gn in data:
            g.observe(i, loss, gn, **extra)
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out)


def bench_guarded_step(n=3000, rounds=3):
    import torch

    import keel.torch as kt

    res = {}
    for guarded in (False, True):
        times = []
        for _ in range(rounds):
            p = torch.nn.Parameter(torch.zeros(8))
            opt = torch.optim.SGD([p], lr=0.0)  # the optimizer's own step is tiny
            gopt = kt.GuardedOptimizer(opt, snapshot_every=10**9) if guarded else None
            loss, gn = torch.tensor(2.0), torch.tensor(1.0)
            t = time.perf_counter()
            for _ in range(n):
                p.grad = torch.zeros(8)
                if guarded:
                    gopt.step(loss, gn)
                else:
                    loss.item(), gn.item()  # what an unguarded loop reads for its log
                    opt.step()
            times.append((time.perf_counter() - t) / n * 1e6)
        res[guarded] = statistics.median(times)
    return res


if __name__ == "__main__":
    print(f"keel.Guard.observe(step, loss, grad_norm)                  {bench_observe():6.1f} µs/step")
    print(f"  + max_attn_logit and logit_z                             {bench_observe(max_attn_logit=30.0, logit_z=1.0):6.1f} µs/step")
    try:
        r = bench_guarded_step()
        print(f"GuardedOptimizer.step on a trivial optimizer               {r[True]:6.1f} µs/step"
              f" (plain loop reading loss/grad norm + step: {r[False]:.1f} µs; guard adds {r[True] - r[False]:.1f} µs)")
    except ImportError:
        print("(torch not installed: GuardedOptimizer not measured)")
