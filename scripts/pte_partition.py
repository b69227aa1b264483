"""What XNNPACK's op coverage buys a .pte: lower the first N layers of a model to int8
with the linear-only partitioner or the default one, then time decode.

    python scripts/pte_partition.py out/smollm2-adapted --layers 4 --configs linear
    python scripts/pte_partition.py out/smollm2-adapted --layers 4 --configs default

Prints lowering seconds, XNNPACK subgraphs, the ops left to the portable kernels, the
median decode ms/token (2 threads, after a 128-token prefill) and, with ``--instructions``,
the instructions per decoded token of the C++ runner under callgrind (one thread: the
stable figure on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

LINEAR_ONLY = ("LinearConfig", "BMMConfig", "QuantizeAffineConfig", "DeQuantizeAffineConfig",
               "ChooseQParamsAffineConfig")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a converted DiJiang folder or a Hugging Face model folder")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--configs", choices=("linear", "default"), default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--instructions", action="store_true", help="also count instructions per decoded token")
    a = ap.parse_args()

    import dijiang_edge
    from dijiang_edge.benchmark.timing import median_ms
    from dijiang_edge.exporters import executorch as ex
    from executorch.extension.pybindings import portable_lib

    if a.configs == "linear":
        ex.XNNPACK_CONFIGS = LINEAR_ONLY
    model = dijiang_edge.convert(a.model)
    model.layers = model.layers[:a.layers]
    model.args.n_layers = a.layers
    calib = ex.calibration_ids(model, Path(a.model), "pydoc")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.pte"
        t0 = time.time()
        facts = ex.build_pte(model, path, "int8", calibration_ids=calib)
        print(f"{a.configs}: lowering {time.time() - t0:.0f} s, {facts['graph']['xnnpack_subgraphs']} XNNPACK "
              f"subgraphs, portable: {', '.join(facts['graph']['portable_ops'])}")
        portable_lib._unsafe_reset_threadpool(a.threads)
        m = portable_lib._load_for_executorch(str(path))
        m.forward((torch.arange(3, 131)[None], torch.tensor([0])))
        pos = iter(range(128, 128 + 40))
        ms = median_ms(lambda: m.forward((torch.tensor([[5]]), torch.tensor([next(pos)]))), 36, warmup=4)
        if a.instructions:
            from dijiang_edge.benchmark.instructions import instructions_per_token
            ir = instructions_per_token(path, "x86_64")["decode_instructions_per_token"]
            print(f"{a.configs}: {ir / 1e6:.2f} M instructions per decoded token (callgrind, 1 thread)")
    print(f"{a.configs}: decode {ms:.2f} ms/token "
          f"({a.layers} layers, {a.threads} threads)")


if __name__ == "__main__":
    main()
