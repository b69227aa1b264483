"""Side-by-side decode time of ONNX files: each file prefilled with the same 128 tokens,
then rounds of 32 single-token calls taken in turn (A, B, A, B, ...), so background
load hits every file alike. Prints the median of the per-round medians, ms/token.

    python scripts/ab_decode.py --threads 2 out/adapted-onnx:onnx/native_int8.onnx \\
        out/onnx-dyn:onnx/native_int8_dynamic.onnx
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="FOLDER:PATH (PATH as in the folder's manifest.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    from dijiang_edge.exporters import read_manifest
    from dijiang_edge.runtime import median_decode_ms
    from dijiang_edge.runtime.onnx import OnnxRunner
    runners = []
    for spec in a.files:
        folder, path = spec.split(":", 1)
        m = read_manifest(folder)
        r = OnnxRunner(Path(folder), next(f for f in m["files"] if f["path"] == path), m, a.threads)
        r.forward(np.arange(3, 131)[None])
        runners.append((spec, r, [s.copy() for s in r.state], r.pos))
    rounds: dict[str, list[float]] = {spec: [] for spec, *_ in runners}
    for _ in range(a.rounds):
        for spec, r, state, pos in runners:
            r.state, r.pos = [s.copy() for s in state], pos
            rounds[spec].append(median_decode_ms(r, 32))
    for spec, v in rounds.items():
        print(f"{statistics.median(v):7.2f} ms/token  {spec}")


if __name__ == "__main__":
    main()
