"""Taming activation outliers before 8-bit dynamic quantization (``8da8w``).

XNNPACK's dynamically quantized linear gives each token's input row one int8 scale.
A few large channels then cost every other channel its precision; on the adapted
SmolLM2 that alone drops top-1 agreement with fp32 to ~91%. Two exact rewrites
(identical in real arithmetic, checked in float64 by the tests) flatten the rows:

* **smoothing** (SmoothQuant, Xiao et al. 2023): where a linear's input comes from
  a per-channel affine op (RMSNorm / LayerNorm / the official GroupNorm) or an
  elementwise product with a linear (the gated MLP's ``up_proj``), divide that
  channel by ``s_j = amax(x_j)^a / amax(W_j)^(1-a)`` there and multiply column ``j``
  of the weights by ``s_j``. ``amax(x)`` comes from calibration text.
* **rotation** (as in QuaRot / SpinQuant, here block-diagonal): ``W x = (W R^T)(R x)``
  with ``R`` a block-diagonal Hadamard matrix, applied to the inputs of the head,
  ``down_proj`` and ``o_proj`` (``.pte``: 64 x 64 blocks), or of every linear
  (``ONNX``: 32 x 32 blocks, the block onnxruntime's int8 kernels quantize an input
  row in, so each quantized block is a rotated one): outliers spread over their block.
  It costs one small batched matmul per rotated input.

``scripts/int8_outliers.py MODEL`` measures each step's top-1 agreement with fp32
(torchao's 8da8w in eager PyTorch; figures for the adapted SmolLM2 in the README).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import ops

Tensor = torch.Tensor
ALPHA = 0.5          # SmoothQuant's default; `scripts/int8_outliers.py --alpha` compares others
BLOCK = 64           # Hadamard block (smaller where a width is not a multiple of 64)
OUTPUT_LINEARS = ("down_proj", "dense_4h_to_h", "o_proj", "dense")   # a layer's linears not fed by a norm
CALIBRATION_TOKENS = 1024


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype)


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A fixed (seeded) random orthogonal ``n x n`` matrix in float64: QR of a Gaussian,
    signs fixed so that the result does not depend on the QR routine's sign choice."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _cross_block(k: int, block: int, mix: bool) -> Tensor | None:
    """The rotation across the ``k / block`` blocks of a width-``k`` input (float64), seeded by
    the width so that every linear of that width, fused or not, gets the same one."""
    return random_orthogonal(k // block, seed=k) if mix and k > block else None


class RotatedLinear(nn.Module):
    """``linear(x)`` computed as ``inner(R x)`` with ``inner.weight = W R^T``.

    ``R`` is block-diagonal Hadamard, or with ``mix`` the Kronecker product
    ``random_orthogonal(k / block) (x) H``: the input seen as ``[k / block, block]`` is
    rotated within each block and then across blocks, so an outlier spreads over the whole
    row (XNNPACK's one scale per row) for one more small matmul. ``inner`` is a plain
    ``nn.Linear`` for the quantizer."""

    def __init__(self, linear: nn.Linear, block: int = BLOCK, mix: bool = False):
        super().__init__()
        k, n = linear.in_features, linear.out_features
        self.block = block
        h = hadamard(block, torch.float64)
        self.register_buffer("rotation", h.to(linear.weight.dtype))
        a = _cross_block(k, block, mix)
        self.register_buffer("mix", None if a is None else a.to(linear.weight.dtype))
        w = linear.weight.detach().double().reshape(n, k // block, block) @ h.T
        w = (w if a is None else a @ w).reshape(n, k)
        self.inner = nn.Linear(k, n, bias=linear.bias is not None, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.inner.weight.copy_(w)
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)

    @classmethod
    def around(cls, inner: nn.Linear, block: int, mix: bool = False) -> "RotatedLinear":
        """A ``RotatedLinear`` over ``inner``, whose weights are already ``W R^T`` (the
        fused projections of ``transforms.fuse_projections``; ``mix``: the same seeded
        cross-block rotation as ``__init__`` makes for this width)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.block = block
        k = inner.in_features
        self.register_buffer("rotation", hadamard(block, inner.weight.dtype))
        a = _cross_block(k, block, mix)
        self.register_buffer("mix", None if a is None else a.to(inner.weight.dtype))
        self.inner = inner
        return self

    def forward(self, x: Tensor) -> Tensor:
        k = self.inner.in_features          # a Python int: traced shapes must not flow into reshape_bt
        if torch.compiler.is_exporting():
            return self.inner(self._rotated_bmm(x, k))
        if x.dim() == 3:        # the model's [B, T, k]: constant-shape reshapes in a traced graph
            y = ops.reshape_bt(x, [k // self.block, self.block]) @ self.rotation.T
            x = ops.reshape_bt(y if self.mix is None else self.mix @ y, [k])
        else:
            y = x.reshape(*x.shape[:-1], k // self.block, self.block) @ self.rotation.T
            x = (y if self.mix is None else self.mix @ y).reshape(x.shape)
        return self.inner(x)

    def _rotated_bmm(self, x: Tensor, k: int) -> Tensor:
        """``R x`` as batched matmuls whose reshapes have one dynamic size: the ``.pte``'s
        form (a 4-D ``@`` by a matrix traces to ``mm`` and ``expand`` copies, portable ops
        that cut XNNPACK's graph at every linear).  The cross-block ``mix @ y`` of each token
        is ``(y^T mix^T)^T``, one bmm over every token's block columns."""
        nb, bl = k // self.block, self.block
        rows = math.prod(x.shape[:-1])
        y = torch.bmm(ops.view(x, 1, rows * nb, bl), self.rotation.T[None])
        if self.mix is not None:
            yt = ops.view(y, rows, nb, bl).transpose(1, 2)                     # [rows, bl, nb]
            y = ops.view(torch.bmm(ops.view(yt, 1, rows * bl, nb), self.mix.T[None]), rows, bl, nb).transpose(1, 2)
        return ops.view(y, *x.shape[:-1], k)


# ----------------------------------------------------------------------------
# Calibration: per-input-channel max |x| of every linear
# ----------------------------------------------------------------------------

@torch.no_grad()
def input_absmax(model: nn.Module, ids: np.ndarray, block: int = 256) -> dict[str, Tensor]:
    """``{linear name: max |input| per channel}`` over ``ids`` fed through ``model``."""
    amax: dict[str, Tensor] = {}

    def hook(name):
        def fn(_, inp, __):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).double()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        state = None
        for i in range(0, len(ids), block):
            _, state = model(torch.from_numpy(np.ascontiguousarray(ids[None, i:i + block], np.int64)), state)
    finally:
        for h in handles:
            h.remove()
    return amax


def smoothing_scale(amax: Tensor, weights: list[Tensor], alpha: float = ALPHA) -> Tensor:
    wmax = torch.stack([w.detach().double().abs().amax(0) for w in weights]).amax(0)
    s = amax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-2, 1e2)


def _fold_into_affine(affine: nn.Module, linears: list[nn.Linear], s: Tensor) -> None:
    """``affine`` (norm with per-channel weight/bias) / s, the linears' columns * s."""
    affine.weight.copy_(affine.weight.double() / s)
    if getattr(affine, "bias", None) is not None:
        affine.bias.copy_(affine.bias.double() / s)
    for lin in linears:
        lin.weight.copy_(lin.weight.double() * s)


def _attn_inputs(attn: nn.Module) -> list[nn.Linear]:
    names = ("query_key_value",) if hasattr(attn, "query_key_value") else ("q_proj", "k_proj", "v_proj")
    return [getattr(attn, n) for n in names + ("gate",) if hasattr(attn, n)]


@torch.no_grad()
def smooth(model: nn.Module, amax: dict[str, Tensor], alpha: float = ALPHA) -> None:
    """SmoothQuant scales folded in place wherever the input's producer is per-channel."""
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        ins = _attn_inputs(attn)
        first = next(n for n, m in model.named_modules() if m is ins[0])
        _fold_into_affine(layer.input_layernorm, ins, smoothing_scale(amax[first], [m.weight for m in ins], alpha))
        if hasattr(mlp, "up_proj"):      # gated MLP: down_proj's input is act(gate) * up
            ups = [mlp.gate_proj, mlp.up_proj]
            name = f"layers.{i}.mlp.gate_proj"
            _fold_into_affine(layer.post_attention_layernorm, ups,
                              smoothing_scale(amax[name], [m.weight for m in ups], alpha))
            s = smoothing_scale(amax[f"layers.{i}.mlp.down_proj"], [mlp.down_proj.weight], alpha)
            mlp.up_proj.weight.copy_(mlp.up_proj.weight.double() / s[:, None])
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.copy_(mlp.up_proj.bias.double() / s)
            mlp.down_proj.weight.copy_(mlp.down_proj.weight.double() * s)
        else:
            name = f"layers.{i}.mlp.dense_h_to_4h"
            _fold_into_affine(layer.post_attention_layernorm, [mlp.dense_h_to_4h],
                              smoothing_scale(amax[name], [mlp.dense_h_to_4h.weight], alpha))
        if hasattr(attn, "group_norm"):  # official variant: o_proj's input is silu(gate) * GroupNorm(o)
            out = attn.dense if hasattr(attn, "dense") else attn.o_proj
            name = next(n for n, m in model.named_modules() if m is out)
            _fold_into_affine(attn.group_norm, [out], smoothing_scale(amax[name], [out.weight], alpha))
    _fold_into_affine(model.norm, [model.lm_head], smoothing_scale(amax["lm_head"], [model.lm_head.weight], alpha))


def _read_rotated(norm: nn.Module, linears: list[nn.Linear], q: Tensor) -> None:
    """Linears that read ``norm``'s output take its gain and the rotation: ``W diag(g) Q``."""
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g) @ q)
    norm.weight.fill_(1.0)


def _write_rotated(lin: nn.Linear, q: Tensor) -> None:
    """A linear that adds to the residual stream writes it rotated: ``Q^T W``, ``b Q``."""
    lin.weight.copy_(q.T @ lin.weight.double())
    if lin.bias is not None:
        lin.bias.copy_(lin.bias.double() @ q)


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> bool:
    """The residual stream rotated by a random orthogonal ``Q`` (QuaRot's rotation, folded
    into the weights: nothing is added to the graph). RMSNorm commutes with ``Q`` once its
    gain moves into the linears that read it, so the embedding and every linear writing the
    stream are multiplied by ``Q`` on the way in and every reader by ``Q^T``: the network is
    the same function, and each linear reading the stream sees a row whose outlier channels
    are spread over all channels. Only for RMSNorm models without a parallel residual
    (LayerNorm's mean subtraction does not commute); returns whether it rotated."""
    a = model.args
    if a.norm != "rms" or a.parallel_residual or a.arch == "gpt_neox":
        return False
    q = random_orthogonal(a.hidden_size, seed)
    model.embed.weight.copy_(model.embed.weight.double() @ q)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        _read_rotated(layer.input_layernorm, _attn_inputs(attn), q)
        _write_rotated(attn.dense if hasattr(attn, "dense") else attn.o_proj, q)
        _read_rotated(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], q)
        _write_rotated(mlp.down_proj, q)
    _read_rotated(model.norm, [model.lm_head], q)
    return True


def block_for(k: int, block: int = BLOCK) -> int:
    """The largest power of two <= ``block`` that divides ``k`` (64 for real models)."""
    while k % block:
        block //= 2
    return block


def rotate(model: nn.Module, block: int = BLOCK, every_input: bool = False, mix: bool = False,
           head: bool = True) -> None:
    """Block-Hadamard rotation of the inputs of the head and each layer's output linears
    (``every_input``: of every linear of the layers; ``mix``: across blocks too).  Where
    ``o_proj``'s input is linear in the values (``fold_into_values``), its rotation moves
    into ``v_proj``'s weights: no matmul is left for it in the graph."""
    def wrap(parent: nn.Module, name: str) -> None:
        lin = getattr(parent, name, None)
        if isinstance(lin, nn.Linear) and block_for(lin.in_features, block) >= 8:
            setattr(parent, name, RotatedLinear(lin, block_for(lin.in_features, block), mix))
    if head:
        wrap(model, "lm_head")
    for layer in model.layers:
        folded = () if mix else fold_into_values(layer.attn, model.args, block)
        for part in (layer.mlp, layer.attn):
            for name, child in list(part.named_children()):
                if (every_input or name in OUTPUT_LINEARS) and not (part is layer.attn and name in folded):
                    wrap(part, name)


@torch.no_grad()
def fold_into_values(attn: nn.Module, a, block: int) -> tuple[str, ...]:
    """``o_proj(R o)`` as ``o_proj'(o')`` with ``o' = R o`` computed upstream: in the
    ``normalized`` variant each head's output (window and linear parts alike) is a
    weighted sum of that head's values divided by a scalar, so rotating every value
    vector by the same per-head block rotation rotates the output exactly.  ``v_proj``'s
    rows (and bias) take the rotation, ``o_proj`` takes ``W R^T`` as ``RotatedLinear``
    would, and the values the window's ring keeps are the rotated ones.  Returns the
    names left unwrapped (``("o_proj",)``), or ``()`` where the output is not linear in
    the values (a gate or the official GroupNorm in between, fused q/k/v)."""
    out, v = getattr(attn, "o_proj", None), getattr(attn, "v_proj", None)
    if a.variant != "normalized" or not isinstance(out, nn.Linear) or not isinstance(v, nn.Linear):
        return ()
    b = block_for(out.in_features, block)
    if b < 8 or a.head_dim % b:
        return ()
    h = hadamard(b, torch.float64)
    wt = v.weight.double().T                              # [k, n_v]: v = x wt + bias
    v.weight.copy_((wt.reshape(wt.shape[0], -1, b) @ h.T).reshape(wt.shape).T)
    if v.bias is not None:
        v.bias.copy_((v.bias.double().reshape(-1, b) @ h.T).reshape(-1))
    attn.o_proj = RotatedLinear(out, b).inner
    return ("o_proj",)


def prepare_for_int8(model: nn.Module, calibration_ids: np.ndarray, alpha: float = ALPHA,
                     block: int = BLOCK, every_input: bool = False, residual: bool = False,
                     mix: bool = False) -> nn.Module:
    """A copy of ``model`` that computes the same function (up to float rounding)
    with flatter linear inputs: the residual stream rotated (``residual``, where the
    architecture allows: ``rotate_residual``), smoothed on ``calibration_ids``, then the
    remaining inputs rotated (``rotate``; the head's input is already flat when the
    residual is rotated). The head is untied from the embedding first (the embedding keeps
    its weights)."""
    model = copy.deepcopy(model).eval()
    if model.lm_head.weight is model.embed.weight:
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    rotated = residual and rotate_residual(model)
    smooth(model, input_absmax(model, calibration_ids), alpha)
    rotate(model, block, every_input, mix, head=not rotated)
    return model


def calibration_ids(model: nn.Module, out_dir: Path, text: str) -> np.ndarray:
    """Calibration ids for int8 from the English ``text`` (never the parity text), in the
    tokenizer of the export folder ``out_dir`` when it has one."""
    from ..parity import text_ids
    from ..tokenizer import load_tokenizer
    tok = load_tokenizer(out_dir) if (Path(out_dir) / "tokenizer.json").exists() else None
    return text_ids(tok, model.args.vocab_size, CALIBRATION_TOKENS, text)[0]


# ----------------------------------------------------------------------------
# Outlier channels taken out (LLM.int8()'s decomposition): for weights that must stay on
# their source's 4-bit grid, where a rotation or smoothing would move them off it.
# ----------------------------------------------------------------------------

class SplitOutliers(nn.Module):
    """``inner(x * keep) + cols(pick(x))``: the linear ``inner`` sees its input with the
    calibrated outlier channels zeroed, so one int8 scale per token row is set by the
    ordinary channels, and the outlier channels go through a narrow side path: ``pick``
    (one-hot rows, exact at 8 bits) selects them and ``cols`` holds ``inner``'s full
    weight columns for them.  The same function as ``inner`` up to float rounding;
    ``inner``'s weights are untouched (a grid stays a grid)."""

    def __init__(self, inner: nn.Module, weight: Tensor, channels: Tensor, pick: nn.Linear | None = None):
        super().__init__()
        k = weight.shape[1]
        self.inner = inner
        keep = torch.ones(k, dtype=weight.dtype)
        keep[channels] = 0
        self.register_buffer("keep", keep)
        self.pick = pick if pick is not None else self.picker(k, channels, weight.dtype)
        self.cols = nn.Linear(len(channels), weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.cols.weight.copy_(weight[:, channels])
        self.cols.weight.requires_grad_(False)

    @staticmethod
    def picker(k: int, channels: Tensor, dtype: torch.dtype) -> nn.Linear:
        """The one-hot ``pick`` of ``channels`` out of ``k``; one module can serve every
        linear of the same input (q, k and v; gate and up): stored once in a program."""
        pick = nn.Linear(k, len(channels), bias=False, dtype=dtype)
        with torch.no_grad():
            pick.weight.copy_(torch.eye(k, dtype=dtype)[channels])
        pick.weight.requires_grad_(False)
        return pick

    @property
    def in_features(self) -> int:
        return self.pick.in_features

    @property
    def out_features(self) -> int:
        return self.cols.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.keep) + self.cols(self.pick(x))


def fused_input_absmax(amax: dict[str, Tensor]) -> dict[str, Tensor]:
    """``amax`` (``input_absmax`` of the model before fusion) with the names of the fused
    projections too (``transforms.fuse_projections``: a fused projection reads its parts'
    input); ``split_outliers`` skips the names a model has no linear under."""
    from ..transforms import FUSED_INPUTS
    out = dict(amax)
    for name, a in amax.items():
        for fused, part in FUSED_INPUTS.items():
            if name.endswith("." + part):
                out[name[:-len(part)] + fused] = a
    return out


def channels_for(name: str, channels: int | dict[str, int]) -> int:
    """How many channels ``split_outliers`` carries aside for the linear ``name``:
    ``channels``, or ``channels[last part of name]`` (else ``channels["*"]``, else 0)."""
    if isinstance(channels, int):
        return channels
    return channels.get(name.rpartition(".")[2], channels.get("*", 0))


def split_outliers(model: nn.Module, amax: dict[str, Tensor], channels: int | dict[str, int]) -> int:
    """Wrap, in place, the head and every layer linear named in ``amax`` (``input_absmax``
    of the model before any replacement) in ``SplitOutliers`` around its ``channels``
    largest input channels (``channels_for``: one count, or one per kind of linear, such
    as ``{"*": 32, "o_proj": 0}``); the number wrapped.  A ``grid.GridLinear``
    keeps its codes, its columns come from ``weight_equivalent``.  Linears that read the
    same channels of the same width share one ``pick``."""
    done, picks = 0, {}
    for name in sorted(amax):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, attr)
        if hasattr(mod, "weight_equivalent"):
            weight = mod.weight_equivalent().to(next(mod.parameters()).dtype)
        elif type(mod) is nn.Linear:
            weight = mod.weight.detach()
        else:
            continue
        n = min(channels_for(name, channels), weight.shape[1])
        if n:
            chosen = amax[name].topk(n).indices.sort().values
            key = (weight.shape[1], weight.dtype, tuple(chosen.tolist()))
            picks.setdefault(key, SplitOutliers.picker(weight.shape[1], chosen, weight.dtype))
            setattr(parent, attr, SplitOutliers(mod, weight, chosen, picks[key]))
            done += 1
    return done
