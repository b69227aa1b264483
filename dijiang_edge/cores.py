"""Attention cores: the recurrence a ``DiJiangAttention`` layer runs, one module per form.

A layer hands its core packed features ``q [B, T, H*m]``, ``k [B, T, H_kv*m]``,
``v [B, T, H_kv*dv]``, the log gate ``[B, H, T]`` (``[1, H, 1]`` for a constant decay),
``beta`` (None = 1), the layer's state ``[B, H, m, dv]`` and the call's ``Context``;
the core returns the packed output ``[B, T, H*dv]`` and the new state.  The math is
``attention.py``'s; a core only arranges heads for it, so swapping the core
(``transforms.use_core``) changes how the model runs, never what it computes:

* ``EagerCore``: chunked form for several tokens, one recurrent step for one (PyTorch);
* ``MaskedCore``: one call's tokens as one masked chunk (``.pte`` and ONNX prefill);
* ``StepCore``: the one-token recurrent step in plain ops (ONNX decode);
* ``NativeCore``: onnxruntime's ``LinearAttention`` (ONNX, prefill and decode).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import attention as A
from . import ops

Tensor = torch.Tensor


class Core(nn.Module):
    """Head layout shared by the cores that run ``attention.py``'s ``[B, H, T, *]`` forms."""

    def __init__(self, a):
        super().__init__()
        self.heads, self.kv_heads = a.n_heads, a.n_kv_heads

    def heads_first(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, H, T, *]`` tensors, keys and values repeated for grouped-query attention."""
        rep = self.heads // self.kv_heads
        k, v = ops.repeat_heads(k, self.kv_heads, rep), ops.repeat_heads(v, self.kv_heads, rep)
        split = (lambda x: ops.reshape_bt(x, [self.heads, -1]).transpose(1, 2))
        return split(q), split(k), split(v)

    @staticmethod
    def packed(o: Tensor) -> Tensor:
        return ops.reshape_bt(o.transpose(1, 2), [-1])


class EagerCore(Core):
    """PyTorch's forms: chunked (prefill, ``chunk_size``) or the recurrent step (one
    token); ``ctx.form`` forces any form of ``attention.FORMS`` (tests, references)."""

    def __init__(self, a):
        super().__init__(a)
        self.chunk_size = a.chunk_size

    def forward(self, q, k, v, log_gate, beta, state, ctx):
        q, k, v = self.heads_first(q, k, v)
        lg = log_gate.expand(q.shape[:3])
        beta = torch.ones_like(lg) if beta is None else beta.expand(q.shape[:3])
        form = ctx.form or ("recurrent" if q.shape[2] == 1 else "chunked")
        if form == "recurrent" and q.shape[2] == 1:
            o, s = A.recurrent_step(q, k, v, lg, beta, state)
        elif form == "chunked":
            o, s = A.chunked_attention(q, k, v, lg, beta, state, self.chunk_size)
        else:
            o, s = A.FORMS[form](q, k, v, lg, beta, state)
        return self.packed(o), s


class MaskedCore(Core):
    """``attention.decayed_attention`` over the call's tokens; the causal mask and, for
    a constant decay, the cumulative log gate ``log_decay * (1..T)`` are computed once
    per call (``ctx.once``), so every op left per layer is one XNNPACK takes."""

    def forward(self, q, k, v, log_gate, beta, state, ctx):
        q, k, v = self.heads_first(q, k, v)
        t = q.shape[2]
        mask = ctx.once("causal_mask", lambda: A.causal_mask(t, q.device))
        last = None
        if log_gate.shape[-1] == 1 and t > 1:
            steps = ctx.once("steps", lambda: torch.arange(1, t + 1, device=q.device, dtype=q.dtype))
            cum = log_gate * steps
            last = log_gate * ctx.once("n_steps", lambda: steps[-1:])     # cum's last, without a slice per layer
        else:
            cum = log_gate.cumsum(-1)
        o, s = A.decayed_attention(q, k, v, cum, beta, state, mask, ctx.keep, last)
        return self.packed(o), s


class StepCore(Core):
    """``attention.recurrent_step``: exactly one token per call."""

    def forward(self, q, k, v, log_gate, beta, state, ctx):
        q, k, v = self.heads_first(q, k, v)
        beta = torch.ones_like(log_gate) if beta is None else beta
        o, s = A.recurrent_step(q, k, v, log_gate, beta, state)
        return self.packed(o), s


class NativeCore(Core):
    """``attention.gated_linear_attention`` on the packed tensors: onnxruntime's
    ``LinearAttention`` shares grouped keys itself, so only values are repeated."""

    def forward(self, q, k, v, log_gate, beta, state, ctx):
        rep = self.heads // self.kv_heads
        v = ops.repeat_heads(v, self.kv_heads, rep)
        if log_gate.shape[-1] == 1 and log_gate.shape[0] == 1:        # a constant per head
            lg = ops.expand_bt(log_gate[0, :, 0], ctx.like)
        else:
            lg = log_gate.transpose(1, 2).expand(*ctx.like.shape, -1)
        if beta is not None and beta.shape[1] == 1:     # one beta for every head (the window's entering mask)
            k = k * beta.transpose(1, 2)
        elif beta is not None:      # beta_n phi(k_n)^T v_n == (beta_n phi(k_n))^T v_n, per query head
            k = ops.repeat_heads(k, self.kv_heads, rep)
            k = ops.reshape_bt(ops.reshape_bt(k, [self.heads, -1]) * beta.transpose(1, 2)[..., None], [-1])
        return A.gated_linear_attention(q, k, v, state, lg)


CORES = {"eager": EagerCore, "masked": MaskedCore, "step": StepCore, "native": NativeCore}
