"""Decode ms/token of two or more ONNX export folders, side by side in one process: after a
prefill of CONTEXT random tokens each, single-token calls alternate between the folders, so
machine load drifts hit them alike; medians after 20 warm-up calls.

    python scripts/decode_side_by_side.py A B [--contexts 128,4096] [--calls 150] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dijiang_edge.runtime import open_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--calls", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant", default="int8")
    a = ap.parse_args()
    runners = [open_export(d, "onnx", a.quant, threads=a.threads) for d in a.dirs]
    rng = np.random.default_rng(0)
    print("| context | " + " | ".join(a.dirs) + " | first / second |")
    for ctx in map(int, a.contexts.split(",")):
        ids = rng.integers(100, 40000, size=(1, ctx))
        for r in runners:
            r.reset()
            r.forward(ids)
        ms: list[list[float]] = [[] for _ in runners]
        for i in range(a.calls):
            tok = np.array([[int(ids[0, i % ctx])]])
            for j, r in enumerate(runners):
                t0 = time.perf_counter()
                r.forward(tok)
                ms[j].append((time.perf_counter() - t0) * 1e3)
        med = [float(np.median(m[20:])) for m in ms]
        print(f"| {ctx} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[0] / med[1]:.3f} |")


if __name__ == "__main__":
    main()
