"""The torch modules that ``torch.onnx.export`` turns into ONNX graphs, one per kind:

* ``block``  (prefill, ``seq`` dynamic): each call is one masked chunk built from
  cumulative log gates -- the chunked form's in-chunk math with the carried state as
  the chunk's initial state.  Exact for any length; the runtime feeds long prompts in
  blocks of ``PREFILL_BLOCK`` tokens, so prefill stays linear in the prompt length.
* ``step``   (decode, ``seq == 1``): ``attention.recurrent_step`` in plain ops.
* ``native`` (both, ``seq`` dynamic): onnxruntime's ``com.microsoft::LinearAttention``
  with ``update_rule="gated"`` runs the recurrence; DiJiang's per-head decay is its
  per-head log-space ``decay``, ``beta`` is folded into the keys, ``scale=1``.

Every graph has the contract of DESIGN.md section 3: inputs ``input_ids`` int64
``[batch, seq]``, ``start_pos`` int64 ``[1]``, ``past_recurrent.{i}``; outputs ``logits``
and ``present_recurrent.{i}``.  RoPE is computed in-graph from the positions, and
each layer's projection ``P`` is a constant initializer.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings

import torch
import torch.nn as nn

from .. import attention as A
from ..errors import DiJiangError
from ..model import DiJiangForCausalLM

Tensor = torch.Tensor
KINDS = ("block", "step", "native")
PREFILL_BLOCK = 512
OPSET = 18


def block_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, beta: Tensor,
                    state: Tensor) -> tuple[Tensor, Tensor]:
    """All tokens of the call as one chunk (fp32): quadratic in ``seq``, exact.

    Decays are differences of the in-call cumulative log gate, masked before ``exp``,
    so nothing overflows; the runtime keeps calls to ``PREFILL_BLOCK`` tokens.
    """
    t = q.shape[2]
    cum = log_gate.cumsum(-1)                                          # [B, H, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = (q @ k.transpose(-1, -2)) * decay * beta[..., None, :]
    o = scores @ v + cum.exp()[..., None] * (q @ state)
    k_end = k * ((cum[..., -1:] - cum).exp() * beta)[..., None]        # decayed to the call's end
    s = cum[..., -1:].exp()[..., None] * state + k_end.transpose(-1, -2) @ v
    return o, s


# -- the native operator: a torch custom op that the exporter maps to LinearAttention --

@torch.library.custom_op("dijiang_edge::gated_linear_attention", mutates_args=())
def gated_linear_attention(q: Tensor, k: Tensor, v: Tensor, state: Tensor,
                           log_gate: Tensor) -> tuple[Tensor, Tensor]:
    """``LinearAttention(update_rule="gated", scale=1)`` semantics on packed ``[B, T, H*d]``
    q/k/v, ``log_gate [B, T, H]``, ``state [B, H, m, dv]`` (reference, for tracing).
    ``k`` may hold fewer heads than ``H`` (a divisor): each serves ``H / heads`` states in
    turn, as the operator does for grouped keys."""
    b, t, _ = q.shape
    h, m, dv = state.shape[1:]
    qh = q.view(b, t, h, m).transpose(1, 2)
    kh = k.view(b, t, -1, m).transpose(1, 2)
    kh = kh.repeat_interleave(h // kh.shape[1], dim=1)
    vh = v.view(b, t, h, dv).transpose(1, 2)
    o, s = A.recurrent_attention(qh, kh, vh, log_gate.transpose(1, 2), None, state)
    return o.transpose(1, 2).reshape(b, t, h * dv).contiguous(), s.contiguous()


@gated_linear_attention.register_fake
def _(q, k, v, state, log_gate):
    b, t, _ = q.shape
    return q.new_empty(b, t, state.shape[1] * state.shape[3]), state.new_empty(state.shape)


def native_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, beta: Tensor,
                     state: Tensor) -> tuple[Tensor, Tensor]:
    """Same signature as ``block_attention``; heads packed as LinearAttention wants them."""
    b, h, t, m = q.shape
    dv = v.shape[-1]
    k = k * beta[..., None]                    # beta_n phi(k_n)^T v_n == (beta_n phi(k_n))^T v_n
    pack = (lambda x, d: x.transpose(1, 2).reshape(b, t, h * d))
    o, s = gated_linear_attention(pack(q, m), pack(k, m), pack(v, dv), state, log_gate.transpose(1, 2))
    return o.view(b, t, h, dv).transpose(1, 2), s


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


ATTENTION = {"block": block_attention, "step": A.recurrent_step, "native": native_attention}


class OnnxStep(nn.Module):
    """``forward(input_ids, start_pos, *past_recurrent) -> (logits, *present_recurrent)``."""

    def __init__(self, model: DiJiangForCausalLM, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise DiJiangError(f"unknown ONNX graph kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.model, self.attend = model, ATTENTION[kind]

    def layer(self, block, x, cos, sin, positions, valid, state):
        """``model.Block.forward`` with this graph's attention form."""
        attn = block.attn
        h = block.input_layernorm(x)
        q, k, v = attn.features(h, cos, sin)
        lg, beta = attn.gates(positions, valid)
        o, s = self.attend(q, k, v, lg, beta, state)
        a = attn.finish(h, o)
        if block.parallel:
            return x + a + block.mlp(block.post_attention_layernorm(x)), s
        x = x + a
        return x + block.mlp(block.post_attention_layernorm(x)), s

    def forward(self, input_ids: Tensor, start_pos: Tensor, *past: Tensor):
        m = self.model
        b, t = input_ids.shape
        positions = (start_pos + torch.arange(t, device=input_ids.device))[None, :].expand(b, t)
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        cos, sin = m.rope(positions)
        x = m.embed(input_ids)
        present = []
        for block, s in zip(m.layers, past):
            x, s = self.layer(block, x, cos, sin, positions, valid, s)
            present.append(s)
        return (m.lm_head(m.norm(x)), *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "start_pos"] + [f"past_recurrent.{i}" for i in range(n_layers)]
    outs = ["logits"] + [f"present_recurrent.{i}" for i in range(n_layers)]
    return ins, outs


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
    past = tuple(torch.zeros(model.state_shape(2)) for _ in range(model.args.n_layers))
    return (torch.zeros(2, seq, dtype=torch.long), torch.zeros(1, dtype=torch.long), *past)


def _torchscript(model: DiJiangForCausalLM, kind: str):
    """The TorchScript exporter: ~20x faster than dynamo here, which matters on 2 cores.
    Graphs are ``onnx_fused.FusedStep`` where it covers the model (few nodes per layer, and
    its concatenated weights shared by every kind), else ``OnnxStep``."""
    import onnx
    from . import onnx_fused
    ins, outs = io_names(model.args.n_layers)
    seq = {} if kind == "step" else {1: "seq"}
    dyn = {"input_ids": {0: "batch", **seq}, "logits": {0: "batch", **seq}}
    dyn.update({n: {0: "batch"} for n in ins[2:] + outs[1:]})
    torch.onnx.register_custom_op_symbolic("dijiang_edge::gated_linear_attention",
                                           _symbolic_linear_attention, OPSET)
    onnx_fused.register_symbolics(OPSET)
    module = onnx_fused.FusedStep(model, kind) if onnx_fused.supports(model) else OnnxStep(model, kind)
    f = io.BytesIO()
    torch.onnx.export(module.eval(), _example(model, kind), f, dynamo=False,
                      input_names=ins, output_names=outs, dynamic_axes=dyn, opset_version=OPSET,
                      custom_opsets={"com.microsoft": 1})
    return onnx.load_from_string(f.getvalue())


def _dynamo(model: DiJiangForCausalLM, kind: str):
    """The torch.export-based exporter (the future default of torch.onnx)."""
    ins, outs = io_names(model.args.n_layers)
    batch = torch.export.Dim("batch", min=1, max=1024)
    tok = {0: batch} if kind == "step" else {0: batch, 1: torch.export.Dim("seq", min=1, max=1 << 20)}
    shapes = (tok, None, tuple({0: batch} for _ in range(model.args.n_layers)))
    table = {torch.ops.dijiang_edge.gated_linear_attention.default: native_translation(model.args.n_heads)}
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
