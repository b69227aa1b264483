"""What one layer's window costs in onnxruntime, as plain ops and as one fused operator.

Builds a graph of ``--copies`` independent copies of a SmolLM2-135M layer's decode-step window
(9 query heads, 3 key heads, head_dim 64, W = 64, one token) in three forms and times a call
(median of 300 after 50 warm-up, one thread), per copy:

* ``plain``   the ops today's graph has after onnxruntime's optimizer: the ring concatenated,
              the values' ones column padded, scaled scores (FusedMatMul), mask, max, exp,
              the weighted sum, the next ring sliced;
* ``attn23``  ONNX's own ``Attention`` (opset 23, GQA, the ring as ``past_key/value``), its
              masked scores out for the shared normaliser's log-sum-exp, the ring sliced;
* ``attn23_nolse`` the same without the scores output (a lower bound for that operator).

    python scripts/window_ops.py [--copies 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h

H, HKV, D, W = 9, 3, 64, 64
REP = H // HKV


def plain(p: str):
    return [
        h.make_node("Concat", ["pk", "k"], [p + "keys"], axis=2),
        h.make_node("Concat", ["pv", "v"], [p + "vals"], axis=2),
        h.make_node("Pad", [p + "vals", "pads", "one"], [p + "ones"]),
        h.make_node("Unsqueeze", [p + "keys", "ax2"], [p + "k5"]),
        h.make_node("Unsqueeze", [p + "ones", "ax2"], [p + "v5"]),
        h.make_node("FusedMatMul", ["q5", p + "k5"], [p + "s0"], domain="com.microsoft", transB=1, alpha=D ** -0.5),
        h.make_node("Add", [p + "s0", "mask"], [p + "s"]),
        h.make_node("ReduceMax", [p + "s", "axm1"], [p + "mx"], keepdims=1),
        h.make_node("Sub", [p + "s", p + "mx"], [p + "sm"]),
        h.make_node("Exp", [p + "sm"], [p + "e"]),
        h.make_node("MatMul", [p + "e", p + "v5"], [p + "num"]),
        h.make_node("Slice", [p + "keys", "s1", "e1", "ax2"], [p + "ringk"]),
        h.make_node("Slice", [p + "vals", "s1", "e1", "ax2"], [p + "ringv"]),
    ], [p + "num", p + "mx", p + "ringk", p + "ringv"]


def attn23(p: str, lse: bool = True):
    outs = [p + "y", p + "presk", p + "presv"] + ([p + "qk"] if lse else [])
    nodes = [h.make_node("Attention", ["q4", "k", "v", "mask4", "pk", "pv"], outs, q_num_heads=H, kv_num_heads=HKV,
                         **({"qk_matmul_output_mode": 1} if lse else {}))]
    if lse:
        nodes.append(h.make_node("ReduceLogSumExp", [p + "qk", "axm1"], [p + "lse"], keepdims=1))
    nodes += [h.make_node("Slice", [p + "presk", "s1", "e1", "ax2"], [p + "ringk"]),
              h.make_node("Slice", [p + "presv", "s1", "e1", "ax2"], [p + "ringv"])]
    return nodes, [p + "y", p + "ringk", p + "ringv"] + ([p + "lse"] if lse else [])


FORMS = {"plain": plain, "attn23": attn23, "attn23_nolse": lambda p: attn23(p, lse=False)}


def build(form, copies: int) -> onnx.ModelProto:
    nodes, outs = [], []
    for i in range(copies):
        n, o = form(f"l{i}_")
        nodes, outs = nodes + n, outs + o
    const = lambda name, v, dt=TP.INT64: h.make_tensor(name, dt, [len(v)] if isinstance(v, list) else [], v if isinstance(v, list) else [v])  # noqa: E731
    inits = [const("pads", [0, 0, 0, 0, 0, 0, 0, 1]), const("one", 1.0, TP.FLOAT), const("ax2", [2]),
             const("axm1", [-1]), const("s1", [1]), const("e1", [1 << 30])]
    vi = lambda n, s: h.make_tensor_value_info(n, TP.FLOAT, s)  # noqa: E731
    ins = [vi("q5", [1, HKV, REP, 1, D]), vi("q4", [1, H, 1, D]), vi("k", [1, HKV, 1, D]), vi("v", [1, HKV, 1, D]),
           vi("pk", [1, HKV, W, D]), vi("pv", [1, HKV, W, D]), vi("mask", [1, 1, 1, 1, W + 1]), vi("mask4", [1, 1, 1, W + 1])]
    g = h.make_graph(nodes, "window", ins, [h.make_tensor_value_info(o, TP.FLOAT, None) for o in outs], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=30)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = {"q5": (1, HKV, REP, 1, D), "q4": (1, H, 1, D), "k": (1, HKV, 1, D), "v": (1, HKV, 1, D),
              "pk": (1, HKV, W, D), "pv": (1, HKV, W, D), "mask": (1, 1, 1, 1, W + 1), "mask4": (1, 1, 1, W + 1)}
    feeds = {k: (rng.standard_normal(s) if "mask" not in k else np.zeros(s)).astype(np.float32) for k, s in shapes.items()}
    for name, form in FORMS.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.log_severity_level = 3
        s = ort.InferenceSession(build(form, a.copies).SerializeToString(), so, providers=["CPUExecutionProvider"])
        f = {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}}
        for _ in range(50):
            s.run(None, f)
        ts = []
        for _ in range(300):
            t0 = time.perf_counter()
            s.run(None, f)
            ts.append(time.perf_counter() - t0)
        print(f"{name:14s} {np.median(ts) * 1e6 / a.copies:6.1f} us per layer")


if __name__ == "__main__":
    main()
