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
from transformers.trainer_callback import ExportableState

from . import GaveUp, Guard
from ._adapt import GuardSpec, guard_state, keep_scheduler_marker, load_guard_state, patch
from .torch import GuardedOptimizer

__all__ = ["GuardCallback"]


def _calling_trainer() -> Optional[Trainer]:
    """The Trainer whose callback handler is calling us (found on the call stack)."""
    f = inspect.currentframe()
    while f is not None:
        obj = f.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        f = f.f_back
    return None


class GuardCallback(TrainerCallback, ExportableState):
    """guard: a keel.Guard, or None to build one from `guard_config` ([guard] keys, checked
    now). trainer: the Trainer (found automatically when the callback was given to it).
    snapshot_every / keep / snapshot_dir: rollback targets (see keel.torch.GuardedOptimizer).
    The guard's state is saved in the Trainer's checkpoints (trainer_state.json) and restored
    by `trainer.train(resume_from_checkpoint=...)`."""

    def __init__(
        self,
        guard: Optional[Guard] = None,
        *,
        trainer: Optional[Trainer] = None,
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
        self.trainer = trainer
        self.snapshot_every = snapshot_every
        self.keep = keep
        self.snapshot_dir = snapshot_dir
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []  # every non-proceed Action, for inspection
        self._resume_state: Optional[dict] = None
        self._loss = None
        self._norm = None
        self._undo: list = []

    @property
    def guard(self) -> Optional[Guard]:
        return self.gopt.guard if self.gopt is not None else self._spec.guard

    def state(self) -> dict:
        # the Trainer rebuilds the callback from "args" and sets "attributes" on resume
        cfg = self.guard.config if self.guard is not None else self._spec.config
        return {
            "args": {
                "snapshot_every": self.snapshot_every,
                "keep": self.keep,
                "snapshot_dir": None if self.snapshot_dir is None else os.fspath(self.snapshot_dir),
                "events": None if self._spec.events is None else os.fspath(self._spec.events),
                **cfg,
            },
            "attributes": {"_resume_state": guard_state(self.gopt) if self.gopt is not None else None},
        }

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        trainer = self.trainer or _calling_trainer()
        if trainer is None:
            raise RuntimeError("keel.hf.GuardCallback: cannot find the Trainer; pass GuardCallback(trainer=trainer)")
        self.trainer = trainer
        optimizer = optimizer if optimizer is not None else trainer.optimizer
        if getattr(optimizer, "scaler", None) is not None:
            raise RuntimeError(
                "keel.hf.GuardCallback does not handle fp16 loss scaling (GradScaler) yet: a skipped step "
                "would leave the scaler's state behind; train in bf16 or fp32"
            )
        guard = self._spec.build(args.output_dir, state.is_world_process_zero)
        self.gopt = GuardedOptimizer(
            optimizer,
            guard,
            model=model if model is not None else trainer.model,
            scheduler=lr_scheduler,
            snapshot_every=self.snapshot_every,
            keep=self.keep,
            snapshot_dir=self.snapshot_dir, probe_attention=self.probe_attention,
            step_scheduler=False,  # the Trainer steps its scheduler itself
        )
        if self._resume_state is None and state.global_step > 0:
            # a resumed run: the Trainer restores callback state only with
            # args.restore_callback_states_from_checkpoint, so read ours from the loaded state
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            saved = saved[0] if isinstance(saved, list) else saved
            if saved:
                self._resume_state = saved.get("attributes", {}).get("_resume_state")
        if self._resume_state is not None:
            load_guard_state(self.gopt, self._resume_state)
            self._resume_state = None
        # the step's loss: training_step's returns (already divided by the accumulation)
        inner_training_step = trainer.training_step

        def training_step(*a, **k):
            loss = inner_training_step(*a, **k)
            d = loss.detach()
            self._loss = d if self._loss is None else self._loss + d
            return loss

        # the pre-clip gradient norm, as the Trainer itself gets it
        acc = trainer.accelerator
        inner_clip = acc.clip_grad_norm_

        def clip_grad_norm_(*a, **k):
            n = inner_clip(*a, **k)
            self._norm = n
            return n

        inner_step = optimizer.step

        def step(*a, **k):
            loss, norm = self._loss, self._norm
            self._loss = self._norm = None
            if loss is None:
                loss = torch.tensor(float("nan"))
            try:
                act = self.gopt._guarded_step(loss, norm, {}, lambda: inner_step(*a, **k))
            except GaveUp:
                self._unwrap()  # a caught GaveUp leaves a clean Trainer behind
                raise
            if act.kind != "proceed":
                self.actions.append(act)

        # the LR the Trainer logs (to its console, W&B, TensorBoard) is the one the update
        # used: the scheduler's times the guard's factor (a rollback lowers it for good)
        inner_lr = trainer._get_learning_rate

        def _get_learning_rate(*a, **k):
            lr = inner_lr(*a, **k)
            f = self.gopt.guard.lr_factor if self.gopt is not None else 1.0
            return lr * f if isinstance(lr, (int, float)) else lr

        keep_scheduler_marker(inner_step, step)
        self._undo = [
            patch(trainer, "training_step", training_step),
            patch(acc, "clip_grad_norm_", clip_grad_norm_),
            patch(optimizer, "step", step),
            patch(trainer, "_get_learning_rate", _get_learning_rate),
        ]

    def _unwrap(self):
        for u in reversed(self._undo):
            u()
        self._undo = []

    def on_train_end(self, args, state, control, **kw):
        # unwrap, so a later train() on the same Trainer starts clean
        self._unwrap()
