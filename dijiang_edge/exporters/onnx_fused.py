"""The ONNX graphs written for few nodes per layer: what onnxruntime runs fastest.

Decode of a 135M model is a few dozen small matrix-vector products per layer, so
onnxruntime's cost per node (a few microseconds) rivals the arithmetic.  The plain
trace of ``model.Block`` spends ~140 nodes a layer, most of them shape arithmetic
(``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` for every ``view``).  This
module computes the same functions as ``onnx_graph.OnnxStep`` (every kind) in ~30:

* one MatMul for q, k, v and the output gate (weights concatenated), one for the
  MLP's gate and up projections -- the same tensors in every kind, so stored once;
* reshapes that keep batch and sequence as ONNX ``0`` dims (``keep2_reshape``), so
  no shape is ever computed per layer;
* RoPE as ``x * cos + x[perm] * sin`` on q and k at once, cos/sin computed once per
  graph (the rotate-half sign folded into sin, partial rotary as cos=1, sin=0);
* ``phi`` on q and k at once; grouped keys left to ``LinearAttention``, values
  repeated by one ``Expand`` (``repeat_heads``);
* each residual add joined to the RMSNorm after it (``SkipSimplifiedLayerNormalization``),
  GroupNorm as one ``LayerNormalization``; onnxruntime fuses RMSNorm and SiLU itself.

Models with imported per-position gates (``pos_table_len``) keep the plain trace.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attention as A
from ..model import DiJiangForCausalLM, RMSNorm
from .onnx_graph import ATTENTION, gated_linear_attention

Tensor = torch.Tensor


# -- shape helpers the exporter maps to single ONNX nodes ----------------------------

@torch.library.custom_op("dijiang_edge::keep2_reshape", mutates_args=())
def keep2_reshape(x: Tensor, tail: list[int]) -> Tensor:
    """``x.reshape(B, T, *tail)``; exported as ``Reshape(x, [0, 0, *tail])``."""
    return x.reshape(*x.shape[:2], *tail).clone()


@keep2_reshape.register_fake
def _(x, tail):
    return x.new_empty(torch.empty(x.shape).reshape(*x.shape[:2], *tail).shape)


@torch.library.custom_op("dijiang_edge::repeat_heads", mutates_args=())
def repeat_heads(x: Tensor, heads: int, rep: int) -> Tensor:
    """``[B, T, heads*d] -> [B, T, heads*rep*d]``, each head repeated ``rep`` times in place
    (``repeat_interleave`` over heads, as GQA needs); exported as Reshape/Expand/Reshape."""
    b, t, _ = x.shape
    return x.view(b, t, heads, 1, -1).expand(b, t, heads, rep, x.shape[-1] // heads).reshape(b, t, -1).clone()


@repeat_heads.register_fake
def _(x, heads, rep):
    return x.new_empty(*x.shape[:2], x.shape[2] * rep)


@torch.library.custom_op("dijiang_edge::expand_bt", mutates_args=())
def expand_bt(x: Tensor, like: Tensor) -> Tensor:
    """``x [H]`` broadcast to ``[B, T, H]`` with ``like [B, T]``; exported as one ``Expand``
    (its target shape computed once per graph)."""
    return x.expand(*like.shape, x.shape[0]).clone()


@expand_bt.register_fake
def _(x, like):
    return x.new_empty(*like.shape, x.shape[0])


@torch.library.custom_op("dijiang_edge::append_ones", mutates_args=())
def append_ones(x: Tensor) -> Tensor:
    """``x`` with a column of ones appended on the last axis; exported as one ``Pad``."""
    return F.pad(x, (0, 1), value=1.0)


@append_ones.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] + 1)


@torch.library.custom_op("dijiang_edge::group_norm", mutates_args=())
def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """``model.GroupNorm`` on ``[B, T, C]``; exported as one ``LayerNormalization`` over
    ``[B, T, groups, C / groups]`` with a ``[groups, C / groups]`` scale and bias."""
    y = F.layer_norm(x.unflatten(-1, (groups, -1)), [x.shape[-1] // groups], eps=eps)
    return (y.flatten(-2) * weight + bias).contiguous()


@group_norm.register_fake
def _(x, weight, bias, groups, eps):
    return torch.empty_like(x)


@torch.library.custom_op("dijiang_edge::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(RMSNorm(x + skip), x + skip)``: the residual add and the next norm as one
    ``com.microsoft::SkipSimplifiedLayerNormalization``."""
    s = x + skip
    return weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)), s.clone()


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _const(g, values: list[int]):
    return g.op("Constant", value_t=torch.tensor(values, dtype=torch.long))


def _sym_keep2_reshape(g, x, tail):
    from torch.onnx import symbolic_helper
    tail = list(symbolic_helper._get_const(tail, "is", "tail"))
    if -1 not in tail:      # the same shape; the exporter's shape inference wants one -1 beside 0s
        tail[0] = -1
    return g.op("Reshape", x, _const(g, [0, 0, *tail]))


def _sym_repeat_heads(g, x, heads, rep):
    from torch.onnx import symbolic_helper
    heads = symbolic_helper._get_const(heads, "i", "heads")
    rep = symbolic_helper._get_const(rep, "i", "rep")
    y = g.op("Reshape", x, _const(g, [0, 0, heads, 1, -1]))
    y = g.op("Expand", y, _const(g, [1, 1, 1, rep, 1]))
    return g.op("Reshape", y, _const(g, [0, 0, -1]))


_BT_SHAPES: dict = {}


def _sym_expand_bt(g, x, like):
    from torch.onnx import symbolic_helper
    heads = symbolic_helper._get_tensor_sizes(x)[0]
    key = (like.debugName(), heads)       # one Shape/Concat per graph (cleared per export), shared by every layer
    if key not in _BT_SHAPES:
        _BT_SHAPES[key] = g.op("Concat", g.op("Shape", like), _const(g, [heads]), axis_i=0)
    return g.op("Expand", x, _BT_SHAPES[key])


def _sym_append_ones(g, x):
    from torch.onnx import symbolic_helper
    rank = symbolic_helper._get_tensor_rank(x)
    pads = [0] * (2 * rank - 1) + [1]                  # ONNX: all begins, then all ends
    return g.op("Pad", x, _const(g, pads), g.op("Constant", value_t=torch.tensor(1.0)))


def _sym_group_norm(g, x, weight, bias, groups, eps):
    from torch.onnx import symbolic_helper
    groups = symbolic_helper._get_const(groups, "i", "groups")
    eps = symbolic_helper._get_const(eps, "f", "eps")
    per = [groups, -1]
    y = g.op("Reshape", x, _const(g, [0, 0, *per]))
    y = g.op("LayerNormalization", y, g.op("Reshape", weight, _const(g, per)),
             g.op("Reshape", bias, _const(g, per)), axis_i=-1, epsilon_f=eps)
    return g.op("Reshape", y, _const(g, [0, 0, -1]))


def _sym_skip_rms_norm(g, x, skip, weight, eps):
    from torch.onnx import symbolic_helper
    eps = symbolic_helper._get_const(eps, "f", "eps")
    y, _, _, s = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight,
                      epsilon_f=eps, outputs=4)
    y.setType(x.type())
    s.setType(x.type())
    return y, s


SYMBOLICS = {"dijiang_edge::keep2_reshape": _sym_keep2_reshape,
             "dijiang_edge::repeat_heads": _sym_repeat_heads,
             "dijiang_edge::expand_bt": _sym_expand_bt,
             "dijiang_edge::append_ones": _sym_append_ones,
             "dijiang_edge::group_norm": _sym_group_norm,
             "dijiang_edge::skip_rms_norm": _sym_skip_rms_norm}


def register_symbolics(opset: int) -> None:
    _BT_SHAPES.clear()
    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)


# -- the layer ------------------------------------------------------------------------

def supports(model: DiJiangForCausalLM) -> bool:
    """Whether the fused graph covers ``model`` (imported per-position gates do not)."""
    return not model.args.pos_table_len


def _qkv_weights(attn) -> list[tuple[Tensor, Tensor | None]]:
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` of either architecture, heads contiguous."""
    a = attn.a
    if a.arch != "gpt_neox":
        return [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    d, h = a.head_dim, a.n_heads            # query_key_value rows are [head, (q|k|v), d]
    w = attn.query_key_value.weight.view(h, 3, d, -1)
    b = attn.query_key_value.bias.view(h, 3, d)
    return [(w[:, i].reshape(h * d, -1), b[:, i].reshape(-1)) for i in range(3)]


def _fused_linear(parts: list[tuple[Tensor, Tensor | None]]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the parts' outputs side by side."""
    w = torch.cat([p[0] for p in parts]).detach()
    bias = any(p[1] is not None for p in parts)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    lin.weight = nn.Parameter(w.clone())
    if bias:
        lin.bias = nn.Parameter(torch.cat([p[1] if p[1] is not None else w.new_zeros(p[0].shape[0])
                                           for p in parts]).detach().clone())
    return lin


class FusedLayer(nn.Module):
    """One ``model.Block`` in few nodes; ``kind`` picks the recurrence (``core``)."""

    def __init__(self, block, kind: str):
        super().__init__()
        attn, a = block.attn, block.attn.a
        self.a, self.parallel, self.kind = a, block.parallel, kind
        self.input_layernorm, self.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        parts = _qkv_weights(attn)
        if a.variant in ("official", "normalized_gated"):
            parts.append((attn.gate.weight, None))
        self.proj_in = _fused_linear(parts)
        sizes = [p[0].shape[0] for p in parts]
        self.sizes = [sizes[0] + sizes[1]] + sizes[2:]             # q and k stay together
        self.out_proj = attn.dense if a.arch == "gpt_neox" else attn.o_proj
        self.register_buffer("proj", attn.proj.clone())
        self.register_buffer("log_decay", attn.log_decay().detach().clone())
        if a.variant == "official":
            self.group_norm = attn.group_norm
        self.mlp = block.mlp
        if a.arch != "gpt_neox":
            self.gate_up = _fused_linear([(self.mlp.gate_proj.weight, self.mlp.gate_proj.bias),
                                          (self.mlp.up_proj.weight, self.mlp.up_proj.bias)])

    def attention(self, h: Tensor, cos: Tensor, sin: Tensor, perm: Tensor, like: Tensor,
                  state: Tensor) -> tuple[Tensor, Tensor]:
        a = self.a
        d, hq, hkv = a.head_dim, a.n_heads, a.n_kv_heads
        qk, v, *gate = torch.split(self.proj_in(h), self.sizes, dim=-1)
        qk = keep2_reshape(qk, [hq + hkv, d])
        qk = qk * cos + qk.index_select(-1, perm) * sin                       # RoPE
        qk = A.feature_map(qk, self.proj)                                      # phi
        q, k = keep2_reshape(qk, [-1]).split([hq * d, hkv * d], dim=-1)
        if a.variant != "official":                                            # last column carries z
            v = keep2_reshape(append_ones(keep2_reshape(v, [hkv, d])), [-1])
        o, s = self.core(q, k, v, expand_bt(self.log_decay, like), state)
        if a.variant != "official":
            o, z = keep2_reshape(o, [hq, d + 1]).split([d, 1], dim=-1)
            o = keep2_reshape(o / (z + a.eps), [-1])
        if a.variant == "official":
            gn = self.group_norm
            o = F.silu(gate[0]) * group_norm(o, gn.weight, gn.bias, gn.groups, gn.eps)
        elif a.variant == "normalized_gated":
            o = o * 2 * torch.sigmoid(gate[0])
        return self.out_proj(o), s

    def core(self, q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrence on packed ``[B, T, heads * d]`` tensors, ``log_gate [B, T, H]``:
        ``LinearAttention`` (native), else the plain-ops form of ``onnx_graph.ATTENTION``."""
        hq, hkv = self.a.n_heads, self.a.n_kv_heads
        rep = hq // hkv
        if rep > 1:            # LinearAttention shares grouped keys itself; values are repeated
            v = repeat_heads(v, hkv, rep)
        if self.kind == "native":
            return gated_linear_attention(q, k, v, state, log_gate)
        if rep > 1:
            k = repeat_heads(k, hkv, rep)
        heads = lambda x: keep2_reshape(x, [hq, -1]).transpose(1, 2)          # [B, H, T, d]
        lg = log_gate.transpose(1, 2)
        o, s = ATTENTION[self.kind](heads(q), heads(k), heads(v), lg, torch.ones_like(lg), state)
        return keep2_reshape(o.transpose(1, 2), [-1]), s

    def feed_forward(self, x: Tensor) -> Tensor:
        if self.a.arch == "gpt_neox":
            return self.mlp(x)
        g, u = self.gate_up(x).split(self.a.intermediate_size, dim=-1)
        return self.mlp.down_proj(self.mlp.act(g) * u)

    def forward(self, x: Tensor, pending: Tensor | None, cos, sin, perm, like, state):
        """The residual stream is ``x + pending``; returns the next ``(x, pending, state)``
        so each add joins the norm after it (``add_norm``)."""
        h, x = add_norm(self.input_layernorm, x, pending)
        a, s = self.attention(h, cos, sin, perm, like, state)
        if self.parallel:
            return x, a + self.feed_forward(self.post_attention_layernorm(x)), s
        h, x = add_norm(self.post_attention_layernorm, x, a)
        return x, self.feed_forward(h), s


def add_norm(norm: nn.Module, x: Tensor, pending: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(norm(x + pending), x + pending)``; RMSNorm's as one fused node."""
    if pending is None:
        return norm(x), x
    if isinstance(norm, RMSNorm):
        return skip_rms_norm(x, pending, norm.weight, norm.eps)
    x = x + pending
    return norm(x), x


class FusedStep(nn.Module):
    """``forward(input_ids, start_pos, *past_recurrent) -> (logits, *present_recurrent)``,
    the contract of ``onnx_graph.OnnxStep``."""

    def __init__(self, model: DiJiangForCausalLM, kind: str = "native"):
        super().__init__()
        a = model.args
        self.model = model
        self.fused = nn.ModuleList(FusedLayer(b, kind) for b in model.layers)
        d, rd, half = a.head_dim, a.rotary_dim, a.rotary_dim // 2
        perm = list(range(half, rd)) + list(range(half)) + list(range(rd, d))
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long))
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.register_buffer("sin_sign", sign)

    def rope(self, start_pos: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` for this call's positions, batch-free
        (``start_pos`` is shared by the batch)."""
        a = self.model.args
        pos = (start_pos + torch.arange(like.shape[1], device=like.device)).float()
        freqs = pos[:, None] * self.model.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * a.rope_scaling, emb.sin() * a.rope_scaling * self.sin_sign
        rest = a.head_dim - a.rotary_dim
        if rest:
            cos = torch.cat((cos, torch.ones_like(cos[:, :1]).expand(-1, rest)), dim=-1)
            sin = torch.cat((sin, torch.zeros_like(sin[:, :1]).expand(-1, rest)), dim=-1)
        return cos[:, None, :], sin[:, None, :]

    def forward(self, input_ids: Tensor, start_pos: Tensor, *past: Tensor):
        m = self.model
        cos, sin = self.rope(start_pos, input_ids)
        x, pending = m.embed(input_ids), None
        present = []
        for layer, s in zip(self.fused, past):
            x, pending, s = layer(x, pending, cos, sin, self.perm, input_ids, s)
            present.append(s)
        return (m.lm_head(add_norm(m.norm, x, pending)[0]), *present)
