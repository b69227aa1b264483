"""Top-1 agreement with PyTorch fp32 and perplexity change of ``MatMulNBits`` quantization
variants of a model's ONNX ``native`` graph, run by onnxruntime: which layers cost int4 its
accuracy, and what int8 in some of them, fp32 compute, smaller blocks, zero points or
onnxruntime's HQQ buy back.

    python scripts/onnx_quant_variants.py default --tokens 1024 [--only A,A0,F]

Graphs are traced from the model and from its outlier-treated copy (``exporters.onnx``'s
recipe for int4 / int8: smoothed, every linear input rotated in 32 x 32 blocks, calibrated
on pydoc), teacher-forced in one call over ``--tokens`` tokens of shakespeare.  The
embedding is quantized as ``onnx_files.quantize`` does (``onnx_vocab``) unless a row says
"embedding fp32".  No files are written: a variant is judged in about 20 s.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import dijiang_edge
from dijiang_edge.exporters import onnx_files, onnx_graph, onnx_vocab, tokenizer_source
from dijiang_edge.exporters.onnx import OUTLIER_BLOCK, feature_projections
from dijiang_edge.exporters.outliers import calibration_ids, prepare_for_int8
from dijiang_edge.parity import text_ids
from dijiang_edge.tokenizer import load_tokenizer, save_tokenizer

LAST = r"/layers\.(0|1|28|29)/"          # SmolLM2-135M's first and last two layers
VARIANTS = {
    "A": ("int4 (the export's)", dict()),
    "A0": ("int4, embedding fp32 (before onnx_vocab)", dict(embed=False)),
    "B": ("int4, head and embedding fp32", dict(fp32=["lm_head"], embed=False)),
    "C": ("int4, fp32 compute (accuracy_level 0)", dict(acc=0)),
    "D": ("int4, no outlier treatment", dict(src="plain")),
    "E": ("int4, down_proj int8", dict(int8=["down_proj"])),
    "F": ("int4, head and embedding int8", dict(int8=["lm_head"])),
    "G": ("int4, o_proj int8", dict(int8=["o_proj"])),
    "H": ("int4, in_proj int8", dict(int8=["in_proj"])),
    "I": ("int4, gate_up int8", dict(int8=["gate_up"])),
    "M": ("int4, head, embedding and down_proj int8", dict(int8=["lm_head", "down_proj"])),
    "Q": ("int4, head, embedding, layers 0,1,28,29 int8", dict(int8=["lm_head", LAST])),
    "K": ("int4, block 16", dict(block=16)),
    "L": ("int4 with zero points, embedding fp32", dict(sym=False, embed=False)),
    "N": ("int4 HQQ (onnxruntime's), embedding fp32", dict(hqq=True, embed=False)),
    "R": ("int4 k-quant scales (onnxruntime's), embedding fp32", dict(algo="k_quant", embed=False)),
    "S": ("int4 GPTQ (onnxruntime's) on the calibration text, embedding fp32", dict(algo="gptq", embed=False)),
    "J": ("int8 (the export's)", dict(bits=8)),
    "J0": ("int8, embedding fp32", dict(bits=8, embed=False)),
}


def _copy(mp):
    out = onnx.ModelProto()
    out.CopyFrom(mp)
    return out


def quantized(mp, keep: list, vocab: int, bits: int = 4, acc: int = 4, int8=(), fp32=(), embed: bool = True,
              sym: bool = True, block: int = 32, hqq: bool = False, algo: str = "", calib: dict | None = None):
    """``mp`` quantized as one row of ``VARIANTS`` says (a copy); ``calib``: the feeds GPTQ sees."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    mp = _copy(mp)
    found = onnx_vocab.find(mp, vocab) if embed else None
    keep_nodes = onnx_files.constant_nodes(mp, keep)
    names = [n.name for n in mp.graph.node if n.op_type == "MatMul"]
    pick = lambda pats: [n for n in names if any(re.search(p, n) for p in pats)]
    if int8:
        chosen = set(pick(int8)) - set(keep_nodes)
        q = MatMulNBitsQuantizer(mp, bits=8, block_size=block, is_symmetric=True, accuracy_level=acc,
                                 nodes_to_exclude=[n for n in names if n not in chosen])
        q.process()
        mp = q.model.model
    if algo == "gptq":
        from onnxruntime.quantization import CalibrationDataReader

        class Feeds(CalibrationDataReader):
            def __init__(self):
                self.left = [calib]

            def get_next(self):
                return self.left.pop() if self.left else None
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=Feeds())
    elif algo == "k_quant":
        algo = KQuantWeightOnlyQuantConfig()
    else:
        algo = HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if hqq else None
    q = MatMulNBitsQuantizer(mp, bits=bits, block_size=block, is_symmetric=sym and not hqq, accuracy_level=acc,
                             nodes_to_exclude=keep_nodes + pick(fp32), algo_config=algo)
    q.process()
    mp = q.model.model
    if found:
        head_bits = 8 if any(re.search(p, "/lm_head/") for p in int8) else bits
        mp = onnx_vocab.quantize_embedding(mp, found, vocab, head_bits, block)
    return mp


def feeds(mp, model, ids: np.ndarray) -> dict:
    """The native graph ``mp``'s inputs for ``ids`` from a fresh state."""
    feed = {"input_ids": ids[None], "start_pos": np.zeros(1, np.int64), "logits_to_keep": np.zeros(1, np.int64)}
    for i, shape in zip(mp.graph.input[len(feed):], model.state_shapes(1)):
        feed[i.name] = np.zeros(shape, np.float32)
    return feed


def logits(mp, model, ids: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(["logits"], feeds(mp, model, ids))[0][0]


def figures(got: np.ndarray, ref: torch.Tensor, ids: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement with ``ref`` and the perplexity change on ``ids``' next tokens."""
    g = torch.from_numpy(got.astype(np.float64))
    t = torch.from_numpy(ids[1:])
    ppl = lambda x: float(torch.nn.functional.cross_entropy(x[:-1], t).exp())
    return float((g.argmax(-1) == ref.argmax(-1)).double().mean()), ppl(g) / ppl(ref) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="what `dijiang-export export` takes ('default', a folder, ...)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--only", default="", help="comma list of VARIANTS keys (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = dijiang_edge.convert(a.model).eval()
    v = model.args.vocab_size
    with tempfile.TemporaryDirectory() as tok_dir:     # the tokenizer an export of the model carries
        save_tokenizer(tokenizer_source(a.model, model), tok_dir)
        ids, _ = text_ids(load_tokenizer(tok_dir), v, a.tokens, "shakespeare")
        calibration = calibration_ids(model, Path(tok_dir), "pydoc")
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[None]))[0][0].double()
    treated = prepare_for_int8(model, calibration, block=OUTLIER_BLOCK["int4"], every_input=True)
    srcs = {"treated": (onnx_graph.to_onnx(treated, "native"), feature_projections(treated))}
    only = [k for k in a.only.split(",") if k] or list(VARIANTS)
    if any(VARIANTS[k][1].get("src") == "plain" for k in only):
        srcs["plain"] = (onnx_graph.to_onnx(model, "native"), feature_projections(model))
    for k in only:
        label, kw = VARIANTS[k]
        kw = dict(kw)
        mp, keep = srcs[kw.pop("src", "treated")]
        t = time.time()
        if kw.get("algo") == "gptq":
            kw["calib"] = feeds(mp, model, np.asarray(calibration[:512], np.int64))
        with onnx_files.quiet_logs():
            q = quantized(mp, keep, v, **kw)
        top1, dppl = figures(logits(q, model, ids, a.threads), ref, ids)
        size = sum(len(x.raw_data) for x in q.graph.initializer)
        print(f"{k:3s} {label:48s} top-1 {top1:.4f}  ppl {dppl * 100:+.2f}%  weights {size / 1e6:6.1f} MB"
              f"  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
