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
- rollback: model, optimizer and scheduler state come back from the newest snapshot
  older than the incident (not the RNG: a sampler drawing from it would replay the
  incident's batches) (kept every `snapshot_every` steps, `keep` of them, in memory or
  under `snapshot_dir`; each a host copy of weights and optimizer state, 12 bytes per fp32
  parameter with AdamW, `keep` + 1 held, copied in the background without stalling the
  loop), or with rollback_from="checkpoints" from the newest checkpoint you saved and
  registered (`opt.register_checkpoint(path)`: nothing copied; see keel.snapshots); the data
  loader moves on past the bad batches;
- give_up: raises keel.GaveUp.

fp16 with a GradScaler, gradient accumulation and the loop's own step numbers:

    for micro in range(accum):
        with torch.autocast("cuda", torch.float16):
            loss = model(**batch).loss / accum
        scaler.scale(loss).backward()
        opt.record(loss, step=iter_num)    # summed over the micro-batches; unscaled
    scaler.unscale_(opt)
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt, grad_norm=gn)         # calls opt.step only when the gradients are finite
    scaler.update()
    opt.zero_grad()                        # ends the step (a scaler-skipped one included)

Steps the scaler skips (no `step()` call between `record()` and `zero_grad()`, or a record
with the next step number) after the first update are counted: `guard.scaler_skips` (10) in
a row are an incident (the scale fell 1000x below one that worked: fp16 runs diverge that way,
with no loss to see), with a warning at half as many. Skips before the first update are the
scaler finding its scale, and a few in a row are ordinary: the guard never sees those.

Every action (a skip, an LR cut, a rollback, a bad batch, giving up) is one line on the
`keel` logger (Python `logging`, WARNING, rank 0): what was seen, what was done, the LR now.

With `model=`, early signals (the max attention logit per layer, the output logZ, the
update/weight ratios) are measured on telemetry steps and fed to the guard: see
GuardedOptimizer and `opt.signals`.

Distributed: pass the local loss tensor and the norm `clip_grad_norm_` returned (global under
DDP and FSDP). keel averages the two over the ranks in one all_reduce (the one host sync of
the step), so every rank sees the same values and takes the same action with no further
communication; extra metrics (max_attn_logit, logit_z) take the largest over the ranks.
Values passed as Python floats are taken as already global (no communication at all).
Snapshots hold `model.state_dict()` as the model gives it (under FSDP configure it to give
sharded state) and are per rank, taken at the same steps on every rank.

After a rollback the scheduler is at the snapshot's step: the schedule is replayed from there
(keel train instead keeps the schedule on the step count); the step count goes on.

keel's run directory and the job's own loggers:

    opt = keel.torch.GuardedOptimizer(adamw, model=model, scheduler=sched, log_dir="runs/exp1",
                                      tokens_per_step=batch * seq)
    ...
    opt.log_val(val_loss, step=it)                 # after an evaluation
    opt.add_event_hook(keel.torch.tensorboard_hook(writer))   # guard events on your charts

`log_dir` makes a RunLogger there: metrics.jsonl (every step's loss and gradient norm as the
guard judged them (pre-clip when the loop passes what `clip_grad_norm_` returned), the LR the
update used (the scheduler's times the guard's factor), skipped flag, tokens, wall time; the
early signals on telemetry steps), telemetry.jsonl (per-layer max attention logit, logZ,
update ratios per tensor group) and events.jsonl (the guard's events), in `keel train`'s
format: `keel report runs/exp1` draws the run, `keel watch runs/exp1/metrics.jsonl` follows
it. Only rank 0 writes. An event hook is called as `hook(step, scalars, text)` after each
step with guard events (`keel/event/<kind>` = 1, `keel/lr_factor`, `keel/rollbacks`; one
sentence per event), on every rank (register it where your logger lives), to put skips,
back-offs and rollbacks on the job's W&B or TensorBoard charts at their step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Optional

import torch

from . import Action, GaveUp, Guard

log = logging.getLogger("keel")

__all__ = ["GuardedOptimizer", "RunLogger", "Snapshots", "event_sentence", "grad_norm", "tensorboard_hook"]


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


from .snapshots import (  # noqa: F401 (re-exported: keel.torch.Snapshots)
    DcpSnapshots,
    Snapshots,
    _barrier,
    _clone,
    _rank,
    _read_failed,
    _rng_state,
    _save_synced,
    _set_rng_state,
    _write_failed,
    _ckpt_read_failed,
    nbytes,
    Checkpoint,
    Checkpoints,
    Stager,
    _tensors,
    load_dcp_checkpoint,
    load_torch_checkpoint,
    pick,
)


# -- keel's run directory ------------------------------------------------------------------
def _num(x) -> Optional[float]:
    """A metric as keel writes it: a float, or None (JSON null) when not finite."""
    x = float(x)
    return x if math.isfinite(x) else None


def _global_rank() -> int:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank()
    # torchrun sets RANK before the process group exists: a logger made first still knows
    return int(os.environ.get("RANK", "0") or 0)


def _param_group(name: str) -> str:
    """The tensor group of keel's telemetry (embed, attn, mlp, norm, head) a parameter belongs
    to, from its name (HF Llama family, torchtitan, nanoGPT and similar); "other" if unknown."""
    parts = name.lower().split(".")
    mods = parts[:-1] if len(parts) > 1 else parts
    if any("norm" in p or p.startswith("ln") for p in mods):
        return "norm"
    if any("embed" in p or p in ("wte", "wpe") for p in mods):
        return "embed"
    if any(p in ("lm_head", "output", "head") for p in mods):
        return "head"
    if any("attn" in p or "attention" in p for p in mods):
        return "attn"
    if any(p in ("mlp", "ffn", "feed_forward", "feedforward") or "mlp" in p for p in mods):
        return "mlp"
    return "other"


def event_sentence(kind: str, detail: Any) -> str:
    """One guard event as a sentence (what `keel report` writes in its events table)."""
    d = detail if isinstance(detail, dict) else {}

    def f(k):
        v = d.get(k)
        return f"{v:.4g}" if isinstance(v, (int, float)) else None

    if kind in ("spike", "divergence", "warning"):
        return (f"{d.get('detector', '')}: {d.get('reason', '')} (value {f('value') or 'not finite'}, "
                f"threshold {f('threshold') or '—'})")
    if kind in ("rollback", "restored") and "to_step" in d:
        if d["to_step"] == 0:
            return f"restored the initial weights ({d.get('reason', '')})"
        return f"restored step {d['to_step']} from {d.get('from', '?')} ({d.get('reason', '')})"
    if kind == "skip":
        return "the update was skipped"
    if kind == "lr_backoff":
        until = d.get("until_step")
        return f"LR × {f('factor') or '?'} " + (f"until step {until}" if until is not None else "from now on")
    if kind == "lr_restore":
        return "LR restored"
    if kind == "lr_cap":
        return f"LR capped at {f('lr') or '?'} from now on"
    for k in ("reason", "diagnosis"):
        if isinstance(d.get(k), str):
            return d[k]
    return json.dumps(detail) if d else ""


class RunLogger:
    """keel's run directory for a PyTorch job: the files `keel train --out DIR` writes, so that
    `keel report DIR` draws the run as it draws a keel run and `keel watch DIR/metrics.jsonl`
    follows it.

        log = keel.torch.RunLogger("runs/exp1")      # or GuardedOptimizer(..., log_dir="runs/exp1")
        log.log_step(step, loss, grad_norm=gn, lr=lr, skipped=False)
        log.log_val(val_loss, step=step)

    metrics.jsonl: one line per step, keel's fields: `step`, `loss`, `lr`, `grad_norm`,
    `skipped`; `tokens` (cumulative) and `tokens_per_s` when the tokens are known
    (`tokens_per_step`, or `tokens=` per step); `elapsed_s` (wall seconds since the logger was
    made, continued across a resume); on telemetry steps `max_attn_logit` (over the layers),
    `logit_z` and `update_ratio` (‖Δw‖/‖w‖ over every parameter); anything else given as a
    number under its own name. Validation losses are lines of their own: `step`, `val_loss`,
    `elapsed_s` (and `tokens`). A metric that is not finite is written as null (keel's
    convention); one not measured is left out.
    telemetry.jsonl: on telemetry steps `step`, `max_attn_logit_per_layer` (a list, null where
    not measured), `logit_z_mean`, `update_ratio` ({group: ‖Δw‖/‖w‖} over keel's groups embed,
    attn, mlp, norm, head, plus "other" for names keel does not know; null on a step with no
    update).
    events.jsonl: guard events (`{"step", "kind", "detail", "time"}`), written by the guard
    GuardedOptimizer makes (events="DIR/events.jsonl"), or by `event()`.

    No config.toml is written: keel's RunConfig describes keel's own trainer and would describe
    this run wrongly; `keel report` draws the curves and events without it.

    Every line is one write(2) of a whole line, unbuffered: a killed job leaves whole lines.
    The first line written drops the lines of that step and later ones already in the files
    (a resumed job re-logs them, as `keel train` does on resume). Only global rank 0 writes
    (`rank=` overrides the detection; on other ranks every method does nothing).
    """

    def __init__(self, dir: os.PathLike, *, tokens_per_step: Optional[int] = None, rank: Optional[int] = None):
        self.dir = os.fspath(dir)
        self.enabled = (_global_rank() if rank is None else int(rank)) == 0
        self.tokens_per_step = tokens_per_step
        self.tokens: Optional[int] = None  # cumulative, once a step's tokens are known
        self._t0 = time.monotonic()
        self._elapsed0 = 0.0
        self._last_t: Optional[float] = None
        self._started = False
        self._fds: dict = {}
        if self.enabled:
            os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- writing -------------------------------------------------------------------------
    def _write(self, name: str, obj: dict) -> None:
        line = (json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n").encode()
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # one write of the whole line (O_APPEND: never interleaved, never half-written by a kill)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]

    def _start(self, step: int) -> None:
        """At the first line: drop lines of this step and later (a resumed or restarted job
        logs them again) and carry on the elapsed time and token count of what is kept."""
        self._started = True
        last = None  # the kept step line of the largest step
        elapsed = 0.0
        for name in ("metrics.jsonl", "telemetry.jsonl"):
            p = self.path(name)
            if not os.path.exists(p):
                continue
            with open(p, "rb") as f:
                lines = f.read().split(b"\n")
            keep, dropped = [], False
            for ln in lines:
                if not ln.strip():
                    continue
                try:
                    s = json.loads(ln).get("step")
                except (ValueError, AttributeError):
                    dropped = True  # a torn line of a killed job
                    continue
                if isinstance(s, (int, float)) and s < step:
                    keep.append(ln)
                    m = json.loads(ln)
                    if name == "metrics.jsonl" and isinstance(m.get("elapsed_s"), (int, float)):
                        elapsed = max(elapsed, float(m["elapsed_s"]))
                    if name == "metrics.jsonl" and "loss" in m and (last is None or s >= last["step"]):
                        last = m
                else:
                    dropped = True
            if dropped:
                tmp = p + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(b"".join(ln + b"\n" for ln in keep))
                os.replace(tmp, p)
        self._elapsed0 = elapsed
        if last is not None and isinstance(last.get("tokens"), (int, float)) and self.tokens is None:
            self.tokens = int(last["tokens"])

    def _elapsed(self) -> float:
        return self._elapsed0 + time.monotonic() - self._t0

    def _begin(self, step: int) -> bool:
        if not self.enabled:
            return False
        if not self._started:
            self._start(int(step))
        return True

    def log_step(self, step: int, loss: Any, *, grad_norm: Any = None, lr: Any = None, skipped: bool = False,
                 tokens: Optional[int] = None, max_attn_logit: Any = None, logit_z: Any = None,
                 update_ratio: Any = None, **extra: Any) -> None:
        """One step's line of metrics.jsonl. `tokens`: this step's tokens (all ranks; default
        `tokens_per_step`); None values are left out; extra keyword numbers are written as
        they are named."""
        if not self._begin(step):
            return
        now = time.monotonic()
        line: dict = {"step": int(step)}
        n = tokens if tokens is not None else self.tokens_per_step
        if n is not None:
            self.tokens = (self.tokens or 0) + int(n)
            line["tokens"] = self.tokens
        line["loss"] = None if loss is None else _num(loss)
        if lr is not None:
            line["lr"] = _num(lr)
        if grad_norm is not None:
            line["grad_norm"] = _num(grad_norm)
        if n is not None:
            dt = now - (self._last_t if self._last_t is not None else self._t0)
            line["tokens_per_s"] = int(n) / dt if dt > 0 else None
        self._last_t = now
        line["elapsed_s"] = self._elapsed()
        for k, v in (("max_attn_logit", max_attn_logit), ("logit_z", logit_z)):
            if v is not None:
                line[k] = _num(v)
        line["skipped"] = bool(skipped)
        if update_ratio is not None:
            line["update_ratio"] = _num(update_ratio)
        for k, v in extra.items():
            if k in line:
                raise ValueError(f"log_step: {k!r} is one of keel's own fields; give it by its keyword")
            if v is not None:
                line[k] = v if isinstance(v, bool) else _num(v)
        self._write("metrics.jsonl", line)

    def log_val(self, val_loss: Any, step: int) -> None:
        """A validation loss at `step` (after that step's update), as a line of its own:
        `keel report` draws it on the loss plot and counts it in the best/last val loss."""
        if not self._begin(step):
            return
        line: dict = {"step": int(step), "val_loss": _num(val_loss), "elapsed_s": self._elapsed()}
        if self.tokens is not None:
            line["tokens"] = self.tokens
        self._write("metrics.jsonl", line)

    def log_telemetry(self, step: int, *, max_attn_logit_per_layer: Optional[list] = None,
                      logit_z_mean: Any = None, update_ratio: Optional[dict] = None, **extra: Any) -> None:
        """A telemetry.jsonl line (keel's per-layer and per-group early signals)."""
        if not self._begin(step):
            return
        line: dict = {"step": int(step)}
        if max_attn_logit_per_layer is not None:
            line["max_attn_logit_per_layer"] = [None if v is None else _num(v) for v in max_attn_logit_per_layer]
        if logit_z_mean is not None:
            line["logit_z_mean"] = _num(logit_z_mean)
        line["update_ratio"] = None if update_ratio is None else {k: _num(v) for k, v in update_ratio.items()}
        line.update(extra)
        self._write("telemetry.jsonl", line)

    def event(self, step: int, kind: str, detail: Optional[dict] = None, time_s: Optional[float] = None) -> None:
        """An events.jsonl line in keel's format."""
        if not self._begin(step):
            return
        self._write("events.jsonl", {"step": int(step), "kind": kind, "detail": detail or {},
                                     "time": time.time() if time_s is None else time_s})

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def tensorboard_hook(writer: Any) -> Callable:
    """An event hook (`GuardedOptimizer.add_event_hook`) writing keel's guard events to
    TensorBoard at their step: the scalars (`keel/event/<kind>` = 1, `keel/lr_factor`,
    `keel/rollbacks`) and the sentences as text under `keel/events`. `writer`: a
    `torch.utils.tensorboard.SummaryWriter` (or anything with add_scalar/add_text), or a log
    directory to make one in."""
    if isinstance(writer, (str, os.PathLike)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"keel.torch.tensorboard_hook({os.fspath(writer)!r}) writes with torch.utils.tensorboard, which "
                f"needs the tensorboard package: pip install tensorboard ({e})"
            ) from None
        writer = SummaryWriter(os.fspath(writer))

    def hook(step: int, scalars: dict, text: str) -> None:
        for k, v in scalars.items():
            writer.add_scalar(k, v, step)
        if text:
            writer.add_text("keel/events", text, step)
        flush = getattr(writer, "flush", None)
        if callable(flush):
            flush()

    return hook


class GuardedOptimizer:
    """Wraps any torch optimizer (and its LR scheduler) with keel's guard.

    optimizer: the torch optimizer. guard: a keel.Guard, or None to make one from
    `guard_config` ([guard] keys) with `events`. model: whose state_dict a rollback
    restores (default: the optimizer's parameters). scheduler: stepped after every step
    (skipped ones too: the schedule follows the step count, as in keel train) and restored
    by a rollback. snapshot_every / keep / snapshot_dir: the rollback targets.
    snapshot_async: copy a snapshot behind the loop's back (the next update waits for it;
    default) or at once (False). rollback_from: "snapshots" (keel's own, every
    `snapshot_every` steps) or "checkpoints" (the checkpoints registered with
    `register_checkpoint`, the `keep` newest; no snapshot is kept beyond the base taken at
    the first step, the target while no checkpoint precedes the incident; when an incident
    opens, a registered single file whose name does not carry its step (nanoGPT's ckpt.pt,
    last.ckpt) is copied beside itself as `<path>.keel-clean`, so the trainer overwriting it
    inside the incident leaves the rollback target intact; the next clean registration
    removes the copy). Memory: see
    keel.snapshots (12 bytes per fp32 parameter per snapshot with AdamW, `keep` + 1 held).
    Early signals (keel.probe), measured on telemetry steps (every step of the guard's early
    window, again after a rollback, then every `probe_every`-th step) without changing the
    model's numerics, fed to the guard and kept in `signals`:
    probe_attention: the exact max attention logit per layer (the guard's early
    attention-logit rule and its attn_logit warning), by keel.probe.AttentionObserver: every
    `scaled_dot_product_attention` call and every softmax over 4-D scores in `model`'s
    forward, whatever the model's names. None (default): on; when the first measured forward
    shows no attention (or runs under torch.compile), one warning says the signal is missing.
    True: required (that first forward raises instead). False: off. Or a probe of your own
    (`keel.probe.AttentionProbe` with `add(module, qk)`, an AttentionObserver with other
    `rows`): used as given.
    probe_logits: the output log-partition logZ from the LM head's logits (the guard's
    logit_drift warning). None: on when an LM head is found (HF `get_output_embeddings()`,
    `lm_head`, torchtitan's `output`); True: required; False: off; or the head module itself.
    probe_updates: ||Δw||/||w|| per parameter tensor across the optimizer step (telemetry,
    no guard rule). It copies the parameters once, transiently, on telemetry steps; False
    turns it off.
    snapshot_format: "torch" (one `torch.save` file per snapshot, per rank when distributed)
    or "dcp" (`torch.distributed.checkpoint` directories shared by the ranks, sharded state
    stays sharded: FSDP2's format; needs snapshot_dir and model).
    reduce: average the loss and gradient norm over ranks when torch.distributed is
    initialised ("auto"), always (True) or never (False).
    log_dir: keel's run directory (a path, or a RunLogger): every step's line in
    metrics.jsonl, telemetry.jsonl on telemetry steps, and the guard's events in
    events.jsonl (the guard made here writes them there unless `events=` says otherwise; a
    guard given writing elsewhere is mirrored); `log_val()` adds validation losses. Rank 0
    only. tokens_per_step: the tokens of one step over all ranks, for metrics.jsonl's
    `tokens` and `tokens_per_s` (or `step(..., tokens=n)` per step).
    Event hooks (`add_event_hook`) get each step's guard events for the job's own loggers.
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
        probe_attention: Optional[bool] = None,
        probe_logits: Any = None,
        probe_updates: bool = True,
        probe_every: int = 10,
        events: Optional[os.PathLike] = None,
        reduce: Any = "auto",
        step_scheduler: bool = True,
        snapshot_async: bool = True,
        rollback_from: str = "snapshots",
        log_dir: Any = None,
        tokens_per_step: Optional[int] = None,
        **guard_config: Any,
    ):
        if snapshot_format not in ("torch", "dcp"):
            raise ValueError(f"snapshot_format: 'torch' or 'dcp', got {snapshot_format!r}")
        if snapshot_format == "dcp" and (snapshot_dir is None or model is None):
            raise ValueError("snapshot_format='dcp' writes torch.distributed.checkpoint directories: give snapshot_dir= and model=")
        logger = None
        if log_dir is not None:
            logger = log_dir if isinstance(log_dir, RunLogger) else RunLogger(log_dir, tokens_per_step=tokens_per_step)
            if tokens_per_step is not None:
                logger.tokens_per_step = tokens_per_step
            if guard is None and events is None and logger.enabled:
                events = logger.path("events.jsonl")  # the guard writes keel's events file itself
        if guard is None:
            if events is not None and self._dist() and torch.distributed.get_rank() != 0:
                events = None  # every rank decides alike; rank 0 writes the one events file
            try:
                guard = Guard(events=events, **guard_config)
            except ValueError as e:
                raise ValueError(
                    f"{e} (GuardedOptimizer's own arguments: guard, model, scheduler, snapshot_every, keep, "
                    "snapshot_dir, snapshot_format, probe_attention, probe_logits, probe_updates, probe_every, events, "
                    "reduce, step_scheduler, snapshot_async, rollback_from, log_dir, tokens_per_step)"
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
        if rollback_from not in ("snapshots", "checkpoints"):
            raise ValueError(f"rollback_from: 'snapshots' or 'checkpoints', got {rollback_from!r}")
        self.rollback_from = rollback_from
        self.checkpoints = Checkpoints(keep)  # registered with register_checkpoint()
        # copies behind the loop's back (dcp snapshots are written at once: their save is collective)
        self._stager = Stager() if snapshot_async and not self._dcp else None
        # the base snapshot is taken at the first step, not here: a wrapper made before
        # DDP(...) broadcasts rank 0's weights would otherwise keep each rank's own
        # pre-broadcast weights, and a rollback to them would leave the ranks different
        self._loss = None  # what record() summed since the last step
        self._pending_step: Optional[int] = None  # the loop's step number given to record()
        self._stepped = False  # a step was taken: the next step number must exceed step_count
        # early signals, measured on telemetry steps: every step of the guard's early window
        # (again after a rollback), then every `probe_every`
        from .probe import AttentionObserver, AttentionProbe, LogitProbe, UpdateRatio

        self.probe_every = max(1, int(probe_every))
        self._early = int(self.guard.config.get("early_window", 0))
        self._probe_on = True  # for the next step's forward
        self._probe = self._logits = self._updates = None
        for name, want in (("probe_attention", probe_attention), ("probe_logits", probe_logits)):
            if want is True and model is None:
                raise ValueError(f"{name}=True measures the model's forward: give model=")
        self._attn_required = probe_attention is True
        self._attn_checked = False  # the first measured forward says whether attention is seen
        if isinstance(probe_attention, (AttentionProbe, AttentionObserver)):
            self._probe = probe_attention
        elif probe_attention not in (None, True, False):
            raise ValueError(
                f"probe_attention: None, True, False or a keel.probe.AttentionProbe/AttentionObserver, "
                f"got {type(probe_attention).__name__}"
            )
        elif model is not None and probe_attention is not False:
            self._probe = AttentionObserver(model)
        head = probe_logits if isinstance(probe_logits, torch.nn.Module) else None
        if head is not None or (model is not None and probe_logits is not False):
            self._logits = LogitProbe(model, head=head, required=probe_logits is not None)
            if self._logits.head is None:
                self._logits = None
        self._param_names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
        if probe_updates:
            self._updates = UpdateRatio()
        self._signals: Optional[dict] = None  # raw (tensors) until `signals` is read
        self._measure_update = False
        # keel's run directory (metrics.jsonl, telemetry.jsonl, events.jsonl) and the event hooks
        self.logger: Optional[RunLogger] = logger
        # the guard writes events.jsonl there itself, unless it was given writing elsewhere
        self._mirror_events = logger is not None and logger.enabled and not (
            guard.events_path is not None
            and os.path.abspath(guard.events_path) == os.path.abspath(logger.path("events.jsonl"))
        )
        self._event_hooks: list = []
        self._step_events: list = []
        self.rollbacks = 0  # rollbacks taken by this wrapper (keel/rollbacks)
        self._tokens: Optional[int] = None  # this step's tokens, given to step()
        self._scaler_skips = 0  # steps in a row the GradScaler skipped (no step() call)
        self._clean_kept = False  # this incident's checkpoint copy was made
        self._copied: dict = {}  # keel's copy -> the registered path it was copied from
        self._sched_epoch = None  # the scheduler's last_epoch after keel stepped it
        self._rank0 = not self._dist() or torch.distributed.get_rank() == 0

    # -- the optimizer's face ------------------------------------------------------------
    # A GradScaler unscales and checks the gradients itself, and calls step() only when they
    # are finite, unless the optimizer says it handles scaling in its own step (fused Adam):
    # then it would call step() on every step, overflows included, and set grad_scale and
    # found_inf on this wrapper, not on the optimizer that reads them. Not for the wrapper.
    _step_supports_amp_scaling = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; this ends a step: what `record()` collected is dropped. (A
        GradScaler that found inf/NaN gradients does not call `step()`: its step's loss must
        not be judged with the next one's.)"""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        if self._loss is not None:
            self._scaler_skipped()
        self._loss = None
        self._pending_step = None

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
    def record(self, loss, step: Optional[int] = None) -> None:
        """Record this step's loss for a `step()` called without one: one line beside
        `loss.backward()`, so `scaler.step(opt)`, an `accelerator`-wrapped step or a plain
        `opt.step()` pass straight through. Pass the unscaled loss (not `scaler.scale(loss)`).

        Gradient accumulation: call it for every micro-batch; the loss judged is the SUM of
        what was recorded since the last step. Record `loss / accum_steps` (what nanoGPT
        backpropagates) to have the mean over the micro-batches judged.

        step: the loop's own step number for this update (nanoGPT's iter_num), used for the
        guard and the events (see `step()`). A record with a step number other than the
        pending one starts a new step: a step the GradScaler skipped (inf/NaN gradients, no
        `step()` call) leaves nothing behind even when the loop never calls `opt.zero_grad()`.
        """
        if step is not None:
            step = int(step)
            if self._pending_step is not None and step != self._pending_step:
                if self._loss is not None:
                    self._scaler_skipped()
                self._loss = None
            self._pending_step = step
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()  # the sum must not keep the micro-batches' graphs alive
        self._loss = loss if self._loss is None else self._loss + loss

    def step(self, loss=None, grad_norm=None, closure: Optional[Callable] = None, *, step: Optional[int] = None,
             tokens: Optional[int] = None, **extra) -> Action:
        """Decide about this step from its loss and (pre-clip) gradient norm, then apply the
        update or not. Returns the Action; raises keel.GaveUp when the guard gives up.

        The loss: given here, else what `record()` collected since the last step (their sum),
        else what `closure()` returns (Lightning-style closures run forward and backward; they
        are called once, here). The norm: given, else measured from the gradients (after
        clipping, if you clipped: pass the norm `clip_grad_norm_` returned).

        step: the loop's own number for this step (nanoGPT's iter_num; given here or to
        `record()`), used for the guard's decisions and the events, so keel's step numbers
        are the loop's; it must increase from step to step. Default: keel's own count (one
        more than the last step).

        fp16 with a GradScaler: `scaler.scale(loss).backward(); opt.record(loss, step=it);
        scaler.unscale_(opt); gn = clip_grad_norm_(...); scaler.step(opt, grad_norm=gn);
        scaler.update(); opt.zero_grad()`. The scaler calls this step only when the gradients
        are finite (its own skips are its business: keel never sees them, they are no
        incident); keel judges the unscaled loss and the norm after `unscale_`.

        tokens: the tokens this step trained on, over all ranks, for metrics.jsonl's `tokens`
        (with `log_dir`; default `tokens_per_step`)."""
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
        if step is None:
            step = self._pending_step
        self._loss = None
        self._pending_step = None
        self._tokens = tokens
        return self._guarded_step(loss, grad_norm, extra, lambda: self.optimizer.step(closure), step=step)

    def _scaler_skipped(self) -> None:
        """A step whose loss was recorded but whose update never came: the GradScaler found
        inf/NaN gradients and skipped it. A few are the scaler finding its scale; a long run
        of them is how an fp16 run diverges (the guard's `scaler_skips` rule)."""
        loss, pending = self._loss, self._pending_step
        self._loss = None
        self._pending_step = None
        n = int(self.guard.config.get("scaler_skips", 0))
        if not self._stepped or n <= 0:
            return  # before the first update the scaler is still finding its scale
        self._scaler_skips += 1
        k = self._scaler_skips
        if 2 * k < n:
            return  # a few in a row are ordinary: the guard is not bothered with them
        s = self._step_number(pending)
        self._ensure_base(s)
        act = self.guard.observe(s, _num(loss), None, scaler_skips=k)
        self.step_count = s
        self._stepped = True
        self.last_action = act
        self._step_events = list(act.events)
        if act.kind == "rollback":
            self.rollbacks += 1
            self._scaler_skips = 0
            self._rollback(act.rollback_before, s)
            self._sched_epoch = None
        self._say(act)
        if self._event_hooks and self._step_events:
            self._call_hooks(act)
        if act.kind == "give_up":
            raise GaveUp(act.diagnosis or "the guard gave up", s)

    def _ensure_base(self, s: int) -> None:
        self._snapshot_ready()  # the snapshot copied since the last step is complete before anything writes
        if not self.snapshots.steps:
            # the state before this step (the ranks agree by now: DDP broadcast at its
            # construction, or a resume loaded); numbered as the loop's previous step
            self.step_count = max(self.step_count, s - 1)
            self.snapshots.put(self.step_count, self._capture())

    def _say(self, act: Action) -> None:
        """One console line per action, rank 0: what was seen, what was done, the LR now."""
        if act.kind == "proceed" and not any(e["kind"] in ("bad_batch", "early_rule_off") for e in self._step_events):
            return
        if not self._rank0:
            return
        events = self._step_events
        seen = [event_sentence(e["kind"], e.get("detail")) for e in events
                if e["kind"] in ("spike", "divergence", "warning")]
        # the rollback's own event only names the incident; what was restored says where to
        done = [event_sentence(e["kind"], e.get("detail")) for e in events
                if e["kind"] not in ("spike", "divergence", "warning", "rollback")]
        lr = self._lr(act.lr_factor)
        now = f"; LR now {lr:.3g} (× {act.lr_factor:.3g})" if lr is not None else f"; LR × {act.lr_factor:.3g}"
        log.warning("keel: step %d: %s -> %s%s", act.step, "; ".join(seen) or act.kind,
                    "; ".join(dict.fromkeys(done)) or act.kind, now)

    def _check_attention(self, measured: bool) -> None:
        """After the first telemetry forward: say once, at the start, when the attention signal
        is missing (never silently off), or raise when it was required."""
        if self._attn_checked or self._probe is None:
            return
        self._attn_checked = True
        if measured:
            return
        from .probe import AttentionObserver

        if isinstance(self._probe, AttentionObserver):
            why = ("the forward ran under torch.compile, where keel cannot watch it" if self._probe.seen == 0 else
                   "the forward made no scaled_dot_product_attention call and no softmax over 4-D scores")
        else:
            why = "the registered attention modules were not called"
        msg = (f"keel: no attention logits measured ({why}): the early attention rule is off for this run; the "
               f"loss-based rules still act. Pass probe_attention=keel.probe.AttentionProbe() with "
               f"probe.add(module, qk) for an attention of your own, or probe_attention=False to silence this.")
        if self._attn_required:
            raise ValueError(msg.replace("keel: ", "GuardedOptimizer(probe_attention=True): ", 1))
        if self._rank0:
            log.warning(msg)

    def _check_scheduler(self) -> None:
        """keel steps the scheduler (step_scheduler=True): a loop that also steps it moves the
        schedule twice per update without a word; name it at the next step."""
        if self._sched_epoch is None or not self.step_scheduler or self.scheduler is None:
            return
        now = getattr(self.scheduler, "last_epoch", None)
        if now is not None and now != self._sched_epoch:
            raise ValueError(
                f"GuardedOptimizer: the scheduler ({type(self.scheduler).__name__}) was stepped outside keel "
                f"(last_epoch {self._sched_epoch} -> {now} between two steps) although keel steps it after each "
                f"update (scheduler= with step_scheduler=True): the schedule would run twice as fast. Remove your "
                f"own scheduler.step(), or pass step_scheduler=False to keep it."
            )

    def _probing_early(self, step: int) -> bool:
        """Inside the early rule's window: from the start, after a rollback, and while the LR
        rises (the guard's rule follows the same rises)."""
        return step <= self.guard._core.early_until

    def _probing(self, step: int) -> bool:
        return self._probing_early(step) or step % self.probe_every == 0

    def _step_number(self, step: Optional[int]) -> int:
        if step is None:
            return self.step_count + 1
        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step={step!r}: the loop's step number must be an integer")
        s = int(step)
        first = not self._stepped and self.step_count == 0
        if s < 0 or (s <= self.step_count and not first):
            raise ValueError(
                f"step={s}: keel's step numbers must increase (the last step was {self.step_count}); pass "
                f"the loop's own counter for each update (nanoGPT's iter_num), or no step= for keel's count"
            )
        return s

    def _guarded_step(self, loss, grad_norm, extra: dict, apply: Callable, step: Optional[int] = None,
                      overflow: Optional[torch.Tensor] = None) -> Optional[Action]:
        """overflow: the `found_inf` a GradScaler hands an optimizer that unscales in its own
        step (fused Adam): nonzero, the step is the scaler's (the optimizer skips the update
        itself): keel passes it through unjudged and returns None. It is read with the loss
        and the norm, in the step's one host sync."""
        s = self._step_number(step)
        self._check_scheduler()
        self._scaler_skips = 0
        # this step's forward was measured (and this update is measured)
        probed = self._probe_on and any(x is not None for x in (self._probe, self._logits, self._updates))
        for key, probe in (("max_attn_logit", self._probe), ("logit_z", self._logits)):
            if probe is not None:
                m = probe.take()
                if key == "max_attn_logit" and self._probe_on:
                    self._check_attention(m is not None or key in extra)
                if m is not None and key not in extra:
                    extra = {**extra, key: m}
        self._ensure_base(s)
        if overflow is not None:
            vals = self._read(loss, grad_norm, {**extra, "found_inf": overflow})
            if vals[-1] != 0:
                apply()
                return None
            vals = vals[:-1]
        else:
            vals = self._read(loss, grad_norm, extra)
        # the scheduled LR (the scheduler's, or the loop's own setting): its rises keep the
        # early rule on (a warm-up of any length), and the rule caps the LR it found too high
        act = self.guard.observe(s, vals[0], vals[1], lr=self._lr(1.0), **dict(zip(extra, vals[2:])))
        self.step_count = s
        if self.guard.in_incident:
            self._keep_clean_checkpoint()
        else:
            self._clean_kept = False
        self._stepped = True
        if probed:
            sig = {"step": s, **{k: v for k, v in zip(extra, vals[2:])}}
            if self._probe is not None and any(v is not None for v in self._probe.taken):
                sig["attn_layers"] = self._probe.taken
            self._signals = sig
        # every step of the early rule's window (it restarts at a rollback and follows LR rises)
        self._probe_on = self._probing(s + 1)  # for the next step's forward
        for probe in (self._probe, self._logits):
            if probe is not None:
                probe.on = self._probe_on
        self._measure_update = probed and self._updates is not None
        self.last_action = act
        self._step_events = list(act.events)
        # the LR this step's update uses (or would have): the scheduler's times the guard's factor
        lr = self._lr(act.lr_factor) if self.logger is not None and self.logger.enabled else None
        if act.kind == "give_up":
            self._after_step(act, vals, extra, lr)
            raise GaveUp(act.diagnosis or "the guard gave up", s)
        if act.kind == "rollback":
            self.rollbacks += 1
            self._rollback(act.rollback_before, s)
            self._sched_epoch = None  # the scheduler went back with the weights
            self._after_step(act, vals, extra, lr)
            return act
        if not act.skip:
            self._apply(apply, act.lr_factor)
        self._after_step(act, vals, extra, lr)
        if self.step_scheduler and self.scheduler is not None:
            self.scheduler.step()
            self._sched_epoch = getattr(self.scheduler, "last_epoch", None)
        self._maybe_snapshot(s)
        return act

    # -- the rollback target of checkpoint mode survives the trainer overwriting it ---------
    _CLEAN = ".keel-clean"

    def _keep_clean_checkpoint(self) -> None:
        """An incident just opened: the trainer may overwrite its only checkpoint file in place
        before the rollback (nanoGPT's ckpt.pt every eval_interval), and that checkpoint is the
        rollback target. Copy each registered single-file checkpoint beside itself once
        (`<path>.keel-clean`, written to a temporary name and renamed) and point the entry at
        the copy; the next clean registration removes it."""
        if self.rollback_from != "checkpoints" or self._clean_kept:
            return
        self._clean_kept = True
        for step in self.checkpoints.steps:
            c = self.checkpoints.get(step)
            if c.path.endswith(self._CLEAN) or not os.path.isfile(c.path) or str(step) in os.path.basename(c.path):
                # already a copy; a directory (dcp) or a name with its step in it
                # (ckpt-2000.pt, epoch=0-step=30.ckpt) is written anew, not over this one
                continue
            dst = c.path + self._CLEAN
            tmp = dst + ".tmp"
            shutil.copyfile(c.path, tmp)
            os.replace(tmp, dst)
            self._copied[dst] = c.path
            c.path = dst

    def _drop_stale_copies(self) -> None:
        """A clean checkpoint was just registered at this step: no later incident rolls back
        past it, so the copies made for earlier incidents are no longer targets."""
        for s in self.checkpoints.steps:
            c = self.checkpoints.get(s)
            if s < self.step_count and c.path.endswith(self._CLEAN):
                self.checkpoints.forget(c.path)
                if os.path.isfile(c.path):
                    os.remove(c.path)

    # -- logging: keel's run directory and the job's own loggers ---------------------------
    def _lr(self, factor: float) -> Optional[float]:
        groups = self.optimizer.param_groups
        if not groups or "lr" not in groups[0]:
            return None
        return float(groups[0]["lr"]) * factor  # a tensor LR (capturable optimizers) reads here

    def _event(self, step: int, kind: str, detail: dict) -> None:
        """An event of keel's own making (what a rollback restored): to the guard's events
        file, keel's run directory and the event hooks."""
        self.guard.log_event(step, kind, detail)
        self._step_events.append({"step": step, "kind": kind, "detail": detail, "time": time.time()})

    def _after_step(self, act: Action, vals: tuple, extra: dict, lr: Optional[float]) -> None:
        """The step's line in metrics.jsonl (telemetry.jsonl on telemetry steps), its events
        where the guard does not write them, and the event hooks."""
        s = act.step
        self._say(act)
        log = self.logger
        if log is not None and log.enabled:
            got = dict(zip(extra, vals[2:]))
            sig = self.signals if self._signals is not None and self._signals["step"] == s else {}
            ratio = sig.get("update_ratio")
            groups, overall = self._group_ratios(ratio) if ratio else (None, None)
            log.log_step(
                s, vals[0], grad_norm=vals[1], lr=lr, skipped=act.skip, tokens=self._tokens,
                max_attn_logit=got.get("max_attn_logit"), logit_z=got.get("logit_z"), update_ratio=overall,
            )
            if sig:
                log.log_telemetry(s, max_attn_logit_per_layer=sig.get("max_attn_logit"),
                                  logit_z_mean=sig.get("logit_z"), update_ratio=groups)
            if self._mirror_events:
                for e in self._step_events:
                    log.event(e.get("step", s), e["kind"], e.get("detail"), e.get("time"))
        self._tokens = None
        if self._event_hooks and (self._step_events or act.kind != "proceed"):
            self._call_hooks(act)

    def _call_hooks(self, act: Action) -> None:
        s = act.step
        scalars, text = self.event_report(act, self._step_events)
        for hook in list(self._event_hooks):
            try:
                hook(s, scalars, text)
            except Exception as e:  # a broken logger must not stop training: say so, go on
                warnings.warn(f"keel: an event hook ({getattr(hook, '__qualname__', hook)}) failed at step {s}: "
                              f"{type(e).__name__}: {e}", stacklevel=4)

    def _group_ratios(self, ratio: dict) -> tuple:
        """‖Δw‖/‖w‖ per keel tensor group and over every parameter (keel's telemetry), from the
        per-tensor ratios and the weight norms measured with them."""
        norms = self._signals.get("norm_floats") if self._signals is not None else None
        if not norms or len(norms) != len(ratio):
            return None, None
        d2: dict = {}
        w2: dict = {}
        for (name, r), w in zip(ratio.items(), norms):
            if not (math.isfinite(r) and math.isfinite(w)):
                continue
            g = _param_group(name)
            d2[g] = d2.get(g, 0.0) + (r * w) ** 2
            w2[g] = w2.get(g, 0.0) + w * w
        groups = {g: math.sqrt(d2[g] / max(w2[g], 1e-30)) for g in d2}
        overall = math.sqrt(sum(d2.values()) / max(sum(w2.values()), 1e-30)) if d2 else None
        return groups, overall

    def event_report(self, act: Action, events: Optional[list] = None) -> tuple:
        """A step's guard events as (scalars, text) for a metrics logger: `keel/event/<kind>` = 1
        for each kind of event (spike, warning, divergence, skip, lr_backoff, lr_restore,
        rollback, restored, give_up, ...), `keel/lr_factor` (the LR multiplier in force) and
        `keel/rollbacks` (rollbacks so far); the text has one line per event."""
        events = list(act.events) if events is None else events
        scalars = {}
        for e in events:
            scalars[f"keel/event/{e['kind']}"] = 1.0
        if act.kind != "proceed":
            scalars.setdefault(f"keel/event/{act.kind}", 1.0)
        scalars["keel/lr_factor"] = float(act.lr_factor)
        scalars["keel/rollbacks"] = float(self.rollbacks)
        text = "\n".join(f"step {e.get('step', act.step)}: {e['kind']}: {event_sentence(e['kind'], e.get('detail'))}"
                         for e in events)
        return scalars, text

    def add_event_hook(self, fn: Callable) -> Callable:
        """Call `fn(step, scalars, text)` after every step with guard events (a detection, a
        skip, a back-off, a rollback, giving up), so they reach the job's own logger at their
        step: `scalars` is `event_report`'s dict, `text` one line per event. E.g.
        `opt.add_event_hook(keel.torch.tensorboard_hook(writer))`, or for W&B
        `opt.add_event_hook(lambda step, sc, text: wandb.log({**sc, "keel/events": text}, step=step))`.
        A hook that raises is reported with a warning; training goes on. Returns `fn`."""
        self._event_hooks.append(fn)
        return fn

    def log_val(self, val_loss: Any, step: Optional[int] = None) -> None:
        """Log a validation loss to keel's run directory (`log_dir`) at `step` (default: the last
        step taken). Give the loss already averaged over the ranks; only rank 0 writes."""
        if self.logger is None:
            raise ValueError("GuardedOptimizer.log_val: no run directory to log to; pass log_dir= to GuardedOptimizer")
        self.logger.log_val(val_loss, self.step_count if step is None else step)

    def _apply(self, apply: Callable, factor: float) -> None:
        params = None
        if self._measure_update:
            # a telemetry step: ||Δw||/||w|| across this update (one transient copy)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self._updates.begin(params)
        if factor == 1.0:
            apply()
        else:
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
        if params is not None:
            # the weight norms UpdateRatio measured before the update: with the ratios they
            # give keel's per-group ratios in telemetry.jsonl
            norms = self._updates._st[1] if self._updates._st is not None else None
            ratio = self._updates.end()
            if ratio is not None and self._signals is not None and self._signals["step"] == self.step_count:
                names = [self._param_names.get(id(p), f"param{i}") for i, p in enumerate(params)]
                self._signals["update_ratio"] = (names, ratio)
                if self.logger is not None and self.logger.enabled and norms is not None:
                    self._signals["update_norms"] = norms

    @property
    def signals(self) -> dict:
        """The early signals of the last telemetry step, as floats: `step`; `max_attn_logit`
        (one per attention layer, None where not measured); `logit_z`; `update_ratio`
        ({parameter name: ||Δw||/||w||}, when that step's update was applied). Only what is
        measured appears; {} before the first telemetry step. The first read after a step
        costs one host sync."""
        raw = self._signals
        if raw is None:
            return {}
        if "cache" in raw:
            return raw["cache"]
        out = {"step": raw["step"]}
        if "logit_z" in raw:
            out["logit_z"] = raw["logit_z"]
        parts, layers = [], raw.get("attn_layers")
        if layers is not None:
            parts += [v for v in layers if v is not None]
        ratio = raw.get("update_ratio")
        if ratio is not None:
            parts.append(ratio[1])
        norms = raw.get("update_norms")
        if norms is not None:
            parts += list(norms)  # read in the same host transfer, kept out of the dict
        if parts:
            dev = parts[0].device
            flat = torch.cat([t.detach().float().reshape(-1).to(dev) for t in parts]).tolist()
            if layers is not None:
                it = iter(flat)
                out["max_attn_logit"] = [None if v is None else next(it) for v in layers]
                flat = flat[sum(v is not None for v in layers):]
            if ratio is not None:
                out["update_ratio"] = dict(zip(ratio[0], flat))
                flat = flat[len(ratio[0]):]
            if norms is not None:
                raw["norm_floats"] = flat[: len(norms)]
        raw["cache"] = out
        return out

    # -- snapshots and rollback ----------------------------------------------------------
    def _capture(self) -> dict:
        """The training state now, copied at once (the base snapshot, a resume's, and the
        synchronous path): weights, optimizer and scheduler state, RNG and the guard's
        detector windows."""
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
        if self.rollback_from == "checkpoints":
            return  # the trainer's checkpoints are the targets: nothing is kept beyond the base
        # a multiple of snapshot_every was reached or passed since the last step seen (the
        # loop's own step numbers skip the steps a GradScaler dropped)
        prev = self.__dict__.get("_snap_prev")
        e = self.snapshot_every
        if self._early and self._probing_early(s):
            # inside the early rule's window (the start, a warm-up, after a rollback) its
            # rollbacks are frequent and cheap only with a near target: every early_window/3
            # steps there (snapshot_every/10 at the least, for models where a copy is costly)
            e = min(e, max(1, self._early // 3, self.snapshot_every // 10))
        if (s % e == 0) if prev is None else (s // e > prev // e):
            self._pending_snapshot = True
        self._snap_prev = s
        # an open incident means the weights may already be damaged: wait for a quiet step
        if self._pending_snapshot and not self.guard.in_incident:
            if self._stager is None or not self._start_snapshot(s):
                self.snapshots.put(s, self._capture())
            self._pending_snapshot = False

    def _start_snapshot(self, s: int) -> bool:
        """Start copying step s's state behind the loop's back (False: it cannot be, e.g.
        FSDP2's DTensor shards; the caller copies it at once). The small parts (RNG, guard,
        scheduler) are copied now; weights and optimizer state are copied while the next
        step's forward and backward run, and `_snapshot_ready` waits before anything writes
        them."""
        live = {"optimizer": self.optimizer.state_dict()}  # references to the live tensors
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.model is not None:
            live["model"] = self.model.state_dict()
        else:
            live["params"] = [p.detach() for p in params]
        if not Stager.can_stage(_tensors(live, [])):
            return False
        now = {"step": s, "rng": _rng_state(), "guard": self.guard._core.state_json()}
        if self.scheduler is not None:
            now["scheduler"] = _clone(self.scheduler.state_dict())
        # only the optimizer's update writes parameters and optimizer state; anything else in
        # the model's state dict (BatchNorm's running statistics) a forward may write: copy it now
        later = {p.data_ptr() for p in params}
        later.update(p.data_ptr() for p in (self.model.parameters() if self.model is not None else ()))
        later.update(v.data_ptr() for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        if self.snapshots.dir is None:
            # the snapshot this one will push out gives it its host buffers
            reuse, write = _tensors(self.snapshots.evict_for_next(), []), None
        else:
            reuse, write = self._stager.spare, self.snapshots.write
        self._stager.start(s, live, now, reuse, eager=lambda t: t.data_ptr() not in later, write=write)
        return True

    def _snapshot_ready(self) -> None:
        """Wait for the snapshot being copied in the background, if any, and add it to the
        history; called before anything writes the weights or the optimizer state (the next
        step's update, a rollback, state_dict/load_state_dict). A failed copy or disk write
        raises here, at the next step, with its message."""
        if self._stager is None or not self._stager.busy:
            return
        try:
            step, state, path = self._stager.wait()
        except BaseException:
            self._pending_snapshot = True  # taken again at the next quiet step
            raise
        if path is None:
            self.snapshots.put(step, state)
        else:
            self.snapshots.record(step, path)

    def wait_snapshot(self) -> None:
        """Block until the snapshot being copied in the background (`snapshot_async=True`) is
        complete. GuardedOptimizer calls it before every update and rollback; call it yourself
        before code of yours that writes the weights in place between steps (swapping EMA
        weights in for an evaluation), or pass snapshot_async=False."""
        self._snapshot_ready()

    @property
    def snapshot_bytes(self) -> int:
        """Host memory the in-memory snapshots hold now (the base and the `keep` newest), plus
        the staging buffers a background disk write reuses; disk snapshots and registered
        checkpoints hold none."""
        self._snapshot_ready()
        held = sum(nbytes(self.snapshots.get(s)) for s in self.snapshots.steps) if self.snapshots.dir is None else 0
        return held + (nbytes(self._stager.spare) if self._stager is not None else 0)

    def register_checkpoint(self, path, format: str = "torch", load: Optional[Callable] = None) -> bool:
        """Offer a checkpoint you have just saved as a rollback target, instead of (with
        rollback_from="checkpoints") or beside keel's own snapshots: nothing is copied; keel
        keeps the path, the guard's detector windows and the scheduler's state of this step.

        format "torch": a `torch.save`d dict {"model": model.state_dict(), "optimizer":
        opt.state_dict(), ...}; "dcp": a `torch.distributed.checkpoint` directory written as
        `dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path)` with `msd, osd =
        get_state_dict(model, optimizer)` (FSDP: every rank registers, every rank loads its
        shards); or `load=fn`: `fn(path)` restores model, optimizer and scheduler in place (your
        own resume code) and may return the guard's state saved with it (`Guard.state_dict()`).

        Saved while an incident is open the state may be damaged: it is not registered (returns
        False). A path registered again replaces the older entry (the file was overwritten);
        the `keep` newest are kept, and one whose file is gone is skipped."""
        if load is None and format not in Checkpoints.FORMATS:
            raise ValueError(f"format: 'torch' or 'dcp' (or pass load=your_loader), got {format!r}")
        if load is None and self.model is None:
            raise ValueError("register_checkpoint loads the model's state dict: give GuardedOptimizer(model=)")
        self._snapshot_ready()
        self.checkpoints.forget(path)
        if self.guard.in_incident:
            return False
        sched = _clone(self.scheduler.state_dict()) if self.scheduler is not None and load is None else None
        self.checkpoints.add(
            Checkpoint(self.step_count, os.fspath(path), format if load is None else "custom", load,
                       self.guard._core.state_json(), sched)
        )
        self._drop_stale_copies()
        return True

    def _target(self, before_step: int):
        """The rollback target: (step, the registered Checkpoint or None for a snapshot)."""
        ck = self.checkpoints.steps
        t = pick(self.snapshots.steps, ck, before_step)
        # a snapshot and a checkpoint of one step: the snapshot (no file to read)
        return t, (self.checkpoints.get(t) if t in ck and t not in self.snapshots.steps else None)

    def _restore_checkpoint(self, c: Checkpoint) -> None:
        try:
            if c.load is not None:
                saved = c.load(c.path)
            elif c.format == "dcp":
                saved = load_dcp_checkpoint(c.path, self.model, self.optimizer)
            else:
                saved = load_torch_checkpoint(c.path, self.model, self.optimizer)
        except Exception as e:  # the loader's own error stays chained below keel's message
            raise _ckpt_read_failed(self._copied.get(c.path, c.path), e) from e
        if c.scheduler is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(_clone(c.scheduler))
        if isinstance(saved, dict):
            saved = saved.get("state")
        # the detector windows saved with the checkpoint, else those of when it was registered
        self.guard._core.restore_detectors_json(saved if isinstance(saved, str) else c.guard)

    def _rollback(self, before_step: int, s: int) -> None:
        self._snapshot_ready()
        target, ckpt = self._target(before_step)
        self._pending_snapshot = False
        if ckpt is not None:
            self._restore_checkpoint(ckpt)
            self._event(
                s, "restored", {"to_step": target, "from": ckpt.path, "reason": f"incident began at step {before_step}"}
            )
            return
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
        self._event(
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
        uninterrupted one, never to the state it resumed from (a registered checkpoint is
        carried as a reference: its path, format, guard and scheduler state; one registered
        with load= is not, and the resumed run rolls back to the state it resumed from)."""
        self._snapshot_ready()  # a snapshot in flight joins the history first
        # the wrapped optimizer's own state dict, keel's part under its own key: it loads
        # into the raw optimizer too (torch ignores the extra key), as resume code expects
        d = dict(self.optimizer.state_dict())
        k = {"guard": self.guard.state_dict(), "step": self.step_count, "pending_snapshot": self._pending_snapshot,
             "rollbacks": self.rollbacks}
        d["keel"] = k
        if self.guard.in_incident:
            start = json.loads(self.guard._core.state_json())["policy"].get("incident_start")
            if start is not None:
                t, ckpt = self._target(start)
                if ckpt is not None:
                    if ckpt.load is None:
                        k["rollback_base"] = {"step": t, "checkpoint": ckpt.describe()}
                elif self._dcp:
                    # the snapshot directory stays on disk: a reference is enough
                    k["rollback_base"] = {"step": t, "dcp_path": self.snapshots.where(t)}
                else:
                    st = self.snapshots.get(t)
                    # a copy: a pruned in-memory snapshot lends its buffers to the next one
                    k["rollback_base"] = {"step": t, "state": _clone(st) if self.snapshots.dir is None else st}
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
        self._snapshot_ready()  # the copy in flight reads the tensors about to be overwritten
        if "guard" in d:
            # the older layout: {optimizer, guard, step}
            k = {kk: d[kk] for kk in ("guard", "step", "pending_snapshot", "rollback_base", "rollbacks") if kk in d}
            self.optimizer.load_state_dict(d["optimizer"])
        else:
            # the optimizer's own state dict, with keel's part under "keel" when it has one
            k = d.get("keel") or {}
            self.optimizer.load_state_dict({kk: v for kk, v in d.items() if kk != "keel"})
        if k:
            self.guard.load_state_dict(k["guard"])
            self.step_count = int(k["step"])
            self._pending_snapshot = bool(k.get("pending_snapshot", False))
            self.rollbacks = int(k.get("rollbacks", 0))
            # the events file keeps what happened up to the resumed step: the steps after it
            # run again and log their events again (once, not twice)
            self.guard._core.truncate_events_after(self.step_count)
        self._loss = None
        base = k.get("rollback_base")
        adopt = base is not None and "dcp_path" in base and self._dcp
        self.snapshots.clear()
        self.checkpoints.clear()
        if adopt:
            # saved inside an incident: the clean snapshot before it stays the rollback target
            self.snapshots.adopt(int(base["step"]), base["dcp_path"])
        elif base is not None and "state" in base:
            self.snapshots.put(int(base["step"]), base["state"])
        else:
            if base is not None and "checkpoint" in base:
                # saved inside an incident: the checkpoint before it stays the rollback target
                c = base["checkpoint"]
                self.checkpoints.add(Checkpoint(int(base["step"]), c["path"], c["format"], None, c["guard"], c["scheduler"]))
            self.snapshots.put(self.step_count, self._capture())
