"""ONNX export: the graphs of ``onnx_graph``, quantized and packed by ``onnx_files``,
each file checked against PyTorch with onnxruntime before its manifest entry is written.

Files per quantization ``q`` (``fp32`` has no suffix), sharing ``onnx/weights[_q].data``:

* ``onnx/prefill[_q].onnx``  role ``prefill``: any ``seq``, one exact masked chunk per call.
* ``onnx/decode[_q].onnx``   role ``decode``: ``seq == 1``, the recurrent step in plain ops.
* ``onnx/native[_q].onnx``   role ``both``: ``com.microsoft::LinearAttention`` for the recurrence.

``default: true`` marks what a runner uses unless told otherwise (``DEFAULT``): the
native file, faster than the plain ops in both decode and prefill when measured on
SmolLM2-135M (see the report of issue 3); the plain pair stays exported and tested.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import DiJiangError
from . import PARITY_TOKENS, onnx_files, onnx_graph

FILES = {"block": ("prefill", "prefill", "plain"), "step": ("decode", "decode", "plain"),
         "native": ("native", "both", "native")}
DEFAULT = ("native",)                # the graph(s) a runner uses unless told otherwise
_CACHE: dict[tuple[int, str], Any] = {}


@contextlib.contextmanager
def progress(msg: str) -> Iterator[None]:
    """One line on stderr per long step, with its time: exports of 135M models take minutes."""
    print(f"[onnx] {msg} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[onnx] {msg}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def fp32_graph(model, kind: str):
    """A fresh copy of the fp32 graph ``kind`` (traced once per model and process)."""
    import onnx
    key = (id(model), kind)
    if key not in _CACHE:
        with progress(f"tracing the {kind} graph"):
            _CACHE[key] = onnx_graph.to_onnx(model, kind)
    mp = onnx.ModelProto()
    mp.CopyFrom(_CACHE[key])
    return mp


def file_name(kind: str, quant: str) -> str:
    return f"onnx/{FILES[kind][0]}{'' if quant == 'fp32' else '_' + quant}.onnx"


def io_spec(model) -> tuple[dict, dict]:
    h, m, dv = model.state_shape(1)[1:]
    ins, outs = onnx_graph.io_names(model.args.n_layers)
    st = lambda names: [{"name": n, "dtype": "float32", "shape": ["batch", h, m, dv]} for n in names]
    return ({"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
             "start_pos": {"dtype": "int64", "shape": [1]}, "state": st(ins[2:])},
            {"logits": {"dtype": "float32", "shape": ["batch", "seq", model.args.vocab_size]},
             "state": st(outs[1:])})


def entry(model, out: Path, kind: str, quant: str, data: str, keep_head: bool) -> dict:
    from ..runtime.onnx import sha256
    path = file_name(kind, quant)
    ins, outs = io_spec(model)
    e = {"format": "onnx", "quant": quant, "path": path, "role": FILES[kind][1],
         "attention": FILES[kind][2], "graph": kind, "default": kind in DEFAULT,
         "weights": data, "lm_head": "fp32" if keep_head or quant == "fp32" else quant,
         "inputs": ins, "outputs": outs,
         "checksums": {p: {"bytes": (out / p).stat().st_size, "sha256": sha256(out / p)} for p in (path, data)}}
    if kind != "step":
        e["prefill_block"] = onnx_graph.PREFILL_BLOCK
    return e


def reference(model, ids, source: str):
    """PyTorch's side of the parity checks, computed once per model and text."""
    from ..parity import Reference
    key = (id(model), "reference", len(ids))
    if key not in _CACHE:
        with progress(f"PyTorch reference over {len(ids)} tokens of English text ({source})"):
            _CACHE[key] = Reference(model, ids)
    return _CACHE[key]


def check(model, out: Path, entries: list[dict], manifest: dict, tokens: int, threads: int = 0) -> None:
    """Run every file with onnxruntime against PyTorch on real text; figures into ``parity``.

    A file is measured in the runner it serves (prefill + decode file of the same
    attention, or one file for both); entries that make the same pair share one measurement.
    """
    from ..parity import measure, text_ids
    from ..runtime.onnx import OnnxRunner
    from ..tokenizer import load_tokenizer
    tok = load_tokenizer(out) if (out / "tokenizer.json").exists() else None
    ids, source = text_ids(tok, model.args.vocab_size, tokens)
    ref = reference(model, ids, source)
    done: dict[tuple[str, str], dict] = {}
    for e in entries:
        runner = OnnxRunner(out, e, manifest, threads, verify=False, spin=False)
        pair = (runner.prefill_entry["path"], runner.decode_entry["path"])
        if pair not in done:
            with progress(f"parity of {' + '.join(dict.fromkeys(pair))} vs PyTorch"):
                done[pair] = {"text": source, "prefill_file": pair[0], "decode_file": pair[1],
                              **measure(model, runner, ids, ref=ref)}
        e["parity"] = done[pair]


def export(model, out_dir: str | Path, quant: str = "fp32", kinds: tuple[str, ...] = onnx_graph.KINDS,
           parity_tokens: int = PARITY_TOKENS, keep_head: bool = False, threads: int = 0,
           **_: Any) -> list[dict]:
    """Write the ONNX files of ``quant`` into ``out_dir``; return their manifest entries
    (defaults first, so ``runtime.pick_entry`` finds them).  ``parity_tokens`` of real
    text are checked against PyTorch (0: skip); ``threads`` for onnxruntime there."""
    onnx_files.check_quant(quant)
    bad = [k for k in kinds if k not in FILES]
    if bad:
        raise DiJiangError(f"unknown ONNX graph kind(s) {bad}; choose from {', '.join(FILES)}")
    out = Path(out_dir)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    data = f"onnx/weights{'' if quant == 'fp32' else '_' + quant}.data"
    graphs = {}
    for kind in sorted(kinds, key=lambda k: k not in DEFAULT):
        mp = fp32_graph(model, kind)
        if quant != "fp32":
            with progress(f"quantizing the {kind} graph to {quant}"), onnx_files.quiet_logs():
                mp = onnx_files.quantize(mp, quant, model.args.vocab_size, keep_head,
                                         keep=model.layers[0].attn.proj.numpy())
        graphs[file_name(kind, quant)] = (kind, mp)
    with progress(f"writing {len(graphs)} {quant} files"):
        onnx_files.pack({n: g for n, (_, g) in graphs.items()}, out, data)
    entries = [entry(model, out, kind, quant, data, keep_head) for kind, _ in graphs.values()]
    if parity_tokens:
        check(model, out, entries, {"files": entries}, parity_tokens, threads)
    return entries
