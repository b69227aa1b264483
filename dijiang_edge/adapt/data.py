"""Text in, fixed-length token blocks out: a training set and held-out blocks.

Held-out text is either separate texts (``heldout_blocks``: other documents, other
domains) or, by default, the *end* of the training stream, so no training block
overlaps it.  The training order is a seeded permutation per epoch, a pure
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

TAIL = "tail"          # the held-out figures' name for the end of the training stream


def load_text(name: str | Path, max_chars: int) -> str:
    """One text: a built-in name (``text.CORPORA``; a file of that name wins) or a file/folder."""
    if str(name) in CORPORA and not Path(name).exists():
        return sample_text(str(name), max_chars=max_chars)
    if not Path(name).expanduser().exists():
        raise DiJiangError(f"text file {name} does not exist, and {str(name)!r} is no built-in text "
                           f"({', '.join(CORPORA)})")
    return read_text(Path(name).expanduser())


def load_corpus(paths: Sequence[str | Path], max_chars: int) -> str:
    """All text of ``paths`` (files, folders of .txt, or the names of built-in corpora)."""
    if not paths:
        raise DiJiangError("no training text: give --data with one or more text files or folders")
    text = "\n\n".join(load_text(p, max_chars) for p in paths)[:max_chars]
    if not text.strip():
        raise DiJiangError(f"the training text in {', '.join(map(str, paths))} is empty")
    return text


def tokenize(text: str, tokenizer: Any, what: str = "the training text") -> torch.Tensor:
    """Token ids of ``text`` as one long int64 stream (a ``tokenizers.Tokenizer``)."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise DiJiangError(f"{what} gave no tokens")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Blocks:
    train: torch.Tensor      # [N, L]
    heldout: torch.Tensor    # [M, L]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def split_blocks(ids: torch.Tensor, seq_len: int, heldout_fraction: float, eval_tokens: int,
                 hold_tail: bool = True) -> Blocks:
    """Pack ``ids`` into ``seq_len`` blocks; the last few (fraction, capped) are held out,
    unless ``hold_tail`` is off (held-out texts of their own): then every block trains."""
    n = ids.numel() // seq_len
    if n < 1 + hold_tail:
        raise DiJiangError(f"the training text has {ids.numel()} tokens; at least {(1 + hold_tail) * seq_len} "
                           f"are needed for a training {'and a held-out ' if hold_tail else ''}block of "
                           f"{seq_len} tokens (or lower --seq-len)")
    m = max(1, min(round(n * heldout_fraction), max(1, eval_tokens // seq_len), n - 1)) if hold_tail else 0
    blocks = ids[: n * seq_len].view(n, seq_len)
    return Blocks(train=blocks[: n - m].clone(), heldout=blocks[n - m:].clone())


def heldout_blocks(ids: torch.Tensor, seq_len: int, eval_tokens: int, name: str) -> torch.Tensor:
    """The first ``seq_len`` blocks of a held-out text's tokens, at most ``eval_tokens`` in all
    (at least one block): the blocks ``adapt --heldout`` and ``evaluate`` both score."""
    n = min(ids.numel() // seq_len, max(1, eval_tokens // seq_len))
    if n < 1:
        raise DiJiangError(f"the held-out text {name} has {ids.numel()} tokens, fewer than one block of "
                           f"{seq_len}; give a longer text or lower --seq-len")
    return ids[: n * seq_len].view(n, seq_len).clone()


def load_heldout(names: Sequence[str | Path], max_chars: int) -> dict[str, str]:
    """The text of each held-out name, read up front so a bad one fails before a model loads."""
    texts = {str(n): load_text(n, max_chars) for n in names}
    empty = [n for n, t in texts.items() if not t.strip()]
    if empty:
        raise DiJiangError(f"the held-out text {empty[0]} is empty")
    return texts


def heldout_sets(texts: dict[str, str], tokenizer: Any, seq_len: int, eval_tokens: int) -> dict[str, torch.Tensor]:
    """Each held-out text tokenized and packed (``heldout_blocks``), by name."""
    return {n: heldout_blocks(tokenize(t, tokenizer, f"the held-out text {n}"), seq_len, eval_tokens, n)
            for n, t in texts.items()}


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
