"""``dijiang-export bench DIR --native ARCHES``: the C++ ``.pte`` runner per CPU, decode
ms/token beside instructions per decoded token.

On the host's own architecture the runner's decode times are a latency; under qemu they
only say how long the emulation took, so the figure that compares files there is the
instruction count (``instructions``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from ..errors import DiJiangError
from ..manifest import verify_files
from ..runtime.native import ARCHES, check_arch, emulated, require, run_pte
from .instructions import instructions_per_token, probe_prompt


def pte_entries(manifest: dict, quants: Sequence[str] | None) -> list[dict]:
    """The ``.pte`` files of the asked quantizations (all when none are asked)."""
    files = [f for f in manifest.get("files", []) if f["format"] == "pte" and (not quants or f["quant"] in quants)]
    if not files:
        raise DiJiangError("the folder has no .pte file for the asked --quant; export one with "
                           "`dijiang-export export MODEL --formats pte`")
    return files


def bench_native(folder: str | Path, arches: Sequence[str] = ARCHES, quants: Sequence[str] | None = None,
                 tokens: int = 32, count_tokens: int = 4, prompt_len: int = 8, threads: int = 1) -> list[dict]:
    """Per ``.pte`` file and arch: the median of the runner's ``tokens`` decode times and
    the instructions per decoded token (``count_tokens`` decode calls counted, one thread).
    Prints a table; returns the rows."""
    from ..manifest import read as read_manifest
    for a in arches:
        check_arch(a)
        require(a)
    folder = Path(folder)
    entries = pte_entries(read_manifest(folder), quants)
    print(f"{'.pte file':<24} {'quant':<6} {'arch':<8} {'decode ms/token':>32} {'instr/token':>12} "
          f"{f'prefill instr ({prompt_len} tok)':>22}  method")
    rows = []
    for e in entries:
        verify_files(folder, e)          # the C++ runner would time a modified file as it is
        pte = folder / e["path"]
        for a in arches:
            r = run_pte(pte, probe_prompt(prompt_len), tokens + 1, a, threads=threads)
            ms = statistics.median(r.decode_ms)
            c = instructions_per_token(pte, a, prompt_len, count_tokens + 1)
            label = f"{ms:.3f} ({threads} thr)" if not emulated(a) else f"({ms:.1f} emulated, not a latency)"
            print(f"{e['path']:<24} {e['quant']:<6} {a:<8} {label:>32} "
                  f"{c['decode_instructions_per_token'] / 1e6:>11.2f}M {c['prefill_instructions'] / 1e6:>21.2f}M  "
                  f"{c['method']}", flush=True)
            rows.append({"path": e["path"], "quant": e["quant"], "arch": a, "emulated": emulated(a),
                         "decode_ms": ms, "threads": threads, **c})
    return rows
