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
of that update, rollbacks restore model, optimizer and scheduler state (not the RNG) from the newest
snapshot, and giving up raises keel.GaveUp out of `trainer.train()`. Events go to
`<output_dir>/keel-events.jsonl` (main process only; `<log_dir>/events.jsonl` with `log_dir=`)
unless `events=` says otherwise.

Rollback targets: keel's snapshots (a host copy of weights and optimizer state every
`snapshot_every` steps, 12 bytes per fp32 parameter with AdamW, `keep` + 1 of them held;
copied in the background, see keel.snapshots), or with `rollback_from="checkpoints"` the
Trainer's own `checkpoint-N` directories: each one saved while no incident is open is
registered when the Trainer saves it (on_save), and a rollback loads the newest one before
the incident with the Trainer's own loading code (weights, optimizer, scheduler) and the
guard's detector windows from its trainer_state.json; nothing is copied beyond the base state
taken at the first step (the target while no checkpoint precedes the incident: one copy,
in memory, or on disk with `snapshot_dir=`). A checkpoint the Trainer's rotation
(`save_total_limit`) deleted is no longer a target; `save_only_model=True` is refused.

Step numbers are the Trainer's: the step being taken is `state.global_step + 1`, the number
HF logs it under (and an fp16 step the scaler skipped still counts, as in HF's own logs).

fp16 (`fp16=True`, accelerate's GradScaler): keel sits where the scaler calls the optimizer's
step, which it does only when the gradients are finite. A step the scaler skips for an
overflow never reaches keel (no incident; the scaler lowers its scale and the Trainer moves
on); keel judges the unscaled loss and the norm after `unscale_`. A step keel skips is no
overflow to the Trainer: its scheduler steps as on any step.

Logs: the loss the Trainer logs is the mean over the steps keel applied in the logging
interval (HF's running sum includes every batch's loss; keel takes a skipped step's share
out, and logs no loss for an interval in which every step was skipped); the run's
`training_loss` counts a skipped step at its interval's mean. The LR logged is the one the
update used (the scheduler's times the guard's factor). Each training log also carries
`keel/skipped_steps` (steps not applied since the last log) and, when a telemetry step fell
in the interval, keel's early signals: `keel/max_attn_logit` (over the layers),
`keel/logit_z` and `keel/update_ratio_max` (see keel.torch.GuardedOptimizer), and the guard's
`keel/lr_factor` and `keel/rollbacks` — in `state.log_history` and whatever the Trainer
reports to (W&B, TensorBoard): the callback adds them before the Trainer hands the log to
its callbacks, so the `report_to` integrations get them whatever the callback order.

Guard events at their step (`report_events=True`, the default): after a step with a
detection, skip, back-off or rollback, the callback logs `keel/event/<kind>` = 1,
`keel/lr_factor` and `keel/rollbacks` through `trainer.log` at that step (the step's number
is the Trainer's global_step, as in its own logs), so every `report_to` integration charts
it (HF prefixes train logs: `train/keel/event/skip` in TensorBoard and W&B); the events as
sentences go to TensorBoard (`add_text`, tag `train/keel/events`) and W&B (a text value
`train/keel/events`). A give-up is reported before keel.GaveUp leaves `train()`.

keel's run directory (`log_dir=`): metrics.jsonl (every step's loss, gradient norm, the LR
the update used, skipped flag, tokens counted from the batches' input_ids, wall time, the
early signals on telemetry steps), each evaluation's `eval_loss` as `val_loss`,
telemetry.jsonl and events.jsonl (the guard writes them there unless `events=` is given):
`keel report DIR` draws the run like a `keel train` run (keel.torch.RunLogger).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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
    probe_attention / probe_logits / probe_updates / probe_every: the early signals measured on
    the live model (keel.torch.GuardedOptimizer; on by default where the model has them).
    The guard's state is saved in the Trainer's checkpoints (trainer_state.json) and restored
    by `trainer.train(resume_from_checkpoint=...)`.
    log_dir: keel's run directory (keel.torch.RunLogger: metrics.jsonl per step, the eval loss
    as val_loss, telemetry.jsonl, events.jsonl) for `keel report` / `keel watch`; main process
    only. tokens_per_step: the tokens of one optimizer step over all ranks (default: counted
    from the batches' input_ids). report_events: send each guard event to the Trainer's
    loggers (`report_to`) at its step (True by default)."""

    def __init__(
        self,
        guard: Optional[Guard] = None,
        *,
        trainer: Optional[Trainer] = None,
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
        report_events: bool = True,
        **guard_config: Any,
    ):
        # passed to GuardedOptimizer: rollback targets (keel's snapshots, or the Trainer's own
        # checkpoint-N: no copy) and the early signals measured on the live model (keel.probe)
        self.options = wrapper_options(
            snapshot_every=snapshot_every, keep=keep, snapshot_dir=snapshot_dir, snapshot_async=snapshot_async,
            rollback_from=rollback_from, probe_attention=probe_attention, probe_logits=probe_logits,
            probe_updates=probe_updates, probe_every=probe_every,
        )
        self._spec = GuardSpec(guard, events, guard_config)
        self.trainer = trainer
        self.gopt: Optional[GuardedOptimizer] = None
        self.actions: list = []  # every non-proceed Action, for inspection
        self._resume_state: Optional[dict] = None
        self._loss = None
        self._norm = None
        self._undo: list = []
        # the Trainer's running loss before this step's first micro-batch, the steps keel did
        # not apply since the last log, and those of earlier intervals that had no loss to log
        self._tr_before = None
        self._skipped = 0
        self._unfilled = 0
        self._last_log_step = 0
        self.log_dir, self.tokens_per_step, self.report_events = log_dir, tokens_per_step, report_events
        self._tokens = 0  # this step's tokens, counted from its batches
        self._pending_events: list = []  # (step, scalars, text) to report at the step's end
        self._warned: set = set()

    @property
    def guard(self) -> Optional[Guard]:
        return self.gopt.guard if self.gopt is not None else self._spec.guard

    def state(self) -> dict:
        # the Trainer rebuilds the callback from "args" and sets "attributes" on resume
        cfg = self.guard.config if self.guard is not None else self._spec.config
        return {
            "args": {
                **self.options,
                "snapshot_dir": None if self.options["snapshot_dir"] is None else os.fspath(self.options["snapshot_dir"]),
                "probe_logits": None if isinstance(self.options["probe_logits"], torch.nn.Module) else self.options["probe_logits"],
                "events": None if self._spec.events is None else os.fspath(self._spec.events),
                "log_dir": None if self.log_dir is None else os.fspath(self.log_dir),
                "tokens_per_step": self.tokens_per_step,
                "report_events": self.report_events,
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
        scaled = getattr(optimizer, "scaler", None) is not None
        if scaled and not hasattr(optimizer, "_optimizer_patched_step_method"):
            import accelerate

            raise RuntimeError(
                f"keel.hf.GuardCallback: fp16 loss scaling with accelerate {accelerate.__version__} is not "
                "supported (its AcceleratedOptimizer has no _optimizer_patched_step_method, where keel sits "
                "inside the scaler's step); train in bf16 or fp32, or use accelerate 1.x"
            )
        self._check_checkpoint_rollbacks(args)
        main = state.is_world_process_zero
        guard = self._spec.build(args.output_dir, main, self.log_dir)
        self.gopt = GuardedOptimizer(
            optimizer,
            guard,
            model=model if model is not None else trainer.model,
            scheduler=lr_scheduler,
            **self.options,
            step_scheduler=False,  # the Trainer steps its scheduler itself
            log_dir=run_logger(self.log_dir, main, self.tokens_per_step),
        )
        self._pending_events = []
        if self.report_events and main:
            self.gopt.add_event_hook(lambda s, scalars, text: self._pending_events.append((s, scalars, text)))
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
        self._loss = self._norm = None
        self._skipped = self._unfilled = 0
        self._last_log_step = state.global_step
        # the step's loss: the sum of training_step's returns (each already divided by the
        # accumulation: their mean over the micro-batches, what the Trainer logs)
        inner_training_step = trainer.training_step

        world = max(1, int(getattr(args, "world_size", 1) or 1))

        def training_step(*a, **k):
            if self._loss is None:
                # the running loss before this step's batches: a step keel skips is taken out
                tr = getattr(trainer, "_tr_loss", None)
                self._tr_before = tr.detach().clone() if isinstance(tr, torch.Tensor) else None
                self._tokens = 0
            inputs = a[1] if len(a) > 1 else k.get("inputs")
            ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
            if isinstance(ids, torch.Tensor):
                self._tokens += ids.numel() * world  # every rank's batch alike (metrics.jsonl's tokens)
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

        # fp16: accelerate's AcceleratedOptimizer.step runs scaler.step(raw optimizer), which
        # calls the raw optimizer's step (through this patched method) only when the
        # gradients are finite; keel sits there, so the scaler's overflow skips never reach it
        # and a step keel skips still ends in scaler.update()
        # (an optimizer that unscales in its own step, fused AdamW, is called on every step
        # with the scaler's found_inf set on it: keel reads it with the loss and passes an
        # overflow through unjudged)
        name = "_optimizer_patched_step_method" if scaled else "step"
        inner_step = getattr(optimizer, name)
        raw = getattr(optimizer, "optimizer", optimizer)

        def step(*a, **k):
            loss, norm = self._loss, self._norm
            self._loss = self._norm = None
            if loss is None:
                loss = torch.tensor(float("nan"))
            if self.tokens_per_step is None and self._tokens:
                self.gopt._tokens = self._tokens
            try:
                act = self.gopt._guarded_step(
                    loss, norm, {}, lambda: inner_step(*a, **k), step=trainer.state.global_step + 1,
                    overflow=getattr(raw, "found_inf", None) if scaled else None,
                )
            except GaveUp:
                self._unwrap()  # a caught GaveUp leaves a clean Trainer behind
                self._report_pending(trainer)  # on_step_end will not come: the give-up is reported now
                raise
            if act is None:
                return  # the scaler's overflow
            if scaled:
                # a step keel skipped is no overflow: the Trainer steps its scheduler as usual
                optimizer._accelerate_step_called = True
            if act.skip:
                tr = getattr(trainer, "_tr_loss", None)
                if self._tr_before is not None and isinstance(tr, torch.Tensor):
                    tr.copy_(self._tr_before)  # its batches' losses leave the logged mean
                self._skipped += 1
            if act.kind != "proceed":
                self.actions.append(act)

        # the LR the Trainer logs (to its console, W&B, TensorBoard) is the one the update
        # used: the scheduler's times the guard's factor (a rollback lowers it for good)
        inner_lr = trainer._get_learning_rate

        def _get_learning_rate(*a, **k):
            lr = inner_lr(*a, **k)
            f = self.gopt.guard.lr_factor if self.gopt is not None else 1.0
            return lr * f if isinstance(lr, (int, float)) else lr

        inner_log = trainer.log

        def log(logs, *a, **k):
            if isinstance(logs, dict) and "loss" in logs and "learning_rate" in logs:
                self._training_log(trainer, logs)  # a training log, not eval's or the summary
            return inner_log(logs, *a, **k)

        keep_scheduler_marker(inner_step, step)
        self._undo = [
            patch(trainer, "training_step", training_step),
            patch(acc, "clip_grad_norm_", clip_grad_norm_),
            patch(optimizer, name, step),
            patch(trainer, "_get_learning_rate", _get_learning_rate),
            patch(trainer, "log", log),
        ]

    def _training_log(self, trainer, logs: dict) -> None:
        """The loss over the applied steps only, keel's skip count and its early signals."""
        since = self._last_log_step
        n = trainer.state.global_step - since
        self._last_log_step = trainer.state.global_step
        skipped, self._skipped = self._skipped, 0
        if skipped and self._tr_before is not None and isinstance(logs["loss"], (int, float)):
            kept = n - skipped
            if kept > 0:
                # the Trainer divided the applied steps' sum by every step of the interval
                mean = logs["loss"] * n / kept
                logs["loss"] = mean
                # its run average counts every step: a skipped one at its interval's mean
                if isinstance(getattr(trainer, "_total_loss_scalar", None), float):
                    trainer._total_loss_scalar += mean * (skipped + self._unfilled)
                self._unfilled = 0
            else:
                del logs["loss"]  # no step of the interval was applied: no loss to report
                self._unfilled += skipped
        logs["keel/skipped_steps"] = skipped
        if self.gopt is not None:
            logs["keel/lr_factor"] = self.gopt.guard.lr_factor
            logs["keel/rollbacks"] = self.gopt.rollbacks
        sig = self.gopt.signals if self.gopt is not None else {}
        if sig and sig["step"] > since:
            attn = [v for v in sig.get("max_attn_logit") or [] if v is not None]
            if attn:
                logs["keel/max_attn_logit"] = max(attn)
            if "logit_z" in sig:
                logs["keel/logit_z"] = sig["logit_z"]
            ratios = [v for v in (sig.get("update_ratio") or {}).values() if v == v and v != float("inf")]
            if ratios:
                logs["keel/update_ratio_max"] = max(ratios)

    def on_step_begin(self, args, state, control, **kw):
        # a step the fp16 scaler skipped (overflow) never reached keel: nothing of it carries over
        self._loss = self._norm = None

    # -- the guard's events on the Trainer's loggers -----------------------------------------
    def on_step_end(self, args, state, control, **kw):
        # the step is counted now (global_step == its number): its events go where the
        # Trainer's own logs of that step go
        self._report_pending(self.trainer)

    def _report_pending(self, trainer) -> None:
        """Each event step's scalars through `trainer.log` (every report_to integration, the
        log history and the console, at the step's number), and its sentences as text to
        TensorBoard and W&B, the integrations that take text."""
        pending, self._pending_events = self._pending_events, []
        for s, scalars, text in pending:
            st = trainer.state
            saved = st.global_step
            # a give-up is reported from inside its step, before the Trainer counts it
            st.global_step = s
            # the Trainer's on_log clears control.should_log: its own log of this step, decided
            # before on_step_end returns, must still happen
            ctl = trainer.control
            should_log = ctl.should_log
            try:
                trainer.log(dict(scalars))
                if text:
                    self._report_text(trainer, s, text)
            finally:
                st.global_step = saved
                ctl.should_log = trainer.control.should_log = should_log

    def _report_text(self, trainer, step: int, text: str) -> None:
        for cb in trainer.callback_handler.callbacks:
            name = type(cb).__name__
            try:
                if name == "TensorBoardCallback":
                    w = getattr(cb, "tb_writer", None)
                    if w is not None:  # the Trainer's writer (HF prefixes its train logs with train/)
                        w.add_text("train/keel/events", text, step)
                        w.flush()
                elif name == "WandbCallback":
                    wb = getattr(cb, "_wandb", None)
                    run = getattr(wb, "run", None)
                    if run is not None:
                        run.log({"train/keel/events": text, "train/global_step": step})
            except Exception as e:  # a logger failing on text must not stop training
                warn_once(self._warned, name, f"keel.hf.GuardCallback: could not write guard events as text to "
                                              f"{name}: {type(e).__name__}: {e}")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        # the eval loss, after the step it was measured at, into keel's run directory
        if self.gopt is None or self.gopt.logger is None or not metrics:
            return
        v = metrics.get("eval_loss")
        if isinstance(v, (int, float)):
            self.gopt.logger.log_val(v, state.global_step)

    # -- rollback to the Trainer's own checkpoints (rollback_from="checkpoints") -------------
    def _check_checkpoint_rollbacks(self, args) -> None:
        if self.options["rollback_from"] != "checkpoints":
            return
        if args.save_only_model:
            raise ValueError(
                "keel.hf.GuardCallback(rollback_from='checkpoints') restores the optimizer and scheduler "
                "from the Trainer's checkpoints, but save_only_model=True leaves them out; save them, or "
                "use rollback_from='snapshots'"
            )
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
            warnings.warn(
                "keel.hf.GuardCallback(rollback_from='checkpoints') with save_strategy='no': the Trainer saves "
                "no checkpoint, so every rollback goes back to the state training started from",
                stacklevel=3,
            )

    def on_save(self, args, state, control, **kw):
        # checkpoint-N is complete (weights, optimizer, scheduler, trainer_state.json with the
        # guard's state): a rollback target unless an incident is open (GuardedOptimizer decides)
        if self.options["rollback_from"] != "checkpoints" or self.gopt is None:
            return
        trainer = self.trainer
        run_dir = trainer._get_output_dir(trial=None) if hasattr(trainer, "_get_output_dir") else args.output_dir
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(path):
            self.gopt.register_checkpoint(path, load=self._load_checkpoint)

    def _load_checkpoint(self, path: str):
        """A rollback to checkpoint-N with the Trainer's own loading code (weights; optimizer and
        scheduler); returns the guard's state saved in its trainer_state.json."""
        trainer = self.trainer
        trainer._load_from_checkpoint(path)
        trainer._load_optimizer_and_scheduler(path)
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            saved = (json.load(f).get("stateful_callbacks") or {}).get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) else saved
        st = (saved or {}).get("attributes", {}).get("_resume_state")
        return st["guard"] if st else None

    def _unwrap(self):
        for u in reversed(self._undo):
            u()
        self._undo = []

    def on_train_end(self, args, state, control, **kw):
        # unwrap, so a later train() on the same Trainer starts clean
        self._unwrap()
        if self.gopt is not None:
            self.gopt.wait_snapshot()  # the last background snapshot's error, if any, is not lost
