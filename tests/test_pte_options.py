"""The .pte exporter's pieces that need no lowering: quantization names, the
exportable attention form, the in-graph reset, and the CLI's ExecuTorch flags."""

import pytest
import torch

import dijiang_edge
from dijiang_edge import attention as A
from dijiang_edge.cli import build_parser, cmd_export
from dijiang_edge.errors import DiJiangError
from dijiang_edge.exporters.executorch import (Int8Embedding, RecurrentLM,
                                               parse_quant, quant_label)
from conftest import rel_err


@pytest.mark.parametrize("label,pair", [("fp32", (None, None)), ("int8", ("8da8w", "8w")),
                                        ("8da4w", ("8da4w", None)), ("int4", ("8da4w", "8w")),
                                        ("emb8w", (None, "8w")), ("8da8w", ("8da8w", None))])
def test_quant_labels_round_trip(label, pair):
    assert parse_quant(label) == pair
    assert quant_label(*pair) == label


def test_recipe_names_read_as_their_alias():
    assert parse_quant("8da4w+emb8w") == parse_quant("int4") and parse_quant("8da8w+emb8w") == parse_quant("int8")


@pytest.mark.parametrize("bad", ["int2", "8da4w+emb4w", "fp16", "", "8w"])
def test_unknown_quant_is_refused(bad):
    with pytest.raises(DiJiangError, match="--qlinear"):
        parse_quant(bad)


def test_int8_embedding_is_groupwise_and_close():
    """One scale per 32 values of a row: an outlier channel costs only its own group."""
    w = torch.randn(50, 64)
    w[:, 3] *= 50                                   # one huge channel, as real embeddings have
    e, per_row = Int8Embedding(w), Int8Embedding(w, group=64)
    ids = torch.arange(50)[None]
    assert e.qweight.dtype == torch.int8 and e.scale.shape == (50, 2)
    rest = [c for c in range(64) if c >= 32]        # the group without the outlier
    err = lambda m: rel_err(m(ids)[0][:, rest], w[:, rest])      # noqa: E731
    assert err(e) < 1 / 127 and err(e) < 0.1 * err(per_row)
    odd = torch.randn(5, 20)                          # 20 % 32 != 0: one group per row
    assert rel_err(Int8Embedding(odd)(torch.arange(5)[None])[0], odd) < 1 / 127


def _pos_table_model():
    """An imported-official-style model: per-position gate tables (past position 8 too)."""
    from dijiang_edge.model import DiJiangForCausalLM, ModelArgs
    torch.manual_seed(0)
    args = ModelArgs(arch="gpt_neox", vocab_size=97, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                     head_dim=16, intermediate_size=128, norm="layer", act="gelu", qkv_bias=True, o_bias=True,
                     mlp_bias=True, parallel_residual=True, rotary_dim=4, pos_table_len=8)
    model = DiJiangForCausalLM(args).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("pos_log_gate"):
                b.copy_(-torch.rand_like(b) * 0.2)
            elif name.endswith("pos_beta"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


@torch.no_grad()
@pytest.mark.parametrize("kind", ["constant decay", "position tables"])
def test_wrapper_carries_state_and_resets_at_position_zero(hf_models, kind):
    """The exported module (constant decays precomputed, tables through ``gates``) in eager
    PyTorch: split calls equal one call, ``start_pos`` 0 clears the state."""
    model = dijiang_edge.convert(hf_models["smollm2"], chunk_size=8) if kind == "constant decay" \
        else _pos_table_model()
    w = RecurrentLM(model).eval()
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    ref = model(ids)[0]
    a = w(ids[:, :11], torch.tensor([0]))
    b = w(ids[:, 11:], torch.tensor([11]))
    assert rel_err(torch.cat([a, b], 1), ref[:, [10, 29]]) < 1e-4      # each call's last position
    again = w(ids[:, :11], torch.tensor([0]))          # start_pos 0: the state is cleared
    assert torch.equal(again, a)


def test_cli_qlinear_adds_a_pte_quantization(monkeypatch):
    seen = {}

    def fake_export(model, out, formats, quants, **kw):
        seen.update(formats=formats, quants=quants)
        return {"files": []}
    monkeypatch.setattr("dijiang_edge.exporters.export", fake_export)
    a = build_parser().parse_args(["export", "default", "--out", "x", "--formats", "pte",
                                   "--quant", "fp32", "--qlinear", "8da4w", "--qembedding", "8w"])
    cmd_export(a)
    assert seen == {"formats": ["pte"], "quants": ["fp32", "int4"]}


def test_op_names_in_the_manifest_carry_no_address():
    """A .pte entry lists its portable ops; a Python function target's repr has its memory
    address, which made two exports' manifests differ (``op_name`` gives bare names)."""
    from dijiang_edge.exporters.executorch import op_name

    def view(x):
        return x
    assert " at 0x" in repr(view)
    assert op_name(view) == "view"
    assert op_name(torch.ops.aten.cumsum.out) == "cumsum" and op_name(torch.ops.aten.add.Tensor) == "add"
