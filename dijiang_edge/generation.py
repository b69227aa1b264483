"""Greedy and sampled generation in PyTorch, built on the recurrent form:
one prefill call (chunked), then one token per call with O(1) work and memory.
Tokens are chosen by ``sampling.Sampler``, the sampler of the exported-file paths too."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from .errors import DiJiangError
from .model import DiJiangForCausalLM, RecurrentState
from .runtime import PREFILL_PIECE     # one piece size for both paths (the runtime is torch-free)
from .sampling import Sampler, Sampling

Tensor = torch.Tensor


@torch.no_grad()
def prefill_last(model: DiJiangForCausalLM, input_ids: Tensor, state: RecurrentState | None = None,
                 piece: int = PREFILL_PIECE) -> tuple[Tensor, RecurrentState]:
    """The last position's logits ``[B, 1, V]`` after ``input_ids``, and the state.

    The prompt goes in pieces (the state carries between them, as between any two
    calls), so memory does not grow with the prompt, and the head runs on each piece's
    last position only: a whole 100k-token prompt's logits would be 20 GB with SmolLM2's
    vocabulary, and generation needs only the last row."""
    if input_ids.shape[1] == 0:
        raise DiJiangError("the prompt is empty (no tokens); give some text")
    logits = None
    for i in range(0, input_ids.shape[1], piece):
        logits, state = model(input_ids[:, i:i + piece], state, logits_to_keep=1)
    return logits, state


@torch.no_grad()
def stream(model: DiJiangForCausalLM, input_ids: Tensor, max_new_tokens: int = 32,
           state: RecurrentState | None = None, eos_ids: list[int] | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           repetition_penalty: float = 1.0) -> Iterator[tuple[Tensor, RecurrentState]]:
    """Yield ``(next_tokens [B], state)`` one step at a time (batch of one stops at EOS);
    one ``Sampler`` per row, sharing one seeded generator."""
    settings = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
    rng = np.random.default_rng(seed)
    samplers = [Sampler(settings, model.args.vocab_size, rng) for _ in range(input_ids.shape[0])]
    for s, row in zip(samplers, input_ids.tolist()):
        s.observe(row)
    eos = set(model.args.eos_ids if eos_ids is None else eos_ids)
    logits, state = prefill_last(model, input_ids, state)
    for _ in range(max_new_tokens):
        last = logits[:, -1].float().numpy()
        tok = torch.tensor([s(row) for s, row in zip(samplers, last)], dtype=torch.long)
        for s, t in zip(samplers, tok.tolist()):
            s.observe([t])
        yield tok, state
        if tok.shape[0] == 1 and int(tok) in eos:
            return
        logits, state = model(tok[:, None], state)


class TorchLM:
    """The PyTorch model as a ``decoding.LM``: one sequence, its state kept here."""

    def __init__(self, model: DiJiangForCausalLM):
        self.model, self.state = model, None
        self.vocab_size = model.args.vocab_size

    def feed(self, ids: list[int]) -> np.ndarray:
        logits, self.state = prefill_last(self.model, torch.tensor([ids], dtype=torch.long), self.state)
        return logits[0, -1].float().numpy()

    def reset(self) -> None:
        self.state = None


def generate(model: DiJiangForCausalLM, input_ids: Tensor, max_new_tokens: int = 32,
             on_token: Callable[[int], None] | None = None, **kw) -> tuple[Tensor, RecurrentState]:
    """The prompt followed by up to ``max_new_tokens`` new tokens, and the final state."""
    out, state = [], None
    for tok, state in stream(model, input_ids, max_new_tokens, **kw):
        out.append(tok)
        if on_token is not None:
            on_token(int(tok[0]))
    new = torch.stack(out, dim=1) if out else input_ids[:, :0]
    return torch.cat([input_ids, new], dim=1), state
