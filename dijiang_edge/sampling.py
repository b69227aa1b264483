"""The one next-token sampler of every path (PyTorch model, ONNX and ``.pte`` folders,
``generate`` and ``chat``): numpy only, so the torch-free runtime uses it as it is.

Order and meaning follow Hugging Face's ``generate``, so a setting means what users
expect: the repetition penalty acts on the raw logits of every token already seen
(the prompt and the output: a positive logit divided by it, a negative one multiplied),
then greedy (``temperature == 0``) takes the argmax, or sampling divides by the
temperature, keeps the ``top_k`` likeliest tokens, then the smallest set whose
probability reaches ``top_p``, and draws from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUCLEUS_FIRST = 64      # candidates sorted first for top-p; more only when they fall short of p


@dataclass(frozen=True)
class Sampling:
    """The sampling flags of ``generate`` and ``chat`` (defaults: greedy, no penalty)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """``logits`` with the seen tokens' entries pushed down by ``penalty`` (HF semantics:
    divide a positive logit, multiply a negative one, so both move away from likely)."""
    z = logits.astype(np.float64)
    seen = seen[:len(z)]
    s = z[seen]
    z[seen] = np.where(s > 0, s / penalty, s * penalty)
    return z


def top_k_mask(z: np.ndarray, k: int) -> np.ndarray:
    """``z`` with all but its ``k`` largest entries at ``-inf`` (ties at the k-th kept)."""
    if not 0 < k < len(z):
        return z
    kth = np.partition(z, -k)[-k]
    return np.where(z < kth, -np.inf, z)


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of likeliest tokens whose probability reaches ``top_p``
    (the token that crosses it included, so at least one).  Only the head of the
    distribution is sorted: a full sort of a 49k vocabulary per token costs more than
    the sampling itself, and the nucleus is usually a few dozen tokens."""
    n, k = len(probs), min(NUCLEUS_FIRST, len(probs))
    while True:
        idx = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        cum = np.cumsum(probs[idx])
        if cum[-1] >= top_p or k == n:
            before = cum - probs[idx]              # mass of the likelier tokens: increasing
            return idx[:max(1, int(np.searchsorted(before, top_p, side="left")))]
        k = min(n, 4 * k)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with weights ``probs`` (unnormalised, zeros never drawn)."""
    cum = np.cumsum(probs)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(probs) - 1)


class Sampler:
    """``sampler(logits [V]) -> token``, with the tokens seen so far (``observe``) for
    the repetition penalty and a seeded generator: one per sequence, kept across a
    chat's turns as the state is."""

    def __init__(self, settings: Sampling, vocab_size: int | None = None, rng: np.random.Generator | None = None):
        """``vocab_size``: the logits' length where known (else the mask grows as ids come)."""
        self.settings = settings
        self.rng = rng if rng is not None else np.random.default_rng(settings.seed)
        self.seen = np.zeros(vocab_size or 0, dtype=bool) if settings.repetition_penalty != 1.0 else None

    def observe(self, ids) -> None:
        """Mark ``ids`` as seen (the prompt, each fed or sampled token)."""
        if self.seen is None or not len(ids):
            return
        ids = np.asarray(ids, dtype=np.int64)
        self._grow(int(ids.max()) + 1)
        self.seen[ids] = True

    def _grow(self, n: int) -> None:
        if n > len(self.seen):
            self.seen = np.concatenate([self.seen, np.zeros(n - len(self.seen), dtype=bool)])

    def forget(self) -> None:
        """A new sequence: nothing seen (the generator goes on, as a fresh seed would not)."""
        if self.seen is not None:
            self.seen[:] = False

    def __call__(self, logits: np.ndarray) -> int:
        s = self.settings
        if self.seen is not None:
            self._grow(len(logits))
            logits = penalize(logits, self.seen, s.repetition_penalty)
        if s.temperature <= 0:
            return int(np.argmax(logits))
        z = top_k_mask(np.asarray(logits, dtype=np.float64) / s.temperature, s.top_k)
        probs = np.exp(z - z.max())
        if s.top_p < 1.0:
            keep = nucleus(probs / probs.sum(), s.top_p)
            return int(keep[draw(probs[keep], self.rng)])
        return draw(probs, self.rng)
