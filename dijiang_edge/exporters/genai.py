"""onnxruntime-genai folders: the ONNX graph of ``onnx.py`` renamed into the layout
``onnxruntime_genai.Model(folder)`` loads and ``Generator`` runs unchanged.

onnxruntime-genai (tested: ``TESTED``) drives a decoder-only model (``model.type``
``decoder``) through ``genai_config.json`` and finds recurrent layers by their input
names (``src/models/recurrent_state.cpp``): per layer ``i`` it binds two fixed-size
state tensors, ``past_key_values.{i}.conv_state`` (rank 3) and
``past_key_values.{i}.recurrent_state`` (rank 4), to ``present.{i}.*`` outputs, every
dimension static but the batch, zeroed at the start of a sequence.  DiJiang's state fits:

* ``recurrent_state`` is the layer's DiJiang state ``[B, H, m, dv]`` as it is;
* ``conv_state`` carries the window's ring (``[B, 2 H_kv W, d]``: the W keys, then the
  W values), or one unused float (``[B, 1, 1]``) for the pure form;
* ``position_ids [B, T]`` replaces ``start_pos``: its first entry is the position
  before the call, which is all the graph needs (RoPE is computed in-graph).

The graph is the file's own (weights untouched, one ``Slice`` + ``Reshape`` in front,
a ``Reshape`` + ``Split`` / ``Concat`` per layer for the ring), saved as
``onnx/genai[_q].onnx`` beside the weights file it shares with onnx.py's graphs, which keep
their names for this project's runner and transformers.js.  So ``onnx/`` itself is the
genai folder: ``genai_config.json`` names the first quantization's graph, the tokenizer
files sit beside it.  One folder per quantization would need a second copy of the
weights: onnxruntime refuses external data outside a model's folder, genai refuses
``..`` in a file name, and onnx refuses hard-linked data.

Limits: one shared position per call, so a batch of prompts must have equal lengths
(the graph has no ``attention_mask`` to hide padding); greedy / sampling, no beams
(genai does not reorder a recurrent state between beams); no rewind but to 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from .. import manifest as M
from ..errors import DiJiangError
from ..tokenizer import FILES as TOKENIZER_FILES

TESTED = "0.18.0"                    # the onnxruntime-genai release these folders are tested with
FOLDER = "onnx"                      # the genai folder: the ONNX files' own, beside their weights
CONFIG = "genai_config.json"
PAST_CONV, PAST_REC = "past_key_values.%d.conv_state", "past_key_values.%d.recurrent_state"
PRESENT_CONV, PRESENT_REC = "present.%d.conv_state", "present.%d.recurrent_state"


# -- the graph ------------------------------------------------------------------------

def _rename(g, old: str, new: str) -> None:
    """Every use of tensor ``old`` in ``g`` (node inputs/outputs, value infos) named ``new``."""
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.name == old:
            vi.name = new


def _const(g, name: str, values: list[int]) -> str:
    g.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    return name


def _drop(items, name: str) -> None:
    """Remove the value info called ``name`` from ``items`` (graph inputs or outputs)."""
    del items[next(i for i, v in enumerate(items) if v.name == name)]


def _positions(g) -> list:
    """``start_pos [1]`` from ``position_ids [B, T]`` (its first entry): nodes to put first."""
    _drop(g.input, "start_pos")
    g.input.insert(1, helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    return [helper.make_node("Slice", ["position_ids", _const(g, "genai.zero2", [0, 0]), _const(g, "genai.one2", [1, 1])],
                             ["genai.first_position"], name="genai.first_position"),
            helper.make_node("Reshape", ["genai.first_position", _const(g, "genai.one", [1])], ["start_pos"],
                             name="genai.start_pos")]


def _ring(g, i: int, kv: int, window: int, d: int) -> tuple[list, list]:
    """Layer ``i``'s ring of keys and values as one ``conv_state`` in and out: the nodes
    that unpack it (before the graph's) and pack it (after)."""
    past, present = PAST_CONV % i, PRESENT_CONV % i
    k_in, v_in, k_out, v_out = (f"{p}_window_{s}.{i}" for p in ("past", "present") for s in ("key", "value"))
    for name in (k_in, v_in):
        _drop(g.input, name)
    for name in (k_out, v_out):
        _drop(g.output, name)
    g.input.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", 2 * kv * window, d]))
    g.output.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch", 2 * kv * window, d]))
    four, three = _const(g, f"genai.ring4.{i}", [0, 2 * kv, window, d]), _const(g, f"genai.ring3.{i}", [0, 2 * kv * window, d])
    halves = _const(g, f"genai.halves.{i}", [kv, kv])
    return ([helper.make_node("Reshape", [past, four], [f"genai.ring_in.{i}"], name=f"genai.ring_in.{i}"),
             helper.make_node("Split", [f"genai.ring_in.{i}", halves], [k_in, v_in], axis=1, name=f"genai.split.{i}")],
            [helper.make_node("Concat", [k_out, v_out], [f"genai.ring_out.{i}"], axis=1, name=f"genai.concat.{i}"),
             helper.make_node("Reshape", [f"genai.ring_out.{i}", three], [present], name=f"genai.ring_out.{i}")])


def _unused_conv(g, i: int) -> tuple[list, list]:
    """The pure form has no ring: a one-float ``conv_state`` genai binds and the graph passes on."""
    g.input.append(helper.make_tensor_value_info(PAST_CONV % i, TensorProto.FLOAT, ["batch", 1, 1]))
    g.output.append(helper.make_tensor_value_info(PRESENT_CONV % i, TensorProto.FLOAT, ["batch", 1, 1]))
    return [], [helper.make_node("Identity", [PAST_CONV % i], [PRESENT_CONV % i], name=f"genai.conv.{i}")]


def _static_shape(vi, dims: list) -> None:
    """Write ``dims`` (ints or names) as ``vi``'s shape."""
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for x in dims:
        d = shape.dim.add()
        if isinstance(x, int):
            d.dim_value = x
        else:
            d.dim_param = x


def genai_graph(mp, facts: M.ModelFacts, window: int):
    """A copy of ``mp`` (an ``onnx.py`` graph that takes ``seq >= 1``: ``native`` or
    ``block``) with genai's inputs and outputs; the weights (external data) untouched."""
    g = onnx.ModelProto()
    g.CopyFrom(mp)
    graph = g.graph
    have = {v.name for v in graph.input}
    if "start_pos" not in have or f"past_recurrent.{facts.n_layers - 1}" not in have:
        raise DiJiangError("this ONNX graph is not a dijiang-export graph with start_pos and past_recurrent.{i} "
                           "inputs; re-export the folder")
    front = _positions(graph)
    if "logits_to_keep" in have:      # genai sizes logits [B, T, V] itself and picks the rows it needs
        _drop(graph.input, "logits_to_keep")
        _const(graph, "logits_to_keep", [0])
    back = []
    for i in range(facts.n_layers):
        _rename(graph, f"past_recurrent.{i}", PAST_REC % i)
        _rename(graph, f"present_recurrent.{i}", PRESENT_REC % i)
        pre, post = _ring(graph, i, facts.n_kv_heads, window, facts.head_dim) if window else _unused_conv(graph, i)
        front, back = front + pre, back + post
    for o in graph.output:
        if o.name == "logits":
            _static_shape(o, ["batch", "seq", facts.vocab_size])
        elif o.name.startswith("present.") and o.name.endswith(".recurrent_state"):
            src = next(v for v in graph.input if v.name == "past_key_values" + o.name[len("present"):])
            o.type.CopyFrom(src.type)
    nodes = front + list(graph.node) + back
    graph.ClearField("node")
    graph.node.extend(nodes)
    return g


# -- the folder -----------------------------------------------------------------------

def context_length(model_args: Any, target: dict | None) -> int:
    """The context genai allows by default (``search.max_length``): the device profile's,
    else the source model's trained length (the state is fixed-size; RoPE past the
    trained length is extrapolation)."""
    if target and target.get("max_context"):
        return int(target["max_context"])
    return int(model_args.source_max_positions)


def special_ids(model_args: Any) -> dict[str, Any]:
    """bos / eos / pad as genai_config.json spells them (one eos as a number, several as a list)."""
    a = model_args
    eos = list(a.eos_ids) or ([a.bos_id] if a.bos_id is not None else [0])
    return {"bos_token_id": a.bos_id if a.bos_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": a.pad_id if a.pad_id is not None else eos[0]}


def genai_config(model_args: Any, graph: str, context: int, prefill_block: int | None) -> dict:
    """``genai_config.json``: the decoder's file and names, the special ids, greedy search."""
    a = model_args
    decoder = {
        "filename": graph,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": a.head_dim, "hidden_size": a.hidden_size, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "num_hidden_layers": a.n_layers,
        "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                   "past_conv_names": PAST_CONV, "past_recurrent_names": PAST_REC},
        "outputs": {"logits": "logits", "present_conv_names": PRESENT_CONV, "present_recurrent_names": PRESENT_REC},
    }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
        "early_stopping": True, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        # separate past and present buffers: genai then never binds one tensor as both
        # an input and an output of a call, whatever the graph reads after writing
        "past_present_share_buffer": False,
    }
    if prefill_block:
        search["chunk_size"] = prefill_block      # long prompts in the pieces this project's runner uses
    model = {"type": "decoder", "context_length": context, "vocab_size": a.vocab_size, **special_ids(a),
             "decoder": decoder}
    return {"model": model, "search": search}


def graph_name(quant: str) -> str:
    """``onnx/genai[_q].onnx``, beside the weights file it shares with onnx.py's graphs."""
    return f"{FOLDER}/genai{'' if quant == 'fp32' else '_' + quant}.onnx"


def source_entry(files: list[M.FileEntry], quant: str) -> M.FileEntry | None:
    """The ONNX file of ``quant`` a genai graph is made from: one graph for any ``seq``
    (genai runs prefill and decode through one session), ``native`` first."""
    pool = [f for f in files if f.format == "onnx" and f.quant == quant and f.role in ("both", "prefill")]
    pool.sort(key=lambda f: (f.role != "both", not f.default))
    return pool[0] if pool else None


def write_graph(out: Path, entry: M.FileEntry, model_args: Any) -> dict:
    """``onnx/genai[_q].onnx`` from ``entry``'s graph; its record for the manifest."""
    mp = onnx.load(str(out / entry.path), load_external_data=False)
    path = graph_name(entry.quant)
    onnx.save(genai_graph(mp, M.ModelFacts.of(model_args), model_args.window), str(out / path))
    return {"path": path, "from": entry.path, "weights": entry["weights"],
            "checksums": M.checksums(out, [path, entry["weights"]])}


def export(out: str | Path, model_args: Any, files: list[M.FileEntry], target: dict | None = None) -> dict | None:
    """Make ``out/onnx/`` an onnxruntime-genai folder: a genai graph per quantization of
    ``files`` that has a graph for any ``seq``, ``genai_config.json`` naming the first
    (``config.overlay`` picks another), the tokenizer files.  Returns the manifest's
    ``genai`` record (None: no such graph)."""
    out = Path(out)
    entries = [e for q in dict.fromkeys(f.quant for f in files if f.format == "onnx")
               if (e := source_entry(files, q)) is not None]
    if not entries:
        return None
    graphs = {e.quant: write_graph(out, e, model_args) for e in entries}
    first = entries[0]
    config = genai_config(model_args, Path(graphs[first.quant]["path"]).name, context_length(model_args, target),
                          first.get("prefill_block"))
    (out / FOLDER / CONFIG).write_text(json.dumps(config, indent=2))
    return {"folder": FOLDER, "config": f"{FOLDER}/{CONFIG}", "quant": first.quant, "graphs": graphs,
            "tokenizer": copy_tokenizer(out, out / FOLDER), "onnxruntime_genai": TESTED}


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """The tokenizer files of ``src`` into ``dst``; genai's tokenizer also needs a
    ``tokenizer_config.json``, so one naming the fast tokenizer is written where the
    source has none (its contents are read from ``tokenizer.json``)."""
    names = [n for n in TOKENIZER_FILES if (src / n).exists()]
    for n in names:
        shutil.copy2(src / n, dst / n)
    if "tokenizer.json" in names and "tokenizer_config.json" not in names:
        (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
        names.append("tokenizer_config.json")
    return [f"{dst.name}/{n}" for n in names]


def check(model, out: Path, record: dict, tokens: int, threads: int = 0, text: str = "shakespeare",
          memo=None) -> None:
    """Run each genai graph through onnxruntime-genai's ``Generator`` against PyTorch on
    the English ``text`` (``parity.measure``: the figures of every exported file); figures
    into the graph's record.  Without onnxruntime-genai installed the record says so."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        record["parity_skipped"] = f"onnxruntime-genai is not installed (pip install onnxruntime-genai=={TESTED})"
        return
    from ..parity import measure, text_ids
    from ..runtime.genai import GenaiRunner
    from ..tokenizer import load_tokenizer
    from . import memo_for
    from .onnx import progress, reference
    memo = memo_for(model, memo)
    tok = load_tokenizer(out) if (out / "tokenizer.json").exists() else None
    ids, encoding = text_ids(tok, model.args.vocab_size, tokens, text)
    ref = reference(model, ids, text, memo)
    for g in record["graphs"].values():
        with progress(f"parity of {g['path']} through onnxruntime-genai {og.__version__} vs PyTorch"):
            runner = GenaiRunner(out / FOLDER, Path(g["path"]).name, len(ids) + len(ref.greedy) + 1, threads)
            g["parity"] = {"text": text, "encoding": encoding, "runtime": f"onnxruntime-genai {og.__version__}",
                           **measure(model, runner, ids, ref=ref)}
