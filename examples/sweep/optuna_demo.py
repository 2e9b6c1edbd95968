#!/usr/bin/env python3
"""The grid of examples/sweep/torch_command.toml (5 peak LRs × 2 widths × 2 seeds, the same
PyTorch loop: examples/sweep/torch_trial.py) searched by Optuna instead of `keel sweep`:
GridSampler, keel's DivergencePruner wrapping a MedianPruner, and two worker processes
sharing one SQLite study (as machines would share one database). Then keel reads the study:

    python3 examples/sweep/optuna_demo.py --db runs/optuna_demo.db
    keel report runs/optuna_demo.db              # -> runs/optuna_demo.keel/report.html

Losses are reported to Optuna at every one of the first 20 steps (keel's rule compares with
the first loss), then every 5th (each report is a database write).
"""

import argparse
import multiprocessing as mp
import os
import sys

import optuna

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_trial  # noqa: E402

import keel.optuna  # noqa: E402

GRID = {"lr": [1e-3, 1e-2, 1e-1, 1.0, 10.0], "model.hidden_size": [64, 128], "train.seed": [0, 1]}
STEPS = 300


def objective(trial):
    lr = trial.suggest_categorical("lr", GRID["lr"])
    width = trial.suggest_categorical("model.hidden_size", GRID["model.hidden_size"])
    seed = trial.suggest_categorical("train.seed", GRID["train.seed"])

    def on_step(step, loss):
        # every step at first (keel's rule needs the starting loss), then every 5th
        if step <= 20 or step % 5 == 0 or loss != loss:
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

    return torch_trial.train(lr, width=width, seed=seed, steps=STEPS, on_step=on_step)


def worker(url, name, n):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url, sampler=optuna.samplers.GridSampler(GRID),
                              pruner=keel.optuna.DivergencePruner(optuna.pruners.MedianPruner(n_warmup_steps=50)))
    # a grid is done when every cell ran (two workers may race for the last one)
    study.optimize(objective, n_trials=n, callbacks=[optuna.study.MaxTrialsCallback(n)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="runs/optuna_demo.db")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.db)), exist_ok=True)
    url = f"sqlite:///{os.path.abspath(a.db)}"
    name = "torch-grid"
    optuna.create_study(study_name=name, storage=url, load_if_exists=True, direction="minimize")
    n = 1
    for v in GRID.values():
        n *= len(v)
    procs = [mp.Process(target=worker, args=(url, name, n)) for _ in range(a.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    study = optuna.load_study(study_name=name, storage=url)
    states = [t.state.name for t in study.trials]
    marked = [t for t in study.trials if t.user_attrs.get("keel_diverged")]
    print(f"{len(study.trials)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned "
          f"({len(marked)} by keel's divergence rule, at steps {sorted(t.user_attrs.get('keel_diverged_at') for t in marked)})")
    print(f"then: keel report {a.db}")


if __name__ == "__main__":
    main()
