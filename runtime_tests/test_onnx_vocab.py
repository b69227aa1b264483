"""The embedding of the MatMulNBits graphs (``onnx_vocab``): a ``GatherBlockQuantized``
over the tied head's own quantized tensors, stored once in a folder, the same function
as the unshared graph given the table it dequantizes to, and run by the project's runner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import dijiang_edge
from dijiang_edge.exporters import export, onnx_files, onnx_graph, onnx_vocab, read_manifest
from dijiang_edge.runtime.onnx import OnnxRunner
from conftest import tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one thread
BITS = {"int4": 4, "int8": 8}


@pytest.fixture(scope="module")
def tied(tiny_src):
    """The tiny SmolLM2 shape: tied head, D = 72 (not a multiple of the block of 32)."""
    return dijiang_edge.convert(str(tiny_src), chunk_size=8)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "llama"
    tiny_hf("llama").save_pretrained(src)
    return dijiang_edge.convert(str(src), chunk_size=8)


def _unshared(fp32, quant: str):
    """``fp32`` quantized by onnxruntime's MatMulNBits tool alone (the graph before ``onnx_vocab``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    mp = onnx.ModelProto()
    mp.CopyFrom(fp32)
    o = onnx_files.QUANTS[quant][1]
    q = MatMulNBitsQuantizer(mp, bits=o["bits"], block_size=o["block_size"], is_symmetric=True,
                             accuracy_level=o["accuracy_level"])
    q.process()
    return q.model.model


def _dequantized(packed: np.ndarray, scales: np.ndarray, bits: int, d: int) -> np.ndarray:
    """``[V, D]`` from MatMulNBits' symmetric layout (zero point 8 or 128, low nibble first)."""
    v = packed.shape[0]
    b = packed.reshape(v, -1)
    q = np.stack([b & 15, b >> 4], -1).reshape(v, -1) if bits == 4 else b
    w = (q.astype(np.float32) - (1 << (bits - 1))).reshape(v, scales.shape[1], -1) * scales[:, :, None]
    return w.reshape(v, -1)[:, :d]


def _table_of(mp, quant: str, vocab: int, d: int) -> np.ndarray:
    """The fp32 table the shared graph's ``GatherBlockQuantized`` reads, dequantized."""
    from onnx import numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in mp.graph.initializer}
    g = next(n for n in mp.graph.node if n.op_type == "GatherBlockQuantized")
    data = g.input[0]
    reshape = next((n for n in mp.graph.node if n.output[0] == data and n.op_type == "Reshape"), None)
    packed = inits[reshape.input[0] if reshape else data]
    return _dequantized(packed.reshape(vocab, -1), inits[g.input[2]], BITS[quant], d)


def _with_table(mp, table: np.ndarray, name: str):
    import onnx
    from onnx import numpy_helper
    out = onnx.ModelProto()
    out.CopyFrom(mp)
    t = next(t for t in out.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(table.astype(np.float32), name))
    return out


def _logits(mp, kind: str, model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "start_pos": np.zeros(1, np.int64)}
    if onnx_graph.keeps_logits(kind):
        feed["logits_to_keep"] = np.zeros(1, np.int64)
    for i, shape in zip(s.get_inputs()[len(feed):], model.state_shapes(ids.shape[0])):
        feed[i.name] = np.zeros(shape, np.float32)
    return s.run(["logits"], feed)[0]


def _ids(model, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, model.args.vocab_size, (batch, seq)).astype(np.int64)


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("kind", ["native", "step"])
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_logits_equal_the_unshared_graph(which, kind, quant, request):
    """The rewritten graph computes the unshared graph's function with the table it
    dequantizes to (float rounding apart), and stays close to the unshared graph itself."""
    from onnx import numpy_helper
    model = request.getfixturevalue(which)
    fp32 = onnx_graph.to_onnx(model, kind)
    v = model.args.vocab_size
    plain = _unshared(fp32, quant)
    found = onnx_vocab.find(fp32, v)
    assert found is not None and (found.head_input is not None) == (which == "tied")
    table = numpy_helper.to_array(next(t for t in fp32.graph.initializer if t.name == found.table))
    shared = onnx_files.quantize(fp32, quant, v)          # (quantizes fp32 itself, as onnxruntime's tool does)
    d = model.args.hidden_size
    assert "GatherBlockQuantized" in {n.op_type for n in shared.graph.node}
    assert found.table not in {t.name for t in shared.graph.initializer}
    assert not [n for n in shared.graph.node if found.table in n.input]
    ids = _ids(model, 2, 1 if kind == "step" else 7)
    got, unshared = _logits(shared, kind, model, ids), _logits(plain, kind, model, ids)
    same_table = _with_table(plain, _table_of(shared, quant, v, d), found.table)
    want = _logits(same_table, kind, model, ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    # what quantizing the table costs on random tiny weights (measured: up to 16% of the
    # largest logit at 4 bits, 2.3% at 8); the real model's figures are top-1 and perplexity
    tol = {"int4": 0.3, "int8": 0.03}[quant]
    assert np.abs(got - unshared).max() <= tol * np.abs(unshared).max()
    err = np.abs(_table_of(shared, quant, v, d) - table).max() / np.abs(table).max()
    assert 0 < err <= {"int4": 0.2, "int8": 0.02}[quant]


def test_keep_head_keeps_the_table(tied):
    fp32 = onnx_graph.to_onnx(tied, "step")
    mp = onnx_files.quantize(fp32, "int4", tied.args.vocab_size, keep_head=True)
    assert "GatherBlockQuantized" not in {n.op_type for n in mp.graph.node}


@pytest.fixture(scope="module")
def folder(tiny_src, tmp_path_factory):
    """int4 and int8 files of the tied tiny model, plain quantization (no outlier rewrite:
    the head stays the table's transpose), every graph kind and the genai graphs."""
    out = tmp_path_factory.mktemp("vocab") / "tiny"
    export(str(tiny_src), out, ["onnx"], ["fp32", "int4", "int8"], convert_options={"chunk_size": 8},
           parity_tokens=64, threads=1, calibration_text=None)
    return out


def _external(folder: Path, quant: str) -> dict[str, list[tuple]]:
    """``{graph file: [(data_type, dims, offset, length, sha256)]}`` of the ``quant`` graphs."""
    import onnx
    from onnx import numpy_helper
    seen = {}
    for p in sorted((folder / "onnx").glob(f"*_{quant}.onnx")):
        mp = onnx.load(str(p), load_external_data=False)
        rows = []
        for t in mp.graph.initializer:
            loc = {e.key: e.value for e in t.external_data}
            raw = numpy_helper.to_array(t, base_dir=str(folder / "onnx")).tobytes()
            rows.append((t.data_type, tuple(t.dims), int(loc.get("offset", -1)), len(raw),
                         hashlib.sha256(raw).hexdigest()))
        seen[p.name] = rows
    return seen


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_embedding_stored_once(folder, tied, quant):
    """Across native, prefill, decode and genai graphs: one quantized table, no fp32 table."""
    from onnx import TensorProto
    a = tied.args
    blocks = -(-a.hidden_size // 32)
    nbytes = a.vocab_size * blocks * 32 * BITS[quant] // 8
    graphs = _external(folder, quant)
    assert {"native", "prefill", "decode", "genai"} <= {n.split("_")[0] for n in graphs}
    tables = {r[4] for rows in graphs.values() for r in rows if r[0] == TensorProto.UINT8 and r[3] == nbytes}
    assert len(tables) == 1                                            # one content ...
    where = {r[2] for rows in graphs.values() for r in rows if r[4] in tables}
    assert len(where) == 1 and -1 not in where                         # ... at one place in the weights file
    vocab_fp32 = {(a.vocab_size, a.hidden_size), (a.hidden_size, a.vocab_size)}
    assert not [r for rows in graphs.values() for r in rows if r[0] == TensorProto.FLOAT and r[1] in vocab_fp32]
    for name, rows in graphs.items():                                  # every graph reads it
        assert any(r[4] in tables for r in rows), name


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_runner_decodes_step_by_step(folder, tied, quant):
    """A file made with it loads in onnxruntime: prefill then one token per call through
    the decode graph equals one prefill, and its figures at export are close to fp32's."""
    m = read_manifest(folder)
    entry = next(f for f in m["files"] if f["path"] == f"onnx/prefill_{quant}.onnx")
    r = OnnxRunner(folder, entry, m, threads=1)
    assert r.decode_entry["path"] == f"onnx/decode_{quant}.onnx"
    ids = _ids(tied, 1, 40)
    whole = r.forward(ids)
    r.reset()
    parts = [r.forward(ids[:, :25])] + [r.forward(ids[:, i:i + 1]) for i in range(25, 40)]
    assert np.abs(np.concatenate(parts, 1) - whole).max() <= 1e-4 * np.abs(whole).max()
    fig = entry["parity"]
    assert fig["top1_agreement"] >= 0.9 and abs(fig["ppl_change"]) <= 0.05, fig
