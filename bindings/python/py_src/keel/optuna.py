"""keel's stability rules inside an Optuna study, and a study's trials as a keel sweep.

    import optuna, keel.optuna

    study = optuna.create_study(
        storage="sqlite:///study.db", study_name="lr", load_if_exists=True,
        pruner=keel.optuna.DivergencePruner(optuna.pruners.MedianPruner()))

    @keel.optuna.guarded(enabled=False)          # [guard] keys; enabled=False: detect only
    def objective(trial, guard):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        opt = guard.optimizer(torch.optim.AdamW(model.parameters(), lr=lr), model=model)
        for step in range(1, steps + 1):
            ...; loss.backward()
            opt.step(loss, clip_grad_norm_(model.parameters(), 1.0))   # keel.torch.GuardedOptimizer
            opt.zero_grad()
            trial.report(loss.item(), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return val_loss

    study.optimize(objective, n_trials=30)        # any number of processes or machines

    keel.optuna.export("sqlite:///study.db", "runs/optuna-lr", study_name="lr")
    # or: python3 -m keel.optuna export --storage sqlite:///study.db --study lr --out runs/optuna-lr

- `DivergencePruner(wrapped)`: prunes a trial when keel's divergence rule fires on the values it
  reports (`trial.report(loss, step)`), replayed in step order through keel's detectors; any
  other trial is left to `wrapped` (MedianPruner, ...). A trial that is merely behind is pruned
  by the wrapped rule; a diverging one by keel's, and that one is marked in the storage.
- `guarded(objective)`: runs the objective with a keel guard for its own loop (`guard.observe`,
  or `guard.optimizer(...)` for a GuardedOptimizer). When the guard gives up or the divergence
  rule fires the trial is recorded as unstable and pruned, not scored.
- `constraints(trial)`: the instability as a constraint value (<= 0 feasible), for
  `constraints_func=` of Optuna's constrained samplers (before Optuna 5; from Optuna 5 on
  keel stores it with the trial, where TPESampler and the others read it themselves).
- `export(storage, out_dir)`: the study's trials as a keel sweep directory (sweep.json and
  trials/<id>/metrics.jsonl, events.jsonl), so `keel sweep collect DIR` and `keel report DIR`
  give the results table, the largest stable LR, the stability maps and the recommendation.

What is recorded on an unstable trial (user attributes, in the shared storage):
`keel_diverged` (True; a trial the guarded objective ran stably gets False), `keel_diverged_at`
(the step), `keel_diverged_reason` (in words), `keel_rule` (which rule: "nonfinite",
"above_initial", "divergence", "persistent" or "give_up"), and the constraint
`keel_unstable` = 1.0 (0.0 for a stable guarded trial) as Optuna 5's constraint attribute.

keel's divergence rule (that of `keel sweep` trials, plus the guard's divergence detectors):
- a reported loss that is not finite (NaN, inf);
- the loss above the first reported loss for `patience` (10) consecutive reports after
  `warmup_steps` (keel train's `train.stop_if_diverged`);
- with `detectors=True`, a divergence detection of keel's guard run in detect-only mode over the
  reported values: `divergence` (the mean of the last `guard.diverge_window` losses above
  `guard.diverge_ratio` x the best such mean) or `persistent` (`guard.persist` flagged losses in
  a row: spikes of `guard.loss_z` robust z or `guard.loss_ratio` x the running mean).
The reported values must be losses (lower is better): a study that maximizes is refused.
"""

from __future__ import annotations

# Absolute imports (Python 3's default): `import optuna` here is the Optuna package, not this
# module, even though this file is keel/optuna.py.
import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import OrderedDict
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional

try:
    import optuna
    from optuna.trial import TrialState
except ImportError as e:  # pragma: no cover - exercised only without optuna
    if __name__ == "__main__":  # the command line: a sentence, not a traceback (exit 2)
        print(f"error: keel.optuna needs the optuna package: pip install optuna ({e})", file=sys.stderr)
        sys.exit(2)
    raise ImportError(f"keel.optuna needs the optuna package: pip install optuna ({e})") from None

from . import Action, GaveUp, Guard, _scalar

__all__ = [
    "CONSTRAINT",
    "DivergencePruner",
    "TrialGuard",
    "constraints",
    "export",
    "guarded",
    "main",
]

CONSTRAINT = "keel_unstable"  # the constraint's name (Optuna >= 5: trial.constraints[CONSTRAINT])
_PATIENCE = 10  # keel train's DIVERGED_AFTER: reports above the first one that count as diverged

# Optuna 5 stores constraints with the trial ("constraints:<name>" system attributes, what
# Trial.set_constraint writes) and its samplers read them without a constraints_func.
_NEW_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


# -- the divergence rule ---------------------------------------------------------------------
class _Rule:
    """keel's divergence rule over one trial's stream of (step, loss): keel train's
    `stop_if_diverged` (a non-finite loss; the loss above the first one for `patience`
    consecutive steps after warm-up) and, with `detectors`, the guard's divergence detections.
    Skipped steps (an acting guard skipped the update) are not judged, as in keel train."""

    def __init__(self, patience: int, warmup_steps: int, detectors: bool):
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.detectors = detectors
        self.initial: Optional[float] = None
        self.above = 0  # consecutive reports above the first one (after warm-up)
        self.flagged = 0  # consecutive reports the detectors flagged as spikes
        self.verdict: Optional[dict] = None  # {"step", "rule", "reason"} once it fired

    def feed(self, step: int, loss: float, skipped: bool, events: tuple) -> Optional[dict]:
        if self.verdict is not None:
            return self.verdict
        self.flagged = self.flagged + 1 if any(e.get("kind") == "spike" for e in events) else 0
        v = None
        if not skipped:
            if not math.isfinite(loss):
                v = ("nonfinite", f"the loss is {loss} at step {step}")
            else:
                if self.initial is None:
                    self.initial = loss
                if step > self.warmup_steps:
                    self.above = self.above + 1 if loss > self.initial else 0
                if self.above >= self.patience:
                    v = ("above_initial",
                         f"the loss stayed above the first step's {self.initial:.4f} for {self.patience} "
                         f"reports after warm-up (now {loss:.4f})")
        if v is None and self.detectors:
            for e in events:
                if e.get("kind") == "divergence":
                    d = e.get("detail") or {}
                    v = (d.get("detector", "divergence"), d.get("reason", "keel's divergence detector fired"))
                    break
        if v is not None:
            self.verdict = {"step": int(step), "rule": v[0], "reason": v[1],
                            "loss": loss if math.isfinite(loss) else None, "initial_loss": self.initial}
        return self.verdict

    @property
    def suspect(self) -> bool:
        """On its way to a verdict: the loss is above the first one, or spiking."""
        return self.verdict is None and (self.above > 0 or self.flagged > 0)


def _check_rule_args(patience: int, warmup_steps: int) -> None:
    if int(patience) < 1:
        raise ValueError(f"patience: must be at least 1 report, got {patience}")
    if int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")


def _detect_only_config(guard_config: Optional[dict], who: str) -> dict:
    cfg = dict(guard_config or {})
    if cfg.get("enabled", False):
        raise ValueError(f"{who}: guard_config enabled=True: the reported values are replayed after the fact, so "
                         "keel's guard can only detect here; leave `enabled` out")
    cfg["enabled"] = False
    Guard(**cfg)  # an unknown or out-of-range key fails here, naming it, not at the first report
    return cfg


def _replay(values: dict, guard_config: dict, patience: int, warmup_steps: int, detectors: bool):
    """Feed a trial's intermediate values in step order to a detect-only guard and the rule:
    (verdict or None, the guard's events)."""
    guard = Guard(**guard_config)
    rule = _Rule(patience, warmup_steps, detectors)
    events: list = []
    for step in sorted(values):
        act = guard.observe(step, values[step])
        events.extend(act.events)
        rule.feed(step, float(values[step]), False, act.events)
    return rule.verdict, events


def _is_loss_study(study) -> None:
    dirs = study.directions
    if len(dirs) != 1:
        raise ValueError(f"study '{study.study_name}' has {len(dirs)} objectives: keel's rules and maps compare one "
                         "loss; fix: use a single-objective study that minimizes a loss")
    if dirs[0] == optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study '{study.study_name}' maximizes its objective: keel's divergence rule and maps read "
                         "the reported values as losses (lower is better); fix: minimize a loss (report and return "
                         "the loss, or its negative for a score)")


# -- what is stored on a trial ---------------------------------------------------------------
def _record(storage, trial_id: Optional[int], verdict: Optional[dict]) -> None:
    """Write keel's verdict on a trial to the storage: user attributes and (Optuna >= 5) the
    constraint. An unstable verdict already there wins over a later stable one. No storage (a
    FixedTrial testing the objective): nothing to write."""
    if storage is None or trial_id is None:
        return
    have = storage.get_trial(trial_id)
    if have.user_attrs.get("keel_diverged") is True:
        return
    if verdict is None:
        storage.set_trial_user_attr(trial_id, "keel_diverged", False)
    else:
        storage.set_trial_user_attr(trial_id, "keel_diverged", True)
        storage.set_trial_user_attr(trial_id, "keel_diverged_at", int(verdict["step"]))
        storage.set_trial_user_attr(trial_id, "keel_diverged_reason", str(verdict["reason"]))
        storage.set_trial_user_attr(trial_id, "keel_rule", str(verdict["rule"]))
    if _NEW_CONSTRAINTS:
        storage.set_trial_system_attr(trial_id, f"constraints:{CONSTRAINT}", 0.0 if verdict is None else 1.0)


def constraints(trial) -> list:
    """`constraints_func` for Optuna's constrained samplers (TPESampler, NSGAIISampler, ...):
    [1.0] for a trial keel found unstable (diverged, or the guard gave up), [0.0] otherwise
    (<= 0 is feasible), so a constrained search learns to stay out of the unstable region.

    From Optuna 5 on the samplers read the constraint keel stores with the trial
    (`trial.constraints["keel_unstable"]`) without this, and warn that constraints_func is
    deprecated; pass it on older Optuna."""
    return [1.0 if trial.user_attrs.get("keel_diverged") is True else 0.0]


# -- the pruner --------------------------------------------------------------------------------
class DivergencePruner(optuna.pruners.BasePruner):
    """Prunes a trial when keel's divergence rule fires on its reported values; otherwise
    defers to `wrapped` (any Optuna pruner; None: prune for divergence only).

    wrapped: e.g. `optuna.pruners.MedianPruner()`: a trial that is merely behind is pruned by it,
        a diverging one by keel, and only that one is marked diverged in the storage
        (`keel_diverged`, `keel_diverged_at`, `keel_diverged_reason`, `keel_rule` user
        attributes and, on Optuna >= 5, the `keel_unstable` constraint).
    guard_config: `[guard]` keys for the detectors (`keel.guard_defaults()`; detect-only: the
        pruner replays reported values, it cannot act on them).
    patience, warmup_steps: the above-the-first-loss rule: `patience` consecutive reports above
        the first reported value, counted from reports of steps > `warmup_steps` (keel train:
        10 steps after the LR warm-up; set warmup_steps to yours).
    detectors: also prune on the guard's `divergence` and `persistent` detections (True), or
        only on a non-finite loss and the above-the-first-loss rule (False, `keel sweep`'s rule).
    hold: while a trial is on its way to keel's verdict (its last loss above the first one, or
        flagged as a spike) `wrapped` is not asked, so a diverging trial, which is also behind,
        is pruned and marked by keel's rule (at most `patience` reports later) rather than
        pruned unmarked as merely behind. False: `wrapped` is asked at every report.

    The values are judged in step order as the trial reports them (report the training loss
    every step or every few steps; the windows count reports). Each process keeps the detector
    state of the trials it runs, so a report costs one detector step; any process sharing the
    storage may run trials. Wrapping HyperbandPruner prunes as it does, but TPESampler's
    per-bracket sampling (it checks `study.pruner` is a HyperbandPruner) is then off.
    """

    def __init__(self, wrapped: Optional[optuna.pruners.BasePruner] = None, guard_config: Optional[dict] = None, *,
                 patience: int = _PATIENCE, warmup_steps: int = 0, detectors: bool = True, hold: bool = True):
        if wrapped is not None and not isinstance(wrapped, optuna.pruners.BasePruner):
            raise TypeError(f"DivergencePruner(wrapped=...): expected an optuna pruner (e.g. "
                            f"optuna.pruners.MedianPruner()), got {type(wrapped).__name__}")
        _check_rule_args(patience, warmup_steps)
        self.wrapped = wrapped
        self.guard_config = _detect_only_config(guard_config, "DivergencePruner")
        self.patience = int(patience)
        self.warmup_steps = int(warmup_steps)
        self.detectors = bool(detectors)
        self.hold = bool(hold)
        self._lock = threading.Lock()  # study.optimize(n_jobs>1) calls prune from threads
        # (study id, trial id) -> [guard, rule, steps fed]; the newest few trials only
        self._live: OrderedDict = OrderedDict()
        self._checked: set = set()

    def __getstate__(self):  # picklable (a lock is not); the detector state is per process anyway
        d = self.__dict__.copy()
        del d["_lock"]
        d["_live"], d["_checked"] = OrderedDict(), set()
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _state(self, key):
        st = self._live.get(key)
        if st is None:
            st = self._live[key] = [Guard(**self.guard_config), _Rule(self.patience, self.warmup_steps, self.detectors), []]
            while len(self._live) > 256:
                self._live.popitem(last=False)
        self._live.move_to_end(key)
        return st

    def judge(self, study, trial) -> tuple:
        """keel's reading of the trial's reported values so far: (verdict, suspect); verdict is
        None (no divergence) or {"step", "rule", "reason", ...}; suspect: on its way to one."""
        values = trial.intermediate_values
        steps = sorted(values)
        key = (study._study_id, trial._trial_id)
        with self._lock:
            st = self._state(key)
            guard, rule, fed = st
            # values arrive in step order; anything else (a step reported late) replays from the start
            if len(steps) < len(fed) or steps[:len(fed)] != fed:
                guard, rule, fed = st[0], st[1], st[2] = Guard(**self.guard_config), _Rule(
                    self.patience, self.warmup_steps, self.detectors), []
            for s in steps[len(fed):]:
                v = values[s]
                act = guard.observe(s, v)
                rule.feed(s, float(v), False, act.events)
                fed.append(s)
            return rule.verdict, rule.suspect

    def prune(self, study, trial) -> bool:
        if study._study_id not in self._checked:
            _is_loss_study(study)
            self._checked.add(study._study_id)
        verdict, suspect = self.judge(study, trial)
        if verdict is not None:
            if trial.user_attrs.get("keel_diverged") is not True:
                _record(study._storage, trial._trial_id, verdict)
            return True
        if suspect and self.hold:
            return False
        return bool(self.wrapped.prune(study, trial)) if self.wrapped is not None else False


# -- the guarded objective -------------------------------------------------------------------
class TrialGuard(Guard):
    """A keel.Guard for one trial's training loop (what `guarded` hands the objective).

    `observe(step, loss, grad_norm)` is keel.Guard's, plus keel's divergence rule: when it fires
    (or the guard gives up) it raises keel.GaveUp, ending the trial, which `guarded` records as
    unstable. `optimizer(torch_optimizer, **kw)` makes a keel.torch.GuardedOptimizer on this
    guard (skip / LR back-off / rollback, metrics with log_dir=...); there the step on which the
    rule fired is logged before GaveUp is raised.

    With the guard acting (enabled, the default) spikes are the guard's to handle and only its
    giving up, or the loss staying above the first one (keel train's rule), makes the trial
    unstable; with enabled=False (detect only, as `keel sweep` runs trials) a non-finite loss
    and the guard's divergence detections do too.
    """

    def __init__(self, trial, events: Optional[os.PathLike] = None, *, patience: int = _PATIENCE,
                 warmup_steps: int = 0, detectors: Optional[bool] = None, **config: Any):
        super().__init__(events=events, **config)
        _check_rule_args(patience, warmup_steps)
        self.trial = trial
        self.rule = _Rule(int(patience), int(warmup_steps), (not self.enabled) if detectors is None else bool(detectors))
        self.last_step: Optional[int] = None
        self._raise = True  # bare loops: raise at once; a GuardedOptimizer logs the step, then raises

    @property
    def verdict(self) -> Optional[dict]:
        """None while stable; {"step", "rule", "reason", ...} once unstable."""
        return self.rule.verdict

    def observe(self, step: int, loss: Any, grad_norm: Any = None, **extra: Any) -> Action:
        lv = _scalar("loss", loss)  # read once (a tensor's one host sync)
        act = super().observe(step, math.nan if lv is None else lv, grad_norm, **extra)
        self.last_step = act.step
        if act.kind == "give_up":
            if self.rule.verdict is None:
                self.rule.verdict = {"step": act.step, "rule": "give_up", "reason": act.diagnosis or "the guard gave up"}
            if self._raise:
                raise GaveUp(act.diagnosis or "the guard gave up", act.step)
            return act
        already = self.rule.verdict is not None
        v = self.rule.feed(act.step, math.nan if lv is None else lv, act.skip, act.events)
        if v is None or already:
            return act
        detail = {"rule": f"keel.optuna {v['rule']}", "reason": v["reason"], "loss": v.get("loss"),
                  "initial_loss": v.get("initial_loss")}
        self.log_event(act.step, "diverged", detail)
        if self._raise:
            raise GaveUp(v["reason"], act.step)
        # a GuardedOptimizer: it logs this step (events included), then raises GaveUp itself
        import time

        ev = {"step": act.step, "kind": "diverged", "detail": detail, "time": time.time()}
        return Action(kind="give_up", step=act.step, skip=True, lr_factor=act.lr_factor,
                      diagnosis=v["reason"], events=act.events + (ev,))

    def optimizer(self, optimizer, **kwargs: Any):
        """keel.torch.GuardedOptimizer(optimizer, guard=self, **kwargs): model=, scheduler=,
        log_dir=, snapshot_every=, ... as there."""
        from .torch import GuardedOptimizer

        self._raise = False
        return GuardedOptimizer(optimizer, guard=self, **kwargs)


def guarded(objective: Optional[Callable] = None, *, events: Any = None, patience: int = _PATIENCE,
            warmup_steps: int = 0, detectors: Optional[bool] = None, **guard_config: Any):
    """An Optuna objective run under keel's guard: `objective(trial, guard)` gets a
    `TrialGuard` (a keel.Guard for its loop; `guard.optimizer(...)` makes a GuardedOptimizer)
    and returns the loss to minimize. Use as `@keel.optuna.guarded` or
    `@keel.optuna.guarded(enabled=False, ...)`, or `study.optimize(keel.optuna.guarded(fn))`.

    guard_config: `[guard]` keys (`keel.guard_defaults()`). enabled=False: detect only (the
        trial measures how training behaves, as `keel sweep` does); default: the guard acts.
    events: an events.jsonl path for the guard (a callable trial -> path, or a string with
        `{number}`, per trial); default none (GuardedOptimizer(log_dir=...) logs them there).
    patience, warmup_steps, detectors: keel's divergence rule (see TrialGuard, DivergencePruner).

    When the guard gives up (keel.GaveUp), the rule fires, or the objective returns a value that
    is not finite, the trial is recorded unstable (`keel_diverged` True, `keel_diverged_at`,
    `keel_diverged_reason`, `keel_rule`; constraint `keel_unstable` = 1) and raised as
    optuna.TrialPruned. Pruned, not failed: Optuna's samplers learn from pruned trials (TPE
    ranks them below completed ones, and below all as infeasible with the constraint), while a
    failed trial teaches them nothing; the percentile pruners read completed trials only, so a
    diverged curve does not move the median. A trial that ends otherwise gets `keel_diverged`
    False and constraint 0, unless a DivergencePruner marked it first.
    """
    _check_rule_args(patience, warmup_steps)
    Guard(**guard_config)  # a bad key fails at decoration, naming it

    def wrap(fn: Callable) -> Callable:
        def run(trial):
            path = events(trial) if callable(events) else (
                events.format(number=trial.number) if isinstance(events, str) else events)
            guard = TrialGuard(trial, events=path, patience=patience, warmup_steps=warmup_steps,
                               detectors=detectors, **guard_config)
            storage = getattr(getattr(trial, "study", None), "_storage", None)
            tid = getattr(trial, "_trial_id", None)
            try:
                value = fn(trial, guard)
            except GaveUp as e:
                v = guard.verdict or {"step": e.step, "rule": "give_up", "reason": e.diagnosis}
                _record(storage, tid, v)
                raise optuna.TrialPruned(f"keel: unstable at step {v['step']} ({v['rule']}): {v['reason']}") from None
            except optuna.TrialPruned:
                _record(storage, tid, guard.verdict)
                raise
            v = guard.verdict
            if v is None:
                try:
                    x = float(value) if not isinstance(value, (list, tuple)) else None
                except (TypeError, ValueError):
                    x = None  # Optuna names what is wrong with the value
                if x is not None and not math.isfinite(x):
                    step = guard.last_step if guard.last_step is not None else 0
                    v = {"step": step, "rule": "nonfinite", "reason": f"the objective returned {x}"}
            _record(storage, tid, v)
            if v is not None:
                raise optuna.TrialPruned(f"keel: unstable at step {v['step']} ({v['rule']}): {v['reason']}")
            return value

        run.__name__ = getattr(fn, "__name__", "objective")
        run.__qualname__ = getattr(fn, "__qualname__", run.__name__)
        run.__doc__ = getattr(fn, "__doc__", None)
        run.__wrapped__ = fn
        return run

    return wrap if objective is None else wrap(objective)


# -- export: a study as a keel sweep ---------------------------------------------------------
def _show(v: Any) -> str:
    """An axis value as keel names trial directories: 3e-4, 0.1, xavier-normal, 4."""
    if isinstance(v, float):
        plain = format(Decimal(repr(v)), "f")
        if "." in plain:
            plain = plain.rstrip("0").rstrip(".")
        m, e = f"{v:.15e}".split("e")
        m = repr(float(m))
        m = m[:-2] if m.endswith(".0") else m
        sci = f"{m}e{int(e)}"
        return plain if len(plain) <= len(sci) else sci
    return str(v)


def _short_key(key: str) -> str:
    return {"optim.lr": "lr", "model.num_layers": "L", "model.hidden_size": "d", "train.seed": "seed",
            "init.scheme": "init"}.get(key, key.rsplit(".", 1)[-1])


def _axis_value(name: str, v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, str) or isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"parameter '{name}' has the value {v}: an axis value must be finite")
        return v
    return "none" if v is None else str(v)  # a categorical None, or another type


def _sort_values(vals: list) -> list:
    try:
        return sorted(vals)
    except TypeError:  # mixed types: by their text
        return sorted(vals, key=lambda x: (type(x).__name__, str(x)))


def _redact(url: str) -> str:
    """A storage URL without its password (postgresql://user:secret@host/db)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _storage_url(storage: str) -> str:
    if "://" not in storage:
        # a plain path to a SQLite file
        if not os.path.isfile(storage):
            raise FileNotFoundError(f"{storage}: no such file; fix: give a storage URL (sqlite:///study.db, "
                                    "postgresql://...) or the path of an existing SQLite study file")
        return "sqlite:///" + os.path.abspath(storage)
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.isfile(path):
            # opening it would create an empty database there
            raise FileNotFoundError(f"{storage}: no such SQLite file ({os.path.abspath(path)}); fix: check the "
                                    "path (sqlite:///relative.db, sqlite:////absolute/path.db)")
    return storage


def _load_study(storage: Any, study_name: Optional[str]):
    if isinstance(storage, optuna.study.Study):
        if study_name is not None and study_name != storage.study_name:
            raise ValueError(f"study_name={study_name!r} but the study given is {storage.study_name!r}")
        return storage, None
    url = _storage_url(os.fspath(storage))
    if study_name is None:
        names = optuna.get_all_study_names(storage=url)
        if len(names) != 1:
            raise ValueError(f"{_redact(url)} holds {len(names)} studies"
                             + (f" ({', '.join(names)})" if names else "")
                             + "; fix: name one with study_name= (--study NAME)")
        study_name = names[0]
    try:
        return optuna.load_study(study_name=study_name, storage=url), url
    except KeyError:
        names = optuna.get_all_study_names(storage=url)
        raise ValueError(f"{_redact(url)}: no study named {study_name!r}; the studies there: "
                         f"{', '.join(names) or 'none'}") from None


_MARK = "optuna.json"  # what export writes beside sweep.json: an exported directory may be rewritten


def export(storage: Any, out_dir: os.PathLike, *, study_name: Optional[str] = None, lr_param: str = "lr",
           steps: Optional[int] = None, params: Optional[list] = None, keys: Optional[dict] = None,
           metric: str = "val_loss", window: float = 0.03, init_scheme: str = "",
           guard_config: Optional[dict] = None, patience: int = _PATIENCE, warmup_steps: int = 0,
           detectors: bool = True) -> Path:
    """Write an Optuna study's trials as a keel sweep directory; returns its path. Then
    `keel sweep collect OUT` prints the results table, the largest stable LR per group and the
    recommendation, and `keel report OUT` draws the stability maps (both read only files).

    storage: an optuna.Study, a storage URL (sqlite:///study.db, postgresql://..., any RDB
        URL Optuna takes) or the path of a SQLite file; study_name: needed when the storage
        holds several studies.
    lr_param: the parameter that is the learning rate (the sweep's LR axis, optim.lr).
    params: the other parameters to keep as axes (default: all). Each group of trials sharing
        their values gets its own row of the map; parameters left out are pooled like seeds.
    keys: parameter name -> keel axis key, e.g. {"n_layer": "model.num_layers", "width":
        "model.hidden_size", "init": "init.scheme"} (keel's depth and width trends and its
        init recommendation read those keys); default: a name with a dot as it is, any other
        as "optuna.<name>".
    steps: the planned length; a trial whose reports reach it counts as finished. Default: the
        shortest last reported step of the completed trials.
    metric: "val_loss" (compare trials by their objective value, written as the validation
        loss at their last step) or "train_loss" (the mean of the last 10 reported values).
    init_scheme: how the recommendation names the init when "init.scheme" is not an axis
        (default: unnamed, the study's own).
    guard_config, patience, warmup_steps, detectors: keel's divergence rule, as for
        DivergencePruner, for trials keel did not judge while they ran.

    Each trial becomes trials/<number>-<axes>/ with optuna_trial.json (its number, state,
    params, value), metrics.jsonl (one line per reported value:
    `step`, `loss` (null when not finite); the value of a completed trial as `val_loss` at its
    last step) and events.jsonl (the detect-only guard's detections over the reported values;
    a `diverged` line at the step keel's rule fired, or a `give_up` line when the guard gave
    up). A trial marked by keel while it ran (`keel_diverged`) keeps that verdict; the others
    are judged by replaying the rule over what they reported.

    The axes are the values the study tried: a grid (GridSampler) maps cell by cell; a
    continuous search gives every trial its own LR (one point per LR), and continuous other
    parameters give every trial its own group: leave those out (params=) or search them on a
    grid. Trials pruned for being behind (MedianPruner, ...) stopped before the planned length
    and read as unfinished: they are left out of the losses and the LR sensitivity, which are
    over the trials that ran to the end or diverged. Failed trials read as unfinished too.
    Trials without the LR parameter, and finished trials that recorded nothing, are left out.
    """
    if metric not in ("val_loss", "train_loss"):
        raise ValueError(f"metric: 'val_loss' (the objective value) or 'train_loss' (the reported values), got {metric!r}")
    if not (0 < window < 1):
        raise ValueError(f"window: a fraction such as 0.03, got {window}")
    _check_rule_args(patience, warmup_steps)
    gcfg = _detect_only_config(guard_config, "export")
    study, url = _load_study(storage, study_name)
    _is_loss_study(study)
    keys = dict(keys or {})
    out = Path(out_dir)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)

    all_params = sorted({p for t in trials for p in t.params})
    if lr_param not in all_params:
        raise ValueError(f"study '{study.study_name}': no trial has the parameter {lr_param!r} (its parameters: "
                         f"{', '.join(all_params) or 'none'}); fix: name the learning rate with lr_param= (--lr-param)")
    others = [p for p in all_params if p != lr_param] if params is None else list(params)
    for p in others:
        if p not in all_params or p == lr_param:
            raise ValueError(f"params: {p!r} is not one of the study's other parameters ({', '.join(q for q in all_params if q != lr_param) or 'none'})")
    axis_key = {lr_param: "optim.lr"}
    for p in others:
        k = keys.get(p, p if "." in p else f"optuna.{p}")
        if k == "optim.lr":
            raise ValueError(f"keys: {p!r} -> optim.lr, but that is the LR axis ({lr_param!r})")
        axis_key[p] = k
    for p in keys:
        if p not in axis_key:
            raise ValueError(f"keys: {p!r} is not an exported parameter ({', '.join(axis_key)})")
    if len(set(axis_key.values())) != len(axis_key):
        raise ValueError(f"keys: two parameters map to one axis key ({axis_key})")

    kept, left_out = [], []
    for t in trials:
        if lr_param not in t.params:
            left_out.append((t.number, f"no {lr_param!r} parameter ({t.state.name})"))
            continue
        lr = t.params[lr_param]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"trial {t.number}: {lr_param}={lr!r}: the learning rate must be a positive number")
        empty = not t.intermediate_values and t.value is None and "keel_diverged" not in t.user_attrs
        if empty and t.state.is_finished():
            left_out.append((t.number, f"nothing recorded ({t.state.name})"))
            continue
        kept.append(t)

    if steps is None:
        done = [max(t.intermediate_values) for t in kept if t.state == TrialState.COMPLETE and t.intermediate_values]
        alls = [max(t.intermediate_values) for t in kept if t.intermediate_values]
        steps = min(done) if done else (max(alls) if alls else 1)
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps: the planned length must be at least 1, got {steps}")

    # the directory: a fresh one, or one this function wrote before (rewritten whole)
    if out.exists() and any(out.iterdir()):
        if not (out / _MARK).exists():
            raise FileExistsError(f"{out}: exists and was not written by keel.optuna.export (no {_MARK}); fix: give a "
                                  "new or empty --out directory")
        shutil.rmtree(out / "trials", ignore_errors=True)
    (out / "trials").mkdir(parents=True, exist_ok=True)

    order = sorted(others, key=lambda p: axis_key[p]) + [lr_param]  # the LR axis last, as keel sweeps
    axes_vals: dict = {p: {} for p in order}  # distinct values; 1, 1.0 and True stay apart (keel reads types)
    plan_trials = []
    for t in kept:
        assign = []
        for p in order:
            v = _axis_value(p, t.params.get(p))
            axes_vals[p][(type(v).__name__, v)] = v
            assign.append([axis_key[p], v])
        tid = f"{t.number:03d}" + "".join(
            ("-" if k == "init.scheme" else f"-{_short_key(k)}") + re.sub(r"[^A-Za-z0-9.\-]", "_", _show(v))
            for k, v in assign)
        plan_trials.append({"id": tid, "assign": assign})
        _write_trial(out / "trials" / tid, t, steps, gcfg, patience, warmup_steps, detectors)

    plan = {
        "axes": [{"key": axis_key[p], "values": _sort_values(list(axes_vals[p].values()))} for p in order],
        "settings": {"metric": metric, "lr_key": "optim.lr", "window": float(window)},
        "trials": plan_trials,
        "steps": steps,
        "base_scheme": init_scheme,
        "base": "",
    }
    _write_atomic(out / "sweep.json", json.dumps(plan, indent=2, allow_nan=False))
    src = _redact(url) if url else f"(a {type(study._storage).__name__})"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Exported by keel.optuna.export on {now} from the Optuna study '{study.study_name}'",
        f"# in {src}: {len(kept)} trials; the axes are the parameter values the study tried",
        f"# ({', '.join(f'{p} -> {axis_key[p]}' for p in order)}). Each trial's metrics are the values it",
        "# reported (trial.report); its objective value is its val_loss. Not a file `keel sweep --config` runs.",
    ]
    if left_out:
        lines.append(f"# Left out: {len(left_out)} trial(s): " + "; ".join(f"#{n} {why}" for n, why in left_out[:10])
                     + (" ..." if len(left_out) > 10 else ""))
    lines.append("[axes]")
    for p in order:
        lines.append(f"{json.dumps(axis_key[p])} = {_toml_list(_sort_values(list(axes_vals[p].values())))}")
    lines += ["", "[sweep]", f'metric = "{metric}"', 'lr_key = "optim.lr"', f"window = {float(window)}", ""]
    _write_atomic(out / "sweep.toml", "\n".join(lines))
    _write_atomic(out / _MARK, json.dumps({
        "study": study.study_name, "storage": src, "exported": now, "lr_param": lr_param,
        "axes": {p: axis_key[p] for p in order}, "steps": steps, "trials": len(kept),
        "left_out": [{"number": n, "why": why} for n, why in left_out],
    }, indent=2))
    return out


def _toml_list(vals: list) -> str:
    def one(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, int):
            return str(v)
        return json.dumps(str(v))
    return "[" + ", ".join(one(v) for v in vals) + "]"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _jsonl(path: Path, rows: list) -> None:
    _write_atomic(path, "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in rows) or "\n")


def _finite(x: Any) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _write_trial(tdir: Path, t, steps: int, gcfg: dict, patience: int, warmup_steps: int, detectors: bool) -> None:
    tdir.mkdir(parents=True, exist_ok=True)
    iv = t.intermediate_values
    verdict, events = _replay(iv, gcfg, patience, warmup_steps, detectors)
    ua = t.user_attrs
    if "keel_diverged" in ua:  # judged while it ran: that verdict stands
        verdict = None
        if ua["keel_diverged"] is True:
            at = ua.get("keel_diverged_at")
            verdict = {"step": int(at) if at is not None else (max(iv) if iv else 0),
                       "rule": ua.get("keel_rule", "diverged"),
                       "reason": ua.get("keel_diverged_reason", "keel found the trial unstable")}
    rows = [{"step": int(s), "loss": _finite(iv[s]), "skipped": False} for s in sorted(iv)]
    end = t.datetime_complete
    if rows and t.datetime_start is not None and end is not None:
        rows[-1]["elapsed_s"] = (end - t.datetime_start).total_seconds()
    if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value) and verdict is None:
        last = int(max(iv)) if iv else steps
        rows.append({"step": last, "val_loss": float(t.value)})
    when = (end or t.datetime_start or datetime.datetime.now()).timestamp()
    if verdict is not None:
        if verdict["rule"] == "give_up":
            events.append({"step": verdict["step"], "kind": "give_up",
                           "detail": {"diagnosis": verdict["reason"], "source": "keel.optuna"}, "time": when})
        else:
            events.append({"step": verdict["step"], "kind": "diverged",
                           "detail": {"rule": f"keel.optuna {verdict['rule']}", "reason": verdict["reason"]},
                           "time": when})
    for e in events:
        e.setdefault("time", when)
    _jsonl(tdir / "metrics.jsonl", rows)
    _jsonl(tdir / "events.jsonl", [_json_safe(e) for e in events])
    # what Optuna says of the trial (keel's reader ignores it): a PRUNED trial without a verdict
    # stopped early for being behind, not for instability
    _write_atomic(tdir / "optuna_trial.json", json.dumps(_json_safe({
        "number": t.number, "state": t.state.name, "value": t.value if t.state == TrialState.COMPLETE else None,
        "params": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in t.params.items()},
        "diverged": verdict is not None, "last_step": int(max(iv)) if iv else None,
    }), indent=2))


def _json_safe(x: Any) -> Any:
    """keel's convention: a number that is not finite is written as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# -- the command line ------------------------------------------------------------------------
def _keel_bin() -> Optional[str]:
    env = os.environ.get("KEEL_BIN")
    if env:
        if not os.path.exists(env):
            raise FileNotFoundError(f"KEEL_BIN={env} does not exist")
        return env
    return shutil.which("keel")


def main(argv: Optional[list] = None) -> int:
    """`python3 -m keel.optuna export --storage URL [--study NAME] --out DIR`."""
    ap = argparse.ArgumentParser(prog="python3 -m keel.optuna",
                                 description="keel's stability reading of an Optuna study")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the study's trials as a keel sweep directory, then run "
                                       "`keel sweep collect` and `keel report` on it",
                        description=export.__doc__.split("\n\n")[0])
    ex.add_argument("--storage", required=True, help="storage URL (sqlite:///study.db, postgresql://...) or a SQLite file")
    ex.add_argument("--study", default=None, help="study name (needed when the storage holds several)")
    ex.add_argument("--out", default=None, help="sweep directory to write (default runs/optuna-<study>)")
    ex.add_argument("--lr-param", default="lr", help="the parameter that is the learning rate (default lr)")
    ex.add_argument("--param", action="append", default=None, metavar="NAME",
                    help="another parameter to keep as an axis (repeatable; default all)")
    ex.add_argument("--key", action="append", default=[], metavar="NAME=KEY",
                    help="map a parameter to a keel axis key, e.g. n_layer=model.num_layers (repeatable)")
    ex.add_argument("--steps", type=int, default=None, help="planned length (default: the completed trials' shortest)")
    ex.add_argument("--metric", choices=("val_loss", "train_loss"), default="val_loss",
                    help="val_loss: the objective value (default); train_loss: the last reported values")
    ex.add_argument("--no-report", action="store_true", help="only write the directory")
    a = ap.parse_args(argv)
    keys = {}
    for kv in a.key:
        if "=" not in kv:
            ap.error(f"--key {kv}: write NAME=KEY, e.g. n_layer=model.num_layers")
        k, v = kv.split("=", 1)
        keys[k] = v
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, _ = _load_study(a.storage, a.study)
        out = a.out or os.path.join("runs", "optuna-" + re.sub(r"[^A-Za-z0-9._-]", "_", study.study_name))
        path = export(study, out, lr_param=a.lr_param, steps=a.steps, params=a.param, keys=keys, metric=a.metric)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = json.loads((path / _MARK).read_text())
    print(f"keel.optuna: study '{info['study']}' -> {path}: {info['trials']} trials, {info['steps']} steps planned"
          + (f", {len(info['left_out'])} left out (see {path / _MARK})" if info["left_out"] else ""))
    if a.no_report:
        return 0
    try:
        exe = _keel_bin()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if exe is None:
        print(f"keel is not on PATH (nor KEEL_BIN set): run `keel sweep collect {path}` and `keel report {path}`")
        return 0
    for cmd in (["sweep", "collect", str(path)], ["report", str(path)]):
        r = subprocess.run([exe, *cmd])
        if r.returncode != 0:
            return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
