"""What the framework adapters (keel.hf, keel.lightning) share: instance patches that can be
undone, and the guard they build from their keyword arguments."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from . import Guard


def patch(obj, name: str, fn):
    """Set obj.name = fn on the instance; returns the undo (which restores what the instance
    had, or removes the attribute so the class's own shows through again)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, fn)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    return undo


def keep_scheduler_marker(inner, wrapper) -> None:
    # torch's LR scheduler marks the optimizer step it wrapped; without the mark it warns
    # that the step was overridden
    if hasattr(inner, "_wrapped_by_lr_sched"):
        wrapper._wrapped_by_lr_sched = True


class GuardSpec:
    """An adapter's guard arguments, checked when the callback is made (a bad key fails
    before training starts); the guard itself is built at train start, when the events path
    (the run's directory, main process only) is known."""

    def __init__(self, guard: Optional[Guard], events: Optional[os.PathLike], config: dict):
        if guard is not None and (config or events is not None):
            raise ValueError("give either guard= or guard keyword arguments (and events=), not both")
        if guard is None:
            Guard(**config)  # validates the keys now
        self.guard, self.events, self.config = guard, events, config

    def build(self, default_dir: Optional[str], is_main: bool, log_dir: Optional[os.PathLike] = None) -> Guard:
        if self.guard is not None:
            return self.guard
        events = self.events
        if events is None and is_main:
            if log_dir is not None:
                events = os.path.join(os.fspath(log_dir), "events.jsonl")  # keel's run directory
            elif default_dir is not None:
                events = os.path.join(default_dir, "keel-events.jsonl")
        return Guard(events=events, **self.config)


def run_logger(log_dir: Optional[os.PathLike], is_main: bool, tokens_per_step: Optional[int] = None):
    """The RunLogger of an adapter's `log_dir` (None without one); it writes on the main
    process only, as the framework says which that is."""
    if log_dir is None:
        return None
    from .torch import RunLogger

    return RunLogger(log_dir, tokens_per_step=tokens_per_step, rank=0 if is_main else 1)


def warn_once(seen: set, key: str, message: str) -> None:
    """A logger keel cannot write to is said once, not at every event."""
    if key not in seen:
        seen.add(key)
        warnings.warn(message, stacklevel=3)


def wrapper_options(**opts: Any) -> dict:
    """The GuardedOptimizer options a callback passes through (snapshot_every, keep,
    snapshot_dir, snapshot_async, rollback_from, probe_*), checked when the callback is made."""
    if opts["rollback_from"] not in ("snapshots", "checkpoints"):
        raise ValueError(f"rollback_from: 'snapshots' or 'checkpoints', got {opts['rollback_from']!r}")
    return opts


def guard_state(gopt) -> dict:
    """What an adapter saves in the framework's checkpoint."""
    return {"guard": gopt.guard.state_dict(), "step": gopt.step_count, "rollbacks": gopt.rollbacks}


def load_guard_state(gopt, st: dict) -> None:
    gopt.guard.load_state_dict(st["guard"])
    gopt.step_count = int(st["step"])
    gopt.rollbacks = int(st.get("rollbacks", 0))
    gopt.snapshots.clear()
    gopt.snapshots.put(gopt.step_count, gopt._capture())
