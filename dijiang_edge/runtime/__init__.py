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


def input_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as the contiguous int64 ``[batch, seq > 0]`` array every runner feeds."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise DiJiangError(f"input ids must have shape [batch, seq>0], got {list(ids.shape)}")
    return ids


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
    if top_k > 0:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def stream_ids(runner: Runner, prompt: list[int], max_new_tokens: int, eos_ids: list[int],
               temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Iterator[int]:
    """Prefill ``prompt`` in one call, then decode one token per call."""
    rng = np.random.default_rng(seed)
    logits = runner.forward(np.asarray([prompt], dtype=np.int64))[0, -1]
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, rng)
        yield tok
        if tok in eos_ids:
            return
        logits = runner.forward(np.asarray([[tok]], dtype=np.int64))[0, -1]

