"""One measurement: one file, one thread count, every context length, in a fresh process.

A fresh process per (file, threads) makes the peak RSS honest (nothing of an earlier
run stays mapped) and isolates the runtimes' thread pools.  The sequence grows once:
prefill (timed) up to each length, then decode calls there (both timed by ``timing``,
the one loop of the project), then on to the next length, so the whole context range
costs one prefill of the longest length.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from .timing import WARMUP_TOKENS, decode_ms, prefill_s as timed_prefill


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process (``/proc/self/status``: VmRSS, VmHWM)."""
    vals = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in vals:        # ru_maxrss keeps the parent's peak across fork + exec: last resort
        vals["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return vals.get("VmRSS", 0), vals["VmHWM"]


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def measure(folder: str, path: str, threads: int, lengths: list[int], tokens: int,
            label: str = "") -> dict:
    """Prefill to each of ``lengths`` in turn, timing prefill and ``tokens`` decode calls there."""
    from ..manifest import read as read_manifest
    from ..runtime import open_entry
    manifest = read_manifest(folder)
    entry = next((f for f in manifest["files"] if f["path"] == path), None)
    if entry is None:
        raise DiJiangError(f"{folder} has no file {path} in its manifest")
    idle = rss_bytes()[0]
    runner = open_entry(folder, entry, manifest, threads)
    if hasattr(runner, "reserve"):          # the peers allocate their KV cache whole: as long as this run needs
        runner.reserve(max(lengths) + tokens + WARMUP_TOKENS + 8)
    vocab = manifest["model"]["vocab_size"]
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, vocab, (1, n), dtype=np.int64)
    runner.forward(ids(8), keep=1)          # first-call allocations, off the clock
    runner.reset()
    loaded = rss_bytes()[0]
    points, prefill_s, prefilled = [], 0.0, 0
    for n in lengths:
        todo = n - runner.pos
        if todo > 0:
            prefill_s += timed_prefill(runner, ids(todo))
            prefilled += todo
        at = runner.pos
        ms = decode_ms(runner, tokens, WARMUP_TOKENS)
        rss, peak = rss_bytes()
        points.append({"context": n, "position": at, "decode_ms": ms,
                       "prefill_tokens": prefilled, "prefill_s": prefill_s,
                       "prefill_tok_s": prefilled / prefill_s if prefill_s else None,
                       "rss_bytes": rss, "peak_rss_bytes": peak})
        progress(f"{label} thr={threads} ctx={n:>6}: decode {ms:8.2f} ms/token, prefill "
                 f"{prefilled / max(prefill_s, 1e-9):8.1f} tok/s, peak RSS {peak / 2**20:7.0f} MiB")
    return {"threads": threads, "rss_idle_bytes": idle, "rss_loaded_bytes": loaded,
            "peak_rss_bytes": rss_bytes()[1], "points": points}


def combine_rounds(rounds: list[dict]) -> dict:
    """One result from repeated ``measure`` runs of one file: the median decode ms and
    prefill rate of each context (each round's figures kept beside them), the largest
    memory figures (the peak is a peak)."""
    if len(rounds) == 1:
        return rounds[0]
    points = []
    for same in zip(*(r["points"] for r in rounds)):
        ms = [p["decode_ms"] for p in same]
        tps = [p["prefill_tok_s"] for p in same if p["prefill_tok_s"] is not None]
        points.append({**same[0], "decode_ms": statistics.median(ms), "decode_ms_rounds": ms,
                       "prefill_s": statistics.median(p["prefill_s"] for p in same),
                       "prefill_tok_s": statistics.median(tps) if tps else None,
                       "rss_bytes": max(p["rss_bytes"] for p in same),
                       "peak_rss_bytes": max(p["peak_rss_bytes"] for p in same)})
    return {**rounds[0], "points": points, "rounds": len(rounds),
            **{k: max(r[k] for r in rounds) for k in ("rss_idle_bytes", "rss_loaded_bytes", "peak_rss_bytes")}}


def in_subprocess(folder: str, path: str, threads: int, lengths: list[int], tokens: int,
                  label: str = "") -> dict:
    """``measure`` in a fresh Python process; its progress lines go to our stderr."""
    spec = json.dumps({"folder": str(folder), "path": path, "threads": threads, "lengths": lengths,
                       "tokens": tokens, "label": label})
    code = f"import sys; from {__name__} import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, spec], stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = proc.communicate()
    except BaseException:                      # interrupted: take the measurement down with us
        proc.kill()
        raise
    if proc.returncode != 0:
        raise DiJiangError(f"measuring {folder}/{path} with {threads} thread(s) failed (exit "
                           f"{proc.returncode}); see the lines above")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    import os
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(argv[0])
    try:
        out = measure(spec["folder"], spec["path"], spec["threads"], spec["lengths"], spec["tokens"],
                      spec.get("label", ""))
    except DiJiangError as e:
        print(f"dijiang-export: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("dijiang-export: error: out of memory in the measurement; use shorter --lengths", file=sys.stderr)
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
