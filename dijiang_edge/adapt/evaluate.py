"""Held-out figures, each process scoring its share of the blocks and the sums
reduced, so the result does not depend on how many processes ran."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..parity import nll_sum
from .objectives import layer_attention
from .teacher import AttentionTap


def _my_blocks(blocks: torch.Tensor, acc) -> torch.Tensor:
    return blocks[acc.process_index::acc.num_processes]


@torch.no_grad()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, batch: int, acc) -> float:
    """exp(mean next-token NLL) over every held-out block (``parity.nll_sum``, the NLL of
    the export-time perplexities too)."""
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for chunk in _my_blocks(blocks, acc).split(batch):
        chunk = chunk.to(acc.device)
        sums[0] += nll_sum(logits_of(chunk)[:, :-1], chunk[:, 1:])
        sums[1] += chunk[:, 1:].numel()
    sums = acc.reduce(sums, "sum")
    return math.exp(float(sums[0] / sums[1]))


@torch.no_grad()
def layer_mse(student, tap: AttentionTap, blocks: torch.Tensor, batch: int, acc) -> float:
    """Mean over layers of ||student attn - teacher attn||^2 / ||teacher attn||^2 (0 = exact)."""
    n = student.args.n_layers
    sums = torch.zeros(2, n, dtype=torch.float64, device=acc.device)
    with tap.hooked():
        for chunk in _my_blocks(blocks, acc).split(batch):
            xs, ys = tap.run(chunk.to(acc.device))
            for i, (o, y) in enumerate(zip(layer_attention(student, xs), ys)):
                sums[0, i] += (o.double() - y.double()).pow(2).sum()
                sums[1, i] += y.double().pow(2).sum()
    sums = acc.reduce(sums, "sum")
    return float((sums[0] / sums[1].clamp_min(1e-30)).mean())
