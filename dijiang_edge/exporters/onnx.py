"""ONNX export: the graphs of ``onnx_graph``, quantized and packed by ``onnx_files``,
each file checked against PyTorch with onnxruntime before its manifest entry is written.

Files per quantization ``q`` (``fp32`` has no suffix), sharing ``onnx/weights[_q].data``:

* ``onnx/prefill[_q].onnx``  role ``prefill``: any ``seq``, one exact masked chunk per call.
* ``onnx/decode[_q].onnx``   role ``decode``: ``seq == 1``, the recurrent step in plain ops.
* ``onnx/native[_q].onnx``   role ``both``: ``com.microsoft::LinearAttention`` for the recurrence.

``default: true`` marks what a runner uses unless told otherwise: the first of
``DEFAULT`` exported, the native file first, faster than the plain ops in both decode
and prefill when measured on SmolLM2-135M (see the report of issue 3); the plain pair
stays exported and tested.  Quantized files keep every layer's feature-map projection
P in fp32 (imported official checkpoints have one per layer).
"""

from __future__ import annotations

from pathlib import Path

from .. import manifest as M
from ..errors import DiJiangError
from . import PARITY_TEXT, PARITY_TOKENS, Memo, memo_for, onnx_files, onnx_graph

FILES = {"block": ("prefill", "prefill", "plain"), "step": ("decode", "decode", "plain"),
         "native": ("native", "both", "native")}
DEFAULT = ("native", "block", "step")    # the first of these exported is the runner's default


def progress(msg: str):
    """``progress.stage`` for the ONNX steps: a start line, the time it has run (redrawn on a
    terminal, a line a minute in a log) and the time it took: exports of 135M models take minutes."""
    from ..progress import stage
    return stage("onnx", msg)


def _trace(model, kind: str):
    with progress(f"tracing the {kind} graph"):
        return onnx_graph.to_onnx(model, kind)


def fp32_graph(model, kind: str, memo: Memo, key: tuple = ()):
    """A fresh copy of the fp32 graph ``kind`` of ``model`` (traced once per export call
    and ``key``: ``memo``; the memo's own model has the empty key)."""
    import onnx
    mp = onnx.ModelProto()
    mp.CopyFrom(memo.get(("graph", kind, *key), lambda: _trace(model, kind)))
    return mp


def feature_projections(model) -> list:
    """Every distinct constant matrix of ``model`` whose MatMul must stay fp32 (numpy):
    the frozen feature-map projections P (one shared by all layers after ``convert``,
    one per layer in an imported official checkpoint) and the outlier rotations
    (``outliers.RotatedLinear``: quantizing them would quantize the input they exist to
    flatten before it is flattened)."""
    found: dict[bytes, object] = {}
    for name, b in model.named_buffers():
        if name.split(".")[-1] in ("proj", "rotation", "mix"):
            for a in (b.detach().cpu().numpy(), b.detach().cpu().numpy().T.copy()):
                found.setdefault(a.tobytes() + str(a.shape).encode(), a)
    return list(found.values())


# quantizations whose kernels quantize activations (onnxruntime's int8 compute,
# ``accuracy_level=4``, in blocks of 32 along each input row): their graphs are traced
# from the outlier-treated model, rotated in those same blocks
OUTLIER_BLOCK = {"int8": 32, "int4": 32}
OUTLIERS = "smoothed + block-Hadamard rotated, every linear input, 32x32 blocks (outliers.py)"
GRID = ("projections on their source's 4-bit grid, exact, in one 4-bit matmul with the LoRA down rows and "
        "block indicators; the side's up matrix (LoRA up, block residual) and the head 8-bit (grid.py)")


def graph_model(model, out: Path, quant: str, calibration_text: str | None, memo: Memo) -> tuple:
    """``(the model the quant graphs are traced from, its memo key, what was done to it)``:
    for ``int4`` where projections are on their source's 4-bit grid, the grid split
    (``GRID``); for the quantizations of ``OUTLIER_BLOCK`` (given a calibration text) the
    outlier-treated copy (``OUTLIERS``); else ``model`` itself.  Each is the same function
    in fp32, made once per export call."""
    if quant == "int4":
        split = memo.get(("grid",), lambda: _grid_split(model))
        if split is not None:
            return split, ("grid",), GRID
    if quant not in OUTLIER_BLOCK or calibration_text is None:
        return model, (), None
    from .outliers import calibration_ids, prepare_for_int8

    def make():
        with progress(f"outlier treatment for {quant}, calibrated on {calibration_text}"):
            return prepare_for_int8(model, calibration_ids(model, out, calibration_text),
                                    block=OUTLIER_BLOCK[quant], every_input=True)
    key = ("prepared", OUTLIER_BLOCK[quant], calibration_text)
    return memo.get(key, make), key, OUTLIERS


def _grid_split(model):
    """An export copy of ``model`` with its projections on their source's 4-bit grid
    (``grid.split``; any off it, such as a new output gate, go to 8 bits), or None when
    none is on one (``int4`` is then round-to-nearest over the outlier-treated model)."""
    from .. import grid
    from ..transforms import export_copy
    copy = export_copy(model).eval()
    return copy if grid.split(copy) else None


def _four_bit(split, kind: str) -> list:
    """The 4-bit weights of the ``kind`` graph of a grid split: its ``GridLinear`` joint
    weights after the graph's own transforms (fused as ``transforms.for_onnx`` fuses)."""
    from ..grid import four_bit_weights
    from ..transforms import for_onnx
    return four_bit_weights(for_onnx(split, kind))


def file_name(kind: str, quant: str) -> str:
    return f"onnx/{FILES[kind][0]}{'' if quant == 'fp32' else '_' + quant}.onnx"


def io_spec(model, kind: str) -> tuple[dict, dict]:
    ins, outs = onnx_graph.io_names(model, kind)
    shapes = model.state_shapes(1)
    st = lambda names: [{"name": n, "dtype": "float32", "shape": ["batch", *s[1:]]} for n, s in zip(names, shapes)]
    keeps = onnx_graph.keeps_logits(kind)
    spec = {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
            "start_pos": {"dtype": "int64", "shape": [1]}}
    if keeps:
        spec["logits_to_keep"] = {"dtype": "int64", "shape": [1]}
    spec["state"] = st([n for n in ins if n.startswith("past_")])
    return spec, {"logits": {"dtype": "float32", "shape": ["batch", "kept" if keeps else 1, model.args.vocab_size]},
                  "state": st(outs[1:])}


def entry(model, out: Path, kind: str, quant: str, data: str, keep_head: bool, default: bool,
          done: str | None = None) -> M.FileEntry:
    """The manifest entry of one file; ``done``: what ``graph_model`` did to the model."""
    path = file_name(kind, quant)
    ins, outs = io_spec(model, kind)
    head = "fp32" if keep_head or quant == "fp32" else "int8" if done == GRID else quant
    extras = {"graph": kind, "weights": data, "lm_head": head,
              "int8_outliers": OUTLIERS if done == OUTLIERS else None}
    if done == GRID:
        extras["int4_grid"] = GRID
    if kind != "step":
        extras["prefill_block"] = onnx_graph.PREFILL_BLOCK
    return M.FileEntry(format="onnx", quant=quant, path=path, role=FILES[kind][1], attention=FILES[kind][2],
                       default=default, inputs=ins, outputs=outs, checksums=M.checksums(out, [path, data]),
                       extras=extras)


def reference(model, ids, text: str, memo: Memo):
    """PyTorch's side of the parity checks, computed once per export call and text."""
    from ..parity import Reference

    def make():
        with progress(f"PyTorch reference over {len(ids)} tokens of English text ({text})"):
            return Reference(model, ids)
    return memo.get(("reference", text, len(ids)), make)


def check(model, out: Path, entries: list[M.FileEntry], tokens: int, threads: int = 0,
          text: str = PARITY_TEXT, memo: Memo | None = None) -> None:
    """Run every file with onnxruntime against PyTorch on the English ``text``; figures
    into ``parity``.

    A file is measured in the runner it serves (prefill + decode file of the same
    attention, or one file for both); entries that make the same pair share one measurement.
    """
    from ..parity import measure, text_ids
    from ..runtime.onnx import OnnxRunner
    from ..tokenizer import load_tokenizer
    memo = memo_for(model, memo)
    tok = load_tokenizer(out) if (out / "tokenizer.json").exists() else None
    ids, encoding = text_ids(tok, model.args.vocab_size, tokens, text)
    ref = reference(model, ids, text, memo)
    done: dict[tuple[str, str], dict] = {}
    for e in entries:
        runner = OnnxRunner(out, e, {"files": entries}, threads, verify=False, spin=False)
        pair = (runner.prefill_entry.path, runner.decode_entry.path)
        if pair not in done:
            with progress(f"parity of {' + '.join(dict.fromkeys(pair))} vs PyTorch"):
                done[pair] = {"text": text, "encoding": encoding, "prefill_file": pair[0],
                              "decode_file": pair[1], **measure(model, runner, ids, ref=ref)}
        e.parity = done[pair]


def export(model, out_dir: str | Path, quant: str = "fp32", kinds: tuple[str, ...] = onnx_graph.KINDS,
           parity_tokens: int = PARITY_TOKENS, keep_head: bool = False, threads: int = 0,
           parity_text: str = PARITY_TEXT, calibration_text: str | None = None,
           memo: Memo | None = None) -> list[M.FileEntry]:
    """Write the ONNX files of ``quant`` into ``out_dir``; return their manifest entries.

    ``parity_tokens`` of ``parity_text`` are checked against PyTorch (0: skip);
    ``threads`` for onnxruntime there.  ``calibration_text``: the English text the
    outlier treatment of ``OUTLIER_BLOCK``'s quantizations is calibrated on (None: plain
    quantization).  ``memo``: what the other quantizations of the same export call
    already traced (``exporters.export`` passes it)."""
    onnx_files.check_quant(quant)
    bad = [k for k in kinds if k not in FILES]
    if bad or not kinds:
        raise DiJiangError(f"unknown ONNX graph kind(s) {bad or 'none'}; choose from {', '.join(FILES)}")
    memo = memo_for(model, memo)
    out = Path(out_dir)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    data = f"onnx/weights{'' if quant == 'fp32' else '_' + quant}.data"
    graphs = {}
    traced, key, done = graph_model(model, out, quant, calibration_text, memo)
    for kind in sorted(kinds, key=DEFAULT.index):
        mp = fp32_graph(traced, kind, memo, key)
        if quant != "fp32":
            with progress(f"quantizing the {kind} graph to {quant}"), onnx_files.quiet_logs():
                mp = onnx_files.quantize(mp, quant, model.args.vocab_size, keep_head,
                                         keep=feature_projections(traced),
                                         four_bit=_four_bit(traced, kind) if done == GRID else None)
        graphs[file_name(kind, quant)] = (kind, mp)
    with progress(f"writing {len(graphs)} {quant} files"):
        onnx_files.pack({n: g for n, (_, g) in graphs.items()}, out, data)
    first = min(graphs.values(), key=lambda g: DEFAULT.index(g[0]))[0]
    entries = [entry(model, out, kind, quant, data, keep_head, kind == first, done)
               for kind, _ in graphs.values()]
    if parity_tokens:
        check(model, out, entries, parity_tokens, threads, parity_text, memo)
    return entries
