"""keel's guard inside a Hugging Face `transformers.Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[keel.hf.GuardCallback(snapshot_every=50)])
    trainer.train()

A TrainerCallback can only stop training (TrainerControl has no skip), so at train begin the
callback wraps the trainer's optimizer in place: each optimizer step first goes through
keel's guard (the Rust detectors and policy of `keel train`) with the step's loss (the sum of
`training_step`'s returns over the accumulation, as the Trainer logs it) and the pre-clip
gradient norm (what `accelerator.clip_grad_norm_` returned to the Trainer; nothing is
computed twice). Skips leave weights and optimizer state untouched, back-offs scale the LR
of that update, rollbacks restore model, optimizer, scheduler and RNG state from the newest
snapshot, and giving up raises keel.GaveUp out of `trainer.train()`. Events go to
`<output_dir>/keel-events.jsonl` (main process only) unless `events=` says otherwise.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback

from . import Guard
from .torch import GuardedOptimizer

__all__ = ["GuardCallback"]


def _patch(obj, name, fn):
    """Set obj.name = fn on the instance; returns the undo."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, fn)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    return undo


def _calling_trainer() -> Optional[Trainer]:
    """The Trainer whose callback handler is calling us (found on the call stack)."""
    f = inspect.currentframe()
    while f is not None:
        obj = f.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        f = f.f_back
    return None


class GuardCallback(TrainerCallback):
    """guard: a keel.Guard, or None to build one from `guard_config` ([guard] keys).
    trainer: the Trainer (found automatically when the callback was given to it).
    snapshot_every / keep / snapshot_dir: rollback targets (see keel.torch.GuardedOptimizer)."""

    def __init__(
        self,
        guard: Optional[Guard] = None,
        *,
        trainer: Optional[Trainer] = None,
        snapshot_every: int = 100,
        keep: int = 2,
        snapshot_dir: Optional[os.PathLike] = None,
        events: Optional[os.PathLike] = None,
        **guard_config: Any,
    ):
        if guard is not None and guard_config:
            raise ValueError("give either guard= or guard keyword arguments, not both")
        self._guard = guard
        self._guard_config = guard_config
        self._events = events
        self.trainer = trainer
        self.snapshot_every = snapshot_every
        self.keep = keep
        self.snapshot_dir = snapshot_dir
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []  # every non-proceed Action, for inspection
        self._loss = None
        self._norm = None

    @property
    def guard(self) -> Optional[Guard]:
        return self.gopt.guard if self.gopt is not None else self._guard

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        trainer = self.trainer or _calling_trainer()
        if trainer is None:
            raise RuntimeError("keel.hf.GuardCallback: cannot find the Trainer; pass GuardCallback(trainer=trainer)")
        self.trainer = trainer
        optimizer = optimizer if optimizer is not None else trainer.optimizer
        guard = self._guard
        if guard is None:
            events = self._events
            if events is None and state.is_world_process_zero:
                events = os.path.join(args.output_dir, "keel-events.jsonl")
            guard = Guard(events=events, **self._guard_config)
        self.gopt = GuardedOptimizer(
            optimizer,
            guard,
            model=model if model is not None else trainer.model,
            scheduler=lr_scheduler,
            snapshot_every=self.snapshot_every,
            keep=self.keep,
            snapshot_dir=self.snapshot_dir,
            step_scheduler=False,  # the Trainer steps its scheduler itself
        )
        # the step's loss: training_step's returns (already divided by the accumulation)
        inner_training_step = trainer.training_step

        def training_step(*a, **k):
            loss = inner_training_step(*a, **k)
            d = loss.detach()
            self._loss = d if self._loss is None else self._loss + d
            return loss

        undo = [_patch(trainer, "training_step", training_step)]
        # the pre-clip gradient norm, as the Trainer itself gets it
        acc = trainer.accelerator
        inner_clip = acc.clip_grad_norm_

        def clip_grad_norm_(*a, **k):
            n = inner_clip(*a, **k)
            self._norm = n
            return n

        undo.append(_patch(acc, "clip_grad_norm_", clip_grad_norm_))
        inner_step = optimizer.step

        def step(*a, **k):
            loss, norm = self._loss, self._norm
            self._loss = self._norm = None
            if loss is None:
                loss = torch.tensor(float("nan"))
            act = self.gopt._guarded_step(loss, norm, {}, lambda: inner_step(*a, **k))
            if act.kind != "proceed":
                self.actions.append(act)

        if hasattr(inner_step, "_wrapped_by_lr_sched"):
            # keeps torch's LR scheduler from warning that the step was overridden
            step._wrapped_by_lr_sched = True
        undo.append(_patch(optimizer, "step", step))
        self._undo = undo

    def on_train_end(self, args, state, control, **kw):
        # unwrap, so a later train() on the same Trainer starts clean
        for u in getattr(self, "_undo", ()):
            u()
        self._undo = ()
