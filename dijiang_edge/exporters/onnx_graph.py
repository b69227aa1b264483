"""The model traced into ONNX graphs, one per kind (``transforms.for_onnx`` picks the core):

* ``block``  (prefill, ``seq`` dynamic): each call is one masked chunk
  (``cores.MaskedCore``), the carried state as the chunk's initial state.  Exact for
  any length; the runtime feeds long prompts in blocks of ``PREFILL_BLOCK`` tokens, so
  prefill stays linear in the prompt length.
* ``step``   (decode, ``seq == 1``): ``attention.recurrent_step`` in plain ops.
* ``native`` (both, ``seq`` dynamic): onnxruntime's ``com.microsoft::LinearAttention``
  with ``update_rule="gated"`` runs the recurrence; DiJiang's per-head decay is its
  per-head log-space ``decay``, ``beta`` is folded into the keys, ``scale=1``.

Every graph has the contract of DESIGN.md section 3: inputs ``input_ids`` int64
``[batch, seq]``, ``start_pos`` int64 ``[1]``, in the graphs that take several tokens
``logits_to_keep`` int64 ``[1]`` (transformers' meaning: the logits of the last that many
positions, 0 = all; prefill asks for 1, so the head, a fifth of SmolLM2-135M's work per
position, runs once per call), ``past_recurrent.{i}`` (and with a window
``past_window_key.{i}``, ``past_window_value.{i}``: the ring of the last W keys and values);
outputs ``logits`` ``[batch, kept, vocab]`` and ``present_*`` of each.  RoPE is computed in-graph from the positions, and
each layer's projection ``P`` is a constant initializer.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch
import torch.nn as nn

from .. import ops
from ..errors import DiJiangError
from ..model import DiJiangForCausalLM
from ..transforms import for_onnx

Tensor = torch.Tensor
KINDS = ("block", "step", "native")
# Tokens per prefill call: 128 keeps peak RSS flat in context (each call's activations and
# in-block scores grow with the block). The adapted default's native_int4.onnx, one thread,
# random ids, peak RSS at contexts 128 / 2k / 16k: 241 / 341 / 342 MB with 512-token blocks,
# 241 / 265 / 266 MB with 128 (README: `bench --lengths 128,2048,16384` on a fresh export).
PREFILL_BLOCK = 128
OPSET = 18


def _linear_attention_schema():
    """The slice of ``com.microsoft::LinearAttention``'s schema this graph uses (onnx's
    own registry does not know onnxruntime's contrib ops, onnxscript needs one)."""
    from onnx.defs import OpSchema
    fp = OpSchema.FormalParameter
    ins = [fp(n, "T") for n in ("query", "key", "value", "past_state", "decay")]
    outs = [fp("output", "T"), fp("present_state", "T")]
    attrs = [OpSchema.Attribute("q_num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
             OpSchema.Attribute("update_rule", OpSchema.AttrType.STRING, ""),
             OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]
    return OpSchema("LinearAttention", "com.microsoft", 1, inputs=ins, outputs=outs,
                    type_constraints=[("T", ["tensor(float)"], "")], attributes=attrs)


def native_translation(num_heads: int):
    """The onnxscript translation of ``gated_linear_attention`` for ``num_heads`` heads."""
    from onnxscript import values
    op = values.Op(values.Opset("com.microsoft", 1), "LinearAttention", _linear_attention_schema())

    def linear_attention(q, k, v, state, log_gate):
        return op(q, k, v, state, log_gate, q_num_heads=num_heads, kv_num_heads=num_heads,
                  update_rule="gated", scale=1.0)
    return linear_attention


def keeps_logits(kind: str) -> bool:
    """Whether graphs of ``kind`` take ``logits_to_keep`` (those that take several tokens)."""
    return kind != "step"


class OnnxStep(nn.Module):
    """``forward(input_ids, start_pos, [logits_to_keep,] *past_recurrent) -> (logits,
    *present_recurrent)`` over ``transforms.for_onnx(model, kind)``: the model itself, its
    core swapped for the graph kind's and its projections fused."""

    def __init__(self, model: DiJiangForCausalLM, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise DiJiangError(f"unknown ONNX graph kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.model = for_onnx(model, kind)
        self.keeps = keeps_logits(kind)

    def forward(self, input_ids: Tensor, start_pos: Tensor, *rest: Tensor):
        m = self.model
        keep, past = (rest[0], rest[1:]) if self.keeps else (None, rest)
        positions = (start_pos + torch.arange(input_ids.shape[1], device=input_ids.device))[None, :]
        h, present = m.hidden(input_ids, m.context(positions, like=input_ids), list(past))
        return (m.lm_head(h if keep is None else ops.last_positions(h, keep)), *present)


def io_names(model: DiJiangForCausalLM, kind: str = "block") -> tuple[list[str], list[str]]:
    names = model.state_names()
    ins = ["input_ids", "start_pos"] + (["logits_to_keep"] if keeps_logits(kind) else [])
    return ins + [f"past_{n}" for n in names], ["logits"] + [f"present_{n}" for n in names]


@contextlib.contextmanager
def _quiet_stdout():
    """torch.onnx prints progress lines to stdout; keep them off the user's terminal."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def _symbolic_linear_attention(g, q, k, v, state, log_gate):
    """TorchScript-exporter symbolic: ``gated_linear_attention`` -> ``com.microsoft::LinearAttention``."""
    from torch.onnx import symbolic_helper
    h = symbolic_helper._get_tensor_sizes(state)[1]
    o, s = g.op("com.microsoft::LinearAttention", q, k, v, state, log_gate, q_num_heads_i=h,
                kv_num_heads_i=h, update_rule_s="gated", scale_f=1.0, outputs=2)
    o.setType(v.type())         # [B, T, H * dv]: v is packed per query head
    s.setType(state.type())
    return o, s


def _example(model: DiJiangForCausalLM, kind: str):
    seq = 1 if kind == "step" else 3
    past = tuple(torch.zeros(s) for s in model.state_shapes(2))
    keep = (torch.zeros(1, dtype=torch.long),) if keeps_logits(kind) else ()
    return (torch.zeros(2, seq, dtype=torch.long), torch.zeros(1, dtype=torch.long), *keep, *past)


def _state_inputs(ins: list[str]) -> list[str]:
    return [n for n in ins if n.startswith("past_")]


def _torchscript(model: DiJiangForCausalLM, kind: str):
    """The TorchScript exporter: ~20x faster than dynamo here, which matters on 2 cores,
    and the one that maps ``ops``' helpers to single nodes (~30 per layer)."""
    import onnx
    ins, outs = io_names(model, kind)
    seq = {} if kind == "step" else {1: "seq"}
    dyn = {"input_ids": {0: "batch", **seq}, "logits": {0: "batch", **({} if kind == "step" else {1: "kept"})}}
    dyn.update({n: {0: "batch"} for n in _state_inputs(ins) + outs[1:]})
    torch.onnx.register_custom_op_symbolic("dijiang_edge::gated_linear_attention",
                                           _symbolic_linear_attention, OPSET)
    ops.register_onnx_symbolics(OPSET)
    f = io.BytesIO()
    torch.onnx.export(OnnxStep(model, kind).eval(), _example(model, kind), f, dynamo=False,
                      input_names=ins, output_names=outs, dynamic_axes=dyn, opset_version=OPSET,
                      custom_opsets={"com.microsoft": 1})
    return onnx.load_from_string(f.getvalue())


def _dynamo(model: DiJiangForCausalLM, kind: str):
    """The torch.export-based exporter (the future default of torch.onnx)."""
    ins, outs = io_names(model, kind)
    batch = torch.export.Dim("batch", min=1, max=1024)
    tok = {0: batch} if kind == "step" else {0: batch, 1: torch.export.Dim("seq", min=1, max=1 << 20)}
    keep = (None,) if keeps_logits(kind) else ()          # forward(input_ids, start_pos, *rest)
    shapes = (tok, None, (*keep, *({0: batch} for _ in model.state_names())))
    table = {torch.ops.dijiang_edge.gated_linear_attention.default: native_translation(model.args.n_heads),
             torch.ops.dijiang_edge.last_positions.default: ops.last_positions_translation()}
    prog = torch.onnx.export(OnnxStep(model, kind).eval(), _example(model, kind), dynamo=True,
                             input_names=ins, output_names=outs, opset_version=OPSET,
                             dynamic_shapes=shapes, custom_translation_table=table,
                             external_data=False, optimize=True)
    return prog.model_proto


EXPORTERS = {"torchscript": _torchscript, "dynamo": _dynamo}


def to_onnx(model: DiJiangForCausalLM, kind: str, exporter: str = "torchscript"):
    """Trace ``model`` into an ``onnx.ModelProto`` of graph ``kind`` (weights inside)."""
    if exporter not in EXPORTERS:
        raise DiJiangError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout() as log:
        warnings.simplefilter("ignore")
        try:
            return EXPORTERS[exporter](model, kind)
        except Exception as e:
            sys.stderr.write(log.getvalue()[-2000:])
            raise DiJiangError(f"torch.onnx ({exporter}) could not export the {kind} graph "
                               f"({type(e).__name__}: {str(e)[:300]})") from e
