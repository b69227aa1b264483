"""Where a decode step's time goes: onnxruntime's profiler over ``steps`` decode calls
of one file of an export folder (DiJiang or softmax baseline), summed per op type.

    python scripts/profile_decode.py FOLDER onnx/native_int8.onnx --context 128 --threads 2

``--matmuls-only`` instead times a graph holding only the file's weight matmuls
(``MatMulNBits``, same weights and attributes, each fed a slice of one input): what the
weights alone cost in this runtime, against which the rest of the graph is overhead.
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
    if hasattr(runner, "keeps"):                      # the ONNX runner's per-session input table
        runner.keeps[id(sess)] = "logits_to_keep" in {i.name for i in sess.get_inputs()}
    tok = np.array([[5]], np.int64)
    for _ in range(steps):
        runner.forward(tok)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"] / 1000 / steps
    return dict(per_op.most_common())


def matmuls_only_ms(folder: str, path: str, threads: int, calls: int = 200) -> tuple[int, float]:
    """(number of MatMulNBits, median ms of one pass through all of them, one token)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from dijiang_edge.benchmark.timing import median_ms
    mp = onnx.load(str(Path(folder) / path))
    inits = {t.name: t for t in mp.graph.initializer}
    mms = [n for n in mp.graph.node if n.op_type == "MatMulNBits"]
    attr = lambda n, k: next(a.i for a in n.attribute if a.name == k)
    nodes, used = [], [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("zero", 0), ("axis", 2))]
    for i, n in enumerate(mms):           # x[..., :K] -> MatMulNBits -> an output
        used.append(helper.make_tensor(f"k{i}", TensorProto.INT64, [1], [attr(n, "K")]))
        nodes.append(helper.make_node("Slice", ["x", "zero", f"k{i}", "axis"], [f"s{i}"]))
        mm = helper.make_node("MatMulNBits", [f"s{i}", *n.input[1:]], [f"y{i}"], domain="com.microsoft")
        mm.attribute.extend(n.attribute)
        nodes.append(mm)
        used += [inits[name] for name in n.input[1:] if name and all(t.name != name for t in used)]
    width = max(attr(n, "K") for n in mms)
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, width])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(mms))],
                              used)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((1, 1, width)).astype(np.float32) * 0.1}
    return len(mms), median_ms(lambda: sess.run(None, feed), calls, warmup=calls // 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("path", help="the .onnx file, relative to the folder (as in manifest.json)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--matmuls-only", action="store_true", help="time only the weight matmuls (see above)")
    a = ap.parse_args()
    if a.matmuls_only:
        n, ms = matmuls_only_ms(a.folder, a.path, a.threads)
        print(f"{a.path}: its {n} MatMulNBits alone, {a.threads} thread(s): {ms:.2f} ms per token")
        return
    ops = profile(a.folder, a.path, a.context, a.threads, a.steps)
    total = sum(ops.values())
    print(f"{a.path} @ {a.context}, {a.threads} thread(s): {total:.1f} ms kernel time per decode call")
    for op, ms in list(ops.items())[:10]:
        print(f"  {op:<24} {ms:7.2f} ms  {ms / total:6.1%}")


if __name__ == "__main__":
    main()
