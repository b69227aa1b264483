"""A multi-turn chat through ExecuTorch's C++ LLM runner with the state kept between
turns, as the Android demo drives it (issue 8).

``TextLLMRunner`` (``executorch.extension.llm.runner``, the C++ runner the Android
``LlmModule`` wraps) keeps its position between ``generate()`` calls in executorch
1.5.1, so this drives it directly: one runner, no ``reset()`` between turns, each
turn feeding only its new text. The per-turn text is what the app's
``ChatSession.textFor`` builds from ``ChatMl``
(android_demo/app/src/main/java/org/dijiang/demo/core/ChatSession.kt and ChatMl.kt),
re-implemented below in ``ChatSession``:

    turn 1: system block + user block + "<|im_start|>assistant\\n"
    turn k: (last piece of reply k-1) + "<|im_end|>\\n" + user block + "<|im_start|>assistant\\n"

(the runner never feeds back the last token it samples, so the session owes it to
the state and feeds it, as text, at the start of the next turn).

What it shows:

* the three replies are exactly the greedy tokens of the converted PyTorch model run
  over the whole conversation (all turns' text and the replies, as token ids, in one
  fresh forward pass), and the runner's positions add up to that conversation: it
  never re-prefills the history;
* the process memory does not grow with the turns and the file's state has the model's
  shape: the ``.pte`` holds a fixed-size recurrent state, not a KV cache. (That decode
  time stays flat is a timing, measured by ``dijiang-export bench``, not asserted here.)

The model is ``conftest.tiny_hf("smollm2")`` with its weights scaled up (a plain
random init repeats one token forever, which would prove little about parity) and a
97-token byte-level BPE with SmolLM2's special tokens at SmolLM2's ids
(``<|endoftext|>`` 0, ``<|im_start|>`` 1 = BOS, ``<|im_end|>`` 2 = EOS). The two
end tokens' rows of its tied embedding are zeroed, so their logits are exactly 0 and
greedy decoding never ends a reply early: every turn runs ``MAX_NEW`` tokens.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import dijiang_edge
from dijiang_edge.bars import BARS
from conftest import tiny_hf
from dijiang_edge.exporters import export, read_manifest

pytest.importorskip("executorch.runtime")
llm = pytest.importorskip("executorch.extension.llm.runner")

# -- ChatMl.kt / ChatSession.kt, in Python ------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CLOSE_REPLY = f"{IM_END}\n"


def block(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def user_turn(message: str) -> str:
    return block("user", message) + f"{IM_START}assistant\n"


MESSAGES = ["hello there, who are you", "tell me a story about the sea", "and what happened next"]
MAX_NEW = 128          # tokens per turn
REPEATS = 3            # conversations after the first, each from a reset runner
SEED, SCALE = 0, 3.0   # a random model that answers with varied tokens, none of them EOS


@dataclass
class Turn:
    fed: str
    pieces: list[str]
    stats: dict
    rss_kb: int


@dataclass
class ChatSession:
    """ChatSession.kt's turn loop over ``TextLLMRunner``: the state stays in the runner."""
    runner: object
    eos_texts: set[str]
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    position: int = 0
    owed: str = ""
    turns: list[Turn] = field(default_factory=list)

    def text_for(self, message: str) -> str:
        return (block("system", self.system_prompt) if self.position == 0 else "") + self.owed + user_turn(message)

    def reset(self) -> None:
        self.runner.reset()
        self.position, self.owed, self.turns = 0, "", []

    def send(self, message: str, max_new_tokens: int) -> Turn:
        text = self.text_for(message)
        pieces: list[str] = []
        stats: list = []
        cfg = llm.GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
        self.runner.generate(text, cfg, token_callback=pieces.append, stats_callback=stats.append)
        s = stats[-1]
        st = {"prompt_tokens": s.num_prompt_tokens, "generated_tokens": s.num_generated_tokens}
        # ChatSession.kt: position += prompt_tokens + generated_tokens (the runner's own pos)
        self.position += st["prompt_tokens"] + st["generated_tokens"]
        ended_on_eos = any(e in pieces[-1] for e in self.eos_texts if e)
        self.owed = CLOSE_REPLY if ended_on_eos else pieces[-1] + CLOSE_REPLY
        turn = Turn(text, pieces, st, _rss_kb())
        self.turns.append(turn)
        return turn


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: extra threads only spin and wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    from dijiang_edge.runtime.executorch import set_threads
    set_threads(1)
    yield
    torch.set_num_threads(n)


def _chat_tokenizer(folder: Path) -> None:
    """A 97-token byte-level BPE (SmolLM2's kind) that covers the chat's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = "\n".join([DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", *MESSAGES]) * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=97, special_tokens=["<|endoftext|>", IM_START, IM_END], limit_alphabet=80))
    assert tok.get_vocab_size() == 97 and tok.token_to_id(IM_START) == 1 and tok.token_to_id(IM_END) == 2
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "tiny"
    hf = tiny_hf("smollm2", SEED)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(SCALE)
        hf.get_input_embeddings().weight[[0, 2]] = 0     # tied: <|endoftext|>, <|im_end|> logits are 0
    hf.save_pretrained(src)
    _chat_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def tiny_export(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "tiny"
    export(str(tiny_src), out, ["pte"], ["fp32"], convert_options={"chunk_size": 8},
           max_seq_len=16, parity_tokens=0)   # test_pte.py checks the file's logits; here the chat
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_src):
    return dijiang_edge.convert(str(tiny_src), chunk_size=8)


@pytest.fixture(scope="module")
def chats(tiny_export):
    """One conversation, then REPEATS more, each from a reset runner; within a
    conversation the runner is never reset."""
    from dijiang_edge.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_export)
    runner = llm.TextLLMRunner(str(tiny_export / "model_fp32.pte"), str(tiny_export / "tokenizer.json"))
    session = ChatSession(runner, {IM_END, "<|endoftext|>"})
    out = []
    for _ in range(1 + REPEATS):
        session.reset()
        for m in MESSAGES:
            session.send(m, MAX_NEW)
        out.append((list(session.turns), session.position))
    return tok, out[0], out[1:]


# -- tests ----------------------------------------------------------------------------

def _piece_ids(tok) -> dict[str, int]:
    """The runner hands back text pieces; each of this vocabulary's tokens decodes to a
    different piece, so the pieces name the token ids exactly."""
    m = {tok.decode([i], skip_special_tokens=False): i for i in range(tok.get_vocab_size())}
    assert len(m) == tok.get_vocab_size()
    return m


@torch.no_grad()
def test_three_turns_equal_pytorch_on_the_whole_conversation(chats, tiny_model):
    tok, (turns, position), _ = chats
    ids_of = _piece_ids(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids        # noqa: E731
    replies = [[ids_of[p] for p in t.pieces] for t in turns]
    assert [len(r) for r in replies] == [MAX_NEW] * 3                 # no EOS: fixed length turns
    assert all(t.stats["generated_tokens"] == MAX_NEW - 1 for t in turns)

    # The whole conversation as token ids: the template's text with the replies' ids in it.
    texts = [block("system", DEFAULT_SYSTEM_PROMPT) + user_turn(MESSAGES[0])] + \
            [CLOSE_REPLY + user_turn(m) for m in MESSAGES[1:]]
    whole, starts = [], []
    for text, reply in zip(texts, replies):
        whole += enc(text)
        starts.append(len(whole))
        whole += reply

    # What the runner was fed is that conversation, turn by turn, and nothing more:
    # turn k's text is the owed last reply token plus the new user turn, never the history.
    assert turns[0].fed == texts[0] and enc(turns[0].fed) == whole[:starts[0]]
    for k in (1, 2):
        assert turns[k].fed == turns[k - 1].pieces[-1] + texts[k]
        assert enc(turns[k].fed) == [replies[k - 1][-1]] + enc(texts[k])
    for t in turns:
        assert t.stats["prompt_tokens"] == len(enc(t.fed))           # the C++ tokenizer agrees
    assert turns[2].stats["prompt_tokens"] < starts[2] / 4             # no re-prefill of the history
    assert position == len(whole) - 1       # the runner's positions: the conversation minus the last token

    # PyTorch, from a fresh state, over the whole conversation at once: its greedy choice
    # at every reply position is the token the runner gave (teacher forcing = greedy).
    logits = tiny_model(torch.tensor([whole]))[0][0]
    for k, (s, reply) in enumerate(zip(starts, replies)):
        want = logits[s - 1:s - 1 + len(reply)]
        assert want.argmax(-1).tolist() == reply, f"turn {k + 1}"
        top2 = want.topk(2, -1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4          # no near-ties: fp32 noise can't flip


def test_repeats_are_identical(chats):
    _, (first, pos), repeats = chats
    for turns, p in repeats:
        assert [t.pieces for t in turns] == [t.pieces for t in first] and p == pos


def test_state_and_memory_stay_fixed_across_turns(chats, tiny_export, tiny_model):
    """Fixed-size state: the file's state is n_layers buffers of a shape set by the model,
    not by the context length; and the process does not grow from turn 1 to turn 3."""
    _, _, repeats = chats
    entry = read_manifest(tiny_export)["files"][0]
    assert [s["shape"] for s in entry["state"]] == [list(tiny_model.state_shape(1))] * 2
    growth = [turns[2].rss_kb - turns[0].rss_kb for turns, _ in repeats]
    assert statistics.median(growth) <= 256, growth
