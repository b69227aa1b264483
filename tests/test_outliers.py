"""The int8 outlier treatment (smoothing + block-Hadamard rotation) computes the
same function as the model it rewrites, and brings 8da8w closer to fp32."""

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge.exporters.executorch import quantize
from dijiang_edge.exporters.outliers import (RotatedLinear, block_for, hadamard, prepare_for_int8,
                                            random_orthogonal)
from dijiang_edge.model import VARIANTS
from conftest import ARCHS, rel_err

CALIB = np.random.default_rng(0).integers(3, 97, 96)


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_hadamard_is_orthonormal():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert block_for(576) == 64 and block_for(72) == 8 and block_for(96) == 32


def test_rotated_linear_equals_the_linear():
    lin = torch.nn.Linear(128, 40, dtype=torch.float64)
    x = torch.randn(3, 5, 128, dtype=torch.float64)
    assert rel_err(RotatedLinear(lin)(x), lin(x)) < 1e-12


def test_mixed_rotation_is_orthogonal_and_the_same_linear():
    """``mix``: a random orthogonal rotation across the 64-blocks on top of Hadamard."""
    a = random_orthogonal(9)
    assert torch.allclose(a @ a.T, torch.eye(9, dtype=torch.float64), atol=1e-12)
    assert torch.equal(a, random_orthogonal(9))                    # seeded: exports stay identical
    lin = torch.nn.Linear(576, 40, dtype=torch.float64)
    rot = RotatedLinear(lin, 64, mix=True)
    assert rot.mix is not None and rot.mix.shape == (9, 9)
    x = torch.randn(3, 5, 576, dtype=torch.float64)
    assert rel_err(rot(x), lin(x)) < 1e-12
    x[..., 7] = 1000.0                                           # one outlier channel
    y = ops_rows(rot, x)
    assert y.abs().amax() < 0.2 * x.abs().amax()                 # spread over the whole row


@pytest.mark.parametrize("mix", [False, True])
def test_exported_rotation_equals_the_eager_one(mix):
    """The ``.pte``'s batched-matmul form of ``R x`` (what ``torch.export`` traces) is the eager one."""
    lin = torch.nn.Linear(576, 40, dtype=torch.float64)
    rot = RotatedLinear(lin, 64, mix=mix)
    x = torch.randn(1, 5, 576, dtype=torch.float64)
    assert rel_err(rot._rotated_bmm(x, 576), ops_rows(rot, x)) < 1e-13


def ops_rows(rot: RotatedLinear, x: torch.Tensor) -> torch.Tensor:
    """What ``rot.inner`` sees: ``x`` after the rotation."""
    seen = []
    h = rot.inner.register_forward_hook(lambda _, inp, __: seen.append(inp[0]))
    rot(x)
    h.remove()
    return seen[0]


@torch.no_grad()
@pytest.mark.parametrize("arch,variant", [(a, v) for a in ARCHS for v in VARIANTS])
def test_residual_rotation_is_the_same_function(hf_models, arch, variant):
    """QuaRot's residual rotation is folded into the weights (norm gains ones after it,
    the head's input no longer wrapped); with ``mix`` the output linears rotate across
    blocks. Exact in float64; GPT-NeoX (LayerNorm) keeps the plain recipe."""
    model = dijiang_edge.convert(hf_models[arch], variant=variant, chunk_size=8).double()
    prepared = prepare_for_int8(model, CALIB, residual=True, mix=True)
    rotated = [m for m in prepared.modules() if isinstance(m, RotatedLinear)]
    if model.args.norm == "rms" and not model.args.parallel_residual:
        assert len(rotated) == 2 * len(model.layers)                 # not the head
        assert not torch.allclose(prepared.embed.weight, model.embed.weight)
    else:
        assert len(rotated) == 1 + 2 * len(model.layers)
    ids = _ids(40)
    assert rel_err(prepared(ids)[0], model(ids)[0]) < 1e-10


@torch.no_grad()
@pytest.mark.parametrize("arch,variant", [(a, v) for a in ARCHS for v in VARIANTS])
def test_prepared_model_is_the_same_function(hf_models, arch, variant):
    """In float64 the rewrite is exact up to rounding: smoothing and rotation cancel."""
    model = dijiang_edge.convert(hf_models[arch], variant=variant, chunk_size=8).double()
    prepared = prepare_for_int8(model, CALIB)
    rotated = [m for m in prepared.modules() if isinstance(m, RotatedLinear)]
    folded = sum(type(getattr(layer.attn, "o_proj", None)) is torch.nn.Linear for layer in prepared.layers)
    assert folded == 0 or variant == "normalized"                         # o_proj's rotation in v_proj
    assert len(rotated) == 1 + 2 * len(model.layers) - folded             # head, each layer's output linears
    assert not torch.equal(prepared.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)
    ids = _ids(40)
    assert rel_err(prepared(ids)[0], model(ids)[0]) < 1e-10
    assert model.lm_head.weight is model.embed.weight or not model.args.tie_embeddings   # original untouched


@torch.no_grad()
@pytest.mark.parametrize("arch,mix", [(a, False) for a in ARCHS] + [(a, True) for a in ARCHS])
def test_every_input_rotated_and_fused_is_the_same_function(hf_models, arch, mix):
    """ONNX's treatment rotates every linear's input (32 x 32 blocks), the .pte's (``mix``)
    across blocks too; the export transforms then fuse rotated q/k/v(/gate) and gate/up
    into rotated fused linears, with the same rotation."""
    from dijiang_edge.transforms import fuse_projections
    model = dijiang_edge.convert(hf_models[arch], variant="normalized_gated", chunk_size=8).double()
    prepared = prepare_for_int8(model, CALIB, block=32, every_input=True, mix=mix)
    rotated = [m for m in prepared.modules() if isinstance(m, RotatedLinear)]
    per_layer = sum(isinstance(m, torch.nn.Linear) for m in model.layers[0].modules())
    assert len(rotated) == 1 + per_layer * len(model.layers) and {m.block for m in rotated} <= {8, 16, 32}
    fused = fuse_projections(prepared)
    assert all(isinstance(layer.attn.in_proj, RotatedLinear) for layer in fused.layers)
    assert all((layer.attn.in_proj.mix is not None) == mix for layer in fused.layers)
    ids = _ids(40)
    assert rel_err(fused(ids)[0], model(ids)[0]) < 1e-10


@torch.no_grad()
@pytest.mark.parametrize("arch,mode", [(a, "shared") for a in ARCHS] + [("llama", "mix")])
def test_output_rotation_folded_into_the_values(hf_models, arch, mode):
    """In the normalized variant, with a window (its ring then holds rotated values) or
    without, ``o_proj``'s input rotation moves into ``v_proj``'s rows: ``o_proj`` is left a
    plain linear and the model is the same function, past the window too."""
    for window in (0, 6):
        model = dijiang_edge.convert(hf_models[arch], variant="normalized", chunk_size=4, window=window,
                                     window_mode=mode).double()
        prepared = prepare_for_int8(model, CALIB, block=8, every_input=True)    # blocks within a head
        attn = prepared.layers[0].attn
        if not hasattr(attn, "v_proj"):          # fused q/k/v (GPT-NeoX): nothing to fold into
            assert isinstance(attn.dense, RotatedLinear)
            continue
        assert type(attn.o_proj) is torch.nn.Linear and isinstance(attn.v_proj, RotatedLinear)
        ids = _ids(23)
        assert rel_err(prepared(ids)[0], model(ids)[0]) < 1e-10
        mixed = prepare_for_int8(model, CALIB, block=8, every_input=True, mix=True)   # across heads: not folded
        assert isinstance(mixed.layers[0].attn.o_proj, RotatedLinear)


@torch.no_grad()
def test_outlier_treatment_brings_int8_closer_to_fp32(hf_models):
    """A few huge activation channels (as real LMs have) ruin per-token int8 scales;
    the treated model's 8da8w logits are much closer to fp32 than the plain one's."""
    model = dijiang_edge.convert(hf_models["llama"], chunk_size=8)
    for layer in model.layers:                  # plant outlier channels in the norms' outputs
        layer.input_layernorm.weight[[3, 17]] *= 40
        layer.post_attention_layernorm.weight[[5, 40]] *= 40
    model.norm.weight[[7]] *= 40
    ids = _ids(64)
    ref = model(ids)[0]
    plain = quantize(model, "8da8w", None)(ids)[0]
    treated = quantize(model, "8da8w", None, CALIB)(ids)[0]
    assert rel_err(treated, ref) < 0.75 * rel_err(plain, ref)     # measured: 0.15 vs 0.26


def test_split_outliers_is_the_same_function():
    """``SplitOutliers`` around a plain linear and around a ``GridLinear``: the same output
    (float64), the chosen channels zeroed in the inner linear's input and carried aside."""
    from conftest import q41
    from dijiang_edge import grid
    from dijiang_edge.exporters.outliers import SplitOutliers, split_outliers
    torch.manual_seed(0)
    base = q41(torch.randn(24, 64) * 0.05).double()
    lora = (torch.randn(4, 64, dtype=torch.float64) * 0.1, torch.randn(24, 4, dtype=torch.float64) * 0.1)
    g, r = grid.find_grid(base, zero=8)
    parent = torch.nn.Module()
    parent.plain = torch.nn.Linear(64, 24, dtype=torch.float64)
    parent.grid = grid.GridLinear(g, None, r, lora)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    x[..., [3, 40]] *= 100                                              # two outlier channels
    want = {n: getattr(parent, n)(x) for n in ("plain", "grid")}
    amax = {n: x.abs().reshape(-1, 64).amax(0) for n in ("plain", "grid")}
    assert split_outliers(parent, amax, 2) == 2
    for n in ("plain", "grid"):
        mod = getattr(parent, n)
        assert isinstance(mod, SplitOutliers) and torch.equal(torch.nonzero(mod.keep == 0).flatten(), torch.tensor([3, 40]))
        assert (mod.in_features, mod.out_features) == (64, 24)
        assert (mod(x) - want[n]).abs().max() / want[n].abs().max() < 1e-12
    assert parent.plain.pick is parent.grid.pick                       # same width, same channels: one pick
    assert isinstance(parent.grid.inner, grid.GridLinear)               # the grid itself untouched
    assert torch.equal(parent.grid.inner.grid, g)


def test_split_outliers_counts_per_kind():
    """A dict of counts keyed by the linear's own name: each kind its own number of
    channels aside, a kind it does not name left as it is."""
    from dijiang_edge.exporters.outliers import SplitOutliers, split_outliers
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.in_proj, block.o_proj, block.gate_up = (torch.nn.Linear(64, 8) for _ in range(3))
    parent = torch.nn.Module()
    parent.block = block
    amax = {f"block.{n}": torch.rand(64) for n in ("in_proj", "o_proj", "gate_up")}
    assert split_outliers(parent, amax, {"in_proj": 3, "gate_up": 5, "o_proj": 0}) == 2
    assert block.in_proj.pick.out_features == 3 and block.gate_up.pick.out_features == 5
    assert type(block.o_proj) is torch.nn.Linear and not isinstance(block.o_proj, SplitOutliers)
    assert set(torch.nonzero(block.in_proj.keep == 0).flatten().tolist()) == set(amax["block.in_proj"].topk(3).indices.tolist())
    block.in_proj, block.o_proj, block.gate_up = (torch.nn.Linear(64, 8) for _ in range(3))
    assert split_outliers(parent, amax, {"*": 4, "o_proj": 0}) == 2            # "*": every kind not named
    assert block.in_proj.pick.out_features == 4 == block.gate_up.pick.out_features
    assert type(block.o_proj) is torch.nn.Linear


@torch.no_grad()
def test_int4_keeps_a_4bit_source_on_its_grid(hf_models):
    """``.pte`` int4 of a model whose projections lie on Q4_1 grids: the grids kept (no
    rotation), the outlier channels carried aside, much closer to fp32 than
    round-to-nearest 8da4w after the outlier rewrite (which rounds every weight again)."""
    from conftest import q41
    from dijiang_edge import grid
    from dijiang_edge.exporters.outliers import SplitOutliers
    model = dijiang_edge.convert(hf_models["llama"], chunk_size=8)
    for name, mod in model.named_modules():
        if type(mod) is torch.nn.Linear and name.startswith("layers."):
            mod.weight.copy_(q41(mod.weight))
    for layer in model.layers:
        layer.input_layernorm.weight[[3, 17]] *= 40
    ids = _ids(64)
    ref = model(ids)[0]
    kept = quantize(model, "8da4w", "8w", CALIB)
    assert isinstance(kept.lm_head, SplitOutliers)
    assert not any(isinstance(m, RotatedLinear) for m in kept.modules())
    # q, k, v, gate fused, o, gate and up fused, down: four per layer, each as two matmuls
    assert sum(isinstance(m, grid.GridApart) for m in kept.modules()) == 4 * len(model.layers)
    assert not any(isinstance(m, grid.GridLinear) for m in kept.modules())
    layer = kept.layers[0]
    assert isinstance(layer.attn.in_proj.inner, grid.GridApart) and layer.attn.q_proj is None
    assert isinstance(layer.mlp.gate_up.inner, grid.GridApart) and layer.mlp.up_proj is None
    assert isinstance(layer.attn.o_proj, grid.GridApart)           # no channels aside (GRID_OUTLIER_CHANNELS)
    assert isinstance(layer.mlp.down_proj.inner, grid.GridApart)
    from dijiang_edge.exporters.executorch import outlier_label
    assert outlier_label(kept).endswith("(outliers.SplitOutliers), none for o_proj")
    rounded = quantize(model, "8da4w", "8w", CALIB, grid_channels=None)
    assert any(isinstance(m, RotatedLinear) for m in rounded.modules())
    assert rel_err(kept(ids)[0], ref) < 0.5 * rel_err(rounded(ids)[0], ref)   # measured: 0.11 vs 0.49


@torch.no_grad()
def test_fused_projections_quantize_to_the_same_numbers(hf_models, monkeypatch):
    """``quantize`` fuses q, k, v (and the gate) and gate, up before 8da8w: one input, so one
    dynamic activation scale per token, and weights scaled per row: the fused program
    computes what the separate linears did, to float rounding."""
    from dijiang_edge.exporters import executorch as ex
    model = dijiang_edge.convert(hf_models["llama"], chunk_size=8)
    ids = _ids(32)
    fused = quantize(model, "8da8w", "8w", CALIB)
    assert fused.layers[0].attn.q_proj is None and fused.layers[0].mlp.gate_proj is None
    monkeypatch.setattr(ex, "fuse_projections", lambda m, drop_parts=False: m)
    apart = quantize(model, "8da8w", "8w", CALIB)
    assert apart.layers[0].attn.in_proj is None
    assert rel_err(fused(ids)[0], apart(ids)[0]) < 1e-4
