"""Text in, fixed-length token blocks out: a training set and a held-out tail.

The held-out blocks are the *end* of the token stream, so no training block
overlaps them.  The training order is a seeded permutation per epoch, a pure
function of the step number: a checkpoint's data position is just its step, and
every process can compute which sequences of the global batch are its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DiJiangError
from ..text import CORPORA, read_text, sample_text


def load_corpus(paths: Sequence[str | Path], max_chars: int) -> str:
    """All text of ``paths`` (files, folders of .txt, or the names of built-in corpora)."""
    if not paths:
        raise DiJiangError("no training text: give --data with one or more text files or folders")
    parts = []
    for p in paths:
        if str(p) in CORPORA and not Path(p).exists():
            parts.append(sample_text(str(p), max_chars=max_chars))
        else:
            parts.append(read_text(Path(p).expanduser()))
    text = "\n\n".join(parts)[:max_chars]
    if not text.strip():
        raise DiJiangError(f"the training text in {', '.join(map(str, paths))} is empty")
    return text


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` as one long int64 stream (a ``tokenizers.Tokenizer``)."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise DiJiangError("the training text gave no tokens")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Blocks:
    train: torch.Tensor      # [N, L]
    heldout: torch.Tensor    # [M, L]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def split_blocks(ids: torch.Tensor, seq_len: int, heldout_fraction: float, eval_tokens: int) -> Blocks:
    """Pack ``ids`` into ``seq_len`` blocks; the last few (fraction, capped) are held out."""
    n = ids.numel() // seq_len
    if n < 2:
        raise DiJiangError(f"the training text has {ids.numel()} tokens; at least {2 * seq_len} are needed "
                           f"for a training and a held-out block of {seq_len} tokens (or lower --seq-len)")
    m = max(1, min(round(n * heldout_fraction), max(1, eval_tokens // seq_len), n - 1))
    blocks = ids[: n * seq_len].view(n, seq_len)
    return Blocks(train=blocks[: n - m].clone(), heldout=blocks[n - m:].clone())


class BatchOrder:
    """Which training blocks form global step ``s``: consecutive slices of per-epoch
    permutations seeded by ``seed + epoch``, so resuming at step ``s`` is exact."""

    def __init__(self, n_blocks: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n_blocks, batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = range(step * self.batch, (step + 1) * self.batch)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in pos])


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's equal, contiguous part of a global batch."""
    if batch.shape[0] % world:
        raise DiJiangError(f"batch size {batch.shape[0]} does not split evenly over {world} processes; "
                           f"use a multiple of {world}")
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]
