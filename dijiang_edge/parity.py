"""Parity of an exported file's runner against the PyTorch model, on real English text.

Works on any ``runtime.Runner`` (``forward(ids [1, T]) -> logits``, state carried).
Figures: logits max relative error (``max|a - b| / max|b|``) in prefill and in
token-by-token decode, teacher-forced top-1 agreement, the perplexity of both, and
how many of ``greedy`` greedily generated tokens are identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .text import sample_text

BLOCK = 256


def text_ids(tokenizer, vocab: int, n: int) -> tuple[np.ndarray, str]:
    """``n`` token ids of real English text: the model's tokenizer when it covers the
    text, else the text's UTF-8 bytes modulo ``vocab`` (tiny test models)."""
    text = sample_text(max_chars=max(20_000, n * 8))
    try:
        ids = np.asarray(tokenizer.encode(text).ids[:n], np.int64) if tokenizer else np.zeros(0)
    except Exception:      # a toy tokenizer that cannot read English
        ids = np.zeros(0)
    if len(ids) == n and ids.max() < vocab and len(np.unique(ids)) > min(vocab, n) // 4:
        return ids, "tokenizer"
    return np.frombuffer(text.encode()[:n], np.uint8).astype(np.int64) % vocab, "utf8-bytes"


class _Acc:
    """Streaming max-abs error, top-1 agreement and summed NLL over logit blocks."""

    def __init__(self):
        self.diff = self.scale = 0.0
        self.agree = self.n = 0
        self.nll_ref = self.nll = 0.0

    def add(self, got: np.ndarray, ref: np.ndarray, targets: np.ndarray | None = None) -> None:
        self.diff = max(self.diff, float(np.abs(got - ref).max()))
        self.scale = max(self.scale, float(np.abs(ref).max()))
        self.agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        self.n += len(ref)
        if targets is not None and len(targets):
            k = len(targets)
            self.nll_ref += _nll(ref[:k], targets)
            self.nll += _nll(got[:k], targets)

    def rel(self) -> float:
        return self.diff / max(self.scale, 1e-30)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float((lse - z[np.arange(len(targets)), targets]).sum())


@torch.no_grad()
def _torch_step(model, ids: np.ndarray, state):
    logits, state = model(torch.from_numpy(ids[None]), state)
    return logits[0].float().numpy(), state


def prefill_parity(model, runner, ids: np.ndarray) -> dict:
    """Teacher-forced over ``ids`` in blocks: max rel err, top-1 agreement, perplexities."""
    acc, state = _Acc(), None
    runner.reset()
    for i in range(0, len(ids), BLOCK):
        blk = ids[i:i + BLOCK]
        ref, state = _torch_step(model, blk, state)
        acc.add(runner.forward(blk[None])[0], ref, ids[i + 1:i + 1 + len(blk)])
    n = len(ids) - 1
    return {"tokens": len(ids), "max_rel_err": acc.rel(), "top1_agreement": acc.agree / acc.n,
            "ppl_torch": math.exp(acc.nll_ref / n), "ppl": math.exp(acc.nll / n)}


def decode_parity(model, runner, ids: np.ndarray, prompt: int) -> dict:
    """Prefill ``ids[:prompt]`` then decode the rest one token per call (teacher-forced)."""
    acc = _Acc()
    runner.reset()
    runner.forward(ids[None, :prompt])
    _, state = _torch_step(model, ids[:prompt], None)
    for j in range(prompt, len(ids)):
        ref, state = _torch_step(model, ids[j:j + 1], state)
        acc.add(runner.forward(ids[None, j:j + 1])[0], ref)
    return {"decode_tokens": len(ids) - prompt, "decode_max_rel_err": acc.rel(),
            "decode_top1_agreement": acc.agree / max(acc.n, 1)}


def greedy_parity(model, runner, prompt: np.ndarray, n: int) -> dict:
    """Greedy continuation of ``prompt`` by both; how many leading tokens are identical."""
    runner.reset()
    got, ref = [], []
    lg_r = runner.forward(prompt[None])[0, -1]
    lg_t, state = _torch_step(model, prompt, None)
    lg_t = lg_t[-1]
    for _ in range(n):
        got.append(int(lg_r.argmax()))
        ref.append(int(lg_t.argmax()))
        lg_r = runner.forward(np.array([[got[-1]]], np.int64))[0, -1]
        lg_t, state = _torch_step(model, np.array([ref[-1]], np.int64), state)
        lg_t = lg_t[-1]
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), n)
    return {"greedy_tokens": n, "greedy_identical": same}


def measure(model, runner, ids: np.ndarray, greedy: int = 64, prompt: int = 32,
            decode: int = 32) -> dict:
    """All parity figures of ``runner`` vs ``model`` on ``ids`` (real text)."""
    out = prefill_parity(model, runner, ids)
    out.update(decode_parity(model, runner, ids[:prompt + decode], prompt))
    if greedy:
        out.update(greedy_parity(model, runner, ids[:prompt], greedy))
    return out
