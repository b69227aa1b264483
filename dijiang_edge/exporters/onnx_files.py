"""ONNX weight quantization and file layout.

* ``quantize``: onnxruntime's own tools -- ``int8`` (8-bit block-quantized
  ``MatMulNBits``, symmetric, block 32, int8 compute: ``accuracy_level=4``), chosen by
  measurement on SmolLM2-135M: faster than fp32 and closer to it than
  ``int8_dynamic`` (per-channel ``DynamicQuantizeMatMul``); ``int8_f32compute`` (the
  same weights computed in fp32: more accurate, but ~10x slower than fp32 on x86
  with onnxruntime 1.32); ``int4`` (4-bit ``MatMulNBits``).  Under both ``MatMulNBits``
  quantizations the embedding table is block-quantized the same way and read by
  ``GatherBlockQuantized``, from the very tensor the head reads when they are tied
  (``onnx_vocab``): the table is stored once, quantized, instead of once in fp32.
* ``pack``: the graphs of one quantization share one weights file, each distinct
  tensor stored once (found by content), so a prefill and a decode graph cost the
  disk of one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from pathlib import Path

from ..errors import DiJiangError
from . import onnx_vocab

# quant name -> (method, options); the figures behind the choice are in issue 3's report.
QUANTS = {
    "fp32": ("none", {}),
    "int8": ("nbits", {"bits": 8, "block_size": 32, "accuracy_level": 4}),
    "int8_f32compute": ("nbits", {"bits": 8, "block_size": 32, "accuracy_level": 0}),
    "int8_dynamic": ("dynamic", {}),
    "int4": ("nbits", {"bits": 4, "block_size": 32, "accuracy_level": 4}),
}
MIN_EXTERNAL = 1024      # initializers smaller than this stay inside the graph file


@contextlib.contextmanager
def quiet_logs():
    """onnxruntime's quantizer sets the root logger to INFO on import and logs every node:
    keep its chatter off the terminal and the caller's logging as it was."""
    root = logging.getLogger()
    level = root.level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise DiJiangError(f"unknown ONNX quantization {quant!r}; choose from {', '.join(QUANTS)}")


def lm_head_nodes(mp, vocab: int) -> list[str]:
    """Names of the MatMul nodes whose constant weight ends in the vocabulary (the head)."""
    shapes = {t.name: list(t.dims) for t in mp.graph.initializer}
    return [n.name for n in mp.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and shapes.get(n.input[1], [0])[-1] == vocab]


def constant_nodes(mp, values: list) -> list[str]:
    """Names of the MatMul nodes whose weight equals one of ``values`` (the frozen projections P)."""
    import numpy as np
    from onnx import numpy_helper
    same = {t.name for t in mp.graph.initializer for v in values if tuple(t.dims) == v.shape
            and np.array_equal(numpy_helper.to_array(t), v)}
    return [n.name for n in mp.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in same]


def _grid_quantize(mp, vocab: int, o: dict, exclude: list[str], four_bit: list, keep_head: bool):
    """``int4`` over a grid-split model (``grid.py``): the MatMuls of ``four_bit`` (the
    ``GridLinear`` joint weights, found by content) to 4-bit ``MatMulNBits`` with zero
    points, which holds their grid rows exactly (the grid's own codes, scales and zero
    points); every other MatMul (``side_up``, the head) to 8 bits, symmetric; the
    embedding with the head's 8-bit tensors.  (``nodes_to_include`` does not restrict
    onnxruntime 1.32's quantizer: each pass excludes what it must not touch.)"""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    mats = [a for w in four_bit for a in (w.cpu().numpy(), np.ascontiguousarray(w.cpu().numpy().T))]
    four = [n for n in constant_nodes(mp, mats) if n not in exclude]
    others = [n.name for n in mp.graph.node if n.op_type == "MatMul" and n.name not in four]
    vocab_mats = None if keep_head else onnx_vocab.find(mp, vocab)
    q = MatMulNBitsQuantizer(mp, bits=4, block_size=o["block_size"], is_symmetric=False,
                             accuracy_level=o["accuracy_level"], nodes_to_exclude=others)
    q.process()
    q = MatMulNBitsQuantizer(q.model.model, bits=8, block_size=o["block_size"], is_symmetric=True,
                             accuracy_level=o["accuracy_level"], nodes_to_exclude=exclude)
    q.process()
    if vocab_mats is None:
        return q.model.model
    return onnx_vocab.quantize_embedding(q.model.model, vocab_mats, vocab, 8, o["block_size"])


def quantize(mp, quant: str, vocab: int, keep_head: bool = False, keep: list | None = None,
             four_bit: list | None = None):
    """``mp`` (fp32 ``ModelProto``) with its MatMul weights quantized as ``quant`` says.

    ``keep``: constant matrices whose MatMuls stay fp32 -- the projections P (one per
    layer in an imported official checkpoint), which define the feature map and are
    tiny; ``keep_head``: the lm_head too (and the embedding table).  With ``MatMulNBits``
    the embedding is block-quantized as well, over the head's own tensors when the head
    is tied (``onnx_vocab``).  ``four_bit``: the joint weights of a grid-split model
    (``grid.four_bit_weights``), which ``int4`` quantizes to 4 bits, the rest to 8
    (``_grid_quantize``)."""
    check_quant(quant)
    method, o = QUANTS[quant]
    exclude = (lm_head_nodes(mp, vocab) if keep_head else []) + \
        (constant_nodes(mp, keep) if keep else [])
    if method == "none":
        return mp
    if method == "nbits" and o["bits"] == 4 and four_bit:
        return _grid_quantize(mp, vocab, o, exclude, four_bit, keep_head)
    if method == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        vocab_mats = None if keep_head else onnx_vocab.find(mp, vocab)
        q = MatMulNBitsQuantizer(mp, bits=o["bits"], block_size=o["block_size"], is_symmetric=True,
                                 accuracy_level=o["accuracy_level"], nodes_to_exclude=exclude)
        q.process()
        if vocab_mats is None:
            return q.model.model
        return onnx_vocab.quantize_embedding(q.model.model, vocab_mats, vocab, o["bits"], o["block_size"])
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(mp, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude)
        return onnx.load(dst)


def _raw(t) -> bytes:
    if not t.HasField("raw_data"):
        from onnx import numpy_helper
        arr = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return t.raw_data


def pack(models: dict[str, object], folder: Path, data_name: str) -> None:
    """Save ``{path: ModelProto}`` (paths in ``data_name``'s folder) into ``folder`` with every initializer of at least
    ``MIN_EXTERNAL`` bytes in ``data_name``, identical tensors written once."""
    import onnx
    from onnx.external_data_helper import set_external_data
    index: dict[tuple, tuple[int, int]] = {}
    location = Path(data_name).name                   # relative to the graphs, which sit beside it
    with open(folder / data_name, "wb") as f:
        for name, mp in models.items():
            for t in mp.graph.initializer:
                raw = _raw(t)
                if len(raw) < MIN_EXTERNAL:
                    continue
                key = (hashlib.sha256(raw).digest(), t.data_type, tuple(t.dims))
                if key not in index:
                    f.write(b"\0" * (-f.tell() % 64))            # aligned for mmap
                    index[key] = (f.tell(), len(raw))
                    f.write(raw)
                set_external_data(t, location, *index[key])
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(mp, folder / name)
