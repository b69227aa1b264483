"""``chat`` on exported ONNX and ``.pte`` folders, and ``generate``'s sampling flags on an
ONNX folder without torch.

The folder carries the source's chat template (copied beside tokenizer.json at export);
the state is carried between turns exactly as on the PyTorch model (tests/test_chat.py
has the checks: fed once, each prefill only its turn's tokens, each reply the greedy
continuation of one prefill of the whole rendered history); and ``--top-p``,
``--repetition-penalty`` and ``--stop`` act on this path too (``--top-p`` was once
dropped on the way to the exported-file sampler).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dijiang_edge.chat_template import load_chat_template
from dijiang_edge.decoding import RunnerLM
from dijiang_edge.exporters import export
from dijiang_edge.runtime import open_export, stream_ids
from conftest import MAX_NEW, TURNS, Counting, chat_session, check_state_carried, conversation
from test_onnx import BLOCK_TORCH

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _export(src, out, fmt):
    opts = {"max_seq_len": 16} if fmt == "pte" else {"threads": 1}    # pte: prefill in several calls
    export(str(src), out, [fmt], ["fp32"], convert_options={"chunk_size": 8}, parity_tokens=0, **opts)
    return out


@pytest.fixture(scope="module")
def chat_export(chat_src, tmp_path_factory):
    return _export(chat_src, tmp_path_factory.mktemp("chatexp") / "onnx", "onnx")


@pytest.fixture(scope="module")
def chat_pte(chat_src, tmp_path_factory):
    pytest.importorskip("executorch.runtime")
    return _export(chat_src, tmp_path_factory.mktemp("chatexp") / "pte", "pte")


def _lm(folder, fmt="onnx") -> RunnerLM:
    runner = open_export(folder, fmt, "fp32", threads=1)
    return RunnerLM(runner, runner.vocab_size)


def _torch_free(*argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv], input=stdin, capture_output=True,
                          text=True, cwd=ROOT)


def test_the_export_carries_the_template(chat_export, chat_src):
    assert load_chat_template(chat_export).source == load_chat_template(chat_src).source


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("pte", marks=pytest.mark.slow)])   # pte: a minute to lower
def test_turns_carry_the_state(fmt, request):
    folder = request.getfixturevalue("chat_export" if fmt == "onnx" else "chat_pte")
    lm = Counting(_lm(folder, fmt))
    session = chat_session(lm, folder)
    prefills = conversation(session, lm)

    def greedy(ids):                    # a fresh runner, one prefill of the whole history
        return list(stream_ids(open_export(folder, fmt, "fp32", threads=1), ids, MAX_NEW, []))
    check_state_carried(session, lm, prefills, greedy)


def test_chat_command_without_torch(chat_export):
    out = _torch_free("chat", str(chat_export), "--max-new-tokens", str(MAX_NEW), stdin="\n".join(TURNS) + "\n")
    assert out.returncode == 0, out.stderr[-2000:]
    lm = Counting(_lm(chat_export))
    session = chat_session(lm, chat_export)
    conversation(session, lm)
    assert out.stdout.splitlines() == [session.tok.decode(t.reply) for t in session.turns]
    figures = [ln for ln in out.stderr.splitlines() if ln.startswith("[")]
    assert [f"prefill {len(t.fed)} tokens" in f and "onnx fp32" in f for t, f in zip(session.turns, figures)] \
        == [True] * len(TURNS)


def _generate(folder, *flags) -> list[str]:
    out = _torch_free("generate", str(folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "16", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[3:]


def test_sampling_flags_act_on_the_export(chat_export):
    greedy = _generate(chat_export)
    hot = ("--temperature", "100", "--seed", "3")
    assert _generate(chat_export, *hot) != greedy
    assert _generate(chat_export, *hot, "--top-p", "1e-9") == greedy
    assert len(set(greedy)) < len(greedy)                   # a repeat, which the penalty must remove
    pen = _generate(chat_export, "--repetition-penalty", "1e6")
    assert len(set(pen)) == len(pen) and not set(pen) & {"w5", "w6", "w7"}
    assert _generate(chat_export, "--repetition-penalty", "1e6", "--stop", f" {pen[5]} ") == pen[:5]
