"""The onnxruntime-genai folder an ONNX export writes (``exporters/genai.py``): loaded by
``onnxruntime_genai.Model`` and run by its ``Generator`` unchanged, it produces PyTorch's
greedy tokens, for the pure form and for the window (whose ring travels as genai's
``conv_state``), through genai's chunked prefill too; the int8 graph (picked with genai's
``Config.overlay``) gives the same tokens as this project's runner on the same weights;
this project's runner keeps working on the files beside it."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge import manifest as M
from dijiang_edge.bars import BARS
from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.exporters import export, genai
from dijiang_edge.runtime import open_export
from conftest import tiny_hf, word_tokenizer

og = pytest.importorskip("onnxruntime_genai", reason=f"onnxruntime-genai is not installed "
                         f"(`pip install onnxruntime-genai=={genai.TESTED}`; CI installs it)")

pytestmark = pytest.mark.usefixtures("one_thread")

W = 8
FORMS = {"pure": {"chunk_size": 8},
         "window": {"chunk_size": 8, "window": W, "variant": "normalized", "window_mode": "shared"}}
PROMPT = [5, 17, 33, 42, 9, 61, 70, 12, 3, 44, 45, 46, 7, 8, 11, 90, 91, 13, 14, 15]   # > W tokens
NEW = 16


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    """A tiny untied-head Llama (SmolLM2's tied miniature repeats its last token greedily,
    which would let a wrong state pass unseen) with a word-level tokenizer."""
    src = tmp_path_factory.mktemp("src") / "llama"
    tiny_hf("llama").save_pretrained(src)
    word_tokenizer(src)
    return src


@pytest.fixture(scope="module", params=list(FORMS))
def exported(request, llama_src, tmp_path_factory):
    """(form, export folder, PyTorch model, what the command printed): fp32 + int8, the
    parity checks run at export; the window form through the command line."""
    form, out = request.param, tmp_path_factory.mktemp("exp") / request.param
    printed = io.StringIO()
    if form == "window":
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in FORMS[form].items()]
        with contextlib.redirect_stdout(printed):
            assert main(["export", str(llama_src), "--out", str(out), "--formats", "onnx", "--quant", "fp32,int8",
                         "--parity-tokens", "96", *flags]) == 0
    else:
        export(str(llama_src), out, ["onnx"], ["fp32", "int8"], convert_options=FORMS[form],
               parity_tokens=96, threads=1)
    return form, out, dijiang_edge.convert(str(llama_src), **FORMS[form]).eval(), printed.getvalue()


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids, _ = dijiang_edge.generate(model, torch.tensor([prompt]), max_new_tokens=n)
    return ids[0, len(prompt):].tolist()


def genai_greedy(folder: Path, prompt: list[int], n: int, graph: str | None = None,
                 chunk: int | None = None) -> list[int]:
    """The plain onnxruntime-genai loop a user writes (README), greedy by the folder's config."""
    config = og.Config(str(folder))
    if graph:
        config.overlay(json.dumps({"model": {"decoder": {"filename": graph}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n)
    if chunk:
        params.set_search_options(chunk_size=chunk)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("chunk", [None, 6], ids=["one-call-prefill", "chunked-prefill"])
def test_generator_gives_pytorch_greedy_tokens(exported, chunk):
    form, out, model, _ = exported
    want = torch_greedy(model, PROMPT, NEW)
    assert len(want) == NEW and len(set(want)) > NEW // 2, want     # a continuation that can tell states apart
    assert genai_greedy(out / "onnx", PROMPT, NEW, chunk=chunk) == want


def test_int8_graph_matches_project_runner(exported):
    """Same weights, same graph: genai and this project's runner pick the same tokens."""
    form, out, model, _ = exported
    runner = open_export(out, "onnx", "int8", threads=1)
    lg = runner.forward(np.array([PROMPT]))[0, -1]
    mine = []
    for _ in range(NEW):
        mine.append(int(lg.argmax()))
        lg = runner.forward(np.array([[mine[-1]]]))[0, -1]
    assert genai_greedy(out / "onnx", PROMPT, NEW, graph="genai_int8.onnx") == mine


def test_export_time_parity_of_genai_graphs(exported):
    """The figures ``export`` measured through genai: fp32 at the bar, and equal to the
    figures of the ONNX file each genai graph was made from (one graph, two names)."""
    form, out, model, _ = exported
    m = M.read(out)
    graphs = m["genai"]["graphs"]
    assert set(graphs) == {"fp32", "int8"}
    fp32 = graphs["fp32"]["parity"]
    assert fp32["max_rel_err"] <= BARS["fp32_max_rel_err"] and fp32["decode_max_rel_err"] <= BARS["fp32_max_rel_err"]
    assert fp32["greedy_identical"] == fp32["greedy_tokens"] == 64
    for q, g in graphs.items():
        src = next(f for f in m["files"] if f["path"] == g["from"])
        assert src["attention"] == "native" and src["quant"] == q
        assert g["parity"]["top1_agreement"] == src["parity"]["top1_agreement"]
        assert g["parity"]["greedy_identical"] == src["parity"]["greedy_identical"]


def test_folder_layout_and_config(exported):
    form, out, model, _ = exported
    m = M.read(out)
    rec = m["genai"]
    folder = out / rec["folder"]
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder"
    assert config["model"]["decoder"]["filename"] == "genai.onnx"          # the first quantization's
    assert config["model"]["eos_token_id"] == model.args.eos_ids[0]
    assert config["model"]["context_length"] == model.args.source_max_positions
    for g in rec["graphs"].values():
        for rel, want in g["checksums"].items():
            M.verify_file(out / rel, want)
        assert Path(g["weights"]).parent == Path(g["path"]).parent         # shares the ONNX files' weights
    for rel in rec["tokenizer"]:
        assert (out / rel).is_file()
    assert (folder / "tokenizer_config.json").is_file()                     # written: the source has none
    import onnx
    g = onnx.load(str(folder / "genai.onnx"), load_external_data=False).graph
    ins = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}
    a = model.args
    assert ins["position_ids"] == ["batch", "seq"] and "start_pos" not in ins
    assert ins["past_key_values.1.recurrent_state"] == ["batch", *model.state_shape(1)[1:]]
    ring = [2 * a.n_kv_heads * W, a.head_dim] if form == "window" else [1, 1]
    assert ins["past_key_values.1.conv_state"] == ["batch", *ring]
    assert {o.name for o in g.output} == {"logits"} | {f"present.{i}.{k}" for i in range(a.n_layers)
                                                       for k in ("conv_state", "recurrent_state")}


def test_command_line_names_the_folder(exported):
    form, out, model, printed = exported
    if form != "window":
        pytest.skip("the pure form is exported through the Python API")
    assert f"onnxruntime-genai folder: {out}/onnx (genai_config.json runs fp32)" in printed
    assert "onnx/genai_int8.onnx" in printed


def test_project_runner_keeps_its_names(exported):
    """onnx.py's files are untouched: the runner's default file still takes ``start_pos``
    and ``past_recurrent.{i}`` and matches PyTorch."""
    form, out, model, _ = exported
    runner = open_export(out, "onnx", "fp32", threads=1)
    assert runner.entry["path"] == "onnx/native.onnx"
    got = runner.forward(np.array([PROMPT]))
    with torch.no_grad():
        want = model(torch.tensor([PROMPT]))[0].numpy()
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= BARS["fp32_max_rel_err"]


def test_check_without_genai_says_so(exported, monkeypatch):
    form, out, model, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)        # import fails as when not installed
    record = {"graphs": {}}
    genai.check(model, out, record, tokens=64)
    assert "not installed" in record["parity_skipped"]


def test_not_a_dijiang_graph_is_refused(exported):
    from onnx import helper, TensorProto
    form, out, model, _ = exported
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    other = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    with pytest.raises(DiJiangError, match="not a dijiang-export graph"):
        genai.genai_graph(other, M.ModelFacts.of(model.args), model.args.window)
