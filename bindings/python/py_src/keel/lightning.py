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
RNG state. Events go to `<log_dir or default_root_dir>/keel-events.jsonl` on global rank 0.
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
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from . import GaveUp, Guard
from ._adapt import GuardSpec, wrapper_options, guard_state, keep_scheduler_marker, load_guard_state, patch
from .torch import GuardedOptimizer, grad_norm

__all__ = ["GuardCallback"]


class GuardCallback(Callback):
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
        guard = self._spec.build(trainer.log_dir or trainer.default_root_dir, trainer.is_global_zero)
        self.gopt = GuardedOptimizer(
            opt, guard, model=pl_module, scheduler=sched, **self.options,
            step_scheduler=False,  # Lightning steps it
        )
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
        ck = trainer.strategy.load_checkpoint(path, weights_only=False)  # this run's own file
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
