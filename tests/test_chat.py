"""``chat``: the chat template, and the state kept between turns on the PyTorch model.

The central claim: after any number of turns the state holds exactly the rendered
conversation, fed once. So a turn's reply equals what a fresh model gives after one
prefill of the whole rendered history, and each turn's prefill is that turn's tokens
only (counted). The ONNX folder: runtime_tests/test_chat_exports.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import dijiang_edge
from dijiang_edge.chat_template import load_chat_template
from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.generation import TorchLM
from dijiang_edge.sampling import Sampling
from dijiang_edge.tokenizer import load_tokenizer
from conftest import MAX_NEW, TURNS, Counting, chat_session, check_state_carried, conversation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_model(chat_src):
    return dijiang_edge.convert(str(chat_src), chunk_size=8)


def torch_greedy(model):
    def run(ids: list[int]) -> list[int]:
        out, _ = dijiang_edge.generate(model, torch.tensor([ids]), MAX_NEW, eos_ids=[])
        return out[0, len(ids):].tolist()
    return run


def test_pytorch_turns_carry_the_state(chat_model, chat_src):
    lm = Counting(TorchLM(chat_model))
    session = chat_session(lm, chat_src, system="w20 w21")
    prefills = conversation(session, lm)
    assert session.messages[0] == {"role": "system", "content": "w20 w21"}
    assert all(not t.refed for t in session.turns) and lm.resets == 1     # the reset of a new session only
    check_state_carried(session, lm, prefills, torch_greedy(chat_model))


def test_repetition_penalty_spans_the_turns(chat_model, chat_src):
    """Seen = the whole conversation (as a re-prefilled history would make it): no reply
    token of a heavily penalised chat repeats any token fed or said before."""
    lm = Counting(TorchLM(chat_model))
    session = chat_session(lm, chat_src, sampling=Sampling(repetition_penalty=1e6))
    conversation(session, lm, TURNS[:2])
    seen = set()
    for call in lm.calls:
        if len(call) == 1:
            assert call[0] not in seen
        seen.update(call)


# -- the session's bookkeeping, on a scripted model ---------------------------------------

class Scripted:
    """An ``LM`` that says the words of ``script`` in turn, whatever it is fed."""

    def __init__(self, script: list[int], vocab: int = 97):
        self.script, self.vocab_size, self.i, self.calls, self.resets = script, vocab, 0, [], 0

    def feed(self, ids):
        self.calls.append(list(ids))
        z = np.zeros(self.vocab_size, np.float32)
        z[self.script[self.i % len(self.script)]] = 1
        self.i += 1
        return z

    def reset(self):
        self.resets += 1


def test_an_end_token_is_not_owed_and_a_stop_string_is(chat_src):
    """Turn 1 ends on EOS (w2): not printed, and turn 2 starts with the template's own
    end of message, not a second w2.  Turn 2 stops at a stop string: the text is cut
    before it, the history records what the state saw, the last token is owed."""
    tok = load_tokenizer(chat_src)
    lm = Scripted([30, 31, 2, 40, 41, 42, 43, 44])
    session = chat_session(lm, chat_src, stops=[" w42"])
    assert "".join(session.send("w10")) == "w30 w31"
    assert lm.calls[-1] == [31] and session.owed == []
    assert "".join(session.send("w11")) == "w40 w41"
    assert lm.calls[3][:3] == tok.encode("w2 w1 w5").ids               # the template closed turn 1
    assert session.messages[-1]["content"] == "w40 w41 w42" and session.owed == [42]
    "".join(session.send("w12"))
    assert lm.calls[-len(session.turns[-1].reply)][0] == 42            # owed, fed first


def test_reset_and_a_template_that_rewrites_history(chat_src, tmp_path):
    lm = Scripted([30, 31])
    session = chat_session(lm, chat_src, max_new=2)
    "".join(session.send("w10"))
    session.reset()
    assert session.messages == [] and lm.resets == 2
    "".join(session.send("w11"))
    assert lm.calls[-2] == session.tok.encode("w1 w5 w11 w2 w1 w4").ids
    last_only = tmp_path / "last.jinja"                  # renders the last message only
    last_only.write_text("w1 {{ messages[-1]['content'] }} w2 w1 w4 ")
    session.template = load_chat_template(chat_src, last_only)
    "".join(session.send("w12"))
    assert session.turns[-1].refed and lm.resets == 3
    assert session.turns[-1].fed == session.tok.encode("w1 w12 w2 w1 w4").ids


# -- templates -------------------------------------------------------------------------

def test_templates_from_either_file_with_hub_conventions(tmp_path):
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template":
                             "{{ bos_token }}{% for m in messages %}{% generation %}{{ m.content | tojson }}"
                             "{% endgeneration %}{% endfor %}{{ eos_token }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load_chat_template(tmp_path)
    assert t.render([{"role": "user", "content": "héllo"}]) == '<s>"héllo"</s>'
    (tmp_path / "chat_template.jinja").write_text("{% if messages[0].role == 'system' %}"
                                                  "{{ raise_exception('no system role') }}{% endif %}ok")
    t = load_chat_template(tmp_path)                      # the .jinja file wins, as transformers has it
    assert t.render([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(DiJiangError, match="no system role"):
        t.render([{"role": "system", "content": "a"}])
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(DiJiangError, match="not valid Jinja"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DiJiangError, match="no chat template"):
        load_chat_template(tmp_path)


# -- the command -------------------------------------------------------------------------

def test_chat_command_reads_turns_from_a_pipe(chat_src, chat_model, capsys, monkeypatch):
    """One reply line per turn, blank lines skipped, /reset starts over (the same reply
    again), one figures line per turn naming only that turn's prefill tokens."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TURNS[0]}\n\n{TURNS[1]}\n/reset\n{TURNS[0]}\n"))
    code = main(["chat", str(chat_src), "--chunk-size", "8", "--max-new-tokens", str(MAX_NEW)])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    lm = Counting(TorchLM(chat_model))
    session = chat_session(lm, chat_src)
    conversation(session, lm, TURNS[:2])
    tok = session.tok
    assert lines == [tok.decode(t.reply) for t in session.turns] + [lines[0]]
    figures = [ln for ln in out.err.splitlines() if ln.startswith("[")]
    assert [f"prefill {len(t.fed)} tokens" in f for t, f in zip(session.turns, figures)] == [True, True]
    assert "[conversation cleared]" in figures[2]


def test_chat_refuses_a_folder_without_template(tmp_path, capsys):
    from conftest import tiny_hf, word_tokenizer
    tiny_hf("llama").save_pretrained(tmp_path / "m")
    word_tokenizer(tmp_path / "m")
    capsys.readouterr()
    code = main(["chat", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no chat template" in err and len(err.splitlines()) == 1
