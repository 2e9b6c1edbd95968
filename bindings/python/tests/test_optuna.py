"""keel.optuna: the divergence pruner (wrapping MedianPruner), the guarded objective and its
constraint, two worker processes sharing one SQLite study, and the export of a study to keel's
sweep format read by the keel binary (`keel sweep collect`, `keel report`).

The objective is a synthetic loss curve over a grid of LRs whose stability edge is known: stable
up to 0.1, the loss above its start from the first step at 0.3, NaN at step 3 at 1.0; at 1e-3
it is stable but slow (behind the median)."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest

optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install optuna): keel.optuna wraps it")

import keel.optuna as ko  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Shared with the worker processes (exec'd there): the synthetic training run.
CURVE = '''
import math
EDGE = 0.1
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
STEPS = 40

def curve(lr, s):
    """The training loss at step s (1-based) for LR lr."""
    if lr >= 1.0:
        return [10.0, 12.0][s - 1] if s < 3 else float("nan")       # NaN at step 3
    if lr > EDGE:
        return 10.0 * (1 + 0.02 * (s - 1))                           # above the start from step 2
    floor = 2.0 + 0.2 * (math.log10(lr) + 1.5) ** 2                  # best near 3e-2
    return floor + 8.0 * math.exp(-min(30 * lr, 2.0) * (s - 1))     # slow at 1e-3

def objective(trial, steps=STEPS):
    lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
    for s in range(1, steps + 1):
        trial.report(curve(lr, s), s)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return curve(lr, steps)
'''
_ns = {"optuna": optuna}
exec(CURVE, _ns)
curve, objective, EDGE, LRS, STEPS = (_ns[k] for k in ("curve", "objective", "EDGE", "LRS", "STEPS"))


def pruner(**kw):
    return ko.DivergencePruner(optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=5), **kw)


def grid_study(storage=None, name=None, **kw):
    # seed 0 orders the grid 1.0, 0.01, 0.003, 0.03, 0.001, 0.3, 0.1: the slow 1e-3 comes after
    # three completed trials, so the median can judge it
    return optuna.create_study(storage=storage, study_name=name, pruner=pruner(**kw),
                               sampler=optuna.samplers.GridSampler({"lr": LRS}, seed=0))


def by_lr(study):
    return {t.params["lr"]: t for t in study.trials}


def keel_attrs(t):
    return {k: v for k, v in t.user_attrs.items() if k.startswith("keel_")}


def test_module_name_does_not_shadow_optuna():
    """keel/optuna.py is `keel.optuna`; `import optuna` (there and after it) is Optuna's."""
    code = "import keel.optuna, optuna; print(optuna.__file__); print(keel.optuna.optuna is optuna)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    path, same = r.stdout.split()
    assert os.sep + "keel" + os.sep not in path and same == "True", r.stdout
    r = subprocess.run([sys.executable, "-m", "keel.optuna", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--storage" in r.stdout, r.stderr


def test_pruner_prunes_divergence_marked_and_leaves_the_slow_trial_to_the_median():
    study = grid_study()
    study.optimize(objective)
    t = by_lr(study)
    assert len(study.trials) == len(LRS)
    # NaN at step 3: pruned there, by keel
    assert t[1.0].state == optuna.trial.TrialState.PRUNED
    assert keel_attrs(t[1.0]) == {"keel_diverged": True, "keel_diverged_at": 3, "keel_rule": "nonfinite",
                                  "keel_diverged_reason": "the loss is nan at step 3"}
    # above the first loss for 10 reports (steps 2..11): pruned at 11, by keel, though the
    # median would have pruned it at step 5 as merely behind (see the hold test)
    assert t[0.3].state == optuna.trial.TrialState.PRUNED and max(t[0.3].intermediate_values) == 11
    a = keel_attrs(t[0.3])
    assert (a["keel_diverged"], a["keel_diverged_at"], a["keel_rule"]) == (True, 11, "above_initial"), a
    assert "above the first step's 10.0000" in a["keel_diverged_reason"]
    # Optuna >= 5 stores the constraint with the trial, where the samplers read it
    if ko._NEW_CONSTRAINTS:
        assert t[1.0].constraints == {"keel_unstable": 1.0} and t[0.3].constraints == {"keel_unstable": 1.0}
    # slow but stable: pruned by the median (behind), not marked diverged
    slow = t[1e-3]
    assert slow.state == optuna.trial.TrialState.PRUNED and max(slow.intermediate_values) < STEPS
    assert keel_attrs(slow) == {} and (not ko._NEW_CONSTRAINTS or slow.constraints == {})
    for lr in (3e-3, 1e-2, 3e-2, 0.1):
        assert t[lr].state == optuna.trial.TrialState.COMPLETE and keel_attrs(t[lr]) == {}, lr
    assert study.best_trial.params["lr"] == 3e-2


def test_without_hold_the_median_takes_the_diverging_trial_unmarked():
    """hold=False asks the wrapped pruner at every report: the trial at 0.3, behind from step 2,
    is pruned by the median at step 5 (its warm-up), before keel's rule (10 reports) can mark it."""
    study = grid_study(hold=False)
    study.optimize(objective)
    t = by_lr(study)[0.3]
    assert t.state == optuna.trial.TrialState.PRUNED and max(t.intermediate_values) == 5
    assert keel_attrs(t) == {}


def test_pruner_detectors_and_sweep_rule():
    """A loss that jumps 3x and stays: keel's detectors call it at the third flagged report
    (persistent); with detectors=False only keel sweep's rule is left: 10 reports above the
    first loss."""
    def jump(trial):
        trial.suggest_float("lr", 1e-3, 1e-3)
        for s in range(1, 41):
            trial.report(5 + 5 * math.exp(-0.3 * (s - 1)) if s < 20 else 15.0, s)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    for detectors, step, rule in ((True, 22, "persistent"), (False, 29, "above_initial")):
        study = optuna.create_study(pruner=ko.DivergencePruner(detectors=detectors))
        study.optimize(jump, n_trials=1)
        a = keel_attrs(study.trials[0])
        assert (a["keel_diverged_at"], a["keel_rule"]) == (step, rule), (detectors, a)
    # warm-up: reports up to warmup_steps do not count towards the 10
    study = optuna.create_study(pruner=ko.DivergencePruner(detectors=False, warmup_steps=25))
    study.optimize(jump, n_trials=1)
    assert keel_attrs(study.trials[0])["keel_diverged_at"] == 35


def test_pruner_and_export_refuse_what_they_cannot_judge(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        ko.DivergencePruner(guard_config={"nope": 1})
    with pytest.raises(ValueError, match="only detect"):
        ko.DivergencePruner(guard_config={"enabled": True})
    with pytest.raises(TypeError, match="optuna pruner"):
        ko.DivergencePruner("median")
    study = optuna.create_study(direction="maximize", pruner=ko.DivergencePruner())
    with pytest.raises(ValueError, match="maximizes"):
        study.optimize(objective, n_trials=1)
    with pytest.raises(ValueError, match="maximizes"):
        ko.export(study, tmp_path / "max")


def test_guarded_records_instability_and_the_constraint():
    @ko.guarded(enabled=False)
    def obj(trial, guard):
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        for s in range(1, 21):
            guard.observe(s, curve(lr, s))
        return float("nan") if lr == 3e-3 else curve(lr, 20)

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [3e-3, 3e-2, 0.3, 1.0]}))
    study.optimize(obj)
    t = by_lr(study)
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert t[1.0].state == P and keel_attrs(t[1.0])["keel_diverged_at"] == 3
    assert keel_attrs(t[1.0])["keel_rule"] == "nonfinite"
    assert t[0.3].state == P and keel_attrs(t[0.3])["keel_rule"] == "above_initial"
    assert keel_attrs(t[0.3])["keel_diverged_at"] == 11
    # a value that is not finite is instability too, at the last step the guard saw
    assert t[3e-3].state == P and keel_attrs(t[3e-3])["keel_diverged_at"] == 20
    assert keel_attrs(t[3e-3])["keel_diverged_reason"] == "the objective returned nan"
    assert t[3e-2].state == C and keel_attrs(t[3e-2]) == {"keel_diverged": False}
    assert [ko.constraints(t[lr]) for lr in (3e-3, 3e-2, 0.3, 1.0)] == [[1.0], [0.0], [1.0], [1.0]]
    if ko._NEW_CONSTRAINTS:
        assert t[3e-2].constraints == {"keel_unstable": 0.0} and t[1.0].constraints == {"keel_unstable": 1.0}
    # a FixedTrial (testing the objective, no storage): the same outcome, nothing recorded
    with pytest.raises(optuna.TrialPruned, match="step 3 .nonfinite."):
        obj(optuna.trial.FixedTrial({"lr": 1.0}))
    assert obj(optuna.trial.FixedTrial({"lr": 3e-2})) == curve(3e-2, 20)


def test_guarded_optimizer_gives_up_on_a_torch_model(tmp_path):
    """The guard acting through a GuardedOptimizer: LR 30 gives up (keel.GaveUp), recorded with
    the guard's step and diagnosis and pruned; LR 0.3 trains; the run directory has the events."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    X = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    Y = X.sum(1, keepdim=True).sin()

    @ko.guarded
    def obj(trial, guard):
        lr = trial.suggest_float("lr", 1e-3, 100, log=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        opt = guard.optimizer(torch.optim.SGD(model.parameters(), lr=lr), model=model, snapshot_every=5,
                              log_dir=tmp_path / f"run{trial.number}")
        for s in range(1, 61):
            i = (s * 32) % 256
            loss = torch.nn.functional.mse_loss(model(X[i:i + 32]), Y[i:i + 32])
            loss.backward()
            opt.step(loss)
            opt.zero_grad()
            trial.report(loss.item(), s)
        return loss.item()

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [0.3, 30.0]}))
    study.optimize(obj)
    t = by_lr(study)
    assert t[0.3].state == optuna.trial.TrialState.COMPLETE and t[0.3].user_attrs["keel_diverged"] is False
    bad = t[30.0]
    a = keel_attrs(bad)
    assert bad.state == optuna.trial.TrialState.PRUNED and a["keel_rule"] == "give_up", a
    assert "Try a lower optim.lr" in a["keel_diverged_reason"]
    events = [json.loads(x) for x in open(tmp_path / f"run{bad.number}" / "events.jsonl")]
    give_up = [e["step"] for e in events if e["kind"] == "give_up"]
    assert give_up == [a["keel_diverged_at"]], events[-3:]
    assert ko.constraints(bad) == [1.0]


def test_constraints_func_with_tpe():
    """TPESampler(constraints_func=keel.optuna.constraints) (deprecated from Optuna 5, where
    the stored constraint is read without it): unstable trials are infeasible, the best trial
    is a stable one below the edge."""
    @ko.guarded(enabled=False)
    def obj(trial, guard):
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        for s in range(1, 13):
            guard.observe(s, curve(lr, s))
        return curve(lr, 12)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5, constraints_func=ko.constraints)
    study = optuna.create_study(sampler=sampler)
    study.optimize(obj, n_trials=20)
    unstable = [t for t in study.trials if t.user_attrs.get("keel_diverged")]
    stable = [t for t in study.trials if t.user_attrs.get("keel_diverged") is False]
    assert unstable and stable and len(unstable) + len(stable) == 20
    assert all(t.params["lr"] > EDGE for t in unstable) and all(t.params["lr"] <= EDGE for t in stable)
    for t in unstable:  # what constraints_func stored (list format), and keel's own (Optuna >= 5)
        assert list(t.system_attrs["constraints"]) == [1.0]
        assert not ko._NEW_CONSTRAINTS or t.constraints == {"0": 1.0, "keel_unstable": 1.0}
    for t in stable:
        assert list(t.system_attrs["constraints"]) == [0.0]
        assert not ko._NEW_CONSTRAINTS or t.constraints == {"0": 0.0, "keel_unstable": 0.0}
    assert study.best_trial.params["lr"] <= EDGE and study.best_trial.user_attrs["keel_diverged"] is False


WORKER = '''
import os, sys, time
import optuna, keel.optuna as ko
optuna.logging.set_verbosity(optuna.logging.WARNING)
exec(open(sys.argv[1]).read())
GRID = [1e-2, 3e-2, 0.1, 0.3, 1.0]
url, wid, ready = sys.argv[2], sys.argv[3], sys.argv[4]
storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
study = optuna.create_study(
    study_name="grid", storage=storage, load_if_exists=True,
    sampler=optuna.samplers.GridSampler({"lr": GRID}, seed=0),  # the same seed in every worker
    # keel's rule alone: which trials a median would prune here depends on the workers' timing
    pruner=ko.DivergencePruner())
open(os.path.join(ready, wid), "w").close()
t0 = time.time()
while len(os.listdir(ready)) < 2 and time.time() - t0 < 60:   # start together
    time.sleep(0.01)

def work(trial):
    # GridSampler gives trial number k the k-th grid point; a trial numbered past the grid
    # (both workers asked for one more at once) is a repeat: stop without running it
    if trial.number >= len(GRID):
        trial.study.stop()
        raise optuna.TrialPruned("grid done")
    trial.set_user_attr("worker", wid)
    return objective(trial, steps=12)

study.optimize(work, callbacks=[optuna.study.MaxTrialsCallback(len(GRID), states=None)])
'''


def test_two_workers_share_one_sqlite_study_then_export(tmp_path, keel_bin):
    """Two processes on one SQLite study (standing in for machines on one database) run the
    grid together, each point once; the pruner's marks are in the shared storage; the export
    of the storage URL reads as a keel sweep with the max stable LR at the edge."""
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    optuna.create_study(study_name="grid", storage=url)  # the tables, made once
    (tmp_path / "curve.py").write_text(CURVE)
    (tmp_path / "worker.py").write_text(WORKER)
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "curve.py"), url, w, str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="grid", storage=url)
    GRID = [1e-2, 3e-2, 0.1, 0.3, 1.0]
    grid = [t for t in study.trials if t.number < len(GRID)]
    assert sorted(t.params["lr"] for t in grid) == GRID  # every point, once
    assert all(t.state.is_finished() for t in grid)
    for t in study.trials[len(GRID):]:  # a repeat the race let in ran nothing
        assert not t.intermediate_values and "worker" not in t.user_attrs
    assert {t.user_attrs["worker"] for t in grid} == {"a", "b"}, "both workers ran trials"
    t = {x.params["lr"]: x for x in grid}
    assert keel_attrs(t[1.0])["keel_diverged_at"] == 3 and keel_attrs(t[0.3])["keel_diverged_at"] == 11
    for lr in GRID[:3]:
        assert t[lr].state == optuna.trial.TrialState.COMPLETE and "keel_diverged" not in t[lr].user_attrs, lr

    out = tmp_path / "sweep"
    ko.export(url, out, study_name="grid")
    r = subprocess.run([keel_bin, "sweep", "collect", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = json.loads((out / "summary.json").read_text())["groups"][0]
    assert (g["max_stable_lr"], g["first_unstable_lr"]) == (EDGE, 0.3), g
    row = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("all")]
    assert row and row[0].split()[3] == "0.1", r.stdout  # group, best LR, loss, max stable


def run_grid_sqlite(tmp_path, name="grid"):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = grid_study(storage=url, name=name)
    study.optimize(objective)
    return url, study


def test_export_cli_and_keel_report(tmp_path, keel_bin):
    """`python3 -m keel.optuna export --storage URL --study NAME --out DIR` writes keel's sweep
    format and runs `keel sweep collect` and `keel report` on it (KEEL_BIN)."""
    url, study = run_grid_sqlite(tmp_path)
    out = tmp_path / "exported"
    env = {**os.environ, "KEEL_BIN": keel_bin}
    r = subprocess.run([sys.executable, "-m", "keel.optuna", "export", "--storage", url, "--study", "grid",
                        "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max stable" in r.stdout and (out / "report.html").exists(), r.stdout
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["axes"] == [{"key": "optim.lr", "values": LRS}] and plan["steps"] == STEPS
    assert plan["settings"] == {"metric": "val_loss", "lr_key": "optim.lr", "window": 0.03}
    res = {r["axes"]["optim.lr"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert res[1.0]["status"] == "diverged" and res[1.0]["diverged_at"] == 3
    assert res[0.3]["status"] == "diverged" and res[0.3]["diverged_at"] == 11
    assert "above the first step" in res[0.3]["diverged_reason"]
    assert res[1e-3]["status"] == "pruned" and not res[1e-3]["diverged"]  # pruned as behind: done
    for lr in (3e-3, 1e-2, 3e-2, 0.1):
        assert res[lr]["status"] == "finished" and res[lr]["final_loss"] == pytest.approx(curve(lr, STEPS)), lr
    s = json.loads((out / "summary.json").read_text())
    g = s["groups"][0]
    assert (g["max_stable_lr"], g["first_unstable_lr"], g["best_lr"]) == (EDGE, 0.3, 3e-2)
    assert g["diverged_at"] == [None, None, None, None, None, 11, 3]
    # a trial's files: one line per reported value, its value as val_loss, keel's events
    tid = next(t["id"] for t in plan["trials"] if t["assign"] == [["optim.lr", 0.3]])
    assert tid == f"{by_lr(study)[0.3].number:03d}-lr0.3"
    m = [json.loads(x) for x in open(out / "trials" / tid / "metrics.jsonl")]
    assert [x["step"] for x in m] == list(range(1, 12)) and m[0]["loss"] == 10.0
    ev = [json.loads(x) for x in open(out / "trials" / tid / "events.jsonl")]
    assert [(e["step"], e["kind"]) for e in ev if e["kind"] == "diverged"] == [(11, "diverged")]
    info = json.loads((out / "trials" / tid / "optuna_trial.json").read_text())
    assert (info["state"], info["diverged"], info["last_step"]) == ("PRUNED", True, 11)
    slow = next(t["id"] for t in plan["trials"] if t["assign"] == [["optim.lr", 1e-3]])
    info = json.loads((out / "trials" / slow / "optuna_trial.json").read_text())
    assert (info["state"], info["diverged"]) == ("PRUNED", False)  # stopped for being behind
    tid = next(t["id"] for t in plan["trials"] if t["assign"] == [["optim.lr", 0.1]])
    m = [json.loads(x) for x in open(out / "trials" / tid / "metrics.jsonl")]
    assert m[-1] == {"step": STEPS, "val_loss": curve(0.1, STEPS)} and m[-2]["step"] == STEPS
    # exporting again rewrites the directory; `keel report` on it exits 0
    ko.export(url, out)  # one study in the storage: no name needed
    r = subprocess.run([keel_bin, "report", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # `keel report` on the storage itself: the same sweep, through keel.optuna export
    via = tmp_path / "via_report"
    env = {**os.environ, "KEEL_PYTHON": sys.executable}
    r = subprocess.run([keel_bin, "report", str(tmp_path / "study.db"), "--study", "grid", "--out", str(via)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (via / "report.html").exists()
    s2 = json.loads((via / "summary.json").read_text())
    assert s2["groups"][0]["max_stable_lr"] == EDGE
    # a storage URL needs --out; a study that is not there is refused with Optuna's words
    r = subprocess.run([keel_bin, "report", url], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "--out" in r.stderr
    r = subprocess.run([keel_bin, "report", str(tmp_path / "study.db"), "--study", "nope", "--out", str(via)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "nope" in r.stderr, r.stderr


def test_export_judges_trials_keel_did_not_watch(tmp_path, keel_bin):
    """A study run without keel (no pruner): export replays keel's rule over the reported
    values, so the completed trial whose loss stayed above its start reads as diverged."""
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [3e-2, 0.1, 0.3]}, seed=0))
    study.optimize(lambda t: objective(t, steps=30))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    out = ko.export(study, tmp_path / "x")
    r = subprocess.run([keel_bin, "sweep", "collect", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    g = json.loads((out / "summary.json").read_text())["groups"][0]
    assert (g["max_stable_lr"], g["diverged_at"]) == (EDGE, [None, None, 11]), g


def test_export_other_params_are_axes(tmp_path, keel_bin):
    """A second parameter is an axis (its own map row per value); keys= maps it to keel's key."""
    def obj(trial):
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        depth = trial.suggest_int("n_layer", 2, 4)
        eff = lr * (1 if depth == 2 else 3)  # deeper: the same LR acts 3x larger
        for s in range(1, 13):
            trial.report(curve(eff, s), s)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return curve(eff, 12)

    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [1e-2, 0.1, 0.3], "n_layer": [2, 4]}, seed=0),
                                pruner=ko.DivergencePruner())
    study.optimize(obj)
    out = ko.export(study, tmp_path / "x", keys={"n_layer": "model.num_layers"})
    plan = json.loads((out / "sweep.json").read_text())
    assert [a["key"] for a in plan["axes"]] == ["model.num_layers", "optim.lr"]
    assert plan["axes"][0]["values"] == [2, 4]
    r = subprocess.run([keel_bin, "sweep", "collect", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    groups = {g["group"]["model.num_layers"]: g for g in json.loads((out / "summary.json").read_text())["groups"]}
    # at depth 4 the effective LR is 3x: 0.1 is already past the edge there
    assert groups[2]["max_stable_lr"] == 0.1 and groups[4]["max_stable_lr"] == 1e-2


def test_export_errors_name_the_fix(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(FileNotFoundError, match="no such SQLite file"):
        ko.export(f"sqlite:///{missing}", tmp_path / "o")
    assert not missing.exists()  # not created by trying
    url = f"sqlite:///{tmp_path / 's.db'}"
    for name in ("a", "b"):
        optuna.create_study(storage=url, study_name=name).optimize(lambda t: objective(t, steps=3), n_trials=1)
    with pytest.raises(ValueError, match=r"2 studies \(a, b\).*--study"):
        ko.export(url, tmp_path / "o")
    with pytest.raises(ValueError, match="no study named 'c'.*a, b"):
        ko.export(url, tmp_path / "o", study_name="c")
    with pytest.raises(ValueError, match="no trial has the parameter 'learning_rate'.*lr"):
        ko.export(url, tmp_path / "o", study_name="a", lr_param="learning_rate")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by keel.optuna.export"):
        ko.export(url, other, study_name="a")
    assert (other / "notes.txt").read_text() == "keep me"
    r = subprocess.run([sys.executable, "-m", "keel.optuna", "export", "--storage", url, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "--study" in r.stderr, r.stderr
