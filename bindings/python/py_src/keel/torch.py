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

Distributed: pass the local loss tensor and the norm `clip_grad_norm_` returned (global under
DDP and FSDP). keel averages the two over the ranks in one all_reduce (the one host sync of
the step), so every rank sees the same values and takes the same action with no further
communication; extra metrics (max_attn_logit, logit_z) take the largest over the ranks.
Values passed as Python floats are taken as already global (no communication at all).
Snapshots hold `model.state_dict()` as the model gives it (under FSDP configure it to give
sharded state) and are per rank, taken at the same steps on every rank.

After a rollback the scheduler is at the snapshot's step: the schedule is replayed from there
(keel train instead keeps the schedule on the step count); the step count goes on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Optional

import torch

from . import Action, GaveUp, Guard

__all__ = ["GuardedOptimizer", "Snapshots", "grad_norm"]


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate

        return DTensor, Partial, Replicate
    except ImportError:  # torch without DTensor: nothing is sharded
        return None, None, None


def _as_local(v):
    """A scalar that may be a DTensor (FSDP2's `clip_grad_norm_` returns one) as a plain
    tensor holding the global value. A replicated DTensor already holds it on every rank (no
    communication); a partial one (a sum still to be reduced) costs one collective."""
    DTensor, Partial, Replicate = _dtensor_types()
    if DTensor is None or not isinstance(v, DTensor):
        return v
    if all(isinstance(p, Replicate) for p in v.placements):
        return v.to_local()
    return v.full_tensor()


def _local_grads(params):
    """Each gradient as this rank's local tensor, and whether any was sharded."""
    DTensor, _, _ = _dtensor_types()
    out, sharded = [], False
    for p in params:
        g = p.grad
        if g is None:
            continue
        if DTensor is not None and isinstance(g, DTensor):
            sharded = True
            g = g.to_local()
        out.append(g.detach())
    return out, sharded


def grad_norm(params):
    """Global L2 norm of the parameters' gradients, for unsharded gradients (under FSDP,
    GuardedOptimizer reduces the shards' squared norms itself, or pass the norm
    `clip_grad_norm_` returns)."""
    grads, _ = _local_grads(params)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


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


def _save_synced(obj, f) -> None:
    torch.save(obj, f)
    f.flush()
    os.fsync(f.fileno())


def _write_failed(path, e: OSError, fix: str = "pass snapshot_dir= on another disk (or None for memory)") -> OSError:
    return OSError(e.errno, f"{path}: writing keel's rollback snapshot failed ({e.strerror or e}); free disk space or {fix}")


def _read_failed(path, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"{path}: keel's rollback snapshot cannot be read ({type(e).__name__}: {e}); it was "
        f"truncated or damaged after it was written"
    )


class Snapshots:
    """The last `keep` training states, in memory or on disk. A disk snapshot is written to a
    temporary file in its directory, fsynced and renamed, so a crash never leaves a
    half-written one under a snapshot's name. The first state put (the initial one, or the
    one a resume starts from) is kept too, so a rollback always has a target (as `keel train`
    falls back to the initial weights). The first disk snapshot is read back at once, so a
    state that cannot be reloaded fails now, not at the rollback that needs it."""

    def __init__(self, keep: int = 2, directory: Optional[os.PathLike] = None):
        if keep < 1:
            raise ValueError(f"keep: must be at least 1, got {keep}")
        self.keep = keep
        self.dir = None if directory is None else os.fspath(directory)
        self._mem: dict[int, dict] = {}
        self._disk: dict[int, str] = {}
        self.base: Optional[int] = None
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
                    _save_synced(state, f)
                os.replace(tmp, final)
            except OSError as e:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise _write_failed(final, e) from e
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._disk[step] = final
            if self.base is None:
                self._load(final)
        if self.base is None:
            self.base = step
        self._prune()

    def clear(self, but: Optional[int] = None) -> None:
        """Forget every snapshot (a resume starts a new history), except step `but`."""
        for s in self.steps:
            if s != but:
                self._drop(s)
        self.base = None

    def _drop(self, s: int) -> None:
        if self.dir is None:
            del self._mem[s]
        else:
            os.unlink(self._disk.pop(s))

    def _prune(self) -> None:
        # keep the base state and the `keep` newest
        for s in [s for s in self.steps if s != self.base][: -self.keep]:
            self._drop(s)

    @staticmethod
    def _load(path: str) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _read_failed(path, e) from e

    def get(self, step: int) -> dict:
        if self.dir is None:
            return self._mem[step]
        return self._load(self._disk[step])

    def where(self, step: int) -> str:
        return "memory" if self.dir is None else self._disk[step]

    def newest_before(self, before_step: int) -> int:
        """The newest snapshot older than the incident (step + 1 < before_step, as keel
        train picks its checkpoint), else the oldest kept."""
        ok = [s for s in self.steps if s + 1 < before_step]
        return ok[-1] if ok else self.steps[0]


def _barrier() -> None:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


class DcpSnapshots(Snapshots):
    """Snapshots as `torch.distributed.checkpoint` directories, the format FSDP users already
    checkpoint in: every rank writes its own shards of the model and optimizer state (collected
    with `get_state_dict`, so FSDP2's DTensors stay sharded), plus a small per-rank file with
    the RNG, scheduler and guard state. A snapshot is written under a temporary name and
    renamed by rank 0 once every rank has finished, so a crash never leaves a half-written
    one under a snapshot's name. `get` loads into the live model and optimizer's layout."""

    def __init__(self, keep: int, directory: os.PathLike, model, optimizer):
        super().__init__(keep, directory)
        self._model, self._optimizer = model, optimizer
        for name in sorted(os.listdir(self.dir)):
            # snapshots of an earlier process in this directory are not this run's history
            if name.startswith(".tmp-step-") and _rank() == 0:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def put(self, step: int, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        final = os.path.join(self.dir, f"step-{step:08d}")
        tmp = os.path.join(self.dir, f".tmp-step-{step:08d}")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        try:
            dcp.save({"model": state["model"], "optimizer": state["optimizer"]}, checkpoint_id=tmp)
            rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            with open(os.path.join(tmp, f"rest-rank{_rank()}.pt"), "wb") as f:
                _save_synced(rest, f)
        except OSError as e:
            raise _write_failed(tmp, e, "pass snapshot_dir= on another disk") from e
        _barrier()
        if _rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        _barrier()
        self._disk[step] = final
        if self.base is None:
            self.base = step
        self._prune()

    def adopt(self, step: int, path: str) -> None:
        """Make an existing snapshot directory (a resume's rollback base) part of the history."""
        self._disk[step] = path
        if self.base is None:
            self.base = step

    def _drop(self, s: int) -> None:
        path = self._disk.pop(s)
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)

    def get(self, step: int) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = self._disk[step]
        msd, osd = get_state_dict(self._model, self._optimizer)
        sd = {"model": msd, "optimizer": osd}
        try:
            dcp.load(sd, checkpoint_id=path)
            rest = torch.load(os.path.join(path, f"rest-rank{_rank()}.pt"), map_location="cpu", weights_only=False)
        except Exception as e:
            raise _read_failed(path, e) from e
        return {**rest, "model": sd["model"], "optimizer": sd["optimizer"], "dcp": True}


class GuardedOptimizer:
    """Wraps any torch optimizer (and its LR scheduler) with keel's guard.

    optimizer: the torch optimizer. guard: a keel.Guard, or None to make one from
    `guard_config` ([guard] keys) with `events`. model: whose state_dict a rollback
    restores (default: the optimizer's parameters). scheduler: stepped after every step
    (skipped ones too: the schedule follows the step count, as in keel train) and restored
    by a rollback. snapshot_every / keep / snapshot_dir: the rollback targets.
    probe_attention: measure the model's exact max attention logit (keel.probe) on every
    step of the guard's early window, then every `probe_every` steps, and feed it to the
    guard (its early attention-logit rule); off by default.
    snapshot_format: "torch" (one `torch.save` file per snapshot, per rank when distributed)
    or "dcp" (`torch.distributed.checkpoint` directories shared by the ranks, sharded state
    stays sharded: FSDP2's format; needs snapshot_dir and model).
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
        snapshot_format: str = "torch",
        probe_attention: bool = False,
        probe_every: int = 10,
        events: Optional[os.PathLike] = None,
        reduce: Any = "auto",
        step_scheduler: bool = True,
        **guard_config: Any,
    ):
        if snapshot_format not in ("torch", "dcp"):
            raise ValueError(f"snapshot_format: 'torch' or 'dcp', got {snapshot_format!r}")
        if snapshot_format == "dcp" and (snapshot_dir is None or model is None):
            raise ValueError("snapshot_format='dcp' writes torch.distributed.checkpoint directories: give snapshot_dir= and model=")
        if guard is None:
            if events is not None and self._dist() and torch.distributed.get_rank() != 0:
                events = None  # every rank decides alike; rank 0 writes the one events file
            try:
                guard = Guard(events=events, **guard_config)
            except ValueError as e:
                raise ValueError(
                    f"{e} (GuardedOptimizer's own arguments: guard, model, scheduler, snapshot_every, keep, "
                    "snapshot_dir, snapshot_format, probe_attention, probe_every, events, reduce, step_scheduler)"
                ) from None
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
        self._dcp = snapshot_format == "dcp"
        if self._dcp:
            self.snapshots = DcpSnapshots(keep, snapshot_dir, model, optimizer)
        else:
            if snapshot_dir is not None and self._dist():
                self._rank = torch.distributed.get_rank()
                snapshot_dir = os.path.join(os.fspath(snapshot_dir), f"rank-{self._rank}")
            self.snapshots = Snapshots(keep, snapshot_dir)
        # the base snapshot is taken at the first step, not here: a wrapper made before
        # DDP(...) broadcasts rank 0's weights would otherwise keep each rank's own
        # pre-broadcast weights, and a rollback to them would leave the ranks different
        self._loss = None
        # the exact max attention logit of the live model, fed to the guard's early rule:
        # measured on every step of the guard's early window, then every `probe_every`
        self._probe = None
        self.probe_every = max(1, int(probe_every))
        self._early = int(self.guard.config.get("early_window", 0))
        self._probe_until = 0
        if probe_attention:
            if model is None:
                raise ValueError("probe_attention=True measures the model's attention: give model=")
            from .probe import AttentionProbe

            self._probe = AttentionProbe(model)

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
        return grad_norm(p for g in self.optimizer.param_groups for p in g["params"])

    def _read(self, loss, grad_norm, extra: dict) -> tuple:
        """The step's scalars as floats: one host sync (and one all_reduce when distributed)."""
        sq = False  # grad_norm holds this rank's sum of squares over its shards (FSDP)
        if grad_norm is None:
            grads, sharded = _local_grads(p for g in self.optimizer.param_groups for p in g["params"])
            if sharded:
                # sharded gradients: each rank's squared norm, summed in the one all_reduce
                sq = True
                grad_norm = sum((g.float().pow(2).sum() for g in grads), torch.zeros(()))
            else:
                grad_norm = self._grad_norm()
        loss, grad_norm = _as_local(loss), _as_local(grad_norm)
        extra = {k: _as_local(v) for k, v in extra.items()}
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
            dist = torch.distributed
            if len(vals) > 2:  # max_attn_logit / logit_z: the largest over the ranks
                extra_t = t[2:].clone()
                dist.all_reduce(extra_t, op=dist.ReduceOp.MAX)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            n = dist.get_world_size()
            # the loss is averaged; shards' squared norms add up to the squared global norm
            t = torch.stack([t[0] / n, t[1].sqrt() if sq else t[1] / n, *t[2:] / n])
            if len(vals) > 2:
                t = torch.cat([t[:2], extra_t])
        elif sq:
            t = torch.stack([t[0], t[1].sqrt(), *t[2:]])
        out = t.tolist()
        return tuple(None if v is None else x for v, x in zip(vals, out))

    # -- the step ----------------------------------------------------------------------------
    def record(self, loss) -> None:
        """Record this step's loss (a tensor, summed or averaged as your loop logs it) for a
        `step()` called without one: one line beside `loss.backward()`, so `scaler.step(opt)`,
        an `accelerator`-wrapped step or a plain `opt.step()` pass straight through."""
        self._loss = loss if self._loss is None or not isinstance(loss, torch.Tensor) else self._loss + loss

    def step(self, loss=None, grad_norm=None, closure: Optional[Callable] = None, **extra) -> Action:
        """Decide about this step from its loss and (pre-clip) gradient norm, then apply the
        update or not. Returns the Action; raises keel.GaveUp when the guard gives up.

        The loss: given here, else what `record()` collected since the last step, else what
        `closure()` returns (Lightning-style closures run forward and backward; they are
        called once, here). The norm: given, else measured from the gradients."""
        if loss is None and self._loss is None and closure is not None:
            with torch.enable_grad():
                loss = closure()
            closure = None
        if loss is None:
            loss = self._loss
        if loss is None:
            raise ValueError(
                "GuardedOptimizer.step(): no loss for this step; pass it (opt.step(loss)) or call "
                "opt.record(loss) beside loss.backward()"
            )
        self._loss = None
        return self._guarded_step(loss, grad_norm, extra, lambda: self.optimizer.step(closure))

    def _probing(self, step: int) -> bool:
        return step <= max(self._early, self._probe_until) or step % self.probe_every == 0

    def _guarded_step(self, loss, grad_norm, extra: dict, apply: Callable) -> Action:
        if self._probe is not None:
            m = self._probe.take()
            if m is not None and "max_attn_logit" not in extra:
                extra = {**extra, "max_attn_logit": m}
        if not self.snapshots.steps:
            # the ranks agree by now (DDP broadcast at its construction, or a resume loaded)
            self.snapshots.put(self.step_count, self._capture())
        s = self.step_count + 1
        vals = self._read(loss, grad_norm, extra)
        act = self.guard.observe(s, vals[0], vals[1], **dict(zip(extra, vals[2:])))
        self.step_count = s
        if self._probe is not None:
            # the early rule's window restarts at a rollback: so does measuring every step
            if act.kind == "rollback":
                self._probe_until = s + self._early
            self._probe.on = self._probing(s + 1)  # for the next step's forward
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
        if self._dcp:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            # written at once by DcpSnapshots.put, each rank its own shards: no copy
            st["model"], st["optimizer"] = get_state_dict(self.model, self.optimizer)
        elif self.model is not None:
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
        if st.get("dcp"):
            from torch.distributed.checkpoint.state_dict import set_state_dict

            # loaded from disk into fresh state dicts: nothing is shared with the snapshot
            set_state_dict(self.model, self.optimizer, model_state_dict=st["model"], optim_state_dict=st["optimizer"])
        else:
            with torch.no_grad():
                if "model" in st:
                    self.model.load_state_dict(st["model"])
                else:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    for p, v in zip(params, st["params"]):
                        p.copy_(v)
            # copies: load_state_dict keeps tensors whose dtype and device already match, and
            # the next step would then write into the snapshot a later rollback needs
            self.optimizer.load_state_dict(_clone(st["optimizer"]))
        if self.scheduler is not None and "scheduler" in st:
            self.scheduler.load_state_dict(_clone(st["scheduler"]))
        # The RNG is not restored: a sampler drawing from it (nanoGPT's torch.randint) would
        # replay the batches since the snapshot, the incident's among them. The loop moves on
        # to new batches, as keel train's data cursor does.
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
        checkpoint and a resumed run guards exactly as before. Saved while an incident is
        open, it also carries the clean snapshot a rollback of that incident would restore
        (`rollback_base`), so the resumed run rolls back to the same state as the
        uninterrupted one, never to the state it resumed from."""
        # the wrapped optimizer's own state dict, keel's part under its own key: it loads
        # into the raw optimizer too (torch ignores the extra key), as resume code expects
        d = dict(self.optimizer.state_dict())
        k = {"guard": self.guard.state_dict(), "step": self.step_count, "pending_snapshot": self._pending_snapshot}
        d["keel"] = k
        if self.guard.in_incident:
            start = json.loads(self.guard._core.state_json())["policy"].get("incident_start")
            if start is not None:
                t = self.snapshots.newest_before(start)
                if self._dcp:
                    # the snapshot directory stays on disk: a reference is enough
                    k["rollback_base"] = {"step": t, "dcp_path": self.snapshots.where(t)}
                else:
                    k["rollback_base"] = {"step": t, "state": self.snapshots.get(t)}
        return d

    def load_state_dict(self, d: dict) -> None:
        """Resume: restore the optimizer, the guard and the step count, and start the snapshot
        history from here (load the model's weights first: the resumed state is the new
        rollback base)."""
        if not isinstance(d, dict) or ("guard" not in d and "state" not in d):
            keys = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(
                f"GuardedOptimizer.load_state_dict: expected what GuardedOptimizer.state_dict() or an "
                f"optimizer's state_dict() returns (keys state/param_groups[/keel], or the older "
                f"optimizer/guard/step); got {keys}"
            )
        if "guard" in d:
            # the older layout: {optimizer, guard, step}
            k = {kk: d[kk] for kk in ("guard", "step", "pending_snapshot", "rollback_base") if kk in d}
            self.optimizer.load_state_dict(d["optimizer"])
        else:
            # the optimizer's own state dict, with keel's part under "keel" when it has one
            k = d.get("keel") or {}
            self.optimizer.load_state_dict({kk: v for kk, v in d.items() if kk != "keel"})
        if k:
            self.guard.load_state_dict(k["guard"])
            self.step_count = int(k["step"])
            self._pending_snapshot = bool(k.get("pending_snapshot", False))
        self._loss = None
        base = k.get("rollback_base")
        adopt = base is not None and "dcp_path" in base and self._dcp
        self.snapshots.clear()
        if adopt:
            # saved inside an incident: the clean snapshot before it stays the rollback target
            self.snapshots.adopt(int(base["step"]), base["dcp_path"])
        elif base is not None and "state" in base:
            self.snapshots.put(int(base["step"]), base["state"])
        else:
            self.snapshots.put(self.step_count, self._capture())
