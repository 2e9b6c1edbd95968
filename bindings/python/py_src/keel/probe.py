"""Early signals measured on a live PyTorch model, without changing its numerics:

- the exact max attention logit per layer (q·kᵀ·scale after RoPE and any q/k norm, causal),
  by `AttentionObserver` with no model-specific code: it watches the forward's calls to
  `torch.nn.functional.scaled_dot_product_attention` (nanoGPT, HF's sdpa path, torchtitan,
  litgpt) and to softmax over 4-D scores (hand-written eager attention: nanoGPT's slow path,
  minGPT, HF's eager path) and takes the max on a subsample of rows, one value per call;
- the same from each attention module's inputs by `AttentionProbe`, for the HF Llama family
  and torchtitan by name, or any attention registered with `probe.add`;
- the output log-partition logZ (the mean over positions of logsumexp over the vocabulary of
  the LM head's logits, float32, on a subsample of rows), through a forward hook on the head;
- the update/weight ratio ||Δw||/||w|| of every parameter tensor across one optimizer step.

    probe = keel.probe.AttentionObserver(model)     # any model whose forward calls sdpa or softmax
    loss = model(**batch).loss                      # the hooks measure during this forward
    opt.step(loss, gn, max_attn_logit=probe.take()) # a 0-d tensor: no host sync here

`keel.torch.GuardedOptimizer(model=...)` and the HF and Lightning callbacks do this for you,
on the guard's telemetry steps. An attention neither observer sees (a fused kernel of its
own): `AttentionProbe().add(module, qk)` where `qk(module, args, kwargs)` returns (q, k) as
[batch, heads, seq, head_dim] after positional encoding, and the scale, passed as
`probe_attention=`; any other LM head: `LogitProbe(head=module)`.

Inside a `torch.compile`d forward neither attention probe measures (the compiled graph makes
no Python calls to watch, and a probe that switched on and off would recompile it): keel says
so once, and the loss-based rules still act.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _hf_qk(rows: int):
    """q, k and the scale of an HF Llama-family attention module (Llama, Mistral, Qwen2,
    Qwen3 with its q_norm/k_norm): its own projections, norms and RoPE, on `rows` rows."""

    def qk(m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = h[:rows]
        b, t, _ = h.shape
        hd = m.head_dim
        q = m.q_proj(h).view(b, t, -1, hd)
        k = m.k_proj(h).view(b, t, -1, hd)
        if getattr(m, "q_norm", None) is not None:
            q, k = m.q_norm(q), m.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        if pe is not None:
            cos, sin = pe
            cos, sin = cos[:rows].unsqueeze(1), sin[:rows].unsqueeze(1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        return q, k, m.scaling

    return qk


def _titan_qk(rows: int):
    """torchtitan's Llama attention (`wq`, `wk`, `forward(x, freqs_cis)`, complex RoPE)."""

    def qk(m, args, kwargs):
        x = args[0] if args else kwargs["x"]
        freqs = args[1] if len(args) > 1 else kwargs["freqs_cis"]
        x = x[:rows]
        b, t, _ = x.shape
        q = m.wq(x).view(b, t, -1, m.head_dim)
        k = m.wk(x).view(b, t, -1, m.head_dim)

        def rope(v):
            c = torch.view_as_complex(v.float().reshape(*v.shape[:-1], -1, 2))
            f = freqs[:t].view(1, t, 1, c.shape[-1])
            return torch.view_as_real(c * f).flatten(3).type_as(v)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        return q, k, 1.0 / math.sqrt(m.head_dim)

    return qk


class _PerLayer:
    """What both attention probes share: a max per layer (`_max`, 0-d tensors), read and reset
    by `take()`, and their hooks (`_handles`)."""

    def take(self) -> Optional[torch.Tensor]:
        """The largest logit over the layers since the last take (a 0-d tensor on the model's
        device, no host sync), or None when nothing was measured."""
        self.taken = self._max
        vals = [v for v in self._max if v is not None]
        self._max = [None] * self.layers
        if not vals:
            return None
        return torch.stack([v.to(vals[0].device) for v in vals]).amax()

    def per_layer(self) -> list:
        """The last measured max per layer (floats; a host sync), None where unmeasured."""
        return [None if v is None else float(v) for v in self._max]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class AttentionProbe(_PerLayer):
    """Exact max attention logit of each attention module of `model`, measured while the
    probe is on (`on`), read and reset with `take()`. `rows`: how many sequences of the batch
    are recomputed (the max over a subsample; 1 costs two small projections and one T×T
    product per layer). `required`: raise when `model` has no attention module keel knows
    (else the probe has `layers == 0` and measures nothing)."""

    def __init__(self, model: Optional[torch.nn.Module] = None, rows: int = 1, required: bool = True):
        self.rows = rows
        self.on = True
        self._max: list = []
        self._handles = []
        self.layers = 0
        self.taken: list = []  # per layer, what the last take() read (0-d tensors or None)
        self.last_logits: Optional[list] = None  # per layer, when `keep_logits` (tests)
        self.keep_logits = False
        if model is not None:
            for m in model.modules():
                if all(hasattr(m, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")):
                    self.add(m, _hf_qk(rows))
                elif all(hasattr(m, a) for a in ("wq", "wk", "head_dim")):
                    self.add(m, _titan_qk(rows))
            if self.layers == 0 and required:
                raise ValueError(
                    "AttentionProbe: no attention module found (HF q_proj/k_proj/head_dim/scaling, or "
                    "torchtitan wq/wk/head_dim); register one with probe.add(module, qk)"
                )

    def add(self, module: torch.nn.Module, qk: Callable) -> None:
        """Probe one attention module: `qk(module, args, kwargs)` → (q, k, scale), q and k as
        [batch, heads (k: KV heads), seq, head_dim] after positional encoding."""
        idx = self.layers
        self.layers += 1
        self._max.append(None)

        def hook(m, args, kwargs):
            if not self.on:  # under torch.compile Dynamo guards on it: one recompile when it switches
                return
            with torch.no_grad():
                q, k, scale = qk(m, args, kwargs)
                if k.shape[1] != q.shape[1]:
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
                t = s.shape[-1]
                causal = torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1)
                s = s.masked_fill(causal, float("-inf"))
                if self.keep_logits:
                    if self.last_logits is None or len(self.last_logits) != self.layers:
                        self.last_logits = [None] * self.layers
                    self.last_logits[idx] = s.detach().clone()
                self._max[idx] = s.amax().detach()

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))



def _compiling() -> bool:
    c = getattr(torch, "compiler", None)
    return bool(c is not None and hasattr(c, "is_compiling") and c.is_compiling())


_SOFTMAX = None


def _softmaxes() -> tuple:
    global _SOFTMAX
    if _SOFTMAX is None:
        F = torch.nn.functional
        _SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax)
    return _SOFTMAX


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class AttentionObserver(torch.overrides.TorchFunctionMode, _PerLayer):
    """The exact max attention logit of every attention call in `model`'s forward, with no
    names: while the observer is on (`on`), a forward pre-hook on `model` enters this
    TorchFunctionMode (a forward hook leaves it, also when the forward raises), which sees

    - each `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
      is_causal, scale, enable_gqa)` call: q·kᵀ·scale (default 1/√E) on the first `rows`
      sequences, with the call's causal or boolean mask (an additive float mask is added), and
    - each softmax over the last dimension of a 4-D float tensor ([batch, heads, T, S]: the
      scores of an attention written by hand): the max over its first `rows` sequences (masked
      entries are −inf or the dtype's minimum: never the max).

    Call i of a forward is layer i: `take()` returns the max over all of them (a 0-d tensor,
    no host sync), `taken` the per-layer values it read (the max over the forwards of a step:
    gradient accumulation). The computation is a subsample's T×S scores per call, only while
    on; the model's own call runs unchanged. `calls` counts the calls seen since the last
    take; `seen` counts forwards observed. Under torch.compile nothing is observed (see the
    module docstring)."""

    def __init__(self, model: Optional[torch.nn.Module] = None, rows: int = 1):
        super().__init__()
        self.rows = max(1, int(rows))
        self.on = True
        self.layers = 0
        self.taken: list = []
        self._max: list = []
        self._i = 0  # position of the next call in this forward
        self.calls = 0
        self.seen = 0
        self._active = 0
        self._handles = []
        self.model = model
        if model is not None:
            # on the model and every module with children: a LightningModule's training_step
            # calls its inner model, not its own forward; nested entries only count depth
            for m in model.modules():
                if m is model or next(m.children(), None) is not None:
                    self._handles.append(m.register_forward_pre_hook(self._enter))
                    try:
                        self._handles.append(m.register_forward_hook(self._leave, always_call=True))
                    except TypeError:  # torch < 2.1: no always_call
                        self._handles.append(m.register_forward_hook(self._leave))

    # -- entering and leaving around the model's forward --------------------------------
    def _enter(self, module, args):
        if _compiling():
            return
        if self._active:
            self._active += 1  # a module inside the observed forward
            return
        if not self.on:
            return
        self._i = 0
        self.seen += 1
        self._active = 1
        self.__enter__()

    def _leave(self, module, args, out):
        if _compiling() or self._active == 0:
            return
        self._active -= 1
        if self._active == 0:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            if func is torch.nn.functional.scaled_dot_product_attention:
                self._sdpa(args, kwargs)
            elif func in _softmaxes():
                self._softmax(args, kwargs)
        except Exception:  # the model's forward must never fail because of keel
            pass
        return func(*args, **kwargs)

    def _put(self, v: torch.Tensor) -> None:
        i = self._i
        self._i += 1
        self.calls += 1
        if i >= len(self._max):
            self._max.extend([None] * (i + 1 - len(self._max)))
            self.layers = len(self._max)
        prev = self._max[i]
        self._max[i] = v if prev is None else torch.maximum(prev, v.to(prev.device))

    def _sdpa(self, args, kwargs) -> None:
        q, k = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 2:
            return
        mask = _arg(args, kwargs, 3, "attn_mask")
        causal = bool(_arg(args, kwargs, 5, "is_causal", False))
        scale = _arg(args, kwargs, 6, "scale")
        with torch.no_grad():
            batched = q.dim() >= 3
            qq = q[: self.rows] if batched else q
            kk = k[: self.rows] if batched else k
            qq, kk = qq.float(), kk.float()
            if qq.dim() >= 3 and kk.shape[-3] != qq.shape[-3] and qq.shape[-3] % kk.shape[-3] == 0:
                kk = kk.repeat_interleave(qq.shape[-3] // kk.shape[-3], dim=-3)  # GQA
            sc = (1.0 / math.sqrt(q.shape[-1])) if scale is None else float(scale)
            s = torch.matmul(qq, kk.transpose(-1, -2)) * sc
            L, S = s.shape[-2], s.shape[-1]
            if causal:
                keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
                s = s.masked_fill(~keep, float("-inf"))
            if isinstance(mask, torch.Tensor):
                m = mask[: self.rows] if (batched and mask.dim() == q.dim() and mask.shape[0] == q.shape[0]) else mask
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
            self._put(s.amax().detach())

    def _softmax(self, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            return
        dim = _arg(args, kwargs, 1, "dim")
        if dim is None or dim not in (-1, 3):
            return
        with torch.no_grad():
            self._put(x[: self.rows].detach().amax().float())

    # -- the probe interface (GuardedOptimizer and the callbacks) ------------------------
    def take(self) -> Optional[torch.Tensor]:
        """The largest logit over the calls since the last take (a 0-d tensor, no host sync),
        or None when nothing was measured."""
        self.calls = 0
        return super().take()

    def remove(self) -> None:
        super().remove()
        if self._active:
            self._active = 0
            self.__exit__(None, None, None)


def find_lm_head(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module producing the vocabulary logits: an HF model's `get_output_embeddings()`
    (its `lm_head`), else a submodule named `lm_head` or torchtitan's `output`; None if none."""
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, torch.nn.Module):
                return head
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lm_head", "output") and isinstance(m, torch.nn.Linear):
            return m
    return None


def _log_partition(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """Mean over positions of logsumexp over the vocabulary (last dim), in float32, a bounded
    slice at a time (a [T, V] float32 copy of a 128k vocabulary would be large): of the
    first `rows` sequences of [batch, seq, vocab] logits, of every row of [rows, vocab] ones."""
    x = logits[:rows] if logits.dim() >= 3 else logits
    x = x.detach().reshape(-1, x.shape[-1])
    chunk = max(1, (1 << 22) // max(1, x.shape[-1]))  # 16 MiB of float32 at a time
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total = total + torch.logsumexp(x[i : i + chunk].float(), dim=-1).sum()
    return total / max(1, x.shape[0])


class LogitProbe:
    """The output log-partition logZ of the live model: the mean over positions of
    logsumexp over the vocabulary of the LM head's logits (float32; the first `rows`
    sequences of the batch, every row of logits without a sequence axis), measured by a
    forward hook on the head while the probe is on (`on`), read and reset with `take()`. It
    is what `keel train` reports as logit_z and what the guard's logit_drift warning watches
    (|logZ| above `logit_z_max`). `head`: the module whose output are the logits (default:
    found by `find_lm_head`). `required`: raise when no head is found (else `head` is None
    and nothing is measured)."""

    def __init__(self, model: Optional[torch.nn.Module] = None, head: Optional[torch.nn.Module] = None,
                 rows: int = 1, required: bool = True):
        self.rows = rows
        self.on = True
        self._z: Optional[torch.Tensor] = None
        self._handle = None
        self.head = head if head is not None else (find_lm_head(model) if model is not None else None)
        if self.head is None:
            if required:
                raise ValueError(
                    "LogitProbe: no LM head found (an HF model's get_output_embeddings(), a module named "
                    "lm_head, or torchtitan's output); pass LogitProbe(head=module)"
                )
            return
        self._handle = self.head.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        # compiled, it measures every forward: reading `on` there would make Dynamo guard on
        # it and recompile at every switch (the cost is one row's logsumexp per step)
        if not _compiling() and not self.on:
            return
        if isinstance(out, (tuple, list)):
            out = out[0] if out and isinstance(out[0], torch.Tensor) else None
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        full = getattr(out, "full_tensor", None)  # a vocabulary sharded by tensor parallelism
        with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
            self._z = _log_partition(full() if callable(full) else out, self.rows)

    def take(self) -> Optional[torch.Tensor]:
        """logZ measured since the last take (a 0-d float32 tensor on the head's device, no host
        sync), or None when nothing was measured."""
        z, self._z = self._z, None
        return z

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _local(p: torch.Tensor) -> torch.Tensor:
    to_local = getattr(p, "to_local", None)  # a DTensor (FSDP2): this rank's shard
    return to_local() if callable(to_local) else p


class UpdateRatio:
    """||Δw|| / ||w|| of every parameter tensor across one optimizer step: `begin(params)`
    copies the parameters (one transient copy, in their own dtype), `end()` after the step
    returns the ratios as one float32 tensor (no host sync), ||w|| taken before the step.
    Sharded parameters (FSDP2 DTensors) give this rank's shard's ratio."""

    def __init__(self):
        self._st = None

    def begin(self, params: list) -> None:
        ps = [_local(p.detach()) for p in params]
        if not ps:
            self._st = None
            return
        with torch.no_grad():
            norms = torch._foreach_norm(ps, 2, dtype=torch.float32)
            copies = [p.clone() for p in ps]
        self._st = (ps, norms, copies)

    def end(self) -> Optional[torch.Tensor]:
        st, self._st = self._st, None
        if st is None:
            return None
        ps, norms, copies = st
        with torch.no_grad():
            torch._foreach_sub_(copies, ps)  # before - after: -Δw, in the copies
            deltas = torch._foreach_norm(copies, 2, dtype=torch.float32)
            dev = norms[0].device
            return torch.stack([d.to(dev) for d in deltas]) / torch.stack([n.to(dev) for n in norms])
