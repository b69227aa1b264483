"""The peers of the softmax baseline (``export-baseline --formats genai,gguf``) on tiny
models: onnxruntime-genai's builder and llama.cpp's tools make files of the same weights
whose runners give the Hugging Face model's logits, and ``bench`` times them beside the
DiJiang files or, where llama-cpp-python is missing, says so in a row.  Timings are
reported by ``bench``, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import rel_err, saved_tiny, tiny_hf, word_tokenizer
from dijiang_edge import manifest as M
from dijiang_edge.cli import main
from dijiang_edge.exporters import MADE_BY, export, read_manifest
from dijiang_edge.exporters.baseline import SCRATCH, export_baseline, hf_logits
from dijiang_edge.runtime import open_export

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = ["--lengths", "16,40", "--threads", "1", "--tokens", "3", "--bandwidth-mib", "64"]


def _prefill_then_decode(runner, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids``: one prefill call of ``prefill`` tokens, then one call per token."""
    runner.reset()
    got = [runner.forward(ids[:, :prefill].numpy())]
    got += [runner.forward(ids[:, i:i + 1].numpy()) for i in range(prefill, ids.shape[1])]
    return torch.from_numpy(np.concatenate(got, 1))


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    """A tiny Llama folder (head size 16: onnxruntime's GroupQueryAttention wants multiples of 16)."""
    return saved_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def genai_dir(llama_src, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path_factory.mktemp("peers") / "genai"
    export_baseline(str(llama_src), out, ["genai"], ["fp32", "int4"], parity_tokens=12, threads=1)
    return out


@pytest.mark.slow      # the builder: a child process that imports torch and onnxruntime-genai, ~30 s each
def test_genai_builder_peer_equals_hf(llama_src, genai_dir):
    """The builder's model of the same weights, run by onnxruntime-genai, against HF's logits:
    fp32 to float rounding, int4 (MatMulNBits, 4 bits) close; the folder is the tool's
    (marker, manifest, no scratch left)."""
    m = read_manifest(genai_dir)
    assert (genai_dir / MADE_BY).is_file() and not (genai_dir / SCRATCH).exists()
    files = {f["quant"]: f for f in m["files"]}
    assert set(files) == {"fp32", "int4"} and {f["format"] for f in files.values()} == {"genai"}
    assert all(f["attention"] == "softmax" and f["runtime"] == "onnxruntime-genai" for f in files.values())
    assert files["fp32"]["parity"]["max_rel_err"] < 1e-4
    cfg = json.loads((genai_dir / "genai" / "int4" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model.onnx" and cfg["model"]["context_length"] >= 16384
    import onnx
    g = onnx.load(str(genai_dir / "genai" / "int4" / "model.onnx"), load_external_data=False)
    bits = {a.i for n in g.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4} and any(n.op_type == "GroupQueryAttention" for n in g.graph.node)
    hf = tiny_hf("llama")
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, ids)
    fp32 = _prefill_then_decode(open_export(genai_dir, "genai", "fp32", threads=1), ids, 17)
    assert rel_err(fp32, ref) < 1e-4
    q4 = _prefill_then_decode(open_export(genai_dir, "genai", "int4", threads=1), ids, 17)
    assert rel_err(q4, ref) < 0.3 and (q4.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    r = open_export(genai_dir, "genai", "fp32", threads=1)
    last = r.forward(ids[:, :17].numpy(), keep=1)
    assert last.shape == (1, 1, 97) and r.pos == 17
    assert rel_err(torch.from_numpy(last[0, 0]), ref[0, 16]) < 1e-4


@pytest.fixture(scope="module")
def dj_and_baseline(tmp_path_factory):
    """A tiny DiJiang export and its ONNX softmax baseline, both fp32 (the bench needs a pair)."""
    root = tmp_path_factory.mktemp("bench")
    src = root / "src"
    tiny_hf("llama").save_pretrained(src)
    word_tokenizer(src)
    dj = root / "dj"
    export(str(src), dj, ["onnx"], ["fp32"], convert_options={"chunk_size": 8}, parity_tokens=0, threads=1,
           kinds=("native",))
    base = root / "softmax"
    export_baseline(str(src), base, ["onnx"], ["fp32"], parity_tokens=0, threads=1)
    return src, dj, base


def _with_gguf_entry(base, out):
    """``base`` copied with a Q4_0 GGUF entry added (a placeholder file: it is never run)."""
    shutil.copytree(base, out)
    (out / "gguf").mkdir()
    (out / "gguf" / "model-Q4_0.gguf").write_bytes(b"GGUF" + bytes(60))
    man = M.read(out)
    entry = M.FileEntry(format="gguf", quant="fp32", path="gguf/model-Q4_0.gguf", role="both", attention="softmax",
                        default=True, checksums=M.checksums(out, ["gguf/model-Q4_0.gguf"]),
                        extras={"graph": "llama.cpp Q4_0", "gguf_type": "Q4_0"})
    man.files.append(entry)
    M.write(out, man)
    return out


def test_bench_says_why_llama_cpp_is_missing(dj_and_baseline, tmp_path, monkeypatch, capfd):
    """Without llama-cpp-python the llama.cpp file is a row with the reason, the other
    files are measured as ever and the command succeeds."""
    import dijiang_edge.runtime.llama as llama
    reason = "llama-cpp-python is not installed (optional; `pip install llama-cpp-python==0.3.36` ...)"
    monkeypatch.setattr(llama, "available", lambda: reason)
    _, dj, base = dj_and_baseline
    peers = _with_gguf_entry(base, tmp_path / "with-gguf")
    out = tmp_path / "report"
    assert main(["bench", str(dj), "--baseline", str(peers), "--out", str(out), *LENGTHS]) == 0
    data = json.loads((out / "bench.json").read_text())
    runs = {r["format"]: r for r in data["runs"]}
    assert runs["gguf"]["missing"] == reason and runs["gguf"]["points"] == [] and runs["gguf"]["peer"]
    assert runs["gguf"]["floor_ms"] is None
    assert [p["context"] for p in runs["onnx"]["points"]] == [16, 40]
    md = (out / "report.md").read_text()
    assert f"llama.cpp Q4_0: not measured, {reason}" in md
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "not measured" in captured.err


def test_peer_options_refused_clearly(dj_and_baseline, tmp_path, capsys):
    src, _, _ = dj_and_baseline
    cases = [
        (["export-baseline", str(src), "--out", str(tmp_path / "a"), "--formats", "gguf", "--quant", "q5"],
         "unknown gguf quantization 'q5'"),
        (["export-baseline", str(src), "--out", str(tmp_path / "b"), "--formats", "genai", "--quant", "int2"],
         "unknown onnxruntime-genai precision 'int2'"),
        (["export-baseline", str(src), "--out", str(tmp_path / "c"), "--formats", "gguf", "--quant", "int8",
          "--llama-cpp", str(tmp_path / "no-llama.cpp")], "convert_hf_to_gguf.py, not found"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not any(p.name.startswith((".a", ".b", ".c", "a", "b", "c")) for p in tmp_path.iterdir())


def _llama_tools():
    """(the converter's llama.cpp tree, the default model's tokenizer folder), or a skip."""
    from dijiang_edge.default_model import cache_root
    from dijiang_edge.exporters.baseline_gguf import CONVERTER, default_tree
    from dijiang_edge.runtime.llama import available
    why = available()
    if why:
        pytest.skip(why)
    tree = os.environ.get("DIJIANG_LLAMA_CPP") or str(default_tree())
    if not (os.path.isfile(os.path.join(tree, CONVERTER))):
        pytest.skip(f"no llama.cpp {CONVERTER} in {tree} (scripts/setup_llama_cpp.sh, or set DIJIANG_LLAMA_CPP)")
    tok = cache_root() / "smollm2-135m-instruct-f32"
    if not (tok / "tokenizer.json").exists():
        pytest.skip("the converter wants a tokenizer it knows: the default model's, not made yet "
                    "(run any command on `default` once)")
    return tree, tok


@pytest.mark.slow      # llama.cpp's converter on a 49k-token vocabulary and a child process per file
def test_gguf_peer_equals_hf_and_is_benched(dj_and_baseline, tmp_path):
    """llama.cpp's F32 and Q4_0 files of a tiny Llama with SmolLM2's tokenizer against HF's
    logits, then a bench row of each, measured."""
    tree, tok = _llama_tools()
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    hf = T.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tok / name, src / name)
    base = tmp_path / "gguf"
    m = export_baseline(str(src), base, ["onnx", "gguf"], ["fp32", "int4"], parity_tokens=12, threads=1,
                        llama_cpp_dir=tree)
    kinds = {f["path"] for f in m["files"] if f["format"] == "gguf"}
    assert kinds == {"gguf/model-F32.gguf", "gguf/model-Q4_0.gguf"} and not (base / SCRATCH).exists()
    ids = torch.randint(3, 49152, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = hf_logits(hf, ids)
    f32 = _prefill_then_decode(open_export(base, "gguf", "fp32", threads=1), ids, 13)
    assert rel_err(f32, ref) < 1e-3
    q4 = _prefill_then_decode(open_export(base, "gguf", "int4", threads=1), ids, 13)
    assert rel_err(q4, ref) < 0.3
    out = tmp_path / "report"
    dj = tmp_path / "dj"
    export(str(src), dj, ["onnx"], ["fp32", "int4"], convert_options={"chunk_size": 8}, parity_tokens=0,
           threads=1, kinds=("native",))
    assert main(["bench", str(dj), "--baseline", str(base), "--out", str(out), *LENGTHS]) == 0
    runs = [r for r in json.loads((out / "bench.json").read_text())["runs"] if r["format"] == "gguf"]
    assert len(runs) == 2 and all(not r.get("missing") and len(r["points"]) == 2 for r in runs)
    assert all(0 < r["weights_read"]["bytes"] <= r["file_bytes"] for r in runs)
    assert "llama.cpp Q4_0" in (out / "report.md").read_text()
