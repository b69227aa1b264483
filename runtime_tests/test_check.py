"""``dijiang-export check``: a folder exported for a target is checked file by file
against PyTorch and printed as a pass/fail table; a damaged or swapped file fails,
bad input (no manifest, no reference model, no files for the target) is exit 2.

One tiny model exported once through ``export --target`` (ONNX + a small .pte);
the native tiers are exercised through a stand-in of ``runtime.native`` built on
the Python runtime (the real one skips here when its tools are missing).
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dijiang_edge.check import BARS, Row, judge
from dijiang_edge.cli import main
from dijiang_edge.exporters import read_manifest
from dijiang_edge.manifest import sha256, write
from conftest import tiny_hf, word_tokenizer

BOARD = """description = "a test board: both formats, fp32, small calls"
arch = "x86_64"
formats = ["onnx", "pte"]
quant = ["fp32"]
threads = 1
max_context = 4096
max_seq_len = 16
"""




@pytest.fixture(scope="module")
def folder(tiny_src, tmp_path_factory):
    """``export --target board.toml``: the profile picks formats, quant and context limit."""
    pytest.importorskip("executorch.runtime")
    d = tmp_path_factory.mktemp("exp")
    (d / "board.toml").write_text(BOARD)
    assert main(["export", str(tiny_src), "--out", str(d / "tiny"), "--target", str(d / "board.toml"),
                 "--chunk-size", "8", "--parity-tokens", "64"]) == 0
    return d / "tiny"


def _check(capsys, *argv):
    code = main(["check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(("onnx/", "model_"))]


def test_export_target_writes_what_the_profile_asks(folder):
    m = read_manifest(folder)
    assert m["target"]["name"] == "board" and m["target"]["arch"] == "x86_64"
    assert m["target"]["max_context"] == 4096 and m["exported_from"]
    assert {(f["format"], f["quant"]) for f in m["files"]} == {("onnx", "fp32"), ("pte", "fp32")}
    pte = next(f for f in m["files"] if f["format"] == "pte")
    assert (pte["max_context_len"], pte["max_seq_len"]) == (4096, 16)


def test_check_passes_and_prints_the_table(folder, capsys):
    code, out, err = _check(capsys, folder, "--tokens", "200")
    assert code == 0, out + err
    assert "file" in out and "max rel err" in out and "greedy" in out, out
    rows = _rows(out)
    python = [r for r in rows if "python" in r]
    assert {r[0] for r in python} == {"onnx/native.onnx", "onnx/prefill.onnx+decode.onnx", "model_fp32.pte"}, out
    assert all("PASS" in r and "32/32" in r for r in python), out
    assert not any("FAIL" in r for r in rows), out
    assert "0 failed" in out


def test_target_selects_files_and_tiers(folder, capsys):
    code, out, _ = _check(capsys, folder, "--target", "x86-laptop", "--tokens", "100")
    assert code == 0 and {r[1] for r in _rows(out)} == {"onnx"}, out
    code, _, err = _check(capsys, folder, "--target", "android-arm64")      # int8 only: none here
    assert code == 2 and "no files for target android-arm64" in err and "onnx/fp32" in err, err
    code, out, _ = _check(capsys, folder, "--files", "onnx/native*,*.pte", "--tokens", "100")
    assert code == 0 and {r[0] for r in _rows(out)} == {"onnx/native.onnx", "model_fp32.pte"}, out
    code, _, err = _check(capsys, folder, "--files", "*.tflite")
    assert code == 2 and "--files" in err and "onnx/native.onnx" in err, err


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def test_modified_weights_fail(folder, tmp_path, capsys):
    d = _copy(folder, tmp_path / "d")
    w = d / "onnx" / "weights.data"
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 0xFF
    w.write_bytes(bytes(b))
    code, out, _ = _check(capsys, d, "--target", "x86-laptop", "--tokens", "100")
    assert code == 1, out
    bad = [r for r in _rows(out) if "FAIL" in r]
    assert bad and "modified" in out, out


def test_another_models_files_swapped_in_fail_on_the_numbers(folder, tmp_path, capsys):
    """Files of a different model with their checksums rehashed: only the figures can tell."""
    from dijiang_edge.exporters import export
    other = tmp_path / "other_src"
    tiny_hf("smollm2", seed=1).save_pretrained(other)
    word_tokenizer(other)
    export(str(other), tmp_path / "other", ["onnx"], ["fp32"], convert_options={"chunk_size": 8},
           parity_tokens=0)
    d = _copy(folder, tmp_path / "d")
    shutil.rmtree(d / "onnx")
    shutil.copytree(tmp_path / "other" / "onnx", d / "onnx")
    m = read_manifest(d)
    for f in m["files"]:
        f.checksums = {p: {"bytes": (d / p).stat().st_size, "sha256": sha256(d / p)} for p in f["checksums"]}
    write(d, m)
    code, out, _ = _check(capsys, d, "--target", "x86-laptop", "--tokens", "100")
    assert code == 1, out
    rows = _rows(out)
    assert rows and all("FAIL" in r for r in rows), out
    assert "rel err" in out and "--model" in out, out


def test_folder_without_manifest_is_exit_2(tmp_path, capsys):
    code, _, err = _check(capsys, tmp_path)
    assert code == 2 and err.startswith("dijiang-export: error:") and "manifest.json" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_reference_model_is_exit_2(folder, tmp_path, capsys):
    d = _copy(folder, tmp_path / "d")
    m = read_manifest(d)
    m.exported_from = str(tmp_path / "gone")
    write(d, m)
    code, _, err = _check(capsys, d)
    assert code == 2 and "reference model" in err and "--model" in err, err


# -- the bars ---------------------------------------------------------------------------

def _judge(quant, floor=None, **fig):
    r = Row("f", "onnx", quant, "x86-python", {"greedy_identical": 32, "greedy_tokens": 32, **fig})
    judge(r, floor)
    return r


def test_bars():
    bar = BARS["fp32_max_rel_err"]
    assert _judge("fp32", max_rel_err=bar / 2).verdict == "PASS"
    assert _judge("fp32", max_rel_err=bar * 2).verdict == "FAIL"
    assert _judge("fp32", max_rel_err=bar / 2, greedy_identical=31).verdict == "FAIL"
    # an ill-conditioned model: the prefill bar is PyTorch's own fp32-vs-fp64 error, said on the row
    r = _judge("fp32", floor=1e-3, max_rel_err=8e-4, decode_max_rel_err=4e-5)
    assert r.verdict == "PASS" and "fp64" in r.note
    assert _judge("fp32", floor=1e-3, max_rel_err=2e-3, decode_max_rel_err=4e-5).verdict == "FAIL"
    assert _judge("fp32", floor=1e-3, max_rel_err=4e-5, decode_max_rel_err=8e-4).verdict == "FAIL"
    top1, ppl = BARS["int8_top1_agreement"], BARS["int8_ppl_change"]
    assert _judge("int8", top1_agreement=top1 + 0.01, ppl_change=ppl / 2).verdict == "PASS"
    assert _judge("int8", top1_agreement=top1 - 0.01, ppl_change=ppl / 2).verdict == "FAIL"
    assert _judge("int8", top1_agreement=0.99, ppl_change=ppl + 0.01).verdict == "FAIL"
    assert _judge("int8", top1_agreement=0.99, ppl_change=-ppl - 0.01).verdict == "FAIL"


# -- the native tiers, through a stand-in of runtime.native --------------------------------

def _fake_native(monkeypatch, scale: float = 1.0, calls: list | None = None):
    """``runtime.native``'s contract served by the Python runtime (``scale`` != 1 damages
    the decode logits; ``calls`` collects the files run); emulated aarch64 reports its
    tools missing."""
    from dijiang_edge.runtime.executorch import PteRunner

    def run_pte(pte, prompt_ids, new_tokens, arch="x86_64", logits_steps=(), threads=1, prefill_logits=False):
        if calls is not None:
            calls.append(Path(pte))
        r = PteRunner(Path(pte))
        pre = r.forward(np.array([prompt_ids], np.int64))[0]
        logits, lg, tokens = {0: pre if prefill_logits else pre[-1]}, pre[-1], []
        for s in range(new_tokens):
            if s:
                logits[s] = lg * scale
            tokens.append(int(lg.argmax()))
            lg = r.forward(np.array([[tokens[-1]]], np.int64))[0, -1]
        return types.SimpleNamespace(tokens=tokens, logits={k: v for k, v in logits.items() if k in logits_steps},
                                     prefill_ms=0.0, decode_ms=[])

    mod = types.SimpleNamespace(ARCHES=("x86_64", "aarch64"), run_pte=run_pte,
                                missing_tools=lambda arch: None if arch == "x86_64" else "no qemu here (test)")
    import dijiang_edge.runtime as rt
    monkeypatch.setitem(sys.modules, "dijiang_edge.runtime.native", mod)
    monkeypatch.setattr(rt, "native", mod, raising=False)


def test_native_tiers_compare_with_pytorch(folder, tmp_path, capsys, monkeypatch):
    _fake_native(monkeypatch)
    code, out, _ = _check(capsys, folder, "--tokens", "100")
    assert code == 0, out
    native = [r for r in _rows(out) if "native" in r]
    assert [r[0] for r in native] == ["model_fp32.pte"] and "PASS" in native[0] and "32/32" in native[0], out
    arm = tmp_path / "arm.toml"                 # the same files for an aarch64 board: emulated tiers
    arm.write_text(BOARD.replace('"x86_64"', '"aarch64"'))
    code, out, _ = _check(capsys, folder, "--target", arm, "--tokens", "100")
    emulated = [r for r in _rows(out) if "emulated" in r]
    assert code == 0 and len(emulated) == 3 and all("SKIP" in r for r in emulated), out
    assert "no qemu here (test)" in out and not any("native" in r for r in _rows(out)), out


def test_native_tier_with_wrong_logits_fails(folder, capsys, monkeypatch):
    _fake_native(monkeypatch, scale=1.001)
    code, out, _ = _check(capsys, folder, "--tokens", "100")
    assert code == 1, out
    native = [r for r in _rows(out) if "native" in r]
    assert "FAIL" in native[0] and "decode rel err" in out, out


def test_native_tier_never_runs_a_pte_whose_checksum_fails(folder, tmp_path, capsys, monkeypatch):
    """The C++ runner reads no manifest: ``check`` verifies the file first, and a modified
    ``.pte`` is a FAIL row on every tier (one clear note), never handed to the runner."""
    calls: list = []
    _fake_native(monkeypatch, calls=calls)
    d = _copy(folder, tmp_path / "d")
    pte = d / "model_fp32.pte"
    b = bytearray(pte.read_bytes())
    b[len(b) // 2] ^= 0xFF
    pte.write_bytes(bytes(b))
    arm = tmp_path / "arm.toml"                 # aarch64: the stand-in has no emulator, yet the row FAILs
    arm.write_text(BOARD.replace('"x86_64"', '"aarch64"'))
    for target, tiers in (([], [["x86", "python"], ["x86", "native"]]),
                          (["--target", arm], [["x86", "python"], ["aarch64", "emulated"]])):
        code, out, _ = _check(capsys, d, "--files", "*.pte", "--tokens", "100", *target)
        assert code == 1, out
        rows = _rows(out)
        assert [r[3:5] for r in rows] == tiers, out
        assert all("FAIL" in r and "sha256" in " ".join(r) for r in rows), out
    assert calls == [], calls


@pytest.mark.slow
def test_check_on_emulated_arm64(folder, tmp_path, capsys):
    """The real aarch64 tier: the .pte through the cross-built C++ runner and the ONNX files
    through onnxruntime's aarch64 wheel, both under qemu (minutes on 2 cores)."""
    from dijiang_edge.runtime import native
    why = native.missing_tools("aarch64")
    if why:
        pytest.skip(f"ARM64 emulation tools missing: {why}")
    arm = tmp_path / "arm.toml"
    arm.write_text(BOARD.replace('"x86_64"', '"aarch64"'))
    code, out, _ = _check(capsys, folder, "--target", arm, "--tokens", "100")
    emulated = [r for r in _rows(out) if "emulated" in r]
    assert code == 0 and len(emulated) == 3 and all("PASS" in r and "32/32" in r for r in emulated), out
