"""Parity of an exported file's runner against the PyTorch model, on real English text.

Works on any ``runtime.Runner`` (``forward(ids [1, T]) -> logits``, state carried).
Figures: logits max relative error (``max|a - b| / max|b|``) in prefill and in
token-by-token decode, teacher-forced top-1 agreement, the perplexity of both, and
how many of ``greedy`` greedily generated tokens are identical.  The PyTorch side is
computed once (``Reference``) and shared by every file checked against it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .text import sample_text

BLOCK = 256


def text_ids(tokenizer, vocab: int, n: int, text_name: str = "shakespeare") -> tuple[np.ndarray, str]:
    """``n`` token ids of real English text: the model's tokenizer when it covers the
    text, else the text's UTF-8 bytes modulo ``vocab`` (tiny test models).

    Parity is measured on Shakespeare; quantizers calibrate on ``"pydoc"`` (Python's
    manual), so no figure is measured on the text a file was calibrated on."""
    text = sample_text(text_name, max_chars=max(20_000, n * 8))
    try:
        ids = np.asarray(tokenizer.encode(text).ids[:n], np.int64) if tokenizer else np.zeros(0)
    except Exception:      # a toy tokenizer that cannot read English
        ids = np.zeros(0)
    if len(ids) == n and ids.max() < vocab and len(np.unique(ids)) > min(vocab, n) // 8:
        return ids, "tokenizer"
    return np.frombuffer(text.encode()[:n], np.uint8).astype(np.int64) % vocab, "utf8-bytes"


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float((lse - z[np.arange(len(targets)), targets]).sum())


@torch.no_grad()
def _torch_step(model, ids: np.ndarray, state):
    logits, state = model(torch.from_numpy(np.ascontiguousarray(ids)[None]), state)
    return logits[0].float().numpy(), state


class Reference:
    """The PyTorch model's outputs on ``ids``: prefill logits per block, teacher-forced
    decode logits after ``prompt`` tokens, and a greedy continuation of ``greedy`` tokens."""

    def __init__(self, model, ids: np.ndarray, prompt: int = 32, decode: int = 32, greedy: int = 64):
        self.ids, self.prompt = ids, prompt
        self.blocks, state = [], None
        for i in range(0, len(ids), BLOCK):
            lg, state = _torch_step(model, ids[i:i + BLOCK], state)
            self.blocks.append(lg)
        _, state = _torch_step(model, ids[:prompt], None)
        start = state
        self.decode = []
        for j in range(prompt, min(prompt + decode, len(ids))):
            lg, state = _torch_step(model, ids[j:j + 1], state)
            self.decode.append(lg[0])
        self.greedy: list[int] = []
        lg = self.blocks[0][prompt - 1] if prompt <= BLOCK else _torch_step(model, ids[:prompt], None)[0][-1]
        state = start
        for _ in range(greedy):
            self.greedy.append(int(lg.argmax()))
            lg, state = _torch_step(model, np.array([self.greedy[-1]], np.int64), state)
            lg = lg[-1]


def prefill_parity(ref: Reference, runner) -> dict:
    """Teacher-forced over the text in blocks: max rel err, top-1 agreement, perplexities."""
    ids, diff, scale, agree, nll, nll_ref = ref.ids, 0.0, 0.0, 0, 0.0, 0.0
    runner.reset()
    for b, want in enumerate(ref.blocks):
        i = b * BLOCK
        got = runner.forward(ids[None, i:i + len(want)])[0]
        diff, scale = max(diff, float(np.abs(got - want).max())), max(scale, float(np.abs(want).max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        tgt = ids[i + 1:i + 1 + len(want)]
        nll, nll_ref = nll + _nll(got[:len(tgt)], tgt), nll_ref + _nll(want[:len(tgt)], tgt)
    n = len(ids) - 1
    return {"tokens": len(ids), "max_rel_err": diff / max(scale, 1e-30), "top1_agreement": agree / len(ids),
            "ppl_torch": math.exp(nll_ref / n), "ppl": math.exp(nll / n)}


def decode_parity(ref: Reference, runner) -> dict:
    """Prefill the prompt, then decode the next tokens one per call (teacher-forced)."""
    runner.reset()
    runner.forward(ref.ids[None, :ref.prompt])
    got = [runner.forward(ref.ids[None, j:j + 1])[0, 0] for j in range(ref.prompt, ref.prompt + len(ref.decode))]
    got, want = np.stack(got), np.stack(ref.decode)
    return {"decode_tokens": len(want),
            "decode_max_rel_err": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)),
            "decode_top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def greedy_parity(ref: Reference, runner) -> dict:
    """Greedy continuation of the prompt; how many leading tokens equal PyTorch's."""
    runner.reset()
    lg = runner.forward(ref.ids[None, :ref.prompt])[0, -1]
    got: list[int] = []
    for _ in range(len(ref.greedy)):
        got.append(int(lg.argmax()))
        lg = runner.forward(np.array([[got[-1]]], np.int64))[0, -1]
    same = next((i for i, (a, b) in enumerate(zip(got, ref.greedy)) if a != b), len(got))
    return {"greedy_tokens": len(ref.greedy), "greedy_identical": same}


def measure(model, runner, ids: np.ndarray, greedy: int = 64, ref: Reference | None = None) -> dict:
    """All parity figures of ``runner`` vs ``model`` on ``ids`` (real text)."""
    ref = ref or Reference(model, ids, greedy=greedy)
    return {**prefill_parity(ref, runner), **decode_parity(ref, runner), **greedy_parity(ref, runner)}
