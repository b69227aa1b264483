"""ExecuTorch export of the softmax baseline, the way ExecuTorch's own LLM export does it.

``forward(tokens int64 [1, T], start_pos int64 [1]) -> logits [1, 1, V]`` (the
contract of the DiJiang ``.pte``: the last position's logits, as ExecuTorch's LLM export), with a static KV cache per layer in mutable
buffers ``[1, max_context_len, kv_heads, head_dim]`` written by ExecuTorch's
``llama::update_cache`` and read by ``llama::custom_sdpa``, which attends over the
first ``start_pos + T`` positions only: decode cost grows with the context as in a
real KV-cache runtime, not with ``max_context_len``.  The cache memory is planned
for ``max_context_len`` at load, as in ExecuTorch's LLM runner.  Linears go to
XNNPACK; quantized with the recipe of the DiJiang ``.pte`` (``executorch.quantize``'s
configs: int8 = 8da8w linears + 8-bit per-row embedding).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import manifest as M
from ..errors import DiJiangError
from ..progress import elapsed, stage
from . import executorch as et

MARKER = "softmax_kv_cache"
MAX_CONTEXT_LEN = 16384 + 1024       # the benchmark's longest context plus its decode steps


class Int8EmbeddingModule(nn.Module):
    """``executorch.Int8Embedding`` behind the ``nn.Embedding`` call signature."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.inner = et.Int8Embedding(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


def quantize(lm, quant: str):
    """A copy of ``KVCacheLM`` quantized with the DiJiang ``.pte`` recipe of ``quant``."""
    qlinear, qembedding = et.parse_quant(quant)
    lm = copy.deepcopy(lm)
    hf = lm.hf
    if qembedding:
        hf.model.embed_tokens = Int8EmbeddingModule(hf.model.embed_tokens.weight)
    if qlinear:
        from torchao.quantization.quant_api import quantize_
        hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())      # untie
        quantize_(hf, et._linear_config(qlinear), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return lm


class StaticCacheLM(nn.Module):
    """``KVCacheLM`` with its cache in buffers ``k_cache_{i}``/``v_cache_{i}``."""

    def __init__(self, lm, max_context_len: int):
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::*)
        self.lm, self.max_context_len = lm, max_context_len
        for i in range(lm.n_layers):
            for w in "kv":
                self.register_buffer(f"{w}_cache_{i}", torch.zeros(1, max_context_len, lm.n_kv, lm.head_dim))

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        lm, t = self.lm, tokens.shape[1]
        sp = start_pos[0].item()
        torch._check_is_size(sp)
        torch._check(sp + t <= self.max_context_len)
        cos, sin = lm.rope(start_pos[:, None] + torch.arange(t)[None, :])
        x = lm.hf.model.embed_tokens(tokens)
        for i, layer in enumerate(lm.hf.model.layers):
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")

            def attend(q, k, v, kc=kc, vc=vc):
                torch.ops.llama.update_cache(k.transpose(1, 2).contiguous(), kc, sp)
                torch.ops.llama.update_cache(v.transpose(1, 2).contiguous(), vc, sp)
                y = torch.ops.llama.custom_sdpa(q.transpose(1, 2).contiguous(), kc, vc, sp, None, 0, True)
                return y.transpose(1, 2)
            x = lm.block(layer, x, cos, sin, attend)
        return lm.head(x[:, -1:]).float()


def metadata(lm, max_seq_len: int, max_context_len: int) -> dict[str, Any]:
    cfg = lm.hf.config
    meta = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_context_len,
            "get_vocab_size": cfg.vocab_size, "get_n_layers": lm.n_layers, "use_kv_cache": True,
            "enable_dynamic_shape": True, MARKER: 1}
    if cfg.bos_token_id is not None:
        meta["get_bos_id"] = cfg.bos_token_id
    return meta


def build(lm, path: Path, quant: str, max_seq_len: int, max_context_len: int) -> dict:
    from torch.export import Dim
    t0 = time.time()
    label = f"pte softmax {quant}"
    with stage(label, "quantizing") if quant != "fp32" else contextlib.nullcontext():
        wrapper = StaticCacheLM(quantize(lm, quant), max_context_len).eval()
    example = (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    try:
        with stage(label, "torch.export of the graph"), torch.no_grad():
            ep = torch.export.export(wrapper, example, dynamic_shapes=({1: Dim("seq", min=1, max=max_seq_len)}, None),
                                     strict=False).run_decompositions({})
    except Exception as e:
        raise DiJiangError(f"torch.export of the softmax baseline failed ({type(e).__name__}: {str(e)[:300]})") from e
    program = et.lower(ep, metadata(lm, max_seq_len, max_context_len), label)
    path.write_bytes(program.buffer)
    return {"seconds": round(time.time() - t0, 1), "graph": et.delegated_fraction(program)}


def export(lm, out_dir: str | Path, quant: str = "fp32", parity_tokens: int = 64,
           max_seq_len: int = et.MAX_SEQ_LEN, max_context_len: int = MAX_CONTEXT_LEN) -> list[M.FileEntry]:
    """Write ``softmax_<quant>.pte``; return its manifest entry (parity vs HF measured)."""
    out = Path(out_dir)
    name = f"softmax_{quant.replace('+', '_')}.pte"
    facts = build(lm, out / name, quant, max_seq_len, max_context_len)
    qlinear, qembedding = et.parse_quant(quant)
    e = M.FileEntry(
        format="pte", quant=quant, path=name, role="both", attention="softmax", default=True,
        inputs={"tokens": {"dtype": "int64", "shape": [1, "seq"]}, "start_pos": {"dtype": "int64", "shape": [1]}},
        outputs={"logits": {"dtype": "float32", "shape": [1, 1, lm.hf.config.vocab_size]}},
        checksums=M.checksums(out, [name]),
        extras={"graph": "static_kv_cache", "qlinear": qlinear, "qembedding": qembedding,
                "max_seq_len": max_seq_len, "max_context_len": max_context_len, "xnnpack": facts["graph"],
                "kv_cache": {"shape_per_layer": [1, max_context_len, lm.n_kv, lm.head_dim], "dtype": "float32",
                             "attention": "llama::custom_sdpa over start_pos + T positions"}})
    if parity_tokens:
        from ..runtime.kv_cache import open as open_runner
        from .baseline import parity
        with stage(f"pte softmax {quant}", f"parity of {name} vs the Hugging Face model"):
            e.parity = parity(lm.hf, open_runner(out, e, None), parity_tokens, lm.hf.config.vocab_size)
    print(f"[pte softmax {quant}] wrote {name} ({e.checksums[name]['bytes'] / 1e6:.1f} MB) in "
          f"{elapsed(facts['seconds'])}", file=sys.stderr, flush=True)
    return [e]
