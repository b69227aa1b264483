"""Progress of long steps (``dijiang_edge.progress``): plain stage lines in a log, a line
redrawn on a terminal, tqdm bars on a terminal only; a failing step prints nothing more,
so the command's error stays one line and the last one."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

import dijiang_edge
from dijiang_edge import progress as P
from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.exporters import executorch as et


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_elapsed_reads_as_a_person_reads_it():
    assert [P.elapsed(s) for s in (0.4, 41, 725, 3720)] == ["0 s", "41 s", "12 min 05 s", "1 h 02 min"]


def test_stage_in_a_log_is_plain_lines_with_the_time(monkeypatch):
    monkeypatch.setattr(P, "LOG_SECONDS", 0.05)
    log = io.StringIO()
    with P.stage("pte int8", "quantizing", stream=log):
        time.sleep(0.3)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0] == "[pte int8] quantizing ..." and lines[-1] == "[pte int8] quantizing: done in 0 s"
    assert len(lines) >= 4 and all(ln == "[pte int8] quantizing ... 0 s" for ln in lines[1:-1]), lines


def test_stage_on_a_terminal_redraws_one_line(monkeypatch):
    monkeypatch.setattr(P, "TTY_SECONDS", 0.05)
    tty = Terminal()
    with P.stage("pte fp32", "lowering to XNNPACK", stream=tty):
        time.sleep(0.3)
    out = tty.getvalue()
    assert out.count("\n") == 1 and out.endswith("\r[pte fp32] lowering to XNNPACK: done in 0 s\x1b[K\n")
    assert "\r[pte fp32] lowering to XNNPACK ... 0 s\x1b[K" in out


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
def test_a_failing_stage_prints_nothing_more(monkeypatch, stream):
    monkeypatch.setattr(P, "LOG_SECONDS", 0.05)
    monkeypatch.setattr(P, "TTY_SECONDS", 0.05)
    s = stream()
    with pytest.raises(ValueError):
        with P.stage("pte", "lowering", stream=s):
            time.sleep(0.12)
            raise ValueError("boom")
    after = s.getvalue()
    time.sleep(0.2)                                     # the heartbeat has stopped
    assert s.getvalue() == after and "done" not in after
    assert after.endswith("\n")                         # the error line starts on a line of its own


def test_bar_in_a_log_is_plain_lines_and_silent_when_short():
    log = io.StringIO()
    assert list(P.bar(range(5), 5, "eval", "perplexity", "batches", stream=log, every=1e-9)) == list(range(5))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[eval] perplexity: 1/5 batches, ") and \
        lines[-1].startswith("[eval] perplexity: 5/5 batches, done in ")
    quiet = io.StringIO()
    assert list(P.bar(range(5), 5, "eval", "perplexity", stream=quiet)) == list(range(5))
    assert quiet.getvalue() == ""


def test_bar_on_a_terminal_is_tqdm():
    pytest.importorskip("tqdm")
    tty = Terminal()
    assert list(P.bar(range(3), 3, "eval", "perplexity", "batches", stream=tty)) == [0, 1, 2]
    assert "[eval] perplexity: 100%" in tty.getvalue() and "3/3" in tty.getvalue()


def test_plain_can_be_forced_on_a_terminal(monkeypatch):
    monkeypatch.setenv("DIJIANG_PROGRESS", "plain")
    assert not P.is_tty(Terminal()) and P.tty_meter(3, "x", stream=Terminal()) is None


# -- the exporters' stages ----------------------------------------------------------

def test_lowering_says_each_half(monkeypatch, capsys):
    class Edge:
        def to_executorch(self, config):
            return "program"
    monkeypatch.setattr("executorch.exir.to_edge_transform_and_lower", lambda *a, **k: Edge())
    assert et.lower(None, {}, "pte t") == "program"
    assert capsys.readouterr().err.splitlines() == [
        "[pte t] lowering to XNNPACK ...", "[pte t] lowering to XNNPACK: done in 0 s",
        "[pte t] memory planning and serializing (to_executorch) ...",
        "[pte t] memory planning and serializing (to_executorch): done in 0 s"]


def test_quantization_stages_and_a_refusal_before_them(tiny_src, capsys):
    model = dijiang_edge.convert(str(tiny_src), chunk_size=8)
    ids = np.arange(64, dtype=np.int64) % model.args.vocab_size
    et.quantize(model, "8da8w", "8w", ids, "pte int8")
    err = capsys.readouterr().err
    for what in ("smoothing and rotating activation outliers (64 tokens)", "quantizing linears 8da8w + embedding 8w"):
        assert f"[pte int8] {what} ...\n" in err and f"[pte int8] {what}: done in " in err, err
    with pytest.raises(DiJiangError, match="groups of 32"):     # hidden size 72
        et.quantize(model, "8da4w", None, ids, "pte 8da4w")
    assert capsys.readouterr().err == ""


def test_export_in_a_log_prints_stage_lines(tiny_src, tmp_path, capsys):
    assert main(["export", str(tiny_src), "--out", str(tmp_path / "o"), "--parity-tokens", "0",
                 "--chunk-size", "8"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "[export] onnx fp32 (1 of 1) ..." in err
    assert any(ln.startswith("[export] onnx fp32 (1 of 1): done in ") for ln in err), err
    assert not any("\r" in ln for ln in err)


def test_a_failed_lowering_is_one_error_line_after_the_stage_lines(tiny_src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(et, "_export_graph", lambda wrapper, n: object())

    def fails(*a, **k):
        raise RuntimeError("no kernel for this op")
    monkeypatch.setattr("executorch.exir.to_edge_transform_and_lower", fails)
    assert main(["export", str(tiny_src), "--out", str(tmp_path / "o"), "--formats", "pte",
                 "--parity-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln for ln in err if "error" in ln] == [err[-1]], err
    assert err[-1].startswith("dijiang-export: error: lowering to ExecuTorch/XNNPACK failed") and \
        "RuntimeError: no kernel for this op" in err[-1]
    assert "[pte fp32] lowering to XNNPACK ..." in err and not any("XNNPACK: done" in ln for ln in err)
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()
