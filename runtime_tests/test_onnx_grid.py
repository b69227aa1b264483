"""ONNX ``int4`` of a source whose projections are on a Q4_1 grid (``grid.py``): the 4-bit
``MatMulNBits`` hold those weights exactly, the rest is 8-bit, the file says so, and it
is far closer to fp32 than round-to-nearest int4 of the same graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import dijiang_edge
from dijiang_edge.exporters import export, onnx_files, onnx_graph
from dijiang_edge.exporters.onnx import GRID, _four_bit, _grid_split, feature_projections
from conftest import q41, tiny_hf, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grid_src(tmp_path_factory):
    """A tiny Llama folder whose every projection went through Q4_1, as a Q4_1 GGUF's do."""
    hf = tiny_hf("llama")
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
                mod.weight.copy_(q41(mod.weight))
    src = tmp_path_factory.mktemp("src") / "llama_q41"
    hf.save_pretrained(src)
    word_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def graphs(grid_src):
    model = dijiang_edge.convert(str(grid_src), chunk_size=8, variant="normalized").eval()   # no new gate: all fused
    split = _grid_split(model)
    assert split is not None
    fp32 = onnx_graph.to_onnx(split, "native")
    mp = onnx.ModelProto()
    mp.CopyFrom(fp32)                   # the quantizer rewrites the graph it is given
    with onnx_files.quiet_logs():
        q = onnx_files.quantize(mp, "int4", model.args.vocab_size, keep=feature_projections(split),
                                four_bit=_four_bit(split, "native"))
        rtn = onnx_files.quantize(onnx_graph.to_onnx(model, "native"), "int4", model.args.vocab_size,
                                  keep=feature_projections(model))
    return model, split, fp32, q, rtn


def _dequantized(mp) -> dict[str, np.ndarray]:
    """``{MatMul node name: its [K, N] weight}`` of every 4-bit MatMulNBits (asymmetric layout)."""
    from onnx import numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in mp.graph.initializer}
    out = {}
    for n in mp.graph.node:
        if n.op_type != "MatMulNBits" or next(a.i for a in n.attribute if a.name == "bits") != 4:
            continue
        b, s = inits[n.input[1]], inits[n.input[2]]
        rows, blocks, _ = b.shape
        codes = np.stack([b & 15, b >> 4], -1).reshape(rows, blocks, 32).astype(np.float32)
        z = inits[n.input[3]]
        z = np.stack([z & 15, z >> 4], -1).reshape(rows, -1)[:, :blocks].astype(np.float32)
        out[n.name.removesuffix("_Q4")] = ((codes - z[..., None]) * s.reshape(rows, blocks, 1)).reshape(rows, -1).T
    return out


def test_four_bit_weights_hold_the_grid_exactly(graphs):
    """Each projection group's joint matmul is 4-bit: its grid rows and block indicators
    exactly, the LoRA down rows (none here) rounded; the side's up matrix and the head 8-bit."""
    from onnx import numpy_helper
    from dijiang_edge.grid import GridLinear
    from dijiang_edge.transforms import for_onnx
    _, split, fp32, q, _ = graphs
    inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    want = {n.name: inits[n.input[1]] for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    got = _dequantized(q)
    used = ("in_proj", "o_proj", "gate_up", "down_proj")            # what the fused graph computes with
    joints = [m for n, m in for_onnx(split, "native").named_modules() if isinstance(m, GridLinear) and n.endswith(used)]
    assert len(got) == len(joints) == 4 * 2          # in_proj, o_proj, gate_up, down_proj of each layer
    for m in joints:
        w = m.joint.weight.detach().numpy().T        # [K, N + side]
        name = next(k for k, v in want.items() if v.shape == w.shape and np.array_equal(v, w))
        assert np.abs(got[name] - w).max() <= 1e-6 * np.abs(w).max(), name
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in q.graph.node if n.op_type == "MatMulNBits"}
    assert bits == {4, 8}
    assert onnx_files.lm_head_nodes(fp32, 97) and not onnx_files.lm_head_nodes(q, 97)   # the head quantized


def test_grid_int4_is_closer_to_fp32_than_round_to_nearest(graphs):
    import onnxruntime as ort
    model, _, fp32, q, rtn = graphs
    ids = np.random.default_rng(0).integers(0, 97, (1, 48))
    feed = {"input_ids": ids, "start_pos": np.zeros(1, np.int64), "logits_to_keep": np.zeros(1, np.int64)}
    for i, shape in zip(fp32.graph.input[3:], model.state_shapes(1)):
        feed[i.name] = np.zeros(shape, np.float32)
    run = lambda mp: ort.InferenceSession(mp.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], feed)[0]
    want, got, far = run(fp32), run(q), run(rtn)
    err = lambda a: float(np.abs(a - want).max() / np.abs(want).max())
    assert err(got) < 0.02 and err(got) < 0.25 * err(far), (err(got), err(far))


def test_export_records_the_grid(grid_src, tmp_path):
    out = tmp_path / "e"
    export(str(grid_src), out, ["onnx"], ["int4"], convert_options={"chunk_size": 8}, parity_tokens=48,
           threads=1, kinds=("native",))
    m = json.loads((out / "manifest.json").read_text())
    f = next(f for f in m["files"] if f["path"] == "onnx/native_int4.onnx")
    assert f["int4_grid"] == GRID and f["lm_head"] == "int8" and f["int8_outliers"] is None
    assert f["parity"]["top1_agreement"] >= 0.9 and abs(f["parity"]["ppl_change"]) < 0.02, f["parity"]
