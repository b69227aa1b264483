"""A model with a local softmax window, exported: the ring of the last W keys and values
travels as explicit ONNX state (``past_window_key.{i}``) and as ``.pte`` mutable
buffers reset at ``start_pos == 0``; every file agrees with PyTorch on English text
across calls of many lengths, below and far above the window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge.bars import BARS
from dijiang_edge.exporters import export, read_manifest
from dijiang_edge.manifest import select
from dijiang_edge.parity import failures, measure, text_ids
from dijiang_edge.runtime.onnx import OnnxRunner
from conftest import tiny_real_vocab

BAR_FP32 = BARS["fp32_max_rel_err"]
W = 8
OPTIONS = {"chunk_size": 8, "window": W, "variant": "normalized", "window_mode": "shared"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(model):
    """The DiJiang part's parameters made random, so the files must carry it right."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.window_weight.copy_(torch.randn(layer.attn.window_weight.shape, generator=g))
    return model


def _windowed_folder(source, tokenizer, out: Path) -> Path:
    """``source`` converted with a window (random window weights) into a folder exports take as MODEL."""
    from dijiang_edge.tokenizer import save_tokenizer
    _randomised(dijiang_edge.convert(source, **OPTIONS)).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


@pytest.fixture(scope="module")
def windowed_src(tiny_src, tmp_path_factory):
    return _windowed_folder(str(tiny_src), tiny_src, tmp_path_factory.mktemp("conv") / "windowed")


@pytest.fixture(scope="module")
def windowed_model(windowed_src):
    return dijiang_edge.convert(str(windowed_src))


@pytest.fixture(scope="module")
def onnx_export(windowed_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "onnx"
    export(str(windowed_src), out, ["onnx"], ["fp32", "int8"], parity_tokens=256, threads=1)
    return out


def _ids(model, n):
    return text_ids(None, model.args.vocab_size, n, "shakespeare")[0]


def test_every_onnx_file_matches_pytorch(onnx_export):
    files = read_manifest(onnx_export)["files"]
    assert {f["path"] for f in files} >= {"onnx/prefill.onnx", "onnx/decode.onnx", "onnx/native.onnx"}
    for f in files:
        p = f["parity"]
        if f["quant"] == "fp32":
            assert p["max_rel_err"] <= BAR_FP32 and p["decode_max_rel_err"] <= BAR_FP32, (f["path"], p)
            assert p["greedy_identical"] == 64, (f["path"], p)
        else:
            assert failures("int8", p) == ([], ""), (f["path"], p)


def test_the_ring_is_explicit_onnx_state(onnx_export, windowed_model):
    import onnxruntime as ort
    n, a = windowed_model.args.n_layers, windowed_model.args
    s = ort.InferenceSession(str(onnx_export / "onnx" / "decode.onnx"))
    names = [i.name for i in s.get_inputs()]
    assert names[:2] == ["input_ids", "start_pos"]
    assert names[2:] == [f"past_{k}.{i}" for i in range(n) for k in ("recurrent", "window_key", "window_value")]
    ring = next(i for i in s.get_inputs() if i.name == "past_window_key.0")
    assert ring.shape[1:] == [a.n_kv_heads, W, a.head_dim]


@pytest.mark.parametrize("path", ["onnx/prefill.onnx", "onnx/native.onnx"])
def test_any_split_through_onnxruntime(onnx_export, windowed_model, path):
    m = read_manifest(onnx_export)
    r = OnnxRunner(onnx_export, next(f for f in m["files"] if f["path"] == path), m, threads=1)
    ids = _ids(windowed_model, 60)[None]
    with torch.no_grad():
        ref = windowed_model(torch.from_numpy(ids))[0].numpy()
    parts, at = [], 0
    for n in (3, 1, 1, W, 13, 1, 1, 32):            # below, at and far above the window
        parts.append(r.forward(ids[:, at:at + n]))
        at += n
    got = np.concatenate(parts, 1)
    assert np.abs(got - ref).max() <= BAR_FP32 * np.abs(ref).max()


@pytest.fixture(scope="module")
def pte_src(tmp_path_factory):
    """A converted windowed one-layer model with SmolLM2's vocabulary and tokenizer (what
    ExecuTorch's C++ tokenizer reads), random window weights."""
    return _windowed_folder(tiny_real_vocab(), "default", tmp_path_factory.mktemp("conv") / "pte-src")


@pytest.fixture(scope="module")
def pte_model(pte_src):
    return dijiang_edge.convert(str(pte_src))


@pytest.fixture(scope="module")
def pte_export(pte_src, tmp_path_factory):
    pytest.importorskip("executorch.runtime")
    out = tmp_path_factory.mktemp("exp") / "pte"
    export(str(pte_src), out, ["pte"], ["fp32"], max_seq_len=16, parity_tokens=96)
    return out


def test_pte_matches_pytorch_and_resets(pte_export, pte_model):
    from dijiang_edge.runtime.executorch import PteRunner
    entry = select(read_manifest(pte_export), "pte", "fp32")
    assert [s["name"] for s in entry["state"]][:3] == ["state_0", "window_key_0", "window_value_0"]
    ids = _ids(pte_model, 120)
    figs = measure(pte_model, PteRunner(pte_export / entry["path"], entry), ids, greedy=32)
    assert figs["max_rel_err"] <= BAR_FP32 and figs["decode_max_rel_err"] <= BAR_FP32, figs
    assert figs["greedy_identical"] == 32, figs
    fresh = PteRunner(pte_export / entry["path"], entry).forward(ids[None, :12])
    r = PteRunner(pte_export / entry["path"], entry)
    r.forward(ids[None, 12:40])          # fills the ring and the state
    r.reset()                            # start_pos 0: a fresh sequence, ring included
    np.testing.assert_array_equal(r.forward(ids[None, :12]), fresh)


def test_text_llm_runner_drives_the_windowed_pte(pte_export, pte_model):
    """ExecuTorch's stock C++ runner, reading only the .pte and tokenizer.json, past the window."""
    from dijiang_edge.runtime.executorch import llm_runner_generate
    from dijiang_edge.tokenizer import load_tokenizer
    tok = load_tokenizer(pte_export)
    prompt = "The king said to his daughter that the castle by the sea"        # longer than W tokens
    ids = tok.encode(prompt).ids
    assert len(ids) > W
    with torch.no_grad():
        logits, state = pte_model(torch.tensor([ids]))
        out = []
        for _ in range(16):
            out.append(int(logits[0, -1].argmax()))
            logits, state = pte_model(torch.tensor([[out[-1]]]), state)
    got = llm_runner_generate(pte_export / "model_fp32.pte", pte_export / "tokenizer.json", prompt, 16)
    assert got == tok.decode(out)
