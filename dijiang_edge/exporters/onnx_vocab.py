"""The vocabulary matrices of a block-quantized ONNX graph: the token embedding and the head.

``MatMulNBits`` quantizes every MatMul weight, the head's included, but the embedding
is a ``Gather`` over a ``[V, D]`` fp32 table the quantizer leaves alone: on SmolLM2-135M
(V = 49152, D = 576) 113 MB, more than all the quantized layers together at 4 bits.
``quantize_embedding`` replaces that ``Gather`` by ``com.microsoft::GatherBlockQuantized``
over the same block quantization (symmetric, the graph's block size and bits).  The
onnxruntime-genai builder does the same for tied models ("shared embeddings").

The layouts meet (checked with onnxruntime 1.32): ``MatMulNBits`` stores its weight
``[K, N]`` as ``B [N, K / block, block * bits / 8]`` uint8 (each output row's blocks along
K, low nibble first) with ``scales [N, K / block]``; a tied head's ``[K, N]`` is the
table transposed, so ``B`` row ``v`` is token ``v``'s embedding row, quantized.
``GatherBlockQuantized`` with uint8 data, ``gather_axis=0``, ``quantize_axis=1`` reads
``[V, D * bits / 8]`` packed the same way, with ``scales [V, D / block]`` and the same
default zero point (8 for 4 bits, 128 for 8).  So:

* **tied** (the head's fp32 weight is the table transposed, as in SmolLM2): the gather
  reads the head's own ``B`` through one ``Reshape`` (``[V, blocks, blob]`` ->
  ``[V, blocks * blob]``; onnxruntime folds it at load) and the head's own ``scales``:
  one quantized tensor in the file for both;
* **untied** (a model with its own head, or one whose head the outlier rewrite changed):
  the table quantized once the same way, its own tensors.

Where ``D`` is not a multiple of the block, the quantized rows are padded to whole
blocks: a ``Slice`` cuts the gathered rows back to ``D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

META_KEY = "dijiang.embedding"           # metadata_props entry saying what was done


@dataclass
class Vocab:
    """What ``find`` saw in the fp32 graph, before the MatMuls were quantized."""
    gather: str                  # the embedding Gather node's output (unchanged by quantization)
    table: str                   # its fp32 [V, D] initializer
    head_input: str | None       # the head MatMul's activation input, when its weight is the table transposed


def _initializers(mp) -> dict:
    return {t.name: t for t in mp.graph.initializer}


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def find(mp, vocab: int) -> Vocab | None:
    """The embedding of ``mp`` (one ``Gather`` on axis 0 of an fp32 ``[vocab, D]`` initializer)
    and whether the head (a ``MatMul`` by an initializer ``[D, vocab]``) is its transpose."""
    from onnx import TensorProto, numpy_helper
    inits = _initializers(mp)
    gathers = [n for n in mp.graph.node if n.op_type == "Gather" and n.input[0] in inits and _axis(n) == 0
               and inits[n.input[0]].data_type == TensorProto.FLOAT
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] == vocab]
    if len(gathers) != 1:
        return None
    g = gathers[0]
    table = inits[g.input[0]]
    d = table.dims[1]
    heads = [n for n in mp.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and list(inits[n.input[1]].dims) == [d, vocab]]
    head_input = None
    if len(heads) == 1:
        w = numpy_helper.to_array(inits[heads[0].input[1]])
        if np.array_equal(w.T, numpy_helper.to_array(table)):
            head_input = heads[0].input[0]
    return Vocab(gather=g.output[0], table=g.input[0], head_input=head_input)


def _attr(node, name: str, default=None):
    return next((a.i for a in node.attribute if a.name == name), default)


def _quantized_head(mp, v: Vocab, d: int, vocab: int):
    """The ``MatMulNBits`` the tied head became (same activation input, ``K = D``, ``N = V``), if any."""
    if v.head_input is None:
        return None
    for n in mp.graph.node:
        if n.op_type == "MatMulNBits" and n.input[0] == v.head_input and _attr(n, "K") == d \
                and _attr(n, "N") == vocab and (len(n.input) < 4 or not n.input[3]):   # symmetric: no zero points
            return n
    return None


def block_quantize(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``table [V, D]`` quantized as ``MatMulNBits`` would quantize its transpose (onnxruntime's
    own kernel): packed ``[V, blocks * blob]`` uint8 and ``scales [V, blocks]``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(table.T))
    return packed.reshape(packed.shape[0], -1), scales


def quantize_embedding(mp, v: Vocab, vocab: int, bits: int, block: int):
    """``mp`` (its MatMuls already ``MatMulNBits``) with the embedding ``Gather`` of ``v`` made a
    ``GatherBlockQuantized`` (in place; returned): over the head's own quantized tensors
    when the head is tied and quantized, else over the table quantized once here."""
    from onnx import TensorProto, helper, numpy_helper
    g = mp.graph
    inits = _initializers(mp)
    d = inits[v.table].dims[1]
    blocks = -(-d // block)
    padded = blocks * block
    head = _quantized_head(mp, v, d, vocab)
    at = next(i for i, n in enumerate(g.node) if n.op_type == "Gather" and n.output[0] == v.gather)
    nodes = []
    if head is not None:
        data = f"{v.table}.shared_Q{bits}"
        shape = helper.make_tensor(f"{data}.shape", TensorProto.INT64, [2], [vocab, padded * bits // 8])
        g.initializer.append(shape)
        nodes.append(helper.make_node("Reshape", [head.input[1], shape.name], [data], name=f"{data}.Reshape"))
        scales = head.input[2]
        how = f"int{bits} block {block}, shared with the lm_head's MatMulNBits ({head.input[1]})"
    else:
        packed, s = block_quantize(numpy_helper.to_array(inits[v.table]), bits, block)
        data, scales = f"{v.table}_Q{bits}", f"{v.table}_scales"
        g.initializer.extend([numpy_helper.from_array(packed, data), numpy_helper.from_array(s, scales)])
        how = f"int{bits} block {block}, its own (the lm_head is not the embedding's transpose or not quantized)"
    out = v.gather if padded == d else f"{v.gather}.padded"
    nodes.append(helper.make_node("GatherBlockQuantized", [data, g.node[at].input[1], scales], [out],
                                  name=f"{v.table}.GatherBlockQuantized", domain="com.microsoft",
                                  bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    if padded != d:
        cut = [helper.make_tensor(f"{v.table}.cut.{k}", TensorProto.INT64, [1], [x])
               for k, x in (("start", 0), ("end", d), ("axis", -1))]
        g.initializer.extend(cut)
        nodes.append(helper.make_node("Slice", [out, *(t.name for t in cut)], [v.gather], name=f"{v.table}.Slice"))
    rest = list(g.node)
    g.ClearField("node")
    g.node.extend(rest[:at] + nodes + rest[at + 1:])
    _drop_unused(mp, v.table)
    if not any(o.domain == "com.microsoft" for o in mp.opset_import):
        mp.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    helper.set_model_props(mp, {**{p.key: p.value for p in mp.metadata_props}, META_KEY: how})
    return mp


def _drop_unused(mp, name: str) -> None:
    """Remove initializer ``name`` when no node reads it any more."""
    if any(name in n.input for n in mp.graph.node):
        return
    keep = [t for t in mp.graph.initializer if t.name != name]
    mp.graph.ClearField("initializer")
    mp.graph.initializer.extend(keep)
