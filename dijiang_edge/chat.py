"""Multi-turn chat on the recurrent state: each turn feeds only its own new tokens.

The conversation is rendered with the tokenizer's chat template every turn (text only,
cheap), and the text the state already holds is a prefix of it: the previous rendering
plus the reply.  Only the rest is tokenized and fed, on top of the state the last turn
left, so a turn costs its own tokens however long the conversation (a KV-cache model
keeps its cache for the same reason; here the state is a few MB at any length).

What the state holds, exactly: every token of the rendered prompts and every reply token
the model produced, except a reply's end token, which the template writes itself (as its
end-of-turn text: ``<|im_end|>\\n`` for ChatML).  The last token of a reply that did not
end on an end token (the length limit, a stop string) is owed and fed first next turn.
A reply is recorded in the history as the text of its tokens (a stop string included,
since the state has seen it; a recurrent state cannot be rewound).  A template that
rewrites earlier turns (some drop a previous reply's reasoning) breaks the prefix: the
turn then starts from a reset state with the whole conversation (``Turn.refed``).
Only numpy, tokenizers and jinja2: the torch-free runtime chats too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from .chat_template import ChatTemplate
from .decoding import LM, stream_tokens
from .detokenize import IncrementalDecoder, StopStrings
from .errors import DiJiangError
from .sampling import Sampler, Sampling

COMMANDS = {"/reset": "clear the conversation", "/exit": "end (as does Ctrl-D)"}


@dataclass
class Turn:
    """One exchange: what was fed before the reply, the reply's tokens and text."""
    fed: list[int]                      # this turn's prefill: owed reply token + the new text's tokens
    reply: list[int] = field(default_factory=list)
    text: str = ""                      # as printed (stop string cut off)
    refed: bool = False                 # the template rewrote the history: fed from a reset state


class ChatSession:
    """A conversation over one ``LM`` whose state is kept between turns."""

    def __init__(self, lm: LM, tokenizer, template: ChatTemplate, sampling: Sampling, eos_ids,
                 max_new_tokens: int, system: str | None = None, stops: list[str] | None = None):
        self.lm, self.tok, self.template = lm, tokenizer, template
        self.eos = set(int(e) for e in eos_ids)
        self.max_new_tokens, self.system, self.stops = max_new_tokens, system, stops or []
        self.sampler = Sampler(sampling, lm.vocab_size)
        self.turns: list[Turn] = []
        self.reset()

    def reset(self) -> None:
        """A new conversation (the system prompt stays)."""
        self.lm.reset()
        self.sampler.forget()
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.fed_text = ""               # the text the state (and the owed token) stands for
        self.owed: list[int] = []

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def _prefill_ids(self, user_text: str) -> tuple[list[int], str, bool]:
        """This turn's tokens to feed, the rendered prompt, and whether the state was reset."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        full = self.template.render(messages, add_generation_prompt=True)
        if full.startswith(self.fed_text):
            return self.owed + self._encode(full[len(self.fed_text):]), full, False
        self.lm.reset()                  # the template changed text the state has seen
        self.sampler.forget()
        return self._encode(full), full, True

    def send(self, user_text: str, on_token: Callable[[], None] | None = None) -> Iterator[str]:
        """Stream the reply's text to ``user_text``; the turn is in ``self.turns[-1]`` after."""
        ids, full, refed = self._prefill_ids(user_text)
        turn = Turn(ids, refed=refed)
        text, stop = IncrementalDecoder(self.tok.decode), StopStrings(self.stops)
        for t in stream_tokens(self.lm, ids, self.max_new_tokens, self.eos, self.sampler):
            turn.reply.append(t)
            if on_token:
                on_token()
            if t in self.eos:
                break
            piece, stopped = stop.push(text.push(t))
            turn.text += piece
            yield piece
            if stopped:
                break
        if not stop.stopped:
            tail = stop.push(text.flush())[0] + stop.flush()
            turn.text += tail
            yield tail
        self._record(user_text, full, turn)

    def _record(self, user_text: str, full: str, turn: Turn) -> None:
        ended = bool(turn.reply) and turn.reply[-1] in self.eos
        said = turn.reply[:-1] if ended else turn.reply
        content = self.tok.decode(said, skip_special_tokens=False)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": content}]
        self.fed_text = full + content
        self.owed = [] if ended or not said else said[-1:]
        self.turns.append(turn)


def user_lines(stdin: TextIO, tty: bool, prompt: str = "> ") -> Iterator[str]:
    """The user's turns: ``input()`` with line editing on a terminal, else one per line."""
    try:
        if tty:
            while True:
                try:
                    yield input(prompt)
                except EOFError:
                    print(file=sys.stderr)
                    return
        for line in stdin:
            yield line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise DiJiangError("the input is not UTF-8 text; send the turns in UTF-8") from None


def repl(session: ChatSession, what: str, stdin: TextIO | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> None:
    """Read turns, stream replies (one per turn, then a newline), a figures line per turn on ``err``."""
    from .benchmark.timing import GenerationClock
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    tty = stdin is sys.stdin and stdin.isatty()
    if tty:
        print(f"chatting with {what}; " + ", ".join(f"{k}: {v}" for k, v in COMMANDS.items()), file=err)
    for line in user_lines(stdin, tty):
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            print("[conversation cleared]", file=err, flush=True)
            continue
        clock = GenerationClock()
        for piece in session.send(line, clock.token):
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        turn = session.turns[-1]
        if turn.refed:
            print("[the chat template rewrote earlier turns: the whole conversation was fed again]", file=err)
        print(clock.summary(len(turn.fed), what), file=err, flush=True)
