"""Run exported folders without torch: onnxruntime for ``.onnx``, executorch for ``.pte``.

A runner keeps one sequence's recurrent state and position between calls::

    r = open_export("out/smollm2", format="onnx", quant="fp32")
    logits = r.forward(np.array([[1, 2, 3]]))    # prefill, [1, T, V] float32
    logits = r.forward(np.array([[4]]))          # decode one token, state carried
    r.reset()                                     # start a new sequence

Each format module provides ``open(folder, entry, threads) -> Runner``.
"""

from __future__ import annotations

import sys
import time
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


def median_decode_ms(runner: Runner, tokens: int) -> float:
    """Median ms of one single-token call from the runner's current state, feeding
    back the greedy token (the benchmarks of every runtime time decode this way)."""
    tok = np.array([[1]], np.int64)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits = runner.forward(tok)
        times.append(time.perf_counter() - t0)
        tok = logits[:, -1:].argmax(-1).astype(np.int64)
    return 1000 * float(np.median(times))


def run_export_generate(a) -> None:
    """``dijiang-export generate DIR``: stream a continuation, then report tokens/s."""
    from ..tokenizer import load_tokenizer
    manifest = M.read(a.model)
    runner = open_export(a.model, a.format, a.quant, a.threads)
    tok = load_tokenizer(a.model)
    prompt = tok.encode(a.prompt).ids
    eos = manifest.model.eos_ids
    print(a.prompt, end="", flush=True)
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for t in stream_ids(runner, prompt, a.max_new_tokens, eos, a.temperature, a.top_k, a.seed):
        t_first = t_first or time.perf_counter()
        out.append(t)
        print(tok.decode(out)[len(tok.decode(out[:-1])):], end="", flush=True)
    t1 = time.perf_counter()
    n = len(out)
    rate = (n - 1) / (t1 - t_first) if n > 1 and t_first else float("nan")
    e = runner.entry
    print(f"\n[{n} tokens; prefill {len(prompt)} tokens in {(t_first or t1) - t0:.2f}s; "
          f"decode {rate:.1f} tokens/s; {e['format']} {e['quant']}]", file=sys.stderr)
