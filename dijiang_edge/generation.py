"""Greedy and sampled generation in PyTorch, built on the recurrent form:
one prefill call (chunked), then one token per call with O(1) work and memory."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .errors import DiJiangError
from .model import DiJiangForCausalLM, RecurrentState
from .runtime import PREFILL_PIECE     # one piece size for both paths (the runtime is torch-free)

Tensor = torch.Tensor


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ``[B]`` from last-position logits ``[B, V]``; ``temperature == 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[..., 0]


@torch.no_grad()
def prefill_last(model: DiJiangForCausalLM, input_ids: Tensor, state: RecurrentState | None = None,
                 piece: int = PREFILL_PIECE) -> tuple[Tensor, RecurrentState]:
    """The last position's logits ``[B, 1, V]`` after ``input_ids``, and the state.

    The prompt goes in pieces (the state carries between them, as between any two
    calls), so memory does not grow with the prompt: a whole 100k-token prompt's logits
    would be 20 GB with SmolLM2's vocabulary, and generation needs only the last row."""
    if input_ids.shape[1] == 0:
        raise DiJiangError("the prompt is empty (no tokens); give some text")
    logits = None
    for i in range(0, input_ids.shape[1], piece):
        logits, state = model(input_ids[:, i:i + piece], state)
        logits = logits[:, -1:].clone()     # drop the piece's other rows now
    return logits, state


@torch.no_grad()
def stream(model: DiJiangForCausalLM, input_ids: Tensor, max_new_tokens: int = 32,
           state: RecurrentState | None = None, eos_ids: list[int] | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           ) -> Iterator[tuple[Tensor, RecurrentState]]:
    """Yield ``(next_tokens [B], state)`` one step at a time (batch of one stops at EOS)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = set(model.args.eos_ids if eos_ids is None else eos_ids)
    logits, state = prefill_last(model, input_ids, state)
    for _ in range(max_new_tokens):
        tok = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        yield tok, state
        if tok.shape[0] == 1 and int(tok) in eos:
            return
        logits, state = model(tok[:, None], state)


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
