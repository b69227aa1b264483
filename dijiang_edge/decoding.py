"""The token loop of ``generate`` and ``chat``, one for every backend.

A backend (``LM``) keeps one sequence's recurrent state and answers ``feed(ids)`` with the
last position's logits: the PyTorch model (``generation.TorchLM``) or an exported file's
runner (``RunnerLM``).  Feeding on top of the state is all a chat turn needs: the history
is never fed again.  Only numpy here: the torch-free runtime uses it.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from .errors import DiJiangError
from .runtime import PREFILL_PIECE, Runner
from .sampling import Sampler


class LM(Protocol):
    vocab_size: int

    def feed(self, ids: list[int]) -> np.ndarray:
        """Feed ``ids`` on top of the state; the last position's logits ``[V]``."""
        ...

    def reset(self) -> None:
        """Start a new sequence (zero state)."""
        ...


class RunnerLM:
    """An exported file's runner as an ``LM``.  Long inputs go in ``PREFILL_PIECE``-token
    calls asking for the last row only (``keep=1``: the files compute the head there
    alone), so memory does not grow with the prompt."""

    def __init__(self, runner: Runner, vocab_size: int):
        self.runner, self.vocab_size = runner, vocab_size

    def feed(self, ids: list[int]) -> np.ndarray:
        arr = np.asarray([ids], dtype=np.int64)
        for i in range(0, arr.shape[1], PREFILL_PIECE):
            logits = self.runner.forward(arr[:, i:i + PREFILL_PIECE], keep=1)[0, -1].copy()
        return logits

    def reset(self) -> None:
        self.runner.reset()


def stream_tokens(lm: LM, ids: list[int], max_new_tokens: int, eos_ids, sampler: Sampler) -> Iterator[int]:
    """Feed ``ids``, then yield up to ``max_new_tokens`` sampled tokens, feeding each one
    only when another is to follow: the last token yielded (an end token, the last
    allowed one, or one after which the caller stopped) is never in the state, so a
    caller that goes on (a chat's next turn) feeds it, or the template's end of turn."""
    if not ids:
        raise DiJiangError("the prompt is empty (no tokens); give some text")
    eos = set(int(e) for e in eos_ids)
    logits = lm.feed(ids)
    sampler.observe(ids)
    for i in range(max_new_tokens):
        tok = sampler(logits)
        sampler.observe([tok])
        yield tok
        if tok in eos or i + 1 == max_new_tokens:
            return
        logits = lm.feed([tok])
