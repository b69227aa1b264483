"""The one timing loop of the project: every figure ``bench``, ``generate`` and the
scripts print is taken here, so "ms/token" and "tokens/s" mean one thing everywhere.

- ``call_times_s(fn, repeats, warmup)``: wall seconds of each call, after untimed warm-up
  calls; ``median_ms`` and ``best_s`` reduce it (median: a latency; best: a bandwidth,
  where background load only ever adds time).
- ``decode_ms(runner, tokens)``: median ms of one single-token call from the runner's
  current position, feeding back the greedy token (the decode figure of every runtime).
- ``prefill_s(runner, ids)``: seconds to feed a prompt in calls of ``PREFILL_CALL`` tokens.
- ``tokens_per_s`` and ``GenerationClock``: ``generate``'s figures, both code paths.

Only numpy and the standard library: the runtime processes of ``bench`` import this.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Protocol

import numpy as np

WARMUP_TOKENS = 4       # decode calls before the timed ones (first-call allocations, caches)
PREFILL_CALL = 512      # tokens per forward call in a timed prefill: the logits of a whole 16k
                        # prompt (16k x vocab floats, 3 GB for SmolLM2) would swamp memory figures


class Runner(Protocol):
    def forward(self, ids: np.ndarray) -> np.ndarray: ...


def call_times_s(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of one call of ``fn``: a latency."""
    return 1000 * statistics.median(call_times_s(fn, repeats, warmup))


def best_s(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> float:
    """Fastest seconds of one call of ``fn``: for throughput limits (memory bandwidth)."""
    return min(call_times_s(fn, repeats, warmup))


def decode_step(runner: Runner, first_token: int = 1) -> Callable[[], None]:
    """One single-token call per invocation, each feeding back the previous greedy token,
    so the runner's position advances as in a real generation."""
    tok = np.array([[first_token]], np.int64)

    def step() -> None:
        nonlocal tok
        logits = runner.forward(tok)
        tok = logits[:, -1:].argmax(-1).astype(np.int64)
    return step


def decode_ms(runner: Runner, tokens: int, warmup: int = WARMUP_TOKENS) -> float:
    """Median ms of one decode call from the runner's current position (``warmup`` calls
    first, which move the position on by as many tokens)."""
    return median_ms(decode_step(runner), tokens, warmup)


def prefill_s(runner: Runner, ids: np.ndarray, call: int = PREFILL_CALL) -> float:
    """Seconds to feed ``ids [1, T]`` in calls of at most ``call`` tokens, each asking
    for its last position's logits only, as generation does."""
    t0 = time.perf_counter()
    for i in range(0, ids.shape[1], call):
        runner.forward(ids[:, i:i + call], keep=1)
    return time.perf_counter() - t0


def tokens_per_s(tokens: int, seconds: float) -> float:
    """``tokens / seconds``; nan when nothing was timed (a rate is never invented)."""
    return tokens / seconds if tokens > 0 and seconds > 0 else float("nan")


class GenerationClock:
    """``generate``'s figures, one definition for the PyTorch and the exported-file paths.

    Prefill time is the time to the first new token (the prompt's forward call and one
    sampling); decode speed is the tokens after the first over the time from the first to
    the last, so a long prompt does not dilute it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.stamps: list[float] = []

    def token(self) -> None:
        """Call once as each new token is available."""
        self.stamps.append(self.clock())

    @property
    def prefill_s(self) -> float:
        return (self.stamps[0] if self.stamps else self.clock()) - self.start

    @property
    def decode_tokens_per_s(self) -> float:
        if len(self.stamps) < 2:
            return float("nan")
        return tokens_per_s(len(self.stamps) - 1, self.stamps[-1] - self.stamps[0])

    def summary(self, prompt_tokens: int, what: str) -> str:
        """The line ``generate`` prints on stderr."""
        return (f"[{len(self.stamps)} tokens; prefill {prompt_tokens} tokens in {self.prefill_s:.2f}s; "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s; {what}]")
