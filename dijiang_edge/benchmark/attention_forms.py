"""``dijiang-export bench --attention-forms``: prefill cost of the chunked form vs the
parallel (quadratic) form of DiJiang attention, one layer's shapes, side by side in one run."""

from __future__ import annotations

import torch

from .. import attention as A
from .timing import median_ms

BYTES_PER_PAIR = 28   # parallel form: float64 log-gate differences and decay, float32 scores, per (i, j)


def _inputs(t: int, heads: int, d: int):
    g = torch.Generator().manual_seed(0)
    proj = A.projection_matrix(d)
    q = A.feature_map(torch.randn(1, heads, t, d, generator=g), proj)
    k = A.feature_map(torch.randn(1, heads, t, d, generator=g), proj)
    v = torch.randn(1, heads, t, d, generator=g)
    lg = A.default_log_decay(heads)[None, :, None].expand(1, heads, t).contiguous()
    return q, k, v, lg


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    return median_ms(fn, repeats, warmup=1) / 1000


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@torch.no_grad()
def bench_prefill_forms(lengths: list[int], heads: int = 9, head_dim: int = 64, chunk_size: int = 64,
                        threads: int = 0, parallel_limit: int = 16384, repeats: int = 3) -> list[dict]:
    """Median seconds per prefill for each length and form; prints a table with growth ratios."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    print(f"DiJiang attention prefill, one layer: {heads} heads x d={head_dim}, chunk {chunk_size}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'tokens':>8} {'chunked s':>11} {'parallel s':>12} {'parallel/chunked':>17}")
    for t in lengths:
        q, k, v, lg = _inputs(t, heads, head_dim)
        reps = repeats if t <= 4096 else 1
        chunked = _time(lambda: A.chunked_attention(q, k, v, lg, chunk_size=chunk_size), reps)
        need = BYTES_PER_PAIR * heads * t * t
        parallel, note = None, ""
        if t > parallel_limit or need > _available_bytes() // 2:
            note = f"skipped: needs ~{need / 2**30:.0f} GiB"
        else:
            try:
                parallel = _time(lambda: A.parallel_attention(q, k, v, lg), reps)
            except (MemoryError, RuntimeError) as e:
                note = f"failed: {str(e)[:40]}"
        rows.append({"tokens": t, "chunked_s": chunked, "parallel_s": parallel, "note": note})
        ratio = f"{parallel / chunked:17.1f}" if parallel else f"{'':17}"
        par = f"{parallel:12.3f}" if parallel else f"{'-':>12}"
        print(f"{t:>8} {chunked:11.3f} {par} {ratio}  {note}")
    base = rows[0]
    for r in rows[1:]:
        growth = r["tokens"] / base["tokens"]
        msg = f"{r['tokens']}/{base['tokens']} tokens (x{growth:.0f}): chunked time x{r['chunked_s'] / base['chunked_s']:.1f}"
        if r["parallel_s"] and base["parallel_s"]:
            msg += f", parallel time x{r['parallel_s'] / base['parallel_s']:.1f} (x{growth ** 2:.0f} if quadratic)"
        print(msg)
    return rows
