"""The few-nodes native ONNX graph (``exporters.onnx_fused``) computes what the plain
trace computes, on every architecture and variant, and keeps its node count down."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge.exporters.onnx_fused import FusedStep, supports
from dijiang_edge.exporters.onnx_graph import OnnxStep, to_onnx
from dijiang_edge.model import DiJiangForCausalLM, ModelArgs
from conftest import ARCHS, rel_err, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def _noisy(model):
    """Trained-looking weights: zero-initialised gates and unit norms would hide mistakes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(model, batch: int, seq: int):
    torch.manual_seed(2)
    ids = torch.randint(3, model.args.vocab_size, (batch, seq))
    past = [torch.randn(model.state_shape(batch)) * 0.1 for _ in model.layers]
    return ids, torch.tensor([5]), past


@pytest.mark.parametrize("variant", ["official", "normalized", "normalized_gated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_step_equals_the_plain_trace(arch, variant):
    """Eager PyTorch, both modules, every graph kind, prefill and decode calls from a
    non-zero state."""
    model = _noisy(dijiang_edge.convert(tiny_hf(arch), variant=variant, chunk_size=8))
    calls = {"native": ((2, 7), (1, 1)), "block": ((2, 7), (1, 1)), "step": ((2, 1),)}
    for kind, shapes in calls.items():
        for batch, seq in shapes:
            ids, pos, past = _inputs(model, batch, seq)
            with torch.no_grad():
                ref = OnnxStep(model, kind)(ids, pos, *past)
                out = FusedStep(model, kind)(ids, pos, *past)
            assert rel_err(out[0], ref[0]) <= 1e-5, (kind, seq)
            assert max(rel_err(a, b) for a, b in zip(out[1:], ref[1:])) <= 1e-5, (kind, seq)


@pytest.mark.parametrize("arch,variant", [("smollm2", "official"), ("gpt_neox", "normalized"),
                                          ("llama", "normalized_gated")])
def test_fused_onnx_file_equals_pytorch(arch, variant):
    """onnxruntime on the exported graph: the custom shape ops map to the right ONNX nodes."""
    import onnxruntime as ort
    model = _noisy(dijiang_edge.convert(tiny_hf(arch), variant=variant, chunk_size=8))
    sess = ort.InferenceSession(to_onnx(model, "native").SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in ((2, 7), (1, 1)):
        ids, pos, past = _inputs(model, batch, seq)
        feeds = {"input_ids": ids.numpy(), "start_pos": pos.numpy(),
                 **{f"past_recurrent.{i}": p.numpy() for i, p in enumerate(past)}}
        out = sess.run(None, feeds)
        with torch.no_grad():
            ref = OnnxStep(model, "native")(ids, pos, *past)
        assert rel_err(torch.from_numpy(out[0]), ref[0]) <= 1e-5
        assert max(rel_err(torch.from_numpy(a), b) for a, b in zip(out[1:], ref[1:])) <= 1e-5


def test_fused_graph_has_few_nodes_per_layer(monkeypatch):
    """The point of the module: the plain trace spends >100 nodes on a layer, mostly shape
    arithmetic; the fused one a third of that, with no per-layer ``Shape``."""
    from dijiang_edge.exporters import onnx_fused
    model = dijiang_edge.convert(tiny_hf("smollm2"), chunk_size=8)
    ops = lambda mp, prefix="": collections.Counter(n.op_type for n in mp.graph.node
                                                    if n.name.startswith(prefix) and n.op_type != "Constant")
    fused = to_onnx(model, "native")
    layer = ops(fused, "/fused.1/")
    assert sum(layer.values()) <= 34 and layer["Shape"] == 0 and layer["LinearAttention"] == 1, layer
    monkeypatch.setattr(onnx_fused, "supports", lambda m: False)
    plain = to_onnx(model, "native")
    assert sum(ops(plain).values()) >= 3 * sum(ops(fused).values()), (ops(plain), ops(fused))


def test_per_position_gates_keep_the_plain_trace():
    """Imported official checkpoints (per-position gate tables) export through OnnxStep."""
    import onnxruntime as ort
    args = ModelArgs(arch="gpt_neox", vocab_size=97, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                     head_dim=16, intermediate_size=128, norm="layer", act="gelu", qkv_bias=True,
                     o_bias=True, mlp_bias=True, parallel_residual=True, rotary_dim=4, pos_table_len=8)
    model = _noisy(DiJiangForCausalLM(args).eval())
    assert not supports(model)
    ids = torch.randint(3, 97, (1, 12))          # past the table's end: the last column serves
    feeds = {"input_ids": ids.numpy(), "start_pos": np.array([0]),
             **{f"past_recurrent.{i}": np.zeros(model.state_shape(1), np.float32) for i in range(2)}}
    out = ort.InferenceSession(to_onnx(model, "native").SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        ref = model(ids)[0]
    assert rel_err(torch.from_numpy(out), ref) <= 1e-5
