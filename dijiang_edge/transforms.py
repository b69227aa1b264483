"""Transforms of the one model into what an export target traces.

Each export target is the model of ``model.py`` with some leaf modules swapped, the way
ExecuTorch's ``replace_sdpa_with_custom_op`` swaps one module: the function computed
stays the same (tests compare every transformed model with the eager one), only how
it runs changes.  The user's model is never modified: ``export_copy`` gives a new
module tree that shares its tensors.

* ``use_core(model, kind)``: the attention core of every layer (``cores.CORES``);
* ``freeze_decay``: each layer's ``ln gamma`` as a constant, computed once here
  instead of in every call of the exported graph;
* ``fuse_projections``: q, k, v and the output gate as one matrix, the MLP's gate and
  up projections as another (ONNX: one MatMul each; the same tensors in every graph
  of a folder, so the weights file stores them once).

``for_onnx`` and ``for_pte`` are the recipes the exporters use.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .cores import CORES
from .errors import DiJiangError
from .model import DiJiangForCausalLM

Tensor = torch.Tensor


def export_copy(model: DiJiangForCausalLM) -> DiJiangForCausalLM:
    """A copy of the module tree whose parameters and buffers are the model's own tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def use_core(model: DiJiangForCausalLM, kind: str) -> DiJiangForCausalLM:
    if kind not in CORES:
        raise DiJiangError(f"unknown attention core {kind!r}; choose one of {', '.join(CORES)}")
    for layer in model.layers:
        layer.attn.core = CORES[kind](model.args)
        layer.attn.window_block = 256 if kind == "eager" else 0    # exports: one window mask per call
    return model


def freeze_decay(model: DiJiangForCausalLM) -> DiJiangForCausalLM:
    for layer in model.layers:
        attn = layer.attn
        attn.frozen_log_decay = attn.log_decay().detach().clone()
    return model


def _plain(m: nn.Module) -> tuple[nn.Linear, tuple[int, bool] | None]:
    """``(the nn.Linear, its input rotation as (block, mixed across blocks) or None)`` of a
    projection, rotated (``exporters.outliers.RotatedLinear``: ``inner`` holds ``W R^T``) or not."""
    return (m.inner, (m.block, m.mix is not None)) if hasattr(m, "rotation") else (m, None)


def _qkv_weights(attn) -> tuple[list[tuple[Tensor, Tensor | None]], list]:
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` of either architecture, heads contiguous,
    and the input rotation block of each."""
    a = attn.a
    if a.arch != "gpt_neox":
        mods = [_plain(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        return [(m.weight, m.bias) for m, _ in mods], [b for _, b in mods]
    d, h = a.head_dim, a.n_heads            # query_key_value rows are [head, (q|k|v), d]
    qkv, block = _plain(attn.query_key_value)
    w = qkv.weight.view(h, 3, d, -1)
    b = qkv.bias.view(h, 3, d)
    return [(w[:, i].reshape(h * d, -1), b[:, i].reshape(-1)) for i in range(3)], [block] * 3


def fused_linear(parts: list[tuple[Tensor, Tensor | None]], blocks: list | None = None) -> nn.Module:
    """One ``nn.Linear`` whose output is the parts' outputs side by side (a rotated
    one when the parts share an input rotation, ``blocks``: ``_plain``'s second items)."""
    w = torch.cat([p[0] for p in parts]).detach()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=any(p[1] is not None for p in parts))
    lin.weight = nn.Parameter(w, requires_grad=False)
    if lin.bias is not None:
        b = [p[1] if p[1] is not None else w.new_zeros(p[0].shape[0]) for p in parts]
        lin.bias = nn.Parameter(torch.cat(b).detach(), requires_grad=False)
    rotations = set(blocks or [None])
    if len(rotations) > 1:
        raise DiJiangError(f"cannot fuse projections with different input rotations {sorted(map(str, rotations))}")
    rot = rotations.pop()
    if rot:
        from .exporters.outliers import RotatedLinear
        return RotatedLinear.around(lin, *rot)
    return lin


def _fused_grid(mods: list[nn.Module]) -> nn.Module | None | bool:
    """The fusion of ``mods`` when they are all ``grid.GridLinear`` (the 4-bit grid split),
    None when only some are (they stay apart: one 4-bit matmul cannot hold an off-grid
    part exactly), False when none is (the plain fusion applies)."""
    from .grid import GridLinear, fuse
    kinds = {isinstance(m, GridLinear) for m in mods}
    if kinds == {False}:
        return False
    return fuse(mods) if kinds == {True} else None


# each fusion: (block, its fused projection) -> the projections it replaces, which share its input
FUSIONS = {("attn", "in_proj"): ("q_proj", "k_proj", "v_proj", "gate"), ("mlp", "gate_up"): ("gate_proj", "up_proj")}
FUSED_INPUTS = {f"{b}.{f}": f"{b}.{parts[0]}" for (b, f), parts in FUSIONS.items()}   # fused -> a part of its input


def fuse_projections(model: DiJiangForCausalLM, drop_parts: bool = False) -> DiJiangForCausalLM:
    """``drop_parts``: set the projections a fusion replaced to None (a ``.pte`` program
    would otherwise carry them as unused constants; a traced ONNX graph drops them itself)."""
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        if attn.a.arch != "gpt_neox":
            mods = [attn.q_proj, attn.k_proj, attn.v_proj] + ([attn.gate] if hasattr(attn, "gate") else [])
            fused = _fused_grid(mods)
        else:
            from .grid import GridLinear      # one matrix already, rows per head: a grid one stays so
            fused = None if isinstance(attn.query_key_value, GridLinear) else False
        if fused is False:
            parts, blocks = _qkv_weights(attn)
            if hasattr(attn, "gate"):
                g, gb = _plain(attn.gate)
                parts, blocks = parts + [(g.weight, None)], blocks + [gb]
            fused = fused_linear(parts, blocks)
        attn.in_proj = fused
        if hasattr(mlp, "gate_proj"):
            fused = _fused_grid([mlp.gate_proj, mlp.up_proj])
            if fused is False:
                (g, gb), (u, ub) = _plain(mlp.gate_proj), _plain(mlp.up_proj)
                fused = fused_linear([(g.weight, g.bias), (u.weight, u.bias)], [gb, ub])
            mlp.gate_up = fused
        if drop_parts:
            for (block, fused_name), parts in FUSIONS.items():
                owner = getattr(layer, block)
                if getattr(owner, fused_name, None) is not None:
                    for name in parts:
                        if getattr(owner, name, None) is not None:
                            setattr(owner, name, None)
    return model


ONNX_CORES = {"block": "masked", "step": "step", "native": "native"}   # ONNX graph kind -> core


def for_onnx(model: DiJiangForCausalLM, kind: str) -> DiJiangForCausalLM:
    """The model an ONNX graph of ``kind`` (``block``, ``step``, ``native``) is traced from."""
    if kind not in ONNX_CORES:
        raise DiJiangError(f"unknown ONNX graph kind {kind!r}; choose one of {', '.join(ONNX_CORES)}")
    return fuse_projections(freeze_decay(use_core(export_copy(model).eval(), ONNX_CORES[kind])))


def for_pte(model: DiJiangForCausalLM) -> DiJiangForCausalLM:
    """The model the ``.pte`` program is traced from: the masked core (one graph for
    prefill and decode), constant decays.  The projections are fused before this, by
    ``exporters.executorch.quantize``: the ``.pte`` is quantized in PyTorch, per linear
    layer, after the outlier rewrite, and a fused linear must exist by then."""
    return freeze_decay(use_core(export_copy(model).eval(), "masked"))
