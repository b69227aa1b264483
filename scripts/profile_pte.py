"""Where a .pte decode step's time goes: ExecuTorch's ETDump over a few decode calls,
summed per event (portable kernels ``native_call_*``, XNNPACK ops, delegate calls).

    python scripts/profile_pte.py out/adapted-pte/model_int8.pte --threads 2
    python scripts/profile_pte.py out/adapted-pte/model_int4.pte --threads 1,2 --kinds

Times are the median over the calls (one 32-token prefill, then ``--steps`` decodes) of
each event, summed over the events of one name: a per-call profile of decode.  Several
thread counts give one column each (a fresh load per count, in this process).
``--kinds`` sums XNNPACK's numbered operators by kind (``Fully Connected (...) GEMM #3``
and ``#1`` as one row): which kinds of operator a second thread speeds up.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
from pathlib import Path

import torch


def profile(pte: str, threads: int, steps: int) -> tuple[collections.Counter, collections.Counter]:
    """``(ms per decode call, events per call)`` per event name at ``threads`` threads."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the softmax baseline's llama::* kernels)
    portable_lib._unsafe_reset_threadpool(threads)
    m = portable_lib._load_for_executorch(pte, enable_etdump=True, debug_buffer_size=0)
    m.forward((torch.arange(3, 35)[None], torch.tensor([0])))
    for i in range(steps):
        m.forward((torch.tensor([[5]]), torch.tensor([32 + i])))
    with tempfile.TemporaryDirectory() as d:
        etdump = str(Path(d) / "run.etdp")
        m.write_etdump_result_to_file(etdump, str(Path(d) / "debug.bin"))
        inspector = Inspector(etdump_path=etdump)
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        for e in block.events:
            if e.perf_data is not None and e.perf_data.raw:
                total[e.name] += statistics.median(e.perf_data.raw)
                count[e.name] += 1
    return total, count


def by_kind(c: collections.Counter) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for name, v in c.items():
        out[re.sub(r" #\d+$", "", name)] += v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--threads", default="2", help="comma list: one column per thread count")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--kinds", action="store_true", help="sum numbered XNNPACK operators by kind")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    runs = [profile(a.pte, t, a.steps) for t in threads]
    if a.kinds:
        runs = [(by_kind(t), by_kind(c)) for t, c in runs]
    first_total, first_count = runs[0]
    print(f"{a.pte}: ms per decode call, median over calls, summed per event"
          + ("" if len(threads) == 1 else f"; columns: {', '.join(f'{t} thread(s)' for t in threads)}"))
    for name, _ in first_total.most_common(a.top):
        cols = "".join(f" {total[name]:8.2f}" for total, _ in runs)
        print(f"  {name:<52}{cols} ms  x{first_count[name]}")


if __name__ == "__main__":
    main()
