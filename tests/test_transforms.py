"""Every export target is the one model transformed (``transforms.py``): each transformed
model computes what the eager model computes, on every architecture and variant, and the
ONNX graphs keep their node count down."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge.exporters.executorch import RecurrentLM
from dijiang_edge.exporters.onnx_graph import OnnxStep, to_onnx
from dijiang_edge.model import DiJiangForCausalLM, ModelArgs, RecurrentState
from conftest import ARCHS, rel_err, tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")
START = 5


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


def _eager(model, ids, past):
    """The eager model continuing from ``past`` at position ``START``."""
    state = RecurrentState([p.clone() for p in past], torch.full((ids.shape[0],), START))
    logits, new = model(ids, state)
    return logits, new.layers


def _pos_table_model():
    args = ModelArgs(arch="gpt_neox", vocab_size=97, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4,
                     head_dim=16, intermediate_size=128, norm="layer", act="gelu", qkv_bias=True,
                     o_bias=True, mlp_bias=True, parallel_residual=True, rotary_dim=4, pos_table_len=8)
    model = _noisy(DiJiangForCausalLM(args).eval())
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.pos_log_gate.copy_(-torch.rand_like(layer.attn.pos_log_gate) * 0.2)
            layer.attn.pos_beta.copy_(0.5 + torch.rand_like(layer.attn.pos_beta))
    return model


CALLS = {"native": ((2, 7), (1, 1)), "block": ((2, 7), (1, 1)), "step": ((2, 1),)}


def _check_onnx_steps(model):
    for kind, shapes in CALLS.items():
        for batch, seq in shapes:
            ids, pos, past = _inputs(model, batch, seq)
            keeps = (0, 1, seq + 3) if kind != "step" else (None,)
            for keep in keeps:          # logits_to_keep: 0 = every row, 1 = the last, more than seq = all
                with torch.no_grad():
                    ref = _eager(model, ids, past)
                    arg = () if keep is None else (torch.tensor([keep]),)
                    out = OnnxStep(model, kind)(ids, pos, *arg, *past)
                want = ref[0][:, -1:] if keep == 1 else ref[0]
                assert out[0].shape == want.shape, (kind, seq, keep)
                assert rel_err(out[0], want) <= 1e-5, (kind, seq, keep)
                assert max(rel_err(a, b) for a, b in zip(out[1:], ref[1])) <= 1e-5, (kind, seq)


def _check_pte_wrapper(model):
    ids, _, past = _inputs(model, 1, 9)
    w = RecurrentLM(model).eval()
    with torch.no_grad():
        for i, p in enumerate(past):
            getattr(w, f"state_{i}").copy_(p)
        out = torch.cat([w(ids[:, :4], torch.tensor([START])), w(ids[:, 4:], torch.tensor([START + 4]))], 1)
        ref, states = _eager(model, ids, past)
    assert out.shape == (1, 2, model.args.vocab_size)       # each call: its last position only
    assert rel_err(out, ref[:, [3, 8]]) <= 1e-5
    assert max(rel_err(getattr(w, f"state_{i}"), s) for i, s in enumerate(states)) <= 1e-5


@pytest.mark.parametrize("variant", ["official", "normalized", "normalized_gated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_transformed_models_equal_the_eager_model(arch, variant):
    """Each ONNX graph kind (fused projections, its own core) and the ``.pte`` module
    (masked core, state in buffers) in eager PyTorch, prefill and decode calls from a
    non-zero state, against ``model.forward``."""
    model = _noisy(dijiang_edge.convert(tiny_hf(arch), variant=variant, chunk_size=8))
    _check_onnx_steps(model)
    _check_pte_wrapper(model)


def test_transforms_cover_per_position_gate_tables():
    """Imported official checkpoints: per-position gates, past the table's end too."""
    model = _pos_table_model()
    _check_onnx_steps(model)
    _check_pte_wrapper(model)


def test_transforms_leave_the_model_alone():
    """Transforms work on a copy that shares the model's tensors."""
    model = _noisy(dijiang_edge.convert(tiny_hf("smollm2"), chunk_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = OnnxStep(model, "native")
    core = type(model.layers[0].attn.core).__name__
    assert core == "EagerCore" and model.layers[0].attn.in_proj is None
    assert step.model.layers[0].attn.q_proj.weight is model.layers[0].attn.q_proj.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch,variant", [("smollm2", "official"), ("gpt_neox", "normalized"),
                                          ("llama", "normalized_gated")])
def test_onnx_file_equals_pytorch(arch, variant):
    """onnxruntime on the exported graph: the custom shape ops map to the right ONNX nodes."""
    import onnxruntime as ort
    model = _noisy(dijiang_edge.convert(tiny_hf(arch), variant=variant, chunk_size=8))
    sess = ort.InferenceSession(to_onnx(model, "native").SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in ((2, 7), (1, 1)):
        ids, pos, past = _inputs(model, batch, seq)
        with torch.no_grad():
            ref = _eager(model, ids, past)
        for keep in (0, 1):          # the graph's Slice: every row, the last row
            feeds = {"input_ids": ids.numpy(), "start_pos": pos.numpy(), "logits_to_keep": np.array([keep]),
                     **{f"past_recurrent.{i}": p.numpy() for i, p in enumerate(past)}}
            out = sess.run(None, feeds)
            want = ref[0][:, -1:] if keep else ref[0]
            assert out[0].shape == tuple(want.shape)
            assert rel_err(torch.from_numpy(out[0]), want) <= 1e-5
            assert max(rel_err(torch.from_numpy(a), b) for a, b in zip(out[1:], ref[1])) <= 1e-5


def test_onnx_graph_has_few_nodes_per_layer():
    """A plain trace spends >100 nodes on a layer, mostly shape arithmetic; with ``ops``'
    single-node helpers and fused projections a layer is about 30, with no ``Shape``."""
    model = dijiang_edge.convert(tiny_hf("smollm2"), chunk_size=8)
    nodes = lambda mp, part: collections.Counter(n.op_type for n in mp.graph.node
                                                 if part in n.name and n.op_type != "Constant")
    graph = to_onnx(model, "native")
    layer = nodes(graph, "/layers.1/")
    assert sum(layer.values()) <= 34 and layer["Shape"] == 0 and layer["LinearAttention"] == 1, layer
    assert sum(nodes(graph, "").values()) <= 34 * model.args.n_layers + 30


def test_windowed_onnx_layer_node_budget():
    """The window adds its ring, softmax and shared normaliser to a layer; combined in the
    window's grouped-head layout they cost 67 nodes on this model (69 when the window's
    sums were brought to the linear part's layout first)."""
    model = dijiang_edge.convert(tiny_hf("smollm2"), chunk_size=8, variant="normalized", window=4)
    layer = collections.Counter(n.op_type for n in to_onnx(model, "native").graph.node
                                if "/layers.1/" in n.name and n.op_type != "Constant")
    assert sum(layer.values()) <= 67 and layer["Shape"] == 0 and layer["LinearAttention"] == 1, layer


def test_per_position_gates_onnx_file_equals_pytorch():
    import onnxruntime as ort
    model = _pos_table_model()
    ids = torch.randint(3, 97, (1, 12))          # past the table's end: the last column serves
    feeds = {"input_ids": ids.numpy(), "start_pos": np.array([0]), "logits_to_keep": np.array([0]),
             **{f"past_recurrent.{i}": np.zeros(model.state_shape(1), np.float32) for i in range(2)}}
    for kind in ("native", "block"):
        out = ort.InferenceSession(to_onnx(model, kind).SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        with torch.no_grad():
            ref = model(ids)[0]
        assert rel_err(torch.from_numpy(out), ref) <= 1e-5, kind
