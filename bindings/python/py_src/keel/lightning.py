"""keel's guard inside a Lightning `Trainer` (automatic optimisation).

    trainer = lightning.Trainer(callbacks=[keel.lightning.GuardCallback(snapshot_every=50)])

At fit start the callback wraps the (first) optimizer's `step` in place. Lightning passes
that step a closure that runs training_step, backward, `on_before_optimizer_step` and
gradient clipping; the wrapper runs it, takes the loss it returns and the pre-clip gradient
norm (measured in `on_before_optimizer_step`, before Lightning clips), asks keel's guard, then
applies the update or not. Rollbacks restore the LightningModule, optimizer, scheduler and
RNG state. Events go to `<log_dir or default_root_dir>/keel-events.jsonl` on global rank 0.
For manual optimisation, wrap your optimizer in keel.torch.GuardedOptimizer yourself.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from . import Guard
from .torch import GuardedOptimizer

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
        **guard_config: Any,
    ):
        if guard is not None and guard_config:
            raise ValueError("give either guard= or guard keyword arguments, not both")
        self._guard, self._guard_config, self._events = guard, guard_config, events
        self.snapshot_every, self.keep, self.snapshot_dir = snapshot_every, keep, snapshot_dir
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []
        self._norm = None
        self._undo = None

    @property
    def guard(self) -> Optional[Guard]:
        return self.gopt.guard if self.gopt is not None else self._guard

    def on_fit_start(self, trainer, pl_module):
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "keel.lightning.GuardCallback needs automatic optimisation; with manual optimisation "
                "wrap your optimizer in keel.torch.GuardedOptimizer"
            )
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        guard = self._guard
        if guard is None:
            events = self._events
            if events is None and trainer.is_global_zero:
                events = os.path.join(trainer.log_dir or trainer.default_root_dir, "keel-events.jsonl")
            guard = Guard(events=events, **self._guard_config)
        self.gopt = GuardedOptimizer(
            opt, guard, model=pl_module, scheduler=sched, snapshot_every=self.snapshot_every,
            keep=self.keep, snapshot_dir=self.snapshot_dir, step_scheduler=False,  # Lightning steps it
        )
        had = "step" in opt.__dict__
        inner = opt.step

        def step(closure=None, **kw):
            self._norm = None
            loss = closure() if closure is not None else None  # forward, backward, clipping
            if loss is None:
                loss = torch.tensor(float("nan"))
            act = self.gopt._guarded_step(loss, self._norm, {}, lambda: inner(**kw))
            if act.kind != "proceed":
                self.actions.append(act)
            return loss

        if hasattr(inner, "_wrapped_by_lr_sched"):
            step._wrapped_by_lr_sched = True
        opt.step = step

        def undo():
            if had:
                opt.step = inner
            else:
                del opt.step

        self._undo = undo

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # before Lightning clips: the norm the guard should see
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))

    def on_fit_end(self, trainer, pl_module):
        if self._undo is not None:
            self._undo()
            self._undo = None
