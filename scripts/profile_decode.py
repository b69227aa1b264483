"""Where a decode step's time goes: onnxruntime's profiler over ``steps`` decode calls
of one file of an export folder (DiJiang or softmax baseline), summed per op type.

    python scripts/profile_decode.py FOLDER onnx/native_int8.onnx --context 128 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def profile(folder: str, path: str, context: int, threads: int, steps: int) -> dict[str, float]:
    """ms per decode call per op type (kernel time), after a prefill of ``context`` tokens."""
    import onnxruntime as ort
    from dijiang_edge.exporters import read_manifest
    from dijiang_edge.runtime import open_entry
    m = read_manifest(folder)
    entry = next(f for f in m["files"] if f["path"] == path)
    runner = open_entry(folder, entry, m, threads)
    runner.forward(np.random.default_rng(0).integers(3, m["model"]["vocab_size"], (1, context)))
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "decode")
    sess = ort.InferenceSession(str(Path(folder) / path), opts, providers=["CPUExecutionProvider"])
    for name in ("sess", "decode", "prefill"):        # the runner's session(s), whatever it calls them
        if hasattr(runner, name):
            setattr(runner, name, sess)
    tok = np.array([[5]], np.int64)
    for _ in range(steps):
        runner.forward(tok)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"] / 1000 / steps
    return dict(per_op.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("path", help="the .onnx file, relative to the folder (as in manifest.json)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    ops = profile(a.folder, a.path, a.context, a.threads, a.steps)
    total = sum(ops.values())
    print(f"{a.path} @ {a.context}, {a.threads} thread(s): {total:.1f} ms kernel time per decode call")
    for op, ms in list(ops.items())[:10]:
        print(f"  {op:<24} {ms:7.2f} ms  {ms / total:6.1%}")


if __name__ == "__main__":
    main()
