"""keel's guard around any torch optimizer: skip, LR back-off and rollback inside your loop.

    opt = keel.torch.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4),
                                      model=model, scheduler=sched, snapshot_every=100)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        action = opt.step(loss, gn)        # decides, then steps (or not) and steps the scheduler
        opt.zero_grad()

- skip: weights and optimizer state are untouched (the optimizer's step is not called);
- lr_backoff: every param group's LR is scaled by the factor for the update, then put back,
  so it works with any scheduler;
- rollback: model, optimizer, scheduler and RNG state come back from the newest snapshot
  older than the incident (kept every `snapshot_every` steps, `keep` of them, in memory or
  under `snapshot_dir`); the data loader moves on past the bad batches;
- give_up: raises keel.GaveUp.

Distributed (DDP/FSDP): pass the local loss tensor. keel averages the loss and the gradient
norm over the ranks in one all_reduce of two numbers (the one host sync of the step), so every
rank sees the same values and takes the same action with no further communication. Values
passed as Python floats are taken as already global (no communication at all).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Callable, Optional

import torch

from . import Action, GaveUp, Guard

__all__ = ["GuardedOptimizer", "Snapshots"]


def _clone(x):
    """Deep copy of a (nested) state dict with tensors cloned to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        st["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:
        pass
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = st["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


class Snapshots:
    """The last `keep` training states, in memory or on disk. A disk snapshot is written to a
    temporary file in its directory, fsynced and renamed, so a crash never leaves a
    half-written one under a snapshot's name. The initial state (step 0) is kept too, so a
    rollback always has a target (as `keel train` falls back to the initial weights)."""

    def __init__(self, keep: int = 2, directory: Optional[os.PathLike] = None):
        if keep < 1:
            raise ValueError(f"keep: must be at least 1, got {keep}")
        self.keep = keep
        self.dir = None if directory is None else os.fspath(directory)
        self._mem: dict[int, dict] = {}
        self._disk: dict[int, str] = {}
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)

    @property
    def steps(self) -> list:
        return sorted(self._disk if self.dir is not None else self._mem)

    def put(self, step: int, state: dict) -> None:
        if self.dir is None:
            self._mem[step] = state
        else:
            final = os.path.join(self.dir, f"step-{step:08d}.pt")
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._disk[step] = final
        self._prune()

    def _prune(self) -> None:
        # keep the initial state and the `keep` newest
        victims = [s for s in self.steps if s != 0][: -self.keep]
        for s in victims:
            if self.dir is None:
                del self._mem[s]
            else:
                os.unlink(self._disk.pop(s))

    def get(self, step: int) -> dict:
        if self.dir is None:
            return self._mem[step]
        return torch.load(self._disk[step], map_location="cpu", weights_only=True)

    def where(self, step: int) -> str:
        return "memory" if self.dir is None else self._disk[step]

    def newest_before(self, before_step: int) -> int:
        """The newest snapshot older than the incident (step + 1 < before_step, as keel
        train picks its checkpoint), else the oldest kept."""
        ok = [s for s in self.steps if s + 1 < before_step]
        return ok[-1] if ok else self.steps[0]


class GuardedOptimizer:
    """Wraps any torch optimizer (and its LR scheduler) with keel's guard.

    optimizer: the torch optimizer. guard: a keel.Guard, or None to make one from
    `guard_config` ([guard] keys) with `events`. model: whose state_dict a rollback
    restores (default: the optimizer's parameters). scheduler: stepped after every step
    (skipped ones too: the schedule follows the step count, as in keel train) and restored
    by a rollback. snapshot_every / keep / snapshot_dir: the rollback targets.
    reduce: average the loss and gradient norm over ranks when torch.distributed is
    initialised ("auto"), always (True) or never (False).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        guard: Optional[Guard] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        scheduler: Any = None,
        snapshot_every: int = 100,
        keep: int = 2,
        snapshot_dir: Optional[os.PathLike] = None,
        events: Optional[os.PathLike] = None,
        reduce: Any = "auto",
        step_scheduler: bool = True,
        **guard_config: Any,
    ):
        if guard is None:
            guard = Guard(events=events, **guard_config)
        elif guard_config or events is not None:
            raise ValueError("give either guard= or guard keyword arguments (and events=), not both")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every: must be at least 1, got {snapshot_every}")
        self.optimizer = optimizer
        self.guard = guard
        self.model = model
        self.scheduler = scheduler
        self.snapshot_every = snapshot_every
        self.reduce = reduce
        self.step_scheduler = step_scheduler
        self.step_count = 0
        self.last_action: Optional[Action] = None
        self._pending_snapshot = False
        self._rank = 0
        if snapshot_dir is not None and self._dist():
            self._rank = torch.distributed.get_rank()
            snapshot_dir = os.path.join(os.fspath(snapshot_dir), f"rank-{self._rank}")
        self.snapshots = Snapshots(keep, snapshot_dir)
        self.snapshots.put(0, self._capture())

    # -- the optimizer's face ------------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        # anything else (add_param_group, defaults, ...) is the wrapped optimizer's
        return getattr(self.__dict__["optimizer"], name)

    # -- reading the step's numbers --------------------------------------------------------
    @staticmethod
    def _dist() -> bool:
        d = torch.distributed
        return d.is_available() and d.is_initialized() and d.get_world_size() > 1

    def _grad_norm(self):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))

    def _read(self, loss, grad_norm, extra: dict) -> tuple:
        """The step's scalars as floats: one host sync (and one all_reduce when distributed)."""
        if grad_norm is None:
            grad_norm = self._grad_norm()
        vals = [loss, grad_norm, *extra.values()]
        tensors = [v for v in vals if isinstance(v, torch.Tensor)]
        if not tensors:
            return tuple(None if v is None else float(v) for v in vals)
        dev = tensors[0].device
        t = torch.stack(
            [
                (v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float("nan") if v is None else float(v)))
                .to(dev)
                for v in vals
            ]
        )
        if self.reduce is True or (self.reduce == "auto" and self._dist()):
            # gloo has no AVG: sum, then divide (exact for identical values on 2^k ranks,
            # and the same on every rank in any case)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t = t / torch.distributed.get_world_size()
        out = t.tolist()
        return tuple(None if v is None else x for v, x in zip(vals, out))

    # -- the step ----------------------------------------------------------------------------
    def step(self, loss, grad_norm=None, closure: Optional[Callable] = None, **extra) -> Action:
        """Decide about this step from its loss and (pre-clip) gradient norm, then apply the
        update or not. Returns the Action; raises keel.GaveUp when the guard gives up."""
        return self._guarded_step(loss, grad_norm, extra, lambda: self.optimizer.step(closure))

    def _guarded_step(self, loss, grad_norm, extra: dict, apply: Callable) -> Action:
        s = self.step_count + 1
        vals = self._read(loss, grad_norm, extra)
        act = self.guard.observe(s, vals[0], vals[1], **dict(zip(extra, vals[2:])))
        self.step_count = s
        self.last_action = act
        if act.kind == "give_up":
            raise GaveUp(act.diagnosis or "the guard gave up", s)
        if act.kind == "rollback":
            self._rollback(act.rollback_before, s)
            return act
        if not act.skip:
            self._apply(apply, act.lr_factor)
        if self.step_scheduler and self.scheduler is not None:
            self.scheduler.step()
        self._maybe_snapshot(s)
        return act

    def _apply(self, apply: Callable, factor: float) -> None:
        if factor == 1.0:
            apply()
            return
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g, lr in zip(groups, saved):
            g["lr"] = lr * factor
        try:
            apply()
        finally:
            # the scheduler keeps owning the LR: the back-off applies to this update only
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    # -- snapshots and rollback ----------------------------------------------------------
    def _capture(self) -> dict:
        st = {
            "step": self.step_count,
            "optimizer": _clone(self.optimizer.state_dict()),
            "rng": _rng_state(),
            "guard": self.guard._core.state_json(),  # its detector windows come back with the weights
        }
        if self.model is not None:
            st["model"] = _clone(self.model.state_dict())
        else:
            st["params"] = [p.detach().to("cpu", copy=True) for g in self.optimizer.param_groups for p in g["params"]]
        if self.scheduler is not None:
            st["scheduler"] = _clone(self.scheduler.state_dict())
        return st

    def _maybe_snapshot(self, s: int) -> None:
        if s % self.snapshot_every == 0:
            self._pending_snapshot = True
        # an open incident means the weights may already be damaged: wait for a quiet step
        if self._pending_snapshot and not self.guard.in_incident:
            self.snapshots.put(s, self._capture())
            self._pending_snapshot = False

    def _rollback(self, before_step: int, s: int) -> None:
        target = self.snapshots.newest_before(before_step)
        st = self.snapshots.get(target)
        with torch.no_grad():
            if "model" in st:
                self.model.load_state_dict(st["model"])
            else:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                for p, v in zip(params, st["params"]):
                    p.copy_(v)
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and "scheduler" in st:
            self.scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        self.guard._core.restore_detectors_json(st["guard"])
        self._pending_snapshot = False
        self.guard.log_event(
            s,
            "restored",
            {"to_step": target, "from": self.snapshots.where(target), "reason": f"incident began at step {before_step}"},
        )

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer's state plus the guard's and the step count: save it in your
        checkpoint and a resumed run guards exactly as before."""
        return {"optimizer": self.optimizer.state_dict(), "guard": self.guard.state_dict(), "step": self.step_count}

    def load_state_dict(self, d: dict) -> None:
        if "guard" not in d:
            # a plain optimizer state dict
            self.optimizer.load_state_dict(d)
            return
        self.optimizer.load_state_dict(d["optimizer"])
        self.guard.load_state_dict(d["guard"])
        self.step_count = int(d["step"])
        self.snapshots.put(self.step_count, self._capture())
