"""Decode latency of an exported ONNX folder at several positions (onnxruntime + numpy only).

DiJiang's decode carries a fixed-size state, so its time per token must not grow with
the position.  Each position is reached by a real prefill of that many tokens; then
``tokens`` single-token decode calls are timed.  Positions are measured in turns
(``rounds`` times, medians reported) so that background load hits them alike.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from ..benchmark.timing import decode_ms
from .onnx import OnnxRunner


def _prefilled(runner: OnnxRunner, pos: int, vocab: int, seed: int = 0) -> tuple[list, int]:
    ids = np.random.default_rng(seed).integers(0, vocab, (1, pos), dtype=np.int64)
    runner.reset()
    runner.forward(ids)
    return [s.copy() for s in runner.state], runner.pos


def _decode_ms(runner: OnnxRunner, saved: tuple[list, int], tokens: int) -> float:
    """Median ms of one decode call, starting from the saved state each time."""
    runner.state, runner.pos = [s.copy() for s in saved[0]], saved[1]
    return decode_ms(runner, tokens, warmup=0)


def prefilled_states(folder: Path, manifest: dict, quant: str, positions: list[int],
                     threads: int = 0) -> dict[int, tuple[list, int]]:
    """The state after a real prefill of ``p`` tokens, for each position ``p`` (default file).

    Plain and native files of one quantization keep the same state, so every decode
    file of ``quant`` starts from these."""
    from . import pick_entry
    runner = OnnxRunner(Path(folder), pick_entry(manifest, "onnx", quant), manifest, threads)
    vocab = manifest["model"]["vocab_size"]
    return {p: _prefilled(runner, p, vocab) for p in positions}


def bench_decode(folder: str | Path, entry: dict, manifest: dict, saved: dict[int, tuple[list, int]],
                 threads: int = 0, tokens: int = 32, rounds: int = 3) -> dict[int, float]:
    """Median decode ms/token from each saved position, for the runner of ``entry``."""
    runner = OnnxRunner(Path(folder), entry, manifest, threads)
    positions = list(saved)
    _decode_ms(runner, saved[positions[0]], 4)                      # warm-up
    runs: dict[int, list[float]] = {p: [] for p in positions}
    for _ in range(rounds):
        for p in positions:
            runs[p].append(_decode_ms(runner, saved[p], tokens))
    return {p: statistics.median(v) for p, v in runs.items()}


def decode_entries(manifest: dict, quants: list[str] | None) -> list[dict]:
    """Every file that can decode (plain and native), for the asked quantizations."""
    files = [f for f in manifest.get("files", []) if f["format"] == "onnx"
             and f.get("role") in ("decode", "both") and (not quants or f["quant"] in quants)]
    if not files:
        raise DiJiangError("the folder has no ONNX decode file for the asked --quant; "
                           "export one with `dijiang-export export MODEL --formats onnx`")
    return files


def run(folder: str | Path, quants: list[str] | None, positions: list[int], threads: list[int],
        tokens: int = 32, rounds: int = 3) -> list[dict]:
    """Print a table (file, quant, threads, ms/token per position, last/first ratio); return rows."""
    from ..exporters import read_manifest
    manifest = read_manifest(folder)
    head = f"{'decode file':<28} {'quant':<13} {'thr':>3} " + " ".join(f"{'@' + str(p):>9}" for p in positions)
    print(head + f" {'ratio':>6}   (median ms/token)")
    rows, saved = [], {}
    for e in decode_entries(manifest, quants):
        if e["quant"] not in saved:
            saved[e["quant"]] = prefilled_states(Path(folder), manifest, e["quant"], positions, max(threads))
        for t in threads:
            ms = bench_decode(folder, e, manifest, saved[e["quant"]], t, tokens, rounds)
            ratio = ms[positions[-1]] / ms[positions[0]]
            print(f"{e['path']:<28} {e['quant']:<13} {t or 'def':>3} "
                  + " ".join(f"{ms[p]:>9.2f}" for p in positions) + f" {ratio:>6.2f}", flush=True)
            rows.append({"path": e["path"], "quant": e["quant"], "threads": t, "ms": ms, "ratio": ratio})
    return rows
