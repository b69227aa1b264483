"""Run exported folders without torch: onnxruntime for ``.onnx``, executorch for ``.pte``.

A runner keeps one sequence's recurrent state and position between calls::

    r = open_export("out/smollm2", format="onnx", quant="fp32")
    logits = r.forward(np.array([[1, 2, 3]]))    # prefill, [1, T, V] float32
    logits = r.forward(np.array([[4]]))          # decode one token, state carried
    r.reset()                                     # start a new sequence

Each format module provides ``open(folder, entry, threads) -> Runner``.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .. import manifest as M
from ..errors import DiJiangError

RUNTIMES = {"onnx": "onnx", "pte": "executorch"}


class Runner(Protocol):
    entry: M.FileEntry

    def reset(self) -> None: ...

    def forward(self, ids: np.ndarray) -> np.ndarray: ...


PREFILL_PIECE = 512     # prompt tokens per prefill call of ``stream_ids``: bounds the logits held


def input_ids(ids: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """``ids`` as the contiguous int64 ``[batch, seq > 0]`` array every runner feeds;
    an id outside ``[0, vocab_size)`` is refused (a graph's gather would read another
    row, or out of bounds, without a word)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise DiJiangError(f"input ids must have shape [batch, seq>0], got {list(ids.shape)}")
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DiJiangError(f"token ids must lie in [0, {vocab_size}) for this model "
                           f"(got {int(ids.min())}..{int(ids.max())})")
    return ids


def vocab_of(entry, manifest=None) -> int | None:
    """The vocabulary size a file's logits have (its entry's output shape, else the
    manifest's model facts; None where neither says)."""
    shape = ((entry.get("outputs") or {}).get("logits") or {}).get("shape") or []
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    model = (manifest or {}).get("model") if hasattr(manifest, "get") else None
    return int(model["vocab_size"]) if model and "vocab_size" in model else None


def open_export(folder: str | Path, format: str | None = None, quant: str | None = None,
                threads: int = 0) -> Runner:
    """The runner of ``folder``'s default file of ``format``/``quant`` (``manifest.select``)."""
    manifest = M.read(folder)
    return open_entry(folder, M.select(manifest, format, quant), manifest, threads)


def open_entry(folder: str | Path, entry: M.FileEntry, manifest: M.Manifest, threads: int = 0) -> Runner:
    """The runner of one manifest ``entry`` (DiJiang or softmax baseline, any format)."""
    name = "kv_cache" if entry.get("attention") == "softmax" else RUNTIMES[entry["format"]]
    try:
        mod = import_module(f".{name}", __name__)
    except ImportError as e:
        raise DiJiangError(f"running {entry['format']} files needs {e.name}; install it "
                           f"(`pip install onnxruntime` or `pip install executorch`)") from None
    return mod.open(Path(folder), entry, manifest, threads)


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy (``temperature == 0``) or temperature/top-k sampling from ``[V]`` logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def stream_ids(runner: Runner, prompt: list[int], max_new_tokens: int, eos_ids: list[int],
               temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Iterator[int]:
    """Prefill ``prompt``, then decode one token per call.  The prompt goes in pieces
    of ``PREFILL_PIECE`` tokens and only the last position's logits are kept, so memory
    does not grow with the prompt (a runner returns every position's logits)."""
    if not prompt:
        raise DiJiangError("the prompt is empty (no tokens); give some text")
    rng = np.random.default_rng(seed)
    ids = np.asarray([prompt], dtype=np.int64)
    for i in range(0, ids.shape[1], PREFILL_PIECE):
        logits = runner.forward(ids[:, i:i + PREFILL_PIECE])[0, -1].copy()
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, rng)
        yield tok
        if tok in eos_ids:
            return
        logits = runner.forward(np.asarray([[tok]], dtype=np.int64))[0, -1]

