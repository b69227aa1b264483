"""A command whose optional library is missing stops before any work with one line that
names the pip extra (``dijiang_edge.extras``); the real torch-free install is
``runtime_tests/test_runtime_install.py``."""

from __future__ import annotations

import importlib.util

import pytest

from dijiang_edge import extras
from dijiang_edge.cli import main


@pytest.fixture
def without(monkeypatch):
    """Make ``find_spec`` report the given top-level modules as not installed."""
    def hide(*names: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))
    return hide


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, hidden, extra", [
    (["convert", "SRC", "--out", "OUT"], ("torch",), "torch"),
    (["generate", "SRC", "--prompt", "hi"], ("transformers",), "torch"),
    (["chat", "SRC"], ("torch",), "torch"),
    (["export", "SRC", "--out", "OUT", "--formats", "pte"], ("executorch",), "executorch"),
    (["export", "SRC", "--out", "OUT", "--formats", "onnx"], ("onnxscript",), "onnx"),
    (["adapt", "SRC", "--data", "general", "--out", "OUT"], ("matplotlib",), "bench"),
    (["evaluate", "SRC", "--text", "heldout-a"], ("safetensors",), "torch"),
])
def test_missing_library_is_one_line_before_any_work(tiny_src, tmp_path, capsys, without, argv, hidden, extra):
    without(*hidden)
    argv = [str(tiny_src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert f"needs {hidden[0]}" in line and f"pip install 'dijiang-edge[{extra}]'" in line, line
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bench_asks_for_the_torch_free_extra(tmp_path, capsys, without, monkeypatch):
    """Timing an ONNX folder needs onnx (it counts the bytes a decode step reads), from ``[bench]``."""
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    monkeypatch.setattr("dijiang_edge.manifest.read", lambda d: {"files": [{"format": "onnx"}]})
    without("onnx")
    assert extras.command_needs(type("A", (), {"cmd": "bench", "attention_forms": False, "native": None,
                                               "report": None, "folders": [str(folder)], "baseline": None,
                                               "formats": None})()) == ("onnxruntime", "onnx", "matplotlib")
    assert main(["bench", str(folder), "--no-baseline", "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'dijiang-edge[bench]'" in _one_line(capsys)


def test_generate_from_an_export_folder_needs_no_torch_up_front(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    a = type("A", (), {"cmd": "generate", "model": str(folder)})()
    assert extras.command_needs(a) == ()


def test_an_optional_import_missed_up_front_is_still_one_line(monkeypatch, tiny_src, tmp_path, capsys):
    def fails(a):
        raise ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript")
    import dijiang_edge.cli as cli
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_fn(parser(), "convert", fails))
    assert main(["convert", str(tiny_src), "--out", str(tmp_path / "o")]) == 2
    assert _one_line(capsys) == ("dijiang-export: error: onnxscript is not installed; install with "
                                 "`pip install 'dijiang-edge[onnx]'`")


def test_any_other_missing_module_is_a_bug_and_keeps_its_traceback():
    assert extras.import_error_line(ModuleNotFoundError("x", name="dijiang_edge.nope")) is None
    assert extras.import_error_line(ModuleNotFoundError("x", name="torch._C")) is not None


def _with_fn(parser, cmd: str, fn):
    """``parser`` with subcommand ``cmd`` calling ``fn``."""
    sub = next(a for a in parser._actions if a.dest == "cmd")
    sub.choices[cmd].set_defaults(fn=fn)
    return parser
