"""Early signals measured on a live PyTorch model, without changing its numerics: the exact
max attention logit per layer (q·kᵀ·scale after RoPE and any q/k norm, causal), recomputed
from each attention module's inputs through forward pre-hooks on a subsample of rows, so
sdpa, flash and eager attention all work (none of them exposes the logits).

    probe = keel.probe.AttentionProbe(model)        # HF Llama/Mistral/Qwen2/Qwen3, torchtitan
    loss = model(**batch).loss                      # the hooks measure during this forward
    opt.step(loss, gn, max_attn_logit=probe.take()) # a 0-d tensor: no host sync here

Any other attention: `probe.add(module, qk)` where `qk(module, args, kwargs)` returns
(q, k) as [batch, heads, seq, head_dim] after positional encoding, and the scale.
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


class AttentionProbe:
    """Exact max attention logit of each attention module of `model`, measured while the
    probe is on (`on`), read and reset with `take()`. `rows`: how many sequences of the batch
    are recomputed (the max over a subsample; 1 costs two small projections and one T×T
    product per layer)."""

    def __init__(self, model: Optional[torch.nn.Module] = None, rows: int = 1):
        self.rows = rows
        self.on = True
        self._max: list = []
        self._handles = []
        self.layers = 0
        self.last_logits: Optional[list] = None  # per layer, when `keep_logits` (tests)
        self.keep_logits = False
        if model is not None:
            for m in model.modules():
                if all(hasattr(m, a) for a in ("q_proj", "k_proj", "head_dim", "scaling")):
                    self.add(m, _hf_qk(rows))
                elif all(hasattr(m, a) for a in ("wq", "wk", "head_dim")):
                    self.add(m, _titan_qk(rows))
            if self.layers == 0:
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
            if not self.on:
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

    def take(self) -> Optional[torch.Tensor]:
        """The largest logit over the layers since the last take (a 0-d tensor on the model's
        device, no host sync), or None when nothing was measured."""
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
