"""Layout and normalisation helpers of the model, each with an ONNX form of one node.

Decode of a small model is a few dozen small matrix-vector products per layer, so
onnxruntime's cost per node (microseconds) rivals the arithmetic.  A plain trace of
``x.view(b, t, h, d)`` costs a ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
chain; a residual add and the RMSNorm after it cost a dozen nodes.  The model calls
these helpers instead: in eager mode and under ``torch.export`` (the ``.pte`` path)
each is its plain torch expression; while ``torch.onnx.export`` traces, each is a
custom op that ``register_onnx_symbolics`` maps to a single ONNX node:

* ``reshape_bt``    -> ``Reshape(x, [0, 0, *tail])`` (batch and sequence kept as ``0`` dims)
* ``repeat_heads``  -> ``Reshape / Expand / Reshape`` (GQA without shape arithmetic)
* ``expand_bt``     -> one ``Expand`` whose target shape is computed once per graph
* ``append_ones``   -> one ``Pad``
* ``rotate_half``   -> one ``Gather`` (RoPE's rotation as a constant permutation)
* ``group_norm``    -> one ``LayerNormalization``
* ``add_rms_norm``  -> one ``com.microsoft::SkipSimplifiedLayerNormalization``
* ``last_positions`` -> one ``Slice`` (``logits_to_keep``: 0 keeps every position)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _onnx() -> bool:
    """Whether the TorchScript ONNX exporter is tracing (the dynamo exporter, which
    traces through torch.export, sees the plain expressions)."""
    return torch.onnx.is_in_onnx_export() and torch.jit.is_tracing()


def view(x: Tensor, *shape) -> Tensor:
    """``x.reshape(*shape)``.  While ``torch.export`` traces (the ``.pte`` path), the one
    size that depends on the sequence length is written ``-1``: XNNPACK takes a reshape
    only when every size is an int (at most one inferred), and a symbolic one is a
    portable op that cuts the delegated graph.  Sizes must not already hold a ``-1``."""
    if torch.compiler.is_exporting():
        symbolic = [i for i, n in enumerate(shape) if not isinstance(n, int)]
        if len(symbolic) == 1:      # (a reshape of a strided tensor would decompose to the sizes)
            return x.contiguous().view(*(-1 if i == symbolic[0] else n for i, n in enumerate(shape)))
    return x.reshape(*shape)


def _tail(x: Tensor, tail: list[int]) -> list[int]:
    """``tail`` (sizes of ``x``'s trailing axes after the first two) with its ``-1`` worked out."""
    if -1 not in tail:
        return list(tail)
    known = math.prod(n for n in tail if n != -1)
    return [math.prod(x.shape[2:]) // known if n == -1 else n for n in tail]


# -- the helpers the model calls ------------------------------------------------------

def reshape_bt(x: Tensor, tail: list[int]) -> Tensor:
    """``x.reshape(B, T, *tail)`` for ``x [B, T, ...]``."""
    return _keep2_reshape(x, tail) if _onnx() else view(x, *x.shape[:2], *_tail(x, tail))


def repeat_heads(x: Tensor, heads: int, rep: int) -> Tensor:
    """``[B, T, heads*d] -> [B, T, heads*rep*d]``, each head repeated ``rep`` times in
    place (``repeat_interleave`` over heads, as grouped-query attention needs).  Under
    ``torch.export`` a broadcast product by ones, which XNNPACK takes, where an
    ``expand`` is a portable copy that cuts the ``.pte``'s delegated graph."""
    if rep == 1:
        return x
    if _onnx():
        return _repeat_heads(x, heads, rep)
    b, t, _ = x.shape
    y = view(x, b, t, heads, 1, x.shape[-1] // heads)
    # a broadcast product by ones (exact): XNNPACK refuses a concat of one tensor with itself
    y = y * torch.ones(rep, 1, dtype=x.dtype, device=x.device) if torch.compiler.is_exporting() \
        else torch.cat([y] * rep, dim=3)
    return view(y, b, t, x.shape[-1] * rep)


def mean_last(x: Tensor) -> Tensor:
    """``x.mean(-1, keepdim=True)``; under ``torch.export`` over a 4-D view, the innermost
    two dimensions (the second of size 1): the only mean XNNPACK takes."""
    if not torch.compiler.is_exporting():
        return x.mean(-1, keepdim=True)
    return view(x.reshape(-1, 1, 1, x.shape[-1]).mean((-1, -2), keepdim=True), *x.shape[:-1], 1)


def expand_bt(x: Tensor, like: Tensor) -> Tensor:
    """``x [H]`` broadcast to ``[B, T, H]`` with ``like [B, T]``."""
    return _expand_bt(x, like) if _onnx() else x.expand(*like.shape, x.shape[0])


def append_ones(x: Tensor) -> Tensor:
    """``x`` with a column of ones appended on the last axis."""
    return _append_ones(x) if _onnx() else F.pad(x, (0, 1), value=1.0)


def rotate_half(x: Tensor, perm: Tensor, rotary_dim: int, rot: Tensor) -> Tensor:
    """RoPE's rotation without its sign: the two halves of the first ``rotary_dim``
    channels swapped, the rest kept (``x.index_select(-1, perm)``, or ``x @ rot``).
    One Gather in ONNX; one bmm by the permutation matrix ``rot`` under ``torch.export``
    (slices of a dynamic length cut the ``.pte``'s XNNPACK graph; the product by a 0/1
    matrix is exact); slices and a concat in eager mode."""
    if _onnx():
        return x.index_select(-1, perm)
    if torch.compiler.is_exporting():
        d = x.shape[-1]
        return view(torch.bmm(view(x, 1, math.prod(x.shape[:-1]), d), rot.to(x.dtype)[None]), *x.shape)
    half = rotary_dim // 2
    parts = [x[..., half:rotary_dim], x[..., :half]]
    if x.shape[-1] > rotary_dim:
        parts.append(x[..., rotary_dim:])
    return torch.cat(parts, dim=-1)


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """``nn.GroupNorm(groups, C)`` on each token's channels of ``x [B, T, C]``."""
    if _onnx():
        return _group_norm(x, weight, bias, groups, eps)
    g = view(x, *x.shape[:-1], groups, x.shape[-1] // groups)
    mean = mean_last(g)
    var = mean_last((g - mean).pow(2))
    g = (g - mean) * torch.rsqrt(var + eps)
    return view(g, *x.shape) * weight + bias


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(mean_last(xf.pow(2)) + eps)).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(RMSNorm(x + residual), x + residual)``: the residual add joined to the norm after it."""
    if residual is None:
        return rms_norm(x, weight, eps), x
    if _onnx():
        return _skip_rms_norm(x, residual, weight, eps)
    s = x + residual
    return rms_norm(s, weight, eps), s


def last_positions(h: Tensor, keep: Tensor) -> Tensor:
    """The last ``keep`` positions of ``h [B, T, ...]`` (``keep``: int64 ``[1]``; 0 keeps
    all, as transformers' ``logits_to_keep``).  A graph input, so one ONNX file serves
    prefill (the last position: no head over positions nobody reads) and scoring (all)."""
    if torch.onnx.is_in_onnx_export():     # both exporters: a data-dependent length, one Slice
        return _last_positions(h, keep)
    return h[:, h.shape[1] - _kept(h, keep):]


def _kept(h: Tensor, keep: Tensor) -> int:
    k = int(keep.reshape(-1)[0])
    if k < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0: every position), got {k}")
    return h.shape[1] if k == 0 else min(k, h.shape[1])


# -- the custom ops seen by torch.onnx.export (reference bodies for tracing) ----------

@torch.library.custom_op("dijiang_edge::keep2_reshape", mutates_args=())
def _keep2_reshape(x: Tensor, tail: list[int]) -> Tensor:
    return x.reshape(*x.shape[:2], *tail).clone()


@_keep2_reshape.register_fake
def _(x, tail):
    return x.new_empty(torch.empty(x.shape).reshape(*x.shape[:2], *tail).shape)


@torch.library.custom_op("dijiang_edge::repeat_heads", mutates_args=())
def _repeat_heads(x: Tensor, heads: int, rep: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, 1, -1).expand(b, t, heads, rep, x.shape[-1] // heads).reshape(b, t, -1).clone()


@_repeat_heads.register_fake
def _(x, heads, rep):
    return x.new_empty(*x.shape[:2], x.shape[2] * rep)


@torch.library.custom_op("dijiang_edge::expand_bt", mutates_args=())
def _expand_bt(x: Tensor, like: Tensor) -> Tensor:
    return x.expand(*like.shape, x.shape[0]).clone()


@_expand_bt.register_fake
def _(x, like):
    return x.new_empty(*like.shape, x.shape[0])


@torch.library.custom_op("dijiang_edge::append_ones", mutates_args=())
def _append_ones(x: Tensor) -> Tensor:
    return F.pad(x, (0, 1), value=1.0)


@_append_ones.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] + 1)


@torch.library.custom_op("dijiang_edge::last_positions", mutates_args=())
def _last_positions(h: Tensor, keep: Tensor) -> Tensor:
    return h[:, h.shape[1] - _kept(h, keep):].clone()


@_last_positions.register_fake
def _(h, keep):
    return h.new_empty(h.shape[0], torch.library.get_ctx().new_dynamic_size(), *h.shape[2:])


@torch.library.custom_op("dijiang_edge::group_norm", mutates_args=())
def _group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    y = F.layer_norm(x.unflatten(-1, (groups, -1)), [x.shape[-1] // groups], eps=eps)
    return (y.flatten(-2) * weight + bias).contiguous()


@_group_norm.register_fake
def _(x, weight, bias, groups, eps):
    return torch.empty_like(x)


@torch.library.custom_op("dijiang_edge::skip_rms_norm", mutates_args=())
def _skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + skip
    return rms_norm(s, weight, eps), s.clone()


@_skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


# -- their ONNX symbolics (TorchScript exporter) ----------------------------------------

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


def last_positions_translation():
    """The dynamo exporter's onnxscript form of ``last_positions`` (the same Slice)."""
    from onnxscript import opset18 as op

    def last_positions(h, keep):
        return op.Slice(h, op.Neg(keep), op.Constant(value_ints=[(1 << 63) - 1]), op.Constant(value_ints=[1]))
    return last_positions


def _sym_last_positions(g, h, keep):
    # Slice(h, -keep, INT64_MAX, axis 1): -0 == 0 starts at the first position, keeping all
    return g.op("Slice", h, g.op("Neg", keep), _const(g, [(1 << 63) - 1]), _const(g, [1]))


SYMBOLICS = {"dijiang_edge::keep2_reshape": _sym_keep2_reshape,
             "dijiang_edge::repeat_heads": _sym_repeat_heads,
             "dijiang_edge::expand_bt": _sym_expand_bt,
             "dijiang_edge::append_ones": _sym_append_ones,
             "dijiang_edge::group_norm": _sym_group_norm,
             "dijiang_edge::skip_rms_norm": _sym_skip_rms_norm,
             "dijiang_edge::last_positions": _sym_last_positions}


def register_onnx_symbolics(opset: int) -> None:
    """Map the helpers' custom ops to their ONNX nodes (call before each export)."""
    _BT_SHAPES.clear()
    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
