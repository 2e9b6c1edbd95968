#!/usr/bin/env python3
"""keel vs PyTorch, back to back on the same presets, one table.

For each preset (tiny, small): `keel bench` (2 threads, and 1 thread for the scaling
ratio) and ../shared/bench/torch_llama_bench.py (fp32 eager, and --torch-modes more),
alternating `--rounds` times so drift hits both; then torch.mm's fp32 GEMM peak
(square 256..2048, as ../shared/bench/torch_matmul_peak.py) in the same session, the ceiling MFU is counted
against. Peak RSS of each process from getrusage. Medians over rounds.

  python3 bench/compare.py                       # needs: cargo build --release; torch
  python3 bench/compare.py --presets tiny --rounds 5 --torch-modes fp32,compile

The machine is shared and noisy: compare ratios measured in one run, not absolute numbers.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "bench")
KEEL = os.path.join(ROOT, "target", "release", "keel")


def run_json(cmd, key=None):
    """Run cmd; return (last JSON line [with bench == key], the child's own peak RSS in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)  # rusage of this child alone
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit {p.returncode}")
    found = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            j = json.loads(line)
            if key is None or j.get("bench") == key:
                found = j
    if found is None:
        sys.exit(f"no JSON result from {' '.join(cmd)}:\n{out}")
    return found, ru.ru_maxrss / 1024


def torch_fp32_peak():
    """torch.mm fp32 GFLOP/s, best median over square sizes 256..2048 at 2 threads (as
    ../shared/bench/torch_matmul_peak.py measures it; its bf16 part takes very long on CPUs
    without AVX512-BF16/AMX, so only fp32 here)."""
    code = r"""
import json, statistics, time, torch
torch.set_num_threads(2)
best = 0.0
for n in (256, 512, 1024, 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    reps = max(1, int(0.1 / (2 * n**3 / 1.5e11)))
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        ts.append((time.perf_counter() - t0) / reps)
    best = max(best, 2 * n**3 / statistics.median(ts) / 1e9)
print(json.dumps({"bench": "peak", "gflops": best}))
"""
    j, _ = run_json([sys.executable, "-c", code], "peak")
    return j["gflops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-modes", default="fp32", help="comma list: fp32,bf16,compile,compile_bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    a = ap.parse_args()
    if not os.path.exists(KEEL):
        sys.exit("build keel first: cargo build --release")
    modes = [m for m in a.torch_modes.split(",") if m]
    rows = []
    # the peak before and after the runs, the larger kept: a noisy moment lowers one reading
    peak0 = torch_fp32_peak()
    for preset in a.presets.split(","):
        k2, k1, tm, rss = [], [], {m: [] for m in modes}, {}
        for r in range(a.rounds):
            j, m = run_json([KEEL, "--threads", "2", "bench", "--preset", preset, "--steps", str(a.steps), "--json"])
            k2.append(j)
            rss["keel"] = max(rss.get("keel", 0), m)
            for mode in modes:
                j, m = run_json([sys.executable, os.path.join(SHARED, "torch_llama_bench.py"), "--config", preset,
                                 "--mode", mode, "--threads", "2", "--wait-idle", "0", "--steps", str(a.steps)],
                                "torch_llama_train")
                tm[mode].append(j)
                rss[mode] = max(rss.get(mode, 0), m)
            j, _ = run_json([KEEL, "--threads", "1", "bench", "--preset", preset, "--steps", str(max(5, a.steps // 2)), "--json"])
            k1.append(j)
            print(f"  {preset} round {r + 1}/{a.rounds}: keel {k2[-1]['tokens_per_s']:.0f} tok/s, "
                  + ", ".join(f"torch {m} {tm[m][-1]['tokens_per_s']:.0f}" for m in modes), file=sys.stderr)
        rows.append((preset, k2, k1, tm, rss))
    p32 = max(peak0, torch_fp32_peak())
    med = statistics.median
    print(f"\nkeel vs PyTorch — {a.rounds} rounds, medians; torch.mm fp32 peak {p32:.0f} GFLOP/s (this session)")
    print(f"{'preset':7} {'engine':24} {'tok/s':>8} {'× torch fp32':>12} {'MFU (torch.mm peak)':>20} {'peak RSS':>10}")
    out = []
    for preset, k2, k1, tm, rss in rows:
        fpt = k2[0]["flops_per_token"]
        t32 = med([j["tokens_per_s"] for j in tm["fp32"]]) if "fp32" in tm else None
        kt = med([j["tokens_per_s"] for j in k2])
        def line(name, tps, r):
            ratio = f"{tps / t32:.2f}×" if t32 else "—"
            mfu = f"{100 * fpt * tps / (p32 * 1e9):.0f}%" if p32 else "—"
            print(f"{preset:7} {name:24} {tps:8.0f} {ratio:>12} {mfu:>20} {(f'{r:.0f} MiB' if r else '—'):>10}")
            out.append({"preset": preset, "engine": name, "tokens_per_s": tps, "mfu": fpt * tps / (p32 * 1e9) if p32 else None, "rss_mib": r})
        line(f"keel ({k2[0]['matmul']})", kt, rss.get("keel"))
        for m in modes:
            line(f"torch {m}", med([j["tokens_per_s"] for j in tm[m]]), rss.get(m))
        k1t = med([j["tokens_per_s"] for j in k1])
        print(f"{preset:7} {'keel 2 threads / 1':24} {kt / k1t:8.2f}×")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
