"""4-bit on the source's own grid: projections written as the codes their source stored.

A source read from a 4-bit GGUF (the default model is ``Q4_1``) has every projection
weight on a grid already: in each block of 32 along the input, ``w = m + d * q`` with
``q`` in 0..15.  Quantizing such a weight again, to any other 4-bit grid, adds a second
rounding as large as the first: on the adapted default, onnxruntime's round-to-nearest
int4 agrees with fp32 on 73% of next tokens.  Kept on its own grid it loses nothing.
An adapted model's weight is off that grid by its LoRA update only, so it is written as

    W = d (q - z)      the grid with an integer zero point z = round(-m / d): what
                       ``MatMulNBits`` stores exactly at 4 bits (asymmetric, block 32)
      + r 1^T          per block the rest of the minimum, r = m + d z (|r| <= d / 2 when
                       0 <= -m / d <= 15), times the block sum of the input
      + s B A          the adapter's low-rank update

and ``GridLinear`` computes it as the grid part plus a side path ``side_up(side_down(x))``
whose two small matrices stack the LoRA factors and the block indicators, so one pair of
matmuls carries both.  The grid part and ``side_down`` share one 4-bit matmul (exact for
the grid and the indicators), ``side_up`` is 8-bit.
``split`` applies it to every projection found on a grid (a transform of an export copy,
the function unchanged to float rounding: tests compare).  Measured in PyTorch on the
adapted default (grid exact, update and head at 8 bits): top-1 agreement with fp32 100%
over 2,048 tokens; the head at 4 bits instead: 77%, which is why the head stays at 8.
"""

from __future__ import annotations

import torch
import torch.nn as nn

Tensor = torch.Tensor
BLOCK = 32           # Q4_0 / Q4_1 / MatMulNBits block
LEVELS = 16          # 4 bits
TOLERANCE = 1e-3     # off-grid distance allowed, in grid steps (float rounding of m + d q, of W - sBA)


def find_grid(w: Tensor, block: int = BLOCK, levels: int = LEVELS, tol: float = TOLERANCE,
              zero: int | None = None) -> tuple[Tensor, Tensor] | None:
    """``(grid part d (q - z) [N, K], residual r [N, K / block])`` of ``w [N, K]`` whose
    every block of ``block`` inputs takes values ``m + d q``, ``q`` in ``0..levels-1``
    (both ends used, as ggml's Q4_1 quantizer makes them); None when any block is off it.

    ``zero``: one zero point for every block (``levels // 2`` gives the symmetric codes
    ``-8..7`` that XNNPACK's 4-bit weights hold, their scale ``d`` recovered exactly from
    the block's ends); the residual ``r = m + d z`` is then no longer small."""
    n, k = w.shape
    if k % block:
        return None
    b = w.detach().double().reshape(n, k // block, block)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    flat = d == 0
    q = torch.where(flat, torch.zeros_like(b), (b - lo) / torch.where(flat, torch.ones_like(d), d))
    if float((q - q.round()).abs().max()) > tol:
        return None
    if zero is None:
        z = torch.where(flat, torch.zeros_like(d), (-lo / torch.where(flat, torch.ones_like(d), d)).round())
        z = z.clamp(0, levels - 1)
    else:
        z = torch.full_like(d, float(zero))
    grid = d * (q.round() - z)
    return grid.reshape(n, k).to(w.dtype), (lo + d * z).squeeze(-1).to(w.dtype)


def _padded(rows: int, block: int) -> int:
    return -(-rows // block) * block


class GridLinear(nn.Module):
    """A projection as the grid part plus a side path (module docstring), in two matmuls:
    ``joint`` holds the grid rows (with the source's bias) and below them the side's down
    rows, so one 4-bit ``MatMulNBits`` reads the input once for both; ``side_up`` (8 bits)
    maps the side's outputs back and they are added.  The side's inner width is the
    update's rank padded to whole blocks, then one row per input block: an 8-bit block of
    ``side_up`` never mixes update columns with residual ones.  The down rows of the
    update are the one part 4 bits round (the block indicators are exact); measured on the
    adapted default that costs 0.5 points of top-1 agreement and saves a matmul per
    projection (11% of decode time)."""

    def __init__(self, grid: Tensor, bias: Tensor | None, residual: Tensor,
                 lora: tuple[Tensor, Tensor] | None = None, block: int = BLOCK):
        super().__init__()
        n, k = grid.shape
        self.block, self.n = block, n
        down = lora[0] if lora is not None else grid.new_zeros(0, k)       # [r, K]
        up = lora[1] if lora is not None else grid.new_zeros(n, 0)         # [N, r] (scale folded in)
        self.register_buffer("residual", residual.detach().clone())
        self.register_buffer("lora_down", down.detach().clone().to(grid.dtype))
        self.register_buffer("lora_up", up.detach().clone().to(grid.dtype))
        r = _padded(down.shape[0], block)
        blocks = k // block
        self.side = r + blocks
        side_down = grid.new_zeros(self.side, k)
        side_down[:down.shape[0]] = self.lora_down
        side_down[r:] = torch.eye(blocks, dtype=grid.dtype).repeat_interleave(block, dim=1)
        side_up = grid.new_zeros(n, self.side)
        side_up[:, :down.shape[0]] = self.lora_up
        side_up[:, r:] = self.residual
        self.joint = nn.Linear(k, n + self.side, bias=bias is not None, dtype=grid.dtype)
        self.side_up = nn.Linear(self.side, n, bias=False, dtype=grid.dtype)
        with torch.no_grad():
            self.joint.weight.copy_(torch.cat([grid, side_down]))
            if bias is not None:
                self.joint.bias.copy_(torch.cat([bias, bias.new_zeros(self.side)]))
            self.side_up.weight.copy_(side_up)
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.joint.in_features

    @property
    def out_features(self) -> int:
        return self.n

    @property
    def grid(self) -> Tensor:
        return self.joint.weight[:self.n]

    @property
    def bias(self) -> Tensor | None:
        return None if self.joint.bias is None else self.joint.bias[:self.n]

    def weight_equivalent(self) -> Tensor:
        """The plain weight this computes (float64): grid + residual blocks + update."""
        k = self.in_features
        w = self.grid.double() + self.residual.double().repeat_interleave(self.block, dim=1)[:, :k]
        return w + self.lora_up.double() @ self.lora_down.double()

    def forward(self, x: Tensor) -> Tensor:
        y, s = self.joint(x).split([self.n, self.side], dim=-1)
        return y + self.side_up(s)


class GridApart(nn.Module):
    """A ``GridLinear`` with its joint matmul as two, ``main`` (the grid rows,
    the bias) and ``down`` (the side's down rows): the ``.pte``'s form.  XNNPACK takes no
    split of a matmul's output, so the joint's split would be a portable op between two
    delegate calls at every projection; two 4-bit matmuls of the same input stay in one
    (the same numbers: one input, one dynamic activation scale, the same weight rows)."""

    def __init__(self, g: GridLinear):
        super().__init__()
        n, k = g.n, g.in_features
        w = g.joint.weight.detach()
        self.main = nn.Linear(k, n, bias=g.joint.bias is not None, dtype=w.dtype)
        self.down = nn.Linear(k, g.side, bias=False, dtype=w.dtype)
        self.side_up = g.side_up
        with torch.no_grad():
            self.main.weight.copy_(w[:n])
            self.down.weight.copy_(w[n:])
            if g.joint.bias is not None:
                self.main.bias.copy_(g.joint.bias[:n])
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.main.in_features

    @property
    def out_features(self) -> int:
        return self.main.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.side_up(self.down(x))


def apart(model: nn.Module) -> int:
    """Replace, in place, every ``GridLinear`` of ``model`` by its ``GridApart``; the number
    replaced.  The parts only ``weight_equivalent`` and ``fuse`` read stay behind (a traced
    program would otherwise carry them as unused constants: 33 MB in the default's)."""
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GridLinear):
                setattr(parent, name, GridApart(child))
                done += 1
    return done


def fuse(parts: list[GridLinear]) -> GridLinear:
    """One ``GridLinear`` whose output is the parts' outputs side by side (same input):
    grids and residuals stacked, the updates block-diagonal."""
    ks, blocks = {p.in_features for p in parts}, {p.block for p in parts}
    if len(ks) != 1 or len(blocks) != 1:
        raise ValueError("grid projections fused must share their input width and block")
    grid = torch.cat([p.grid for p in parts])
    biased = any(p.bias is not None for p in parts)
    bias = torch.cat([p.bias if p.bias is not None else grid.new_zeros(p.out_features)
                      for p in parts]) if biased else None
    down = torch.cat([p.lora_down for p in parts])
    up = torch.block_diag(*[p.lora_up for p in parts]) if down.shape[0] else grid.new_zeros(grid.shape[0], 0)
    return GridLinear(grid, bias, torch.cat([p.residual for p in parts]),
                      (down, up) if down.shape[0] else None, blocks.pop())


def _updates(model) -> dict[str, tuple[Tensor, Tensor]]:
    """``{projection name: (A, s B)}`` of the adapter applied to ``model`` (merged into its
    weights), read back from the file its record names; empty for a plain conversion or
    when that file is gone or changed (its projections are then simply off the grid)."""
    from .adapter import applied, load_adapter
    from .errors import DiJiangError
    rec = applied(model)
    path = rec.get("path")
    if not rec.get("applied") or not path:
        return {}
    try:
        ad = load_adapter(path)
    except DiJiangError:         # gone or damaged: a bug anywhere else must still surface
        return {}
    if ad.sha256 != rec.get("sha256"):
        return {}
    return {name: (a, b * ad.scale) for name, (a, b) in ad.lora.items()}


def split(model, block: int = BLOCK, zero: int | None = None) -> int:
    """Replace, in place, every projection of ``model``'s layers whose weight (less its
    adapter update) lies on a 4-bit grid by its ``GridLinear``; the number replaced.
    Use on an export copy (``transforms.export_copy``); ``zero``: as ``find_grid``."""
    updates = _updates(model)
    done = 0
    for layer_name, layer in model.layers.named_children():
        for name, mod in list(layer.named_modules()):
            if type(mod) is not nn.Linear or not name:
                continue
            full = f"layers.{layer_name}.{name}"
            lora = updates.get(full)
            w = mod.weight.detach()
            base = w - (lora[1] @ lora[0]).to(w.dtype) if lora is not None else w
            found = find_grid(base, block, zero=zero)
            if found is None:
                continue
            parent, attr = (layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer), name.rsplit(".", 1)[-1]
            setattr(parent, attr, GridLinear(found[0], mod.bias, found[1], lora, block))
            done += 1
    return done


def four_bit_weights(model) -> list[Tensor]:
    """The ``joint`` weights of ``model``'s ``GridLinear`` modules: what the ``int4`` export
    quantizes to 4 bits (found in the traced graph by content)."""
    return [m.joint.weight.detach() for m in model.modules() if isinstance(m, GridLinear)]
