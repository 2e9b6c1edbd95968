"""keel's guard inside a Lightning `Trainer` (automatic optimisation).

    trainer = lightning.Trainer(callbacks=[keel.lightning.GuardCallback(snapshot_every=50)])

At fit start the callback wraps the (first) optimizer's `step` in place. Lightning passes
that step a closure that runs training_step, backward, `on_before_optimizer_step` and
gradient clipping; the wrapper runs it, then asks keel's guard with the step's loss (what
`on_before_backward` saw, summed over gradient accumulation: Lightning has already divided
each by the accumulation) and the pre-clip gradient norm (measured in
`on_before_optimizer_step`, before Lightning clips), then applies the update or not. A
training_step that returns None (Lightning's "skip this batch") is passed through unjudged.
The guard's state is saved in Lightning checkpoints (the callback's state_dict). Rollbacks restore the LightningModule, optimizer, scheduler and
RNG state. Events go to `<trainer.log_dir or default_root_dir>/keel-events.jsonl` on global rank 0
(`<log_dir>/events.jsonl` with the callback's `log_dir=`).
For manual optimisation, wrap your optimizer in keel.torch.GuardedOptimizer yourself.

Rollback targets: keel's snapshots (a host copy of weights and optimizer state every
`snapshot_every` steps, 12 bytes per fp32 parameter with AdamW, `keep` + 1 of them held;
copied in the background, see keel.snapshots), or with `rollback_from="checkpoints"` the
.ckpt files the Trainer writes (ModelCheckpoint's, or your `trainer.save_checkpoint`): each
one written while no incident is open is registered, and a rollback loads the newest one
before the incident with the strategy's loading code (module, optimizer) plus the
schedulers' states, and the guard's detector windows from the callback's state in it.
Nothing is copied beyond the base state taken at the first step (the target while no
checkpoint precedes the incident: one copy, in memory, or on disk with `snapshot_dir=`). A
file written again (last.ckpt) replaces its older entry; one ModelCheckpoint deleted
(save_top_k) is no longer a target; weights-only saves are not targets.

Step numbers are Lightning's: the step being taken is `trainer.global_step + 1` (an fp16
step the scaler skipped still counts, as in Lightning's own count).

fp16 ("16-mixed"): the precision plugin runs the closure itself, unscales the gradients
(before `on_before_optimizer_step`, so the norm keel reads is unscaled), then calls
`scaler.step(optimizer)`, which calls the optimizer's step (keel's wrapper) only when the
gradients are finite. A step the scaler skips for an overflow never reaches keel (no
incident); the loss keel judges is unscaled (`on_before_backward` sees the scaled loss: keel
divides it by the scaler's scale), and a step keel skips still ends in `scaler.update()`.

The early signals (keel.torch.GuardedOptimizer: max attention logit, output logZ, update
ratios) are measured on the LightningModule's model where it has them: `callback.gopt.signals`.

Guard events on the Trainer's loggers (`report_events=True`, the default): after a step with
a detection, skip, back-off or rollback, `keel/event/<kind>` = 1, `keel/lr_factor` and
`keel/rollbacks` go to every logger in `trainer.loggers` (`log_metrics`) at the step
Lightning logs that batch's own metrics under (its count of optimizer steps before the
update: keel's step s is logger step s - 1), and the events as sentences as text:
TensorBoardLogger's `add_text` (tag `keel/events`), WandbLogger's run (a text value
`keel/events`). A logger that cannot write (its package missing) is warned about once, by
name; training goes on.

keel's run directory (`log_dir=`): metrics.jsonl per step, the validation loss the module
logs (`val_key`) as `val_loss` after each validation, telemetry.jsonl and events.jsonl, for
`keel report DIR` (keel.torch.RunLogger; global rank 0 writes).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from . import GaveUp, Guard
from ._adapt import (
    GuardSpec,
    guard_state,
    keep_scheduler_marker,
    load_guard_state,
    patch,
    run_logger,
    warn_once,
    wrapper_options,
)
from .torch import GuardedOptimizer, grad_norm

__all__ = ["GuardCallback"]


_VAL_KEYS = ("val_loss", "val/loss", "validation_loss", "valid_loss", "loss/val", "val_loss_epoch")


class GuardCallback(Callback):
    """guard: a keel.Guard, or None to build one from `guard_config` ([guard] keys, checked
    now). snapshot_every / keep / snapshot_dir / rollback_from: rollback targets, probe_*: the
    early signals (see keel.torch.GuardedOptimizer). log_dir: keel's run directory
    (keel.torch.RunLogger; global rank 0 only): metrics.jsonl per step, the validation loss
    (`val_key`, default the first of val_loss, val/loss, validation_loss, valid_loss, loss/val,
    val_loss_epoch that the module logs) as val_loss, telemetry.jsonl, events.jsonl. tokens_per_step: the
    tokens of one optimizer step over all ranks, for metrics.jsonl's `tokens` (not logged
    without it). report_events: send each guard event to `trainer.loggers` at its step (True)."""

    def __init__(
        self,
        guard: Optional[Guard] = None,
        *,
        snapshot_every: int = 100,
        keep: int = 2,
        snapshot_dir: Optional[os.PathLike] = None,
        events: Optional[os.PathLike] = None,
        probe_attention: Optional[bool] = None,
        probe_logits: Any = None,
        probe_updates: bool = True,
        probe_every: int = 10,
        snapshot_async: bool = True,
        rollback_from: str = "snapshots",
        log_dir: Optional[os.PathLike] = None,
        tokens_per_step: Optional[int] = None,
        val_key: Optional[str] = None,
        report_events: bool = True,
        **guard_config: Any,
    ):
        # passed to GuardedOptimizer: rollback targets (keel's snapshots, or the .ckpt files the
        # Trainer saves: no copy) and the early signals measured on the live model (keel.probe;
        # on by default where the model has them)
        self.options = wrapper_options(
            snapshot_every=snapshot_every, keep=keep, snapshot_dir=snapshot_dir, snapshot_async=snapshot_async,
            rollback_from=rollback_from, probe_attention=probe_attention, probe_logits=probe_logits,
            probe_updates=probe_updates, probe_every=probe_every,
        )
        self._spec = GuardSpec(guard, events, guard_config)
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []
        self._norm = None
        self._loss = None
        self._resume_state: Optional[dict] = None
        self._undo = None
        self._scaler = None
        self._opt = None
        self.log_dir, self.tokens_per_step, self.val_key = log_dir, tokens_per_step, val_key
        self.report_events = report_events
        self._warned: set = set()

    @property
    def guard(self) -> Optional[Guard]:
        return self.gopt.guard if self.gopt is not None else self._spec.guard

    def state_dict(self) -> dict:
        return guard_state(self.gopt) if self.gopt is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callback state after on_fit_start: apply now, or at fit start
        if not state_dict:
            return
        if self.gopt is not None:
            load_guard_state(self.gopt, state_dict)
        else:
            self._resume_state = state_dict

    def on_fit_start(self, trainer, pl_module):
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "keel.lightning.GuardCallback needs automatic optimisation; with manual optimisation "
                "wrap your optimizer in keel.torch.GuardedOptimizer"
            )
        # 16-mixed: the loss on_before_backward sees is scaled
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
        self._opt = opt
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        main = trainer.is_global_zero
        guard = self._spec.build(trainer.log_dir or trainer.default_root_dir, main, self.log_dir)
        self.gopt = GuardedOptimizer(
            opt, guard, model=pl_module, scheduler=sched, **self.options,
            step_scheduler=False,  # Lightning steps it
            log_dir=run_logger(self.log_dir, main, self.tokens_per_step),
        )
        if self.report_events and main and trainer.loggers:
            self.gopt.add_event_hook(lambda s, scalars, text: self._report(trainer, scalars, text))
        if self._resume_state is not None:
            load_guard_state(self.gopt, self._resume_state)
            self._resume_state = None
        inner = opt.step

        def step(closure=None, **kw):
            # 32/bf16: Lightning passes the closure (training_step, backward,
            # on_before_optimizer_step, clipping). 16-mixed: the precision plugin ran it and
            # unscaled the gradients, and the scaler calls this without one, and only when
            # the gradients are finite
            if closure is not None:
                closure()
            loss, self._loss = self._loss, None
            norm, self._norm = self._norm, None
            if loss is None:
                return inner(**kw)  # training_step returned None: nothing to judge
            try:
                act = self.gopt._guarded_step(
                    loss, norm, {}, lambda: inner(**kw), step=trainer.global_step + 1,
                    # a fused optimizer is called on overflows too, the scaler's found_inf set on it
                    overflow=getattr(opt, "found_inf", None) if self._scaler is not None else None,
                )
            except GaveUp:
                self._unwrap()
                raise
            if act is not None and act.kind != "proceed":
                self.actions.append(act)
            return loss

        keep_scheduler_marker(inner, step)
        self._undo = patch(opt, "step", step)
        if self.options["rollback_from"] == "checkpoints":
            self._undo = self._watch_saves(trainer, self._undo)

    # -- the guard's events on the Trainer's loggers, the validation loss in keel's run ------
    def _report(self, trainer, scalars: dict, text: str) -> None:
        """A step's guard events to every logger of the Trainer, at the step Lightning logs
        that batch's own metrics under (its count of optimizer steps before this one)."""
        loop = getattr(trainer.fit_loop, "epoch_loop", None)
        step = getattr(loop, "_batches_that_stepped", None)
        step = trainer.global_step if step is None else step
        for lg in trainer.loggers:
            name = type(lg).__name__
            try:
                lg.log_metrics(dict(scalars), step=step)
                if text:
                    exp = lg.experiment
                    if callable(getattr(exp, "add_text", None)):  # TensorBoard's SummaryWriter
                        exp.add_text("keel/events", text, step)
                    elif name == "WandbLogger":
                        exp.log({"keel/events": text, "trainer/global_step": step})
            except Exception as e:  # a logger that cannot write must not stop training
                missing = f" (install the `{e.name}` package)" if isinstance(e, ModuleNotFoundError) and e.name else ""
                warn_once(self._warned, name, f"keel.lightning.GuardCallback: cannot write guard events to {name}: "
                                              f"{type(e).__name__}: {e}{missing}; training goes on")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.gopt is None or self.gopt.logger is None:
            return
        m = trainer.callback_metrics
        keys = (self.val_key,) if self.val_key is not None else _VAL_KEYS
        key = next((k for k in keys if k in m), None)
        if key is None:
            if self.val_key is not None:
                warn_once(self._warned, "val_key", f"keel.lightning.GuardCallback(val_key={self.val_key!r}): the module "
                                                   f"logged no such metric (it logged: {', '.join(sorted(m)) or 'none'})")
            return
        self.gopt.logger.log_val(float(m[key]), trainer.global_step)

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        # the start of an accumulation window (before its first backward): a step the fp16
        # scaler skipped (overflow) never reached keel, and nothing of it carries over
        self._loss = self._norm = None

    def on_before_backward(self, trainer, pl_module, loss):
        d = loss.detach()
        sc = self._scaler
        if sc is not None and sc.is_enabled() and getattr(sc, "_scale", None) is not None:
            # 16-mixed hands this hook scaler.scale(loss): keel judges the unscaled loss (the
            # scale is a power of two, so the division is exact; no host sync)
            d = d / sc._scale.to(d.device)
        self._loss = d if self._loss is None else self._loss + d

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # before Lightning clips: the norm the guard should see
        n = grad_norm(pl_module.parameters())
        sc = self._scaler
        if sc is not None and sc.is_enabled() and getattr(self._opt, "_step_supports_amp_scaling", False):
            # a fused optimizer unscales in its own step: the gradients here are still scaled
            n = n / sc._scale.to(n.device)
        self._norm = n

    # -- rollback to the Trainer's own checkpoints (rollback_from="checkpoints") -------------
    def _watch_saves(self, trainer, undo_step):
        """Register each full .ckpt the Trainer writes (ModelCheckpoint's, or a
        trainer.save_checkpoint of yours) as a rollback target, once it is written."""
        inner = trainer.save_checkpoint

        def save_checkpoint(filepath, weights_only=None, storage_options=None):
            out = inner(filepath, weights_only, storage_options)
            if weights_only:
                self.gopt.checkpoints.forget(filepath)  # overwritten with no optimizer state
            else:
                self.gopt.register_checkpoint(filepath, load=lambda path: self._load_checkpoint(trainer, path))
            return out

        undo_save = patch(trainer, "save_checkpoint", save_checkpoint)

        def undo():
            undo_save()
            undo_step()

        return undo

    def _load_checkpoint(self, trainer, path: str):
        """A rollback to a .ckpt with the strategy's own loading code (LightningModule,
        optimizers) and the schedulers' states; returns the guard's state saved in it."""
        # weights only: a .ckpt swapped in at this path cannot run code when keel reads it
        ck = trainer.strategy.load_checkpoint(path, weights_only=True)
        trainer.strategy.load_model_state_dict(ck)
        trainer.strategy.load_optimizer_state_dict(ck)
        for cfg, st in zip(trainer.lr_scheduler_configs, ck.get("lr_schedulers", [])):
            cfg.scheduler.load_state_dict(st)
        mine = (ck.get("callbacks") or {}).get(self.state_key)
        return mine.get("guard") if mine else None

    def _unwrap(self):
        if self._undo is not None:
            self._undo()
            self._undo = None

    def on_fit_end(self, trainer, pl_module):
        self._unwrap()
        if self.gopt is not None:
            self.gopt.wait_snapshot()  # the last background snapshot's error, if any, is not lost

    def on_exception(self, trainer, pl_module, exception):
        self._unwrap()
