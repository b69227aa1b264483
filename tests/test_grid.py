"""The 4-bit grid split (``grid.py``): a projection on its source's Q4_1 grid found exactly,
written as grid + block residual + low-rank update, and the same function as the plain
(merged) projection, alone, fused, and in the transformed models the exports trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dijiang_edge
from dijiang_edge import grid, transforms
from conftest import q41, rel_err, tiny_hf


def test_find_grid_recovers_a_q41_weight():
    w = q41(torch.randn(48, 96) * 0.05)
    g, r = grid.find_grid(w)
    assert rel_err(g + r.repeat_interleave(32, dim=1), w) < 1e-6
    steps = g.reshape(48, 3, 32) / ((w.reshape(48, 3, 32).amax(-1) - w.reshape(48, 3, 32).amin(-1)) / 15)[..., None]
    assert (steps - steps.round()).abs().max() < 1e-3 and steps.abs().max() <= 15 + 1e-3   # d (q - z), z in 0..15
    d = (w.reshape(48, 3, 32).amax(-1) - w.reshape(48, 3, 32).amin(-1)) / 15
    assert (r.abs() <= d / 2 + 1e-7).float().mean() > 0.9       # the residual is at most half a step (centred weights)


def test_find_grid_refuses_what_is_off_a_grid():
    assert grid.find_grid(torch.randn(16, 64)) is None                      # plain floats
    w = q41(torch.randn(16, 64))
    w[3, 40] += 0.3 * (w[3, 32:64].amax() - w[3, 32:64].amin()) / 15       # one value a third of a step off
    assert grid.find_grid(w) is None
    assert grid.find_grid(torch.randn(16, 48)) is None                      # not whole blocks


def test_find_grid_takes_a_constant_block():
    w = q41(torch.randn(8, 64))
    w[2, :32] = 0.25
    g, r = grid.find_grid(w)
    assert torch.equal(g[2, :32], torch.zeros(32)) and float(r[2, 0]) == 0.25


def _grid_linear(n: int, k: int, rank: int, seed: int, bias: bool = False):
    """A GridLinear in float64 and the plain weight (and bias) it stands for."""
    torch.manual_seed(seed)
    base = q41(torch.randn(n, k) * 0.05).double()
    g, r = grid.find_grid(base)
    lora = (torch.randn(rank, k, dtype=torch.float64) * 0.1, torch.randn(n, rank, dtype=torch.float64) * 0.1) \
        if rank else None
    b = torch.randn(n, dtype=torch.float64) if bias else None
    w = base + (lora[1] @ lora[0] if lora else 0)
    return grid.GridLinear(g, b, r, lora), w, b


@pytest.mark.parametrize("rank", [0, 4, 40])
def test_grid_linear_is_the_merged_projection(rank):
    lin, w, b = _grid_linear(24, 96, rank, 0, bias=True)
    x = torch.randn(3, 5, 96, dtype=torch.float64)
    assert rel_err(lin(x), F.linear(x, w, b)) < 1e-12
    assert rel_err(lin.weight_equivalent(), w) < 1e-12
    assert lin.side == -(-rank // 32) * 32 + 3      # update rows in whole blocks, then 3 block rows


def test_fused_grid_is_the_parts_side_by_side():
    parts = [_grid_linear(n, 64, r, s)[0] for n, r, s in ((32, 8, 1), (16, 0, 2), (16, 16, 3))]
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    fused = grid.fuse(parts)
    assert rel_err(fused(x), torch.cat([p(x) for p in parts], -1)) < 1e-12
    with pytest.raises(ValueError):
        grid.fuse([parts[0], _grid_linear(8, 96, 0, 4)[0]])


def _on_grid(model, updates: dict | None = None):
    """``model`` with each projection put on a Q4_1 grid, plus ``updates`` {name: (A, sB)} merged."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, mod in mods.items():
            if type(mod) is torch.nn.Linear and name.startswith("layers."):
                mod.weight.copy_(q41(mod.weight))
                if updates is not None:
                    a = torch.randn(4, mod.in_features) * 0.05
                    b = torch.randn(mod.out_features, 4) * 0.05
                    updates[name] = (a, b)
                    mod.weight.add_(b @ a)
    return model


@pytest.fixture(scope="module")
def llama():
    return dijiang_edge.convert(tiny_hf("llama"), chunk_size=8).eval()


@pytest.mark.parametrize("adapted", [False, True])
def test_split_keeps_the_function(llama, adapted, monkeypatch):
    """Every projection found (less its adapter update, when adapted), the eager model and
    the fused ONNX-traced one unchanged to float rounding."""
    updates = {} if adapted else None
    model = _on_grid(copy.deepcopy(llama), updates)
    monkeypatch.setattr(grid, "_updates", lambda m: updates or {})
    split = transforms.export_copy(model).eval()
    linears = [n for n, m in model.layers.named_modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 8 * len(model.layers)          # q, k, v, o, the official output gate, the MLP's three
    assert grid.split(split) == len(linears)
    left = [n for n, m in split.layers.named_modules() if type(m) is torch.nn.Linear]
    assert left and all(n.endswith((".joint", ".side_up")) for n in left)   # only GridLinear parts
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        want = model(ids)[0]
        assert rel_err(split(ids)[0], want) < 1e-5
        onnx_like = transforms.for_onnx(split, "native")
        assert isinstance(onnx_like.layers[0].attn.in_proj, grid.GridLinear)
        assert isinstance(onnx_like.layers[0].mlp.gate_up, grid.GridLinear)
        assert rel_err(onnx_like(ids)[0], want) < 1e-5


def test_split_leaves_what_is_off_the_grid(llama):
    plain = transforms.export_copy(llama).eval()
    assert grid.split(plain) == 0                 # random float weights: nothing on a grid
    mixed = transforms.export_copy(llama).eval()
    with torch.no_grad():
        mixed.layers[0].attn.q_proj.weight = torch.nn.Parameter(q41(llama.layers[0].attn.q_proj.weight))
    assert grid.split(mixed) == 1
    fused = transforms.fuse_projections(mixed)
    assert fused.layers[0].attn.in_proj is None            # one on the grid, two off: they stay apart
    assert fused.layers[1].attn.in_proj is not None


def test_fused_parts_dropped_for_a_program(llama):
    """``drop_parts`` (the ``.pte``'s recipe): the parts a fusion replaced are None, the ones
    left apart stay, the function is unchanged."""
    mixed = transforms.export_copy(llama).eval()
    with torch.no_grad():
        mixed.layers[0].attn.q_proj.weight = torch.nn.Parameter(q41(llama.layers[0].attn.q_proj.weight))
    grid.split(mixed)
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        want = mixed(ids)[0]
        fused = transforms.fuse_projections(transforms.export_copy(mixed), drop_parts=True)
        assert rel_err(fused(ids)[0], want) < 1e-5
    first, second = fused.layers[0], fused.layers[1]
    assert first.attn.in_proj is None and isinstance(first.attn.q_proj, grid.GridLinear)    # kept apart
    assert first.attn.k_proj is not None and first.attn.gate is not None
    assert second.attn.q_proj is None and second.attn.gate is None and second.mlp.gate_proj is None
    assert first.mlp.gate_up is not None and first.mlp.up_proj is None
    names = {n for n, _ in fused.named_parameters()}
    assert not any(".1.attn.q_proj" in n or ".mlp.up_proj" in n for n in names)


def test_find_grid_with_the_symmetric_zero_point():
    """``zero=8``: the codes ``q - 8`` fill XNNPACK's symmetric -8..7 and the block's step
    is what ``max(-min / 8, max / 7)`` of the grid part gives back; grid + residual is the
    weight."""
    w = q41(torch.randn(16, 96) * 0.05)
    g, r = grid.find_grid(w, zero=8)
    assert rel_err(g + r.repeat_interleave(32, dim=1), w) < 1e-6
    gb = g.reshape(16, 3, 32)
    step = torch.maximum(-gb.amin(-1) / 8, gb.amax(-1) / 7)[..., None]
    codes = gb / step
    assert (codes - codes.round()).abs().max() < 1e-4
    assert codes.round().amin() == -8 and codes.round().amax() == 7


def test_grid_codes_survive_torchao_8da4w_exactly():
    """The ``.pte`` int4 recipe's config for grid parts rounds nothing: dequantized, the
    4-bit weight is the grid part (the default ``absmax / 7.5`` scale would round it again)."""
    from torchao.quantization.quant_api import quantize_
    from dijiang_edge.exporters.executorch import _linear_config
    g, _ = grid.find_grid(q41(torch.randn(24, 64) * 0.05), zero=8)
    for exact, bound in ((True, 1e-6), (False, None)):
        lin = torch.nn.Sequential(torch.nn.Linear(64, 24, bias=False))
        with torch.no_grad():
            lin[0].weight.copy_(g)
        quantize_(lin, _linear_config("8da4w", exact_grid=exact))
        err = rel_err(lin[0].weight.dequantize(), g)
        assert (err < bound) if exact else (err > 1e-3)


def test_grid_apart_computes_the_same():
    """The ``.pte``'s two-matmul form: the same function, none of the parts
    ``weight_equivalent`` reads (a traced program would carry them unused)."""
    lin, w, b = _grid_linear(24, 96, 8, 5, bias=True)
    x = torch.randn(2, 3, 96, dtype=torch.float64)
    parent = torch.nn.Module()
    parent.lin = lin
    assert grid.apart(parent) == 1
    got = parent.lin
    assert isinstance(got, grid.GridApart) and (got.in_features, got.out_features) == (96, 24)
    assert rel_err(got(x), F.linear(x, w, b)) < 1e-12
    assert not {n for n, _ in got.named_buffers()}
    assert got.main.weight.shape == (24, 96) and got.down.weight.shape == (lin.side, 96)
