"""keel inside any PyTorch job: the guard of `keel train` (spike detection and escalating
recovery), role-aware init, the init audit and the signal-propagation check.

Everything that decides is keel's Rust library (the same code the `keel` binary runs):

    guard = keel.Guard(events="run/events.jsonl")          # [guard] keys as keyword arguments
    action = guard.observe(step, loss, grad_norm)            # proceed / skip / lr_backoff / rollback / give_up

    opt = keel.torch.GuardedOptimizer(torch.optim.AdamW(...), model=model, scheduler=sched)
    keel.init_(model, scheme="mitchell", seed=0)             # == `keel init --hf config.json --init mitchell`
    keel.audit(model, scheme="mitchell")                     # == `keel check --model DIR --init mitchell`
    keel.check(model.config, "mitchell")                     # == `keel check --hf config.json --json`

`keel.torch`, `keel.hf` and `keel.lightning` import torch / transformers / lightning on
first use; `import keel` alone needs none of them. `import keel.optuna` (needs optuna): a
pruner on keel's divergence rule, objectives run under the guard, and a study exported as a
keel sweep (`python3 -m keel.optuna export --storage URL --out DIR`) for `keel report`.
`keel.sharpness(model, loss_fn, batch, opt)` (imports torch on first use): λ_max of the Hessian
and of Adam's preconditioned Hessian on a live model, and the max stable LR they predict.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _keel

__version__ = _keel.__version__

__all__ = [
    "Action",
    "GaveUp",
    "Guard",
    "audit",
    "check",
    "explain",
    "init_",
    "guard_defaults",
    "init_defaults",
]

_ACTIONS = tuple(_keel.ACTIONS)  # index = code returned by the core
_EXTRA = ("max_attn_logit", "logit_z", "lr", "scaler_skips")

def _dumps(section: str, d: dict) -> str:
    """Keyword settings as JSON; a non-finite number is named (JSON has none, and the bare
    "not valid JSON" it would cause names nothing)."""
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{section}.{k}: must be a finite number, got {v}")
    return json.dumps(d)

class GaveUp(RuntimeError):
    """The guard ran out of rungs (rollbacks or skips): the instability is not in a few
    batches. `diagnosis` says what happened and what to try; `step` is where it gave up."""

    def __init__(self, diagnosis: str, step: int):
        super().__init__(f"keel guard gave up at step {step}: {diagnosis}")
        self.diagnosis = diagnosis
        self.step = step

    def __reduce__(self):  # picklable across processes (ddp_spawn, multiprocessing)
        return (GaveUp, (self.diagnosis, self.step))


@dataclass(frozen=True)
class Action:
    """What to do about one step.

    kind: "proceed", "skip", "lr_backoff" (skip this update; the LR is lowered from now on),
        "rollback" (restore the last good state older than `rollback_before`) or "give_up".
    skip: do not apply this step's update (true for every kind but proceed).
    lr_factor: the LR multiplier in force from this step on (1 unless backed off).
    events: the events.jsonl lines written for this step (detections and actions).
    """

    kind: str
    step: int
    skip: bool
    lr_factor: float
    rollback_before: Optional[int] = None
    diagnosis: Optional[str] = None
    events: tuple = field(default=(), repr=False)

    @property
    def proceed(self) -> bool:
        return not self.skip

    @property
    def detections(self) -> list:
        """The detectors that fired (spike, warning, divergence lines), each a dict."""
        return [e["detail"] for e in self.events if e["kind"] in ("spike", "warning", "divergence")]


def _scalar(name: str, v: Any) -> Optional[float]:
    if v is None:
        return None
    try:
        return float(v)  # a 0-d tensor or numpy scalar reads here (one host sync)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number or a 0-d tensor, got {type(v).__name__}") from None


class Guard:
    """keel's guard over any training loop: the detectors (nonfinite, loss_spike, divergence,
    persistent; grad_spike, attn_logit and logit_drift warnings) and the escalating policy
    (skip -> LR back-off -> rollback -> give up) of `keel train`, from the same Rust code.

    Keyword arguments are `[guard]` keys (see `keel.guard_defaults()`); an unknown key raises
    ValueError naming it and the valid ones. `events` is an events.jsonl path to append to
    (keel's format, readable by `keel report`); give it on one rank only.
    """

    def __init__(self, events: Optional[os.PathLike] = None, **config: Any):
        self._core = _keel.Guard(_dumps("guard", config), None if events is None else os.fspath(events))
        self.events_path = None if events is None else os.fspath(events)

    def observe(self, step: int, loss: Any, grad_norm: Any = None, **extra: Any) -> Action:
        """Feed one step's loss and gradient norm (and optionally `max_attn_logit`,
        `logit_z`, `lr`: the step's scheduled LR, whose rises keep the early rule on, and
        `scaler_skips`: on a step a GradScaler skipped, how many in a row); returns the Action.
        NaN and inf are acted on (skipped), never raised."""
        for k in extra:
            if k not in _EXTRA:
                raise ValueError(f"observe: unknown metric '{k}'; use one of: {', '.join(_EXTRA)}")
        step = int(step)
        if step < 0:
            raise ValueError(f"observe: step must be >= 0, got {step}")
        lv = _scalar("loss", loss)
        if lv is None:
            lv = math.nan
        code, skip, factor, before, diagnosis, events = self._core.observe(
            step,
            lv,
            _scalar("grad_norm", grad_norm),
            _scalar("max_attn_logit", extra.get("max_attn_logit")),
            _scalar("logit_z", extra.get("logit_z")),
            _scalar("lr", extra.get("lr")),
            None if extra.get("scaler_skips") is None else int(extra["scaler_skips"]),
        )
        return Action(
            kind=_ACTIONS[code],
            step=step,
            skip=skip,
            lr_factor=factor,
            rollback_before=before,
            diagnosis=diagnosis,
            events=tuple(json.loads(events)) if events else (),
        )

    def restore_detectors(self, state: dict) -> None:
        """After you roll back yourself: put the detector windows back to those of
        `state` (a `state_dict()` taken with the restored weights), so the restored weights'
        losses are judged against their own history. The policy state carries on."""
        self._core.restore_detectors_json(state["state"] if isinstance(state, dict) else state)

    def log_event(self, step: int, kind: str, detail: Optional[dict] = None) -> None:
        """Append an event of your own to events.jsonl (e.g. what a rollback restored)."""
        self._core.log_event(int(step), kind, json.dumps(detail or {}))

    @property
    def lr_factor(self) -> float:
        return self._core.lr_factor

    @property
    def in_incident(self) -> bool:
        """An incident is open: snapshots and checkpoints should wait for a quiet step."""
        return self._core.in_incident

    @property
    def enabled(self) -> bool:
        return self._core.enabled

    @property
    def config(self) -> dict:
        return json.loads(self._core.config_json())

    def state_dict(self) -> dict:
        """Detector windows and policy state; save it with the training checkpoint."""
        return {"config": self.config, "state": self._core.state_json()}

    def load_state_dict(self, d: dict) -> None:
        self._core.load_state_json(d["state"] if isinstance(d, dict) else d)


def guard_defaults() -> dict:
    """The `[guard]` keys and their defaults."""
    return json.loads(_keel.guard_defaults())


def init_defaults() -> dict:
    """The `[init]` keys and their defaults."""
    return json.loads(_keel.init_defaults())


def _config_json(config: Any) -> str:
    """An HF config (object, dict, or path to config.json) or a preset name, as JSON."""
    if isinstance(config, (str, os.PathLike)):
        p = os.fspath(config)
        if os.path.exists(p):
            with open(p) as f:
                try:
                    return json.dumps(json.load(f))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}: not valid JSON: {e}") from None
        return json.dumps(p)  # a preset: micro, tiny, small, llama2-7b, ...
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ValueError(
            f"config: expected an HF config, a dict, a config.json path or a preset name, got {type(config).__name__}"
        )
    return json.dumps(config, default=str)


def _init_json(scheme: str, seed: int, init: dict) -> str:
    return json.dumps({"scheme": scheme, "seed": int(seed), **init})


def explain(config: Any, scheme: str = "normal", seed: int = 0, **init: Any) -> dict:
    """The per-tensor plan of `scheme` for a config (`keel init --explain`): role, shape,
    fans, distribution, target σ, formula and depth scaling of every tensor, plus the model
    variant the scheme implies. Nothing is allocated: any size works."""
    plan = _keel.InitPlan(_config_json(config), _init_json(scheme, seed, init))
    return json.loads(plan.explain_json())


def check(config: Any, scheme: str = "normal", seed: int = 0, *, init: Optional[dict] = None, **options: Any) -> dict:
    """`keel check --json` as a dict: theory vs a measured forward/backward at init, the
    first optimizer steps and six PASS/WARN/FAIL gates with reasons and suggestions. Large
    configs run on a width-reduced proxy. Options: batch, seq, steps, lr, seed, proxy_width."""
    opts = dict(options)
    opts.setdefault("seed", seed)
    return json.loads(
        _keel.check(_config_json(config), _init_json(scheme, seed, init or {}), json.dumps(opts))
    )


def init_(model, scheme: str = "normal", seed: int = 0, *, config: Any = None, names: Any = None, **init: Any):
    """Initialise a live LLaMA-architecture module with keel's role-aware scheme, in place;
    float32 tensors equal `keel init --hf config.json --init SCHEME --seed SEED` bit for bit.
    Returns the model.

    Taken as they are: HF `LlamaForCausalLM` / `LlamaModel` (config from `.config`), torchtitan's
    Llama (config derived from the module; wq/wk get torchtitan's RoPE row order, so the
    network is the one `keel init` writes), either under torch.compile, DDP or activation
    checkpointing. Any other Llama: `config=` (an HF LlamaConfig, a dict of its keys or a
    config.json path) and `names=`: {your name pattern: keel's HF name}, `{i}` standing for the
    layer (e.g. {"blocks.{i}.attn.q.weight": "model.layers.{i}.self_attn.q_proj.weight"}), or
    a callable name -> keel name; None leaves a tensor alone (a bias), a list of keel names is
    one tensor fused along dim 0 (a qkv or gate+up projection). `**init` are `[init]` options
    (`keel.init_defaults()`; `roles=` there sets per-role options such as the head's std)."""
    from ._model import init_model

    return init_model(model, scheme, seed, config, init, names)


def audit(model, scheme: str = "normal", *, config: Any = None, names: Any = None, **init: Any) -> dict:
    """`keel check --model` on live weights: every tensor's σ, mean, max|w|/σ, kurtosis and
    fraction at the bound against `scheme`, with a verdict and the likely bug. Takes the
    modules `init_` takes (`config=`, `names=` alike; a fused tensor is audited part by part;
    each row's `param` is the module's parameter name)."""
    from ._model import audit_model

    return audit_model(model, scheme, config, init, names)


def __getattr__(name: str):
    # keel.torch / keel.hf / keel.lightning without importing torch at `import keel`;
    # keel.sharpness is a callable module: keel.sharpness(model, loss_fn, batch, opt) measures,
    # keel.sharpness.track(...) tracks (a function here would be shadowed by the submodule)
    if name in ("torch", "hf", "lightning", "probe", "snapshots", "optuna", "sharpness"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'keel' has no attribute '{name}'")
