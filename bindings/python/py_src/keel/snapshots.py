"""keel's rollback targets: in-memory or on-disk snapshots of the training state, and the
trainer's own checkpoints registered as targets.

Cost of an in-memory snapshot: a full host copy of what the optimizer updates. For fp32
weights with AdamW that is 4 bytes of weights plus 8 of the two moments, 12 bytes per
parameter (AdamW's step counters are a few bytes per tensor, the RNG state ~10 kB); `keep`
+ 1 of them are held: the `keep` newest and the base taken at the first step, never pruned
(weights only, 4 bytes per parameter, in a fresh run: AdamW has no state before its first
step; 12 when training resumed). At the default keep=2 that is 28 bytes per parameter from
the start (36 after a resume): 290 MB on a 10.4M-parameter model, 2 TB on a 70B one.
`snapshot_dir=` moves them to disk (one host staging copy stays for the background write),
`snapshot_format="dcp"` writes each rank's shards only, and `rollback_from="checkpoints"`
keeps none beyond the base: a rollback then loads the newest checkpoint the trainer itself
saved before the incident.

The copy does not stall the loop (`snapshot_async=True`, the default): the snapshot of step
s is started at the end of step s (CUDA tensors: into pinned host buffers on a side stream,
non_blocking, with an event; CPU tensors: on a background thread, torch's copies release
the GIL) and the next thing that writes the weights or the optimizer state (the next step's
update, a rollback, `state_dict()`/`load_state_dict()`) waits for it first, so the snapshot
is exactly step s's state while step s+1's forward and backward run. Host buffers are reused
from snapshot to snapshot (the one pruned gives its buffers to the next). Model buffers
(BatchNorm's running statistics: a forward writes them) are copied at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Optional

import torch


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
            if self.base is None:
                self.base = step
            self._prune()
        else:
            self.record(step, self.write(step, state))

    def write(self, step: int, state: dict) -> str:
        """Write a disk snapshot under its final name (temporary file, fsync, rename) and
        return the path; touches no bookkeeping, so it may run on a background thread."""
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
        return final

    def record(self, step: int, path: str) -> None:
        """Add a written disk snapshot to the history (and prune)."""
        self._disk[step] = path
        if self.base is None:
            self._load(path)
            self.base = step
        self._prune()

    def evict_for_next(self) -> Optional[dict]:
        """Memory snapshots: remove now the one the next put would prune and return it (its
        host buffers take the next copy). Pruning it before the next snapshot is complete
        changes nothing: a rollback waits for that snapshot, which would prune it first."""
        if self.dir is not None or self.base is None:
            return None
        rest = [s for s in self.steps if s != self.base]
        if len(rest) < self.keep:
            return None
        return self._mem.pop(rest[0])

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
            # tensors, numbers, strings and containers only (RNG, guard, scheduler state): a
            # file planted in the snapshot directory cannot run code when it is read
            rest = torch.load(os.path.join(path, f"rest-rank{_rank()}.pt"), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _read_failed(path, e) from e
        return {**rest, "model": sd["model"], "optimizer": sd["optimizer"], "dcp": True}


# -- copying a snapshot without stalling the loop ------------------------------------------


def _tensors(x, out: list) -> list:
    """The tensors of a (nested) state dict, in the order `_rebuild` visits them."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors(v, out)
    return out


def _rebuild(x, it):
    """A copy of the (nested) state dict's structure with its tensors taken from `it`."""
    if isinstance(x, torch.Tensor):
        return next(it)
    if isinstance(x, dict):
        return {k: _rebuild(v, it) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rebuild(v, it) for v in x)
    return x


def nbytes(state) -> int:
    """Bytes held by the tensors of a (nested) state dict (a snapshot's host memory)."""
    return sum(t.numel() * t.element_size() for t in _tensors(state, []))


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # one host tensor's copy on the background thread (a seam the tests slow down). A torch
    # copy_ there runs a parallel region from a second thread: a second OpenMP team whose
    # threads spin after it, and on a CPU machine they took the cores from training (measured:
    # the next 60 steps of a small nanoGPT at 83-113 ms instead of 52-54). numpy's copy is one
    # thread and lets go of the GIL; torch's own copy stays for what numpy cannot view.
    if _np is not None and dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype \
            and dst.shape == src.shape and src.device.type == "cpu" and dst.device.type == "cpu":
        try:
            _np.copyto(dst.view(-1).view(torch.uint8).numpy(), src.detach().view(-1).view(torch.uint8).numpy())
            return
        except (RuntimeError, TypeError, ValueError):
            pass
    dst.copy_(src)


try:
    import numpy as _np
except ImportError:  # torch runs without numpy: its own copy then
    _np = None


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keel-snapshot")
    return _pool


def _key(t: torch.Tensor, pinned: bool) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, pinned)


def _host_buffer(src: torch.Tensor, pinned: bool) -> torch.Tensor:
    if not pinned:
        return torch.empty_like(src, device="cpu")  # same strides when src is dense
    if src.is_contiguous():
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    return torch.empty_like(src, device="cpu").pin_memory()


class _Job:
    __slots__ = ("step", "state", "future", "events", "buffers")

    def __init__(self, step, state, future, events, buffers):
        self.step, self.state, self.future, self.events, self.buffers = step, state, future, events, buffers


class Stager:
    """Copies a snapshot to host memory behind the loop's back: CUDA tensors into pinned
    buffers on a side stream (non_blocking, an event marks the end), CPU tensors on a
    background thread; a disk snapshot's `torch.save` runs on that thread too. One copy is
    in flight at a time; `wait()` blocks until it is complete (and raises its error)."""

    def __init__(self):
        self.job: Optional[_Job] = None
        self.spare: list = []  # a finished disk write's buffers, for the next snapshot
        self._streams: dict = {}

    @staticmethod
    def can_stage(tensors) -> bool:
        """Plain CPU or CUDA tensors only: a DTensor (FSDP2 shards) is copied synchronously."""
        return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type in ("cpu", "cuda") for t in tensors)

    def start(
        self,
        step: int,
        live: dict,
        now: dict,
        reuse: list,
        eager: Callable[[torch.Tensor], bool] = lambda t: False,
        write: Optional[Callable[[int, dict], str]] = None,
    ) -> None:
        """Start copying `live` (a state dict of references to the live tensors). `now`: the
        snapshot's parts already copied; `reuse`: host tensors to copy into where shape,
        strides and dtype match; `eager(t)`: tensors to copy now, on this thread (those the
        next forward writes); `write(step, state)`: run on the thread once the copy is done
        (a disk snapshot)."""
        assert self.job is None, "wait() for the snapshot in flight first"
        pool: dict = {}
        for b in reuse:
            pool.setdefault(_key(b, b.is_pinned() if torch.cuda.is_available() else False), []).append(b)
        src = _tensors(live, [])
        dst = []
        for t in src:
            pinned = t.is_cuda
            free = pool.get(_key(t, pinned))
            dst.append(free.pop() if free else _host_buffer(t, pinned))
        host, cuda = [], {}
        for d, t in zip(dst, src):
            if t.is_cuda:
                cuda.setdefault(t.device, []).append((d, t))
            elif eager(t):
                d.copy_(t)
            else:
                host.append((d, t))
        events = []
        for device, pairs in cuda.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            # after everything queued so far (step s's update), beside what comes next
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for d, t in pairs:
                    if eager(t):
                        d.copy_(t)
                    else:
                        d.copy_(t, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events.append(ev)
        state = {**now, **_rebuild(live, iter(dst))}

        def run():
            for d, t in host:
                _copy(d, t)
            if write is not None:
                for ev in events:
                    ev.synchronize()
                return write(step, state)
            return None

        future = _executor().submit(run) if host or write is not None else None
        self.job = _Job(step, state, future, events, dst if write is not None else None)

    @property
    def busy(self) -> bool:
        return self.job is not None

    def wait(self) -> Optional[tuple]:
        """Block until the copy in flight is complete: (step, state, the written path or
        None), or None when nothing is in flight. Raises the copy's or the write's error."""
        job, self.job = self.job, None
        if job is None:
            return None
        try:
            for ev in job.events:
                ev.synchronize()
            path = job.future.result() if job.future is not None else None
        finally:
            if job.buffers is not None:
                self.spare = job.buffers  # the file holds the state now: the buffers are free
        return job.step, job.state, path


# -- the trainer's own checkpoints as rollback targets ------------------------------------


def _ckpt_read_failed(path, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"{path}: the checkpoint registered as a rollback target cannot be loaded "
        f"({type(e).__name__}: {e}); it was moved, deleted or overwritten after it was registered"
    )


def load_torch_checkpoint(path: str, model, optimizer) -> None:
    """A `torch.save`d dict {"model": model.state_dict(), "optimizer": opt.state_dict(), ...}
    (the optimizer's state dict may be GuardedOptimizer.state_dict()'s), loaded in place."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck or "optimizer" not in ck:
        keys = sorted(ck) if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(
            f"expected a dict with 'model' (model.state_dict()) and 'optimizer' (the optimizer's "
            f"state_dict()), got {keys}; for another layout register it with load=your_loader"
        )
    with torch.no_grad():
        model.load_state_dict(ck["model"])
    optimizer.load_state_dict({k: v for k, v in ck["optimizer"].items() if k != "keel"})


def load_dcp_checkpoint(path: str, model, optimizer) -> None:
    """A `torch.distributed.checkpoint` directory written as
    `dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path)` with
    `msd, osd = get_state_dict(model, optimizer)` (FSDP2's shards stay sharded), loaded in place
    by every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optimizer": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


class Checkpoint:
    """One registered checkpoint: where it is, how to load it, and the small state keel keeps
    for it (the guard's detector windows and the scheduler's state when it was saved)."""

    __slots__ = ("step", "path", "format", "load", "guard", "scheduler")

    def __init__(self, step, path, format, load, guard, scheduler):
        self.step, self.path, self.format, self.load = step, path, format, load
        self.guard, self.scheduler = guard, scheduler

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def describe(self) -> dict:
        """What a resume needs to register it again (formats keel loads itself only)."""
        return {"path": self.path, "format": self.format, "guard": self.guard, "scheduler": self.scheduler}


class Checkpoints:
    """The trainer's own checkpoints registered as rollback targets, the `keep` newest: no
    copy, only the path and a few kilobytes of guard and scheduler state each. A checkpoint
    whose file is gone (a trainer's rotation deleted it) is no longer a target; registering a
    path again (a file overwritten in place, Lightning's last.ckpt) replaces the older entry."""

    FORMATS = ("torch", "dcp")

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._at: dict[int, Checkpoint] = {}

    @property
    def steps(self) -> list:
        self._forget_missing()
        return sorted(self._at)

    def add(self, c: Checkpoint) -> None:
        old = self._at.get(c.step)
        if old is not None and old.exists():
            # one state saved twice (Lightning's epoch=..-step=N.ckpt, then last.ckpt): keep the
            # first, so overwriting the second later leaves this step a target
            return
        self._at[c.step] = c
        for s in sorted(self._at)[: -self.keep]:
            del self._at[s]

    def forget(self, path) -> None:
        """Forget every entry at `path` (its file is being or was overwritten)."""
        p = os.path.abspath(os.fspath(path))
        for s in [s for s, c in self._at.items() if os.path.abspath(c.path) == p]:
            del self._at[s]

    def _forget_missing(self) -> None:
        for s in [s for s, c in self._at.items() if not c.exists()]:
            del self._at[s]

    def get(self, step: int) -> Checkpoint:
        return self._at[step]

    def clear(self) -> None:
        self._at.clear()


def pick(snapshots: list, checkpoints: list, before_step: int) -> int:
    """The newest target older than the incident (step + 1 < before_step, as keel train picks
    its checkpoint), else the oldest one; among in-memory/disk snapshots and registered
    checkpoints together."""
    both = sorted(set(snapshots) | set(checkpoints))
    ok = [s for s in both if s + 1 < before_step]
    return ok[-1] if ok else both[0]
