"""ONNX export of the softmax baseline, the way optimum exports a decoder with a cache.

One graph ``onnx/softmax[_q].onnx`` (role ``both``) with inputs ``input_ids``,
``attention_mask`` ``[batch, past + seq]``, ``position_ids``,
``past_key_values.{i}.key/value`` ``[batch, kv_heads, past, head_dim]`` and outputs
``logits``, ``present.{i}.key/value`` (past and the call's tokens concatenated).
Plain ONNX ops (MatMul/Softmax): the usual export, not onnxruntime's fused
``GroupQueryAttention``.  Quantized with the very function the DiJiang files use
(``onnx_files.quantize``), so "same precision" holds by construction.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from .. import manifest as M
from ..errors import DiJiangError
from . import onnx_files
from .onnx import progress
from .onnx_graph import OPSET, _quiet_stdout

PREFILL_BLOCK = 512          # tokens per prefill call: scores stay [heads, 512, context]


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = lambda p: [f"{p}.{i}.{w}" for i in range(n_layers) for w in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *kv("past_key_values")], ["logits", *kv("present")]


def to_onnx(lm):
    """Trace ``KVCacheLM`` with dynamic batch, sequence and past length (TorchScript exporter)."""
    import onnx
    ins, outs = io_names(lm.n_layers)
    past = tuple(torch.zeros(2, lm.n_kv, 2, lm.head_dim) for _ in range(2 * lm.n_layers))
    example = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
               torch.arange(2, 5)[None].expand(2, 3), *past)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
           "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in ins[3:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(lm, example, f, dynamo=False, input_names=ins, output_names=outs,
                              dynamic_axes=dyn, opset_version=OPSET)
        except Exception as e:
            raise DiJiangError(f"torch.onnx could not export the softmax baseline "
                               f"({type(e).__name__}: {str(e)[:300]})") from e
    return onnx.load_from_string(f.getvalue())


def io_spec(lm) -> tuple[dict, dict]:
    kv = lambda n, axis: {"name": n, "dtype": "float32", "shape": ["batch", lm.n_kv, axis, lm.head_dim]}
    ins, outs = io_names(lm.n_layers)
    return ({"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
             "attention_mask": {"dtype": "int64", "shape": ["batch", "total"]},
             "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
             "past_key_values": [kv(n, "past") for n in ins[3:]]},
            {"logits": {"dtype": "float32", "shape": ["batch", "seq", lm.hf.config.vocab_size]},
             "present": [kv(n, "total") for n in outs[1:]]})


def export(lm, out_dir: str | Path, quant: str = "fp32", parity_tokens: int = 64,
           threads: int = 0) -> list[M.FileEntry]:
    """Write ``onnx/softmax[_q].onnx`` (+ its weights file); return its manifest entry."""
    onnx_files.check_quant(quant)
    out = Path(out_dir)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    suffix = "" if quant == "fp32" else "_" + quant
    path, data = f"onnx/softmax{suffix}.onnx", f"onnx/softmax_weights{suffix}.data"
    with progress(f"tracing the softmax KV-cache baseline ({quant})"):
        mp = to_onnx(lm)
    if quant != "fp32":
        with progress(f"quantizing the baseline to {quant}"), onnx_files.quiet_logs():
            mp = onnx_files.quantize(mp, quant, lm.hf.config.vocab_size)
    onnx_files.pack({path: mp}, out, data)
    ins, outs = io_spec(lm)
    e = M.FileEntry(format="onnx", quant=quant, path=path, role="both", attention="softmax", default=True,
                    inputs=ins, outputs=outs, checksums=M.checksums(out, [path, data]),
                    extras={"graph": "kv_cache", "weights": data, "prefill_block": PREFILL_BLOCK})
    if parity_tokens:
        from ..runtime.kv_cache import KvOnnxRunner
        from .baseline import parity
        with progress(f"parity of {path} vs the Hugging Face model"):
            e.parity = parity(lm.hf, KvOnnxRunner(out, e, threads), parity_tokens, lm.hf.config.vocab_size)
    return [e]
