"""Runners of the softmax KV-cache baseline files (``"attention": "softmax"``), with the
``Runner`` interface of the DiJiang runners so one benchmark drives both.

* ONNX: the cache is the ``present`` outputs fed back as ``past_key_values`` (numpy),
  growing by the call's tokens; prompts go in ``prefill_block``-token calls.
* ``.pte``: the cache lives in the program's buffers (static, ``max_context_len``
  positions), as in ExecuTorch's own LLM export; the runner keeps the position.
* the peers: an onnxruntime-genai folder (``genai.GenaiRunner``) and a llama.cpp GGUF
  (``llama.LlamaRunner``), each run by its own runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from . import input_ids, vocab_of
from .onnx import session


class KvOnnxRunner:
    """``forward(ids [B, T]) -> logits [B, T, V]``, the KV cache carried between calls."""

    def __init__(self, folder: Path, entry: dict, threads: int = 0, verify: bool = True,
                 vocab_size: int | None = None):
        self.entry, self.vocab_size = entry, vocab_size
        self.sess = session(Path(folder), entry, threads, verify)
        self.names = [p["name"] for p in entry["inputs"]["past_key_values"]]
        _, self.kv_heads, _, self.head_dim = entry["inputs"]["past_key_values"][0]["shape"]
        self.block = int(entry.get("prefill_block", 0)) or 1 << 30
        self.reset()

    def reset(self, batch: int = 1) -> None:
        self.cache = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.names]
        self.pos = 0

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((b, self.pos + t), np.int64),
                "position_ids": np.broadcast_to(np.arange(self.pos, self.pos + t, dtype=np.int64), (b, t)).copy()}
        feed.update(zip(self.names, self.cache))
        out = self.sess.run(None, feed)
        self.cache, self.pos = out[1:], self.pos + t
        return out[0]

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits of the last ``keep`` positions (0: all); the graph computes every row."""
        ids = input_ids(ids, self.vocab_size)
        if self.pos == 0 and ids.shape[0] != self.cache[0].shape[0]:
            self.reset(ids.shape[0])
        parts = [self._run(ids[:, i:i + self.block]) for i in range(0, ids.shape[1], self.block)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return out[:, -keep:] if keep else out


def open(folder: Path, entry: dict, manifest: dict, threads: int = 0):   # noqa: A001
    """The ``Runner`` of a softmax baseline entry (``runtime.open_export`` calls this)."""
    if entry["format"] == "genai":
        from .genai import GenaiRunner
        return GenaiRunner((Path(folder) / entry["path"]).parent, threads=threads, entry=entry)
    if entry["format"] == "gguf":
        from .llama import LlamaRunner
        return LlamaRunner(Path(folder) / entry["path"], threads=threads, entry=entry)
    if entry["format"] == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DiJiangError("running .onnx files needs onnxruntime: `pip install onnxruntime`") from None
        return KvOnnxRunner(Path(folder), entry, threads, vocab_size=vocab_of(entry, manifest))
    from .executorch import PteRunner
    try:        # registers the llama::update_cache / custom_sdpa kernels the baseline file calls
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    except ImportError as e:
        raise DiJiangError(f"the softmax .pte baseline needs ExecuTorch's LLM custom ops ({e}); "
                           f"install executorch with its extension.llm package") from None
    return PteRunner(Path(folder) / entry["path"], entry, threads, marker="softmax_kv_cache")
