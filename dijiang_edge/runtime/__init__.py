"""Run exported folders without torch: onnxruntime for ``.onnx``, executorch for ``.pte``.

A runner keeps one sequence's recurrent state and position between calls::

    r = open_export("out/smollm2", format="onnx", quant="fp32")
    logits = r.forward(np.array([[1, 2, 3]]))    # every position's logits, [1, T, V] float32
    logits = r.forward(np.array([[4]]))          # decode one token, state carried
    logits = r.forward(ids, keep=1)              # prefill: the last position's only, [1, 1, V]
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

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits of the last ``keep`` positions of ``ids`` (0: all), the state carried."""
        ...


PREFILL_PIECE = 512     # prompt tokens per prefill call (``decoding``): bounds the logits held


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
        from ..extras import install_hint
        raise DiJiangError(f"running {entry['format']} files needs {e.name}, which is not installed; "
                           f"install with `{install_hint([e.name.split('.')[0]])}`") from None
    return mod.open(Path(folder), entry, manifest, threads)


def stream_ids(runner: Runner, prompt: list[int], max_new_tokens: int, eos_ids: list[int],
               sampling=None) -> Iterator[int]:
    """Prefill ``prompt``, then decode one token per call (``decoding.stream_tokens``
    over this runner; ``sampling``: a ``sampling.Sampling``, default greedy)."""
    from ..decoding import RunnerLM, stream_tokens
    from ..sampling import Sampler, Sampling
    vocab = getattr(runner, "vocab_size", None) or vocab_of(runner.entry)
    sampler = Sampler(sampling or Sampling(), vocab)
    return stream_tokens(RunnerLM(runner, vocab), prompt, max_new_tokens, eos_ids, sampler)
