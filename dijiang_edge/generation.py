"""Greedy and sampled generation in PyTorch, built on the recurrent form:
one prefill call (chunked), then one token per call with O(1) work and memory."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .model import DiJiangForCausalLM, RecurrentState

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
def stream(model: DiJiangForCausalLM, input_ids: Tensor, max_new_tokens: int = 32,
           state: RecurrentState | None = None, eos_ids: list[int] | None = None,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           ) -> Iterator[tuple[Tensor, RecurrentState]]:
    """Yield ``(next_tokens [B], state)`` one step at a time (batch of one stops at EOS)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = set(model.args.eos_ids if eos_ids is None else eos_ids)
    logits, state = model(input_ids, state)
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
