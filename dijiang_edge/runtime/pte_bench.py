"""Decode latency of the ``.pte`` files of an export folder at several positions, and
their sizes (``executorch.runtime`` only; no model code).

The state lives inside the program, so it cannot be saved and restored from here:
each position gets its own loaded program, brought there by a real prefill of that
many tokens (in ``get_max_seq_len`` calls, as the stock runner does). Decode calls are
then timed in turns over the positions (``rounds`` times, medians reported), so
background load hits them alike; the positions move on by ``tokens * rounds`` only.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from ..benchmark.timing import decode_ms
from .executorch import PteRunner


def _prefilled(folder: Path, entry: dict, pos: int, threads: int, seed: int = 0) -> PteRunner:
    runner = PteRunner(folder / entry["path"], entry, threads)
    ids = np.random.default_rng(seed).integers(3, runner.vocab_size, (1, pos), dtype=np.int64)
    runner.forward(ids)
    return runner


def bench_decode(folder: str | Path, entry: dict, positions: list[int], threads: int = 0,
                 tokens: int = 32, rounds: int = 3) -> dict[int, float]:
    """Median decode ms/token at each position (each reached by a real prefill)."""
    runners = {p: _prefilled(Path(folder), entry, p, threads) for p in positions}
    decode_ms(runners[positions[0]], 4, warmup=0)                                      # warm-up
    runs: dict[int, list[float]] = {p: [] for p in positions}
    for _ in range(rounds):
        for p in positions:
            runs[p].append(decode_ms(runners[p], tokens, warmup=0))
    return {p: statistics.median(v) for p, v in runs.items()}


def pte_entries(manifest: dict, quants: list[str] | None) -> list[dict]:
    files = [f for f in manifest.get("files", []) if f["format"] == "pte"
             and (not quants or f["quant"] in quants)]
    if not files:
        raise DiJiangError("the folder has no .pte file for the asked --quant; export one with "
                           "`dijiang-export export MODEL --formats pte`")
    return files


def file_sizes(folder: str | Path, entries: list[dict]) -> dict[str, int]:
    return {e["path"]: (Path(folder) / e["path"]).stat().st_size for e in entries}


def run(folder: str | Path, quants: list[str] | None, positions: list[int], threads: list[int],
        tokens: int = 32, rounds: int = 3) -> list[dict]:
    """Print sizes, then a table (file, quant, threads, ms/token per position, last/first)."""
    from ..exporters import read_manifest
    if not positions:
        raise DiJiangError("give at least one --positions value")
    manifest = read_manifest(folder)
    entries = pte_entries(manifest, quants)
    sizes = file_sizes(folder, entries)
    base = next((sizes[e["path"]] for e in entries if e["quant"] == "fp32"), None)
    for e in entries:
        rel = f"  ({sizes[e['path']] / base:.1%} of fp32)" if base else ""
        print(f"{e['path']:<28} {e['quant']:<13} {sizes[e['path']] / 1e6:9.1f} MB{rel}")
    print(f"{'.pte file':<28} {'quant':<13} {'thr':>3} " + " ".join(f"{'@' + str(p):>9}" for p in positions)
          + f" {'ratio':>6}   (median decode ms/token)")
    rows = []
    for e in entries:
        for t in threads:
            ms = bench_decode(folder, e, positions, t, tokens, rounds)
            ratio = ms[positions[-1]] / ms[positions[0]]
            print(f"{e['path']:<28} {e['quant']:<13} {t or 'def':>3} "
                  + " ".join(f"{ms[p]:>9.2f}" for p in positions) + f" {ratio:>6.2f}", flush=True)
            rows.append({"path": e["path"], "quant": e["quant"], "threads": t, "ms": ms,
                         "ratio": ratio, "bytes": sizes[e["path"]]})
    return rows
