"""Where a .pte decode step's time goes: ExecuTorch's ETDump over a few decode calls,
summed per event (portable kernels ``native_call_*``, XNNPACK ops, delegate calls).

    python scripts/profile_pte.py out/adapted-pte/model_int8.pte --threads 2

Times are the median over the calls (one 32-token prefill, then ``--steps`` decodes) of
each event, summed over the events of one name: a per-call profile of decode.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the softmax baseline's llama::* kernels)
    portable_lib._unsafe_reset_threadpool(a.threads)
    m = portable_lib._load_for_executorch(a.pte, enable_etdump=True, debug_buffer_size=0)
    m.forward((torch.arange(3, 35)[None], torch.tensor([0])))
    for i in range(a.steps):
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
    print(f"{a.pte}, {a.threads} thread(s): ms per decode call, median over calls, summed per event")
    for name, ms in total.most_common(a.top):
        print(f"  {name:<52} {ms:8.2f} ms  x{count[name]}")


if __name__ == "__main__":
    main()
