"""The converted model: a plain decoder-only transformer with DiJiang attention.

In the style of gpt-fast: a dataclass of arguments, then a few small modules.
The only state is a fixed-size ``RecurrentState`` (one ``[B, H, m, dv]`` tensor per
layer plus each sequence's position), so ``forward(input_ids, state)`` is the
whole runtime contract and a sequence fed in any split gives the same logits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as A
from . import ops
from .cores import EagerCore
from .errors import DiJiangError

Tensor = torch.Tensor
VARIANTS = ("official", "normalized", "normalized_gated")
WINDOW_MODES = ("shared", "mix")


@dataclass
class ModelArgs:
    """Architecture of the source model (kept) plus the DiJiang settings (new)."""

    arch: str = "llama"                 # "llama" (Llama/SmolLM2/Qwen2/Mistral) or "gpt_neox"
    vocab_size: int = 32000
    hidden_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1376
    norm: str = "rms"                   # "rms" or "layer"
    norm_eps: float = 1e-5
    act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False     # GPT-NeoX
    rotary_dim: int = 64                # partial rotary when < head_dim
    rope_scaling: float = 1.0           # HF's attention_scaling on cos/sin
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    source_max_positions: int = 2048
    # DiJiang settings
    variant: str = "official"           # see VARIANTS
    norm_groups: int = 0                # GroupNorm groups; 0 = one per head
    chunk_size: int = 64
    pos_table_len: int = 0              # >0: per-position gates imported from D1/D2
    eps: float = 1e-6                   # denominator floor of the normalized variants
    window: int = 0                     # >0: exact softmax over the last `window` tokens beside DiJiang
    window_mode: str = "shared"         # see WINDOW_MODES and DiJiangAttention.finish
    source: dict = field(default_factory=dict)

    @property
    def v_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RecurrentState:
    """Each layer's state tensors, flat in layer order (``DiJiangForCausalLM.layer_state_shapes``:
    the DiJiang state ``[B, H, m, dv]``, dv + 1 for normalized variants, and with a window
    the ring of its last W keys and values ``[B, H_kv, W, d]``), and the position each
    sequence has reached ``[B]``: all a sequence carries, the same size at any length."""

    layers: list[Tensor]
    pos: Tensor

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.layers)

    def clone(self) -> "RecurrentState":
        return RecurrentState([s.clone() for s in self.layers], self.pos.clone())


@dataclass
class Context:
    """What every layer of one call shares, computed once per call by the caller.

    ``valid`` None means every token is real (the exported graphs); ``like`` is any
    ``[B, T]`` tensor of the call (the exported native graph's shape source); ``keep``
    (``[1]``, 0 or 1) is the ``.pte`` program's in-graph reset at ``start_pos == 0``;
    ``form`` forces an attention form in the eager core (tests, references)."""

    positions: Tensor                   # [B or 1, T]
    cos: Tensor                         # [B or 1, T, 1, head_dim]
    sin: Tensor                         # same, RoPE's sign folded in
    valid: Tensor | None = None         # [B, T] bool
    like: Tensor | None = None
    keep: Tensor | None = None
    form: str | None = None
    _memo: dict = field(default_factory=dict)

    def once(self, name: str, make):
        """``make()`` computed for the first layer that asks, shared by the others."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]


class RMSNorm(nn.Module):
    """``forward(x, residual) -> (RMSNorm(x + residual), x + residual)``: each residual
    add is joined to the norm after it (one ONNX node, ``ops.add_rms_norm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with ``RMSNorm``'s ``(x, residual)`` signature (GPT-NeoX)."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = x if residual is None else x + residual
        return super().forward(x), x


def make_norm(a: "ModelArgs") -> nn.Module:
    return RMSNorm(a.hidden_size, a.norm_eps) if a.norm == "rms" else LayerNorm(a.hidden_size, eps=a.norm_eps)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(groups, channels)`` applied to each token's channels of ``[B, T, C]``."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.weight, self.bias, self.groups, self.eps)


def _act(name: str):
    acts = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}
    if name not in acts:
        raise DiJiangError(f"activation {name!r} is not supported (supported: {', '.join(acts)})")
    return acts[name]


class FeedForward(nn.Module):
    """Gated MLP (Llama family) or plain MLP (GPT-NeoX), keeping the source's names.
    ``gate_up`` (None unless ``transforms.fuse_projections`` set it) is the gate and up
    projections as one matrix."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.arch, self.act, self.inner = a.arch, _act(a.act), a.intermediate_size
        self.gate_up: nn.Linear | None = None
        if a.arch == "gpt_neox":
            self.dense_h_to_4h = nn.Linear(a.hidden_size, a.intermediate_size, bias=True)
            self.dense_4h_to_h = nn.Linear(a.intermediate_size, a.hidden_size, bias=True)
        else:
            self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.arch == "gpt_neox":
            return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))
        if self.gate_up is not None:
            g, u = self.gate_up(x).split(self.inner, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(g) * u)


def rope_tables(positions: Tensor, inv_freq: Tensor, head_dim: int, scaling: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin ``[B, T, 1, head_dim]`` from positions (no table, no length cap):
    ``apply_rope(x) = x * cos + rotate_half(x) * sin`` with RoPE's minus sign in ``sin``
    and partial rotary as ``cos = 1, sin = 0`` on the channels it leaves alone."""
    rd = 2 * inv_freq.shape[0]
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    sign = torch.cat((-torch.ones_like(inv_freq), torch.ones_like(inv_freq))) * scaling
    cos, sin = emb.cos() * scaling, emb.sin() * sign
    if head_dim > rd:
        cos = F.pad(cos, (0, head_dim - rd), value=1.0)
        sin = F.pad(sin, (0, head_dim - rd), value=0.0)
    return cos, sin


def rope_permutation(a: ModelArgs) -> Tensor:
    """The channel order ``rotate_half`` gathers in ONNX: each rotary half swapped, the rest kept."""
    rd, half = a.rotary_dim, a.rotary_dim // 2
    return torch.tensor(list(range(half, rd)) + list(range(half)) + list(range(rd, a.head_dim)), dtype=torch.long)


def rope_rotation(a: ModelArgs) -> Tensor:
    """``rotate_half`` as a matrix, ``x @ R == x[..., perm]``: the ``.pte`` runs it as one
    XNNPACK bmm, where slices of a tensor of dynamic length are portable ops."""
    return torch.eye(a.head_dim)[:, rope_permutation(a)]


def apply_rope(x: Tensor, ctx: Context, attn: "DiJiangAttention") -> Tensor:
    """RoPE on ``x [B, T, heads, head_dim]`` (q and k heads together)."""
    return x * ctx.cos + ops.rotate_half(x, attn.rope_perm, attn.a.rotary_dim, attn.rope_rot) * ctx.sin


class DiJiangAttention(nn.Module):
    """Source q/k/v/o projections (kept) around DiJiang attention (new).

    The recurrence itself is ``self.core`` (``cores.py``): the eager chunked/recurrent
    core by default; export transforms swap in the masked, one-step or native core.
    ``in_proj`` (None unless ``transforms.fuse_projections`` set it) is q, k, v and the
    gate as one matrix."""

    def __init__(self, a: ModelArgs, layer_idx: int):
        super().__init__()
        self.a, self.layer_idx = a, layer_idx
        d, h, hkv = a.head_dim, a.n_heads, a.n_kv_heads
        if a.arch == "gpt_neox":
            self.query_key_value = nn.Linear(a.hidden_size, 3 * h * d, bias=True)
            self.dense = nn.Linear(h * d, a.hidden_size, bias=True)
        else:
            self.q_proj = nn.Linear(a.hidden_size, h * d, bias=a.qkv_bias)
            self.k_proj = nn.Linear(a.hidden_size, hkv * d, bias=a.qkv_bias)
            self.v_proj = nn.Linear(a.hidden_size, hkv * d, bias=a.qkv_bias)
            self.o_proj = nn.Linear(h * d, a.hidden_size, bias=a.o_bias)
        self.register_buffer("proj", A.projection_matrix(d))          # frozen P = C @ T
        self.decay_logit = nn.Parameter(_logit_of_log(A.default_log_decay(h)))
        self.register_buffer("frozen_log_decay", None, persistent=False)   # set by export transforms
        if a.pos_table_len:   # imported per-position gates; the extra last column serves all later positions
            self.register_buffer("pos_log_gate", torch.zeros(h, a.pos_table_len + 1))
            self.register_buffer("pos_beta", torch.ones(h, a.pos_table_len + 1))
        if a.variant in ("official", "normalized_gated"):
            self.gate = nn.Linear(a.hidden_size, a.v_dim, bias=False)
        if a.variant == "official":
            self.group_norm = GroupNorm(a.norm_groups or h, a.v_dim)
        self.register_buffer("rope_perm", rope_permutation(a), persistent=False)
        self.register_buffer("rope_rot", rope_rotation(a), persistent=False)
        if a.window:
            self.window_weight = nn.Parameter(torch.zeros(h))       # per head, see ``finish``
        self.window_block = 256           # eager: long prompts scored in query blocks; exports: 0
        self.linear_on = True             # False: the window alone (the long-range ablation)
        self.in_proj: nn.Linear | None = None
        self.core: nn.Module = EagerCore(a)

    # -- pieces ---------------------------------------------------------------
    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``qk [B, T, (H + H_kv) * d]``, ``v [B, T, H_kv * d]`` and the gate (or None)."""
        a = self.a
        d, h, hkv = a.head_dim, a.n_heads, a.n_kv_heads
        if self.in_proj is not None:
            sizes = [(h + hkv) * d, hkv * d] + ([a.v_dim] if hasattr(self, "gate") else [])
            qk, v, *g = self.in_proj(x).split(sizes, dim=-1)
            return qk, v, (g[0] if g else None)
        gate = self.gate(x) if hasattr(self, "gate") else None
        if a.arch == "gpt_neox":       # rows are [head, (q|k|v), d]
            q, k, v = ops.reshape_bt(self.query_key_value(x), [h, 3 * d]).split(d, dim=-1)
            return ops.reshape_bt(torch.cat((q, k), dim=2), [-1]), ops.reshape_bt(v, [-1]), gate
        return torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x), gate

    def out_proj(self, o: Tensor) -> Tensor:
        return self.dense(o) if self.a.arch == "gpt_neox" else self.o_proj(o)

    def log_decay(self) -> Tensor:
        """Per-head ``ln gamma`` (learnable through ``decay_logit``; a constant once frozen)."""
        if self.frozen_log_decay is not None:
            return self.frozen_log_decay
        return F.logsigmoid(self.decay_logit)

    def gates(self, ctx: Context) -> tuple[Tensor, Tensor | None]:
        """Log gate ``[B, H, T]`` (``[1, H, 1]`` for a constant decay) and beta (None = 1);
        invisible (0, 0) where a token is not ``valid``."""
        if self.a.pos_table_len:
            idx = ctx.positions.clamp(0, self.a.pos_table_len)
            lg = self.pos_log_gate[:, idx].permute(1, 0, 2)
            beta = self.pos_beta[:, idx].permute(1, 0, 2)
        else:
            lg, beta = self.log_decay()[None, :, None], None
        if ctx.valid is None:
            return lg, beta
        valid = ctx.valid[:, None, :].to(lg.dtype)
        return lg * valid, valid if beta is None else beta * valid

    def rotated(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor | None]:
        """``qk [B, T, H + H_kv, d]`` after RoPE, packed ``v`` and the gate (or None)."""
        a = self.a
        qk, v, gate = self.project(x)
        qk = apply_rope(ops.reshape_bt(qk, [a.n_heads + a.n_kv_heads, a.head_dim]), ctx, self)
        return qk, v, gate

    def values(self, v: Tensor, like: Tensor) -> Tensor:
        """Packed values in the feature dtype, with a ones column per head that carries
        ``z`` in the normalized variants."""
        v = v if v.dtype == like.dtype else v.to(like.dtype)      # (a no-op cast is still a graph node)
        if self.a.variant != "official":
            v = ops.reshape_bt(ops.append_ones(ops.reshape_bt(v, [self.a.n_kv_heads, self.a.head_dim])), [-1])
        return v

    def features(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Packed ``phi(q) [B, T, H*m]``, ``phi(k) [B, T, H_kv*m]`` (RoPE first), ``values``
        and the gate."""
        a = self.a
        qk, v, gate = self.rotated(x, ctx)
        qk = ops.reshape_bt(A.feature_map(qk, self.proj), [-1])
        q, k = qk.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
        return q, k, self.values(v, q), gate

    def finish(self, x: Tensor, o: Tensor, gate: Tensor | None, win: tuple | None = None) -> Tensor:
        """Per-token output from the core's packed ``o`` (and the window's sums, if any).

        Without a window: normaliser or GroupNorm, gate, projection.  With one, per head:
        ``shared`` (LoLCATs) divides window and linear sums by one normaliser,
        ``(num + w lin) / (den + w z)`` (``den`` and ``z`` the last column of each packed sum) with ``w = exp(window_weight - mx)`` (the window's
        sums are relative to its max score ``mx``), so on a prompt shorter than the window
        the layer is the source's softmax attention exactly; ``mix`` (Liger) blends the
        window's softmax output with the finished linear output,
        ``sigmoid(window_weight) * num / den + (1 - sigmoid(window_weight)) * linear``."""
        a = self.a
        h, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
        if win is not None and a.window_mode == "shared":
            # in the window's [B, H_kv, rep, T, *] layout: two layout changes (of ``o`` in, of
            # the result out) where bringing ``num`` and ``mx`` to ``o``'s would take four
            num, mx = win
            o = ops.reshape_bt(o, [hkv, h // hkv, d + 1]).permute(0, 2, 3, 1, 4)
            ww = self.window_weight.view(hkv, h // hkv, 1, 1)
            w = (ww - mx).clamp(max=60.0).exp() * float(self.linear_on)
            num, den = (num + w * o).split([d, 1], dim=-1)
            o = ops.reshape_bt((num / den).permute(0, 3, 1, 2, 4), [-1])
            return self.out_proj(self.gated(o, x, gate))
        if a.variant != "official":
            o, z = ops.reshape_bt(o, [h, d + 1]).split([d, 1], dim=-1)
            o = ops.reshape_bt(o / (z + a.eps), [-1])
        o = self.gated(o, x, gate)
        if win is not None:
            num, den = ops.reshape_bt(win[0].permute(0, 3, 1, 2, 4), [h, -1]).split([d, 1], dim=-1)
            lam = torch.sigmoid(self.window_weight)[:, None] if self.linear_on else self.window_weight.new_ones(h, 1)
            o = ops.reshape_bt(lam * (num / den) + (1 - lam) * ops.reshape_bt(o, [h, d]), [-1])
        return self.out_proj(o)

    def gated(self, o: Tensor, x: Tensor, gate: Tensor | None) -> Tensor:
        o = o if o.dtype == x.dtype else o.to(x.dtype)
        if self.a.variant == "official":
            return F.silu(gate) * self.group_norm(o)
        if self.a.variant == "normalized_gated":
            return o * 2 * torch.sigmoid(gate)    # zero-initialised gate == identity
        return o

    def forward(self, x: Tensor, ctx: Context, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if self.a.window:
            return self.windowed(x, ctx, state)
        q, k, v, gate = self.features(x, ctx)
        lg, beta = self.gates(ctx)
        o, s = self.core(q, k, v, lg, beta, state[0], ctx)
        return self.finish(x, o, gate), [s]

    def windowed(self, x: Tensor, ctx: Context, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The layer with its window (``attention.py``'s hybrid): the call's keys and values
        after the ring of the last W, softmax over each query's window, and the tokens that
        leave the window entering the DiJiang state through the core."""
        a = self.a
        h, hkv, d, w = a.n_heads, a.n_kv_heads, a.head_dim, a.window
        s, ring_k, ring_v = state
        t = x.shape[1]
        qk, v, gate = self.rotated(x, ctx)
        q, k = qk.split([h, hkv], dim=2)
        keys = torch.cat((ring_k, _as(k.transpose(1, 2), ring_k)), dim=2)          # [B, H_kv, W + T, d]
        vals = torch.cat((ring_v, _as(ops.reshape_bt(v, [hkv, d]).transpose(1, 2), ring_v)), dim=2)
        ones = ops.append_ones(vals)        # the window's normaliser and the core's z ride along
        # queries grouped by the key head they share, [B, H_kv, rep, T, d] (plain reshapes
        # of the batch and sequence axes would trace to shape arithmetic per layer)
        win = self.window_sums(ops.reshape_bt(q, [hkv, h // hkv, d]).permute(0, 2, 3, 1, 4), keys, ones, ctx)
        # the T tokens that leave the window are the first T of the W + T (`:-w`: no shape arithmetic)
        fq = ops.reshape_bt(A.feature_map(q, self.proj), [-1])
        fk = ops.reshape_bt(A.feature_map(keys[:, :, :-w].transpose(1, 2), self.proj), [-1])
        fv = (vals if a.variant == "official" else ones)[:, :, :-w].transpose(1, 2)
        fv = _as(ops.reshape_bt(fv, [-1]), fq)
        lg, beta = self.gates(ctx)
        enter = ctx.once("window_enter", lambda: self._entering(ctx))
        o, s = self.core(fq, fk, fv, lg, enter if beta is None else beta * enter, s, ctx)
        return self.finish(x, o, gate, win), [s, *self._ring(keys, vals, ctx)]

    def window_sums(self, q: Tensor, keys: Tensor, vals: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """The window's ``(num, mx)`` as ``[B, H_kv, rep, T, *]`` (``attention.window_softmax``;
        ``vals`` carry the ones column, so ``num``'s last column is the normaliser);
        exported graphs (``window_block == 0``) share one mask per call."""
        a = self.a
        start, scale = ctx.positions[:, 0], a.head_dim ** -0.5
        if self.window_block and q.shape[-2] > self.window_block:
            parts = A.windowed_softmax(q, keys[:, :, None], vals[:, :, None], start, a.window, scale, self.window_block)
        else:
            # (the .pte's one sequence: the batched-matmul form, its mask once per call)
            rep = a.n_heads // a.n_kv_heads if torch.compiler.is_exporting() and q.shape[0] == 1 else 0
            mask = ctx.once("window_mask", lambda: A.window_mask(start, q.shape[-2], a.window, rep=rep))
            kv = (keys, vals) if rep else (keys[:, :, None], vals[:, :, None])
            parts = A.window_softmax(q, *kv, mask, scale)
        return parts

    def _entering(self, ctx: Context) -> Tensor:
        """``[B, 1, T]``: 1 where step n moves a real token out of the window (position >= W)."""
        enter = ctx.positions >= self.a.window
        if ctx.valid is not None:
            enter = enter & ctx.valid
        return enter[:, None, :].to(self.proj.dtype)

    def _ring(self, keys: Tensor, vals: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """The last W real keys and values: the ring the next call starts from."""
        w = self.a.window
        if ctx.valid is None:
            return keys[:, :, -w:], vals[:, :, -w:]
        idx = ctx.valid.sum(-1)[:, None] + torch.arange(w, device=keys.device)     # padding is at the end
        idx = idx[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        return keys.gather(2, idx), vals.gather(2, idx)


def _as(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in ``like``'s dtype (no node at all when it already is: a no-op cast still traces)."""
    return x if x.dtype == like.dtype else x.to(like.dtype)


def check_args(a: ModelArgs) -> None:
    """The DiJiang settings that cannot work together, refused before any weight is made."""
    if a.variant not in VARIANTS:
        raise DiJiangError(f"unknown DiJiang variant {a.variant!r}; choose one of {', '.join(VARIANTS)}")
    if a.window < 0:
        raise DiJiangError(f"window must be 0 (none) or a number of tokens, not {a.window}")
    if a.window and a.window_mode not in WINDOW_MODES:
        raise DiJiangError(f"unknown window mode {a.window_mode!r}; choose one of {', '.join(WINDOW_MODES)}")
    if a.window and a.window_mode == "shared" and a.variant == "official":
        raise DiJiangError("window mode 'shared' divides by the linear part's normaliser, which the official "
                           "variant does not keep: use --variant normalized (or --window-mode mix)")
    if a.window and a.pos_table_len:
        raise DiJiangError("a window needs a per-head decay; an imported official checkpoint's "
                           "per-position gates cannot take one")


def _logit_of_log(log_gamma: Tensor) -> Tensor:
    """``decay_logit`` with ``logsigmoid(decay_logit) == log_gamma``."""
    return log_gamma - torch.log(-torch.expm1(log_gamma))


class Block(nn.Module):
    """``forward(x, pending, ctx, state) -> (x, pending, state)``: the residual stream is
    ``x + pending``; each add is left to the norm that follows it."""

    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.parallel = a.parallel_residual
        self.input_layernorm, self.post_attention_layernorm = make_norm(a), make_norm(a)
        self.attn = DiJiangAttention(a, i)
        self.mlp = FeedForward(a)

    def forward(self, x: Tensor, pending: Tensor | None, ctx: Context, state: list[Tensor]):
        h, x = self.input_layernorm(x, pending)
        a, s = self.attn(h, ctx, state)
        if self.parallel:
            return x, a + self.mlp(self.post_attention_layernorm(x)[0]), s
        h, x = self.post_attention_layernorm(a, x)
        return x, self.mlp(h), s


class DiJiangForCausalLM(nn.Module):
    """Decoder-only LM with DiJiang attention; ``forward(input_ids, state) -> (logits, state)``."""

    def __init__(self, a: ModelArgs, inv_freq: Tensor | None = None):
        super().__init__()
        check_args(a)
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = make_norm(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if inv_freq is None:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, a.rotary_dim, 2).float() / a.rotary_dim))
        self.register_buffer("inv_freq", inv_freq.float())

    # -- state ---------------------------------------------------------------
    @property
    def state_dv(self) -> int:
        return self.args.head_dim + (self.args.variant != "official")

    def state_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.args.n_heads, self.args.head_dim, self.state_dv)

    def layer_state_shapes(self, batch: int = 1) -> list[tuple[int, ...]]:
        """One layer's state tensors: the DiJiang state, then (window) the key and value rings."""
        a = self.args
        ring = [(batch, a.n_kv_heads, a.window, a.head_dim)] * 2 if a.window else []
        return [self.state_shape(batch), *ring]

    def state_names(self) -> list[str]:
        """Names of the flat state tensors, as the exported files call them (with a
        ``past_``/``present_`` prefix in ONNX): ``recurrent.{i}``, and with a window
        ``window_key.{i}`` and ``window_value.{i}`` after it."""
        kinds = ["recurrent"] + (["window_key", "window_value"] if self.args.window else [])
        return [f"{k}.{i}" for i in range(self.args.n_layers) for k in kinds]

    def state_shapes(self, batch: int = 1) -> list[tuple[int, ...]]:
        """Shapes of the flat state tensors (``state_names``' order)."""
        return self.layer_state_shapes(batch) * self.args.n_layers

    def layer_state(self, batch: int = 1) -> list[Tensor]:
        """A fresh (empty) state for one layer."""
        proj = self.layers[0].attn.proj       # (not the embedding's weight: a quantized embedding has none)
        return [torch.zeros(s, device=proj.device, dtype=proj.dtype) for s in self.layer_state_shapes(batch)]

    def init_state(self, batch: int = 1) -> RecurrentState:
        layers = [t for _ in self.layers for t in self.layer_state(batch)]
        return RecurrentState(layers, torch.zeros(batch, dtype=torch.long, device=self.layers[0].attn.proj.device))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and signed sin ``[B, T, 1, head_dim]`` for ``positions [B, T]`` (``rope_tables``)."""
        return rope_tables(positions, self.inv_freq, self.args.head_dim, self.args.rope_scaling)

    def context(self, positions: Tensor, valid: Tensor | None = None, like: Tensor | None = None,
                keep: Tensor | None = None, form: str | None = None) -> Context:
        return Context(positions, *self.rope(positions), valid=valid, like=like, keep=keep, form=form)

    def hidden(self, input_ids: Tensor, ctx: Context, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The final-normed hidden states ``[B, T, hidden]`` and the new state tensors (flat,
        as ``RecurrentState.layers``): the whole network below the head, shared by eager,
        ONNX and ``.pte``."""
        x, pending, new = self.embed(input_ids), None, []
        k = len(self.layer_state_shapes())
        for i, layer in enumerate(self.layers):
            x, pending, s = layer(x, pending, ctx, list(states[i * k:(i + 1) * k]))
            new += s
        return self.norm(x, pending)[0], new

    # -- forward -------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: RecurrentState | None = None,
                attention_mask: Tensor | None = None, form: str | None = None,
                return_hidden: bool = False, logits_to_keep: int = 0):
        """Logits ``[B, T, V]`` and the state after these tokens.

        ``attention_mask`` (1 = token, 0 = padding) makes padded tokens invisible:
        they neither change the state nor advance the position, so left- or
        right-padded batches give each sequence its unpadded logits.
        ``logits_to_keep`` (transformers' meaning): logits of the last that many
        positions only, ``[B, k, V]`` (0: all); prefill wants 1, the head being a fifth
        of a small model's work per position.
        """
        if logits_to_keep < 0:
            raise DiJiangError(f"logits_to_keep must be >= 0 (0: every position), got {logits_to_keep}")
        state = state if state is not None else self.init_state(input_ids.shape[0])
        if attention_mask is not None and self.args.window:
            out, new_state, h = self._compacted(input_ids, state, attention_mask, form)
            out = out[:, -logits_to_keep:] if logits_to_keep else out
        else:
            out, new_state, h = self._run(input_ids, state, attention_mask, form, logits_to_keep)
        return (out, new_state, h) if return_hidden else (out, new_state)

    def _run(self, input_ids: Tensor, state: RecurrentState, attention_mask: Tensor | None, form: str | None,
             logits_to_keep: int = 0):
        b, t = input_ids.shape
        if attention_mask is None:
            valid = None
            steps = torch.arange(1, t + 1, device=input_ids.device).expand(b, t)
        else:
            valid = attention_mask.bool()
            steps = valid.long().cumsum(-1)
        positions = state.pos[:, None] + (steps - 1).clamp(min=0)
        h, new = self.hidden(input_ids, self.context(positions, valid, like=input_ids, form=form), state.layers)
        head_in = h[:, -logits_to_keep:] if logits_to_keep else h
        return self.lm_head(head_in), RecurrentState(new, state.pos + steps[:, -1]), h

    def _compacted(self, input_ids: Tensor, state: RecurrentState, attention_mask: Tensor, form: str | None):
        """``_run`` with padding for a windowed model: each sequence's real tokens moved
        to the front (stable), so the window's keys are consecutive, then put back.
        Every part but attention is per token, and padding at the end is after every real
        token, so this changes nothing but where the ring is read from (``_ring``)."""
        order = torch.sort((attention_mask == 0).to(torch.int8), dim=1, stable=True).indices
        back = order.argsort(dim=1)
        logits, new_state, h = self._run(input_ids.gather(1, order), state, attention_mask.gather(1, order), form)
        unsort = (lambda x: x.gather(1, back[..., None].expand(-1, -1, x.shape[-1])))
        return unsort(logits), new_state, unsort(h)

    # -- persistence ---------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the tied head stored once)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.args.tie_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"model_type": "dijiang", "dijiang_edge": self.args.to_dict()}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DiJiangForCausalLM":
        from safetensors.torch import load_file
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "dijiang":
            raise DiJiangError(f"{path} is not a converted DiJiang model (config.json model_type "
                               f"is {cfg.get('model_type')!r}); convert it first with `dijiang-export convert`")
        args = ModelArgs.from_dict(cfg["dijiang_edge"])
        with torch.device("meta"):
            model = cls(args)
        model = model.to_empty(device="cpu")
        sd = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise DiJiangError(f"{path}/model.safetensors does not match its config.json "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if args.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        for layer in model.layers:           # not in the file: to_empty left them uninitialised
            layer.attn.rope_perm, layer.attn.rope_rot = rope_permutation(args), rope_rotation(args)
        return model.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["ModelArgs", "RecurrentState", "Context", "DiJiangForCausalLM", "DiJiangAttention", "VARIANTS",
           "WINDOW_MODES"]
