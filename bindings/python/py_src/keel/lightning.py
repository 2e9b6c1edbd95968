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
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from . import GaveUp, Guard
from ._adapt import GuardSpec, guard_state, keep_scheduler_marker, load_guard_state, patch
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
        probe_attention: bool = False,
        **guard_config: Any,
    ):
        # measure the model's exact max attention logit for the guard's early rule (keel.probe)
        self.probe_attention = probe_attention
        self._spec = GuardSpec(guard, events, guard_config)
        self.snapshot_every, self.keep, self.snapshot_dir = snapshot_every, keep, snapshot_dir
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []
        self._norm = None
        self._loss = None
        self._resume_state: Optional[dict] = None
        self._undo = None

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
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise RuntimeError(
                "keel.lightning.GuardCallback does not handle fp16 loss scaling (16-mixed) yet; "
                "use bf16-mixed or 32-true"
            )
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        guard = self._spec.build(trainer.log_dir or trainer.default_root_dir, trainer.is_global_zero)
        self.gopt = GuardedOptimizer(
            opt, guard, model=pl_module, scheduler=sched, snapshot_every=self.snapshot_every,
            keep=self.keep, snapshot_dir=self.snapshot_dir, probe_attention=self.probe_attention, step_scheduler=False,  # Lightning steps it
        )
        if self._resume_state is not None:
            load_guard_state(self.gopt, self._resume_state)
            self._resume_state = None
        inner = opt.step

        def step(closure=None, **kw):
            self._norm = None
            if closure is not None:
                closure()  # training_step, backward, on_before_optimizer_step, clipping
            loss, self._loss = self._loss, None
            if loss is None:
                return inner(**kw)  # training_step returned None: nothing to judge
            try:
                act = self.gopt._guarded_step(loss, self._norm, {}, lambda: inner(**kw))
            except GaveUp:
                self._unwrap()
                raise
            if act.kind != "proceed":
                self.actions.append(act)
            return loss

        keep_scheduler_marker(inner, step)
        self._undo = patch(opt, "step", step)

    def on_before_backward(self, trainer, pl_module, loss):
        d = loss.detach()
        self._loss = d if self._loss is None else self._loss + d

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # before Lightning clips: the norm the guard should see
        self._norm = grad_norm(pl_module.parameters())

    def _unwrap(self):
        if self._undo is not None:
            self._undo()
            self._undo = None

    def on_fit_end(self, trainer, pl_module):
        self._unwrap()

    def on_exception(self, trainer, pl_module, exception):
        self._unwrap()
