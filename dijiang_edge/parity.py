"""Parity of an exported file against the PyTorch model: logits against logits.

``compare`` is the one definition of the figures, used by the export-time checks,
``check`` (every tier, native runners included), the softmax baseline and the tests:
max relative error (``max|a - b| / max|b|``) over teacher-forced prefill logits and over
token-by-token decode logits, top-1 agreement, the perplexity of both and its change,
and how many greedily generated tokens are identical.  ``failures`` judges a figure
set against ``bars.BARS``.  ``measure`` drives a ``runtime.Runner`` (``forward(ids
[1, T]) -> logits``, state carried) through the text; the PyTorch side is computed once
(``Reference``) and shared by every file checked against it.

Texts are chosen by name (``text.sample_text``): parity on one, int8 calibration on
another, both recorded in the manifest (``manifest.Texts``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .bars import BARS
from .errors import DiJiangError
from .text import sample_text
from .validate import PARITY_PROMPT

BLOCK = 256


def text_ids(tokenizer, vocab: int, n: int, text_name: str) -> tuple[np.ndarray, str]:
    """``n`` token ids of the English text ``text_name`` and how they were made: the
    model's tokenizer when it covers the text (``"tokenizer"``), else the text's UTF-8
    bytes modulo ``vocab`` (``"utf8-bytes"``: tiny test models)."""
    text = sample_text(text_name, max_chars=max(20_000, n * 8))
    try:
        ids = np.asarray(tokenizer.encode(text).ids[:n], np.int64) if tokenizer else np.zeros(0)
    except Exception:      # a toy tokenizer that cannot read English
        ids = np.zeros(0)
    if len(ids) == n and ids.max() < vocab and len(np.unique(ids)) > min(vocab, n) // 8:
        return ids, "tokenizer"
    return np.frombuffer(text.encode()[:n], np.uint8).astype(np.int64) % vocab, "utf8-bytes"


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float64) of ``logits [..., V]`` for
    ``targets [...]``: the perplexity of parity and of adaptation's held-out figures."""
    lp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1)
    return F.nll_loss(lp, targets.reshape(-1), reduction="none").double().sum()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    nll = nll_sum(torch.from_numpy(np.ascontiguousarray(logits)), torch.from_numpy(targets))
    return math.exp(float(nll) / len(targets))


def compare(got: np.ndarray, want: np.ndarray, targets: np.ndarray | None = None,
            decode: tuple[np.ndarray, np.ndarray] | None = None,
            greedy: tuple[list[int], list[int]] | None = None) -> dict:
    """The parity figures of a file's logits ``got`` against the reference's ``want``
    (``[T, V]``, teacher-forced over the same ids).  ``targets``: the next token of each
    row (perplexities); ``decode``: (got, want) logits of one-token calls; ``greedy``:
    (the file's greedy tokens, the reference's choice at each of them)."""
    fig = {"tokens": len(want), "max_rel_err": rel_err(got, want),
           "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
    if targets is not None and len(targets):
        n = len(targets)
        fig |= {"ppl_torch": perplexity(want[:n], targets), "ppl": perplexity(got[:n], targets)}
        fig["ppl_change"] = fig["ppl"] / fig["ppl_torch"] - 1
    if decode is not None:
        fig |= {"decode_tokens": len(decode[1]), "decode_max_rel_err": rel_err(*decode) if len(decode[1]) else 0.0,
                "decode_top1_agreement": float((decode[0].argmax(-1) == decode[1].argmax(-1)).mean())
                if len(decode[1]) else 1.0}
    if greedy is not None:
        mine, theirs = greedy
        fig |= {"greedy_tokens": len(theirs),
                "greedy_identical": next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                                         min(len(mine), len(theirs)))}
    return fig


def failures(quant: str, fig: dict, floor: float | None = None) -> tuple[list[str], str]:
    """What of ``fig`` misses ``BARS`` (empty: pass), and a note for the row.

    fp32: prefill and decode within ``fp32_max_rel_err`` and every greedy token
    identical; where PyTorch's own float32 is further than that from float64 (``floor``,
    the un-adapted official variant), the prefill bar is that floor, said in the note.
    Quantized files: top-1 agreement and perplexity change."""
    bar, fails, note = BARS["fp32_max_rel_err"], [], ""
    if quant == "fp32":
        prefill_bar = max(bar, floor or 0.0)
        err = fig["max_rel_err"]
        if err > prefill_bar:
            fails.append(f"rel err {err:.1e} > {prefill_bar:.0e}")
        if fig.get("decode_max_rel_err", 0.0) > bar:
            fails.append(f"decode rel err {fig['decode_max_rel_err']:.1e} > {bar:.0e}")
        if fig.get("greedy_identical", 0) < fig.get("greedy_tokens", 0):
            fails.append(f"greedy differs from token {fig['greedy_identical']}")
        if floor and floor > bar and err > bar and not fails:
            note = f"rel err bar = PyTorch fp32-vs-fp64 error {floor:.1e} (ill-conditioned model)"
        return fails, note
    if fig["top1_agreement"] < BARS["int8_top1_agreement"]:
        fails.append(f"top-1 {100 * fig['top1_agreement']:.1f}% < {100 * BARS['int8_top1_agreement']:.0f}%")
    if abs(fig["ppl_change"]) > BARS["int8_ppl_change"]:
        fails.append(f"ppl {100 * fig['ppl_change']:+.1f}% beyond {100 * BARS['int8_ppl_change']:.0f}%")
    return fails, note


@torch.no_grad()
def torch_step(model, ids: np.ndarray, state):
    logits, state = model(torch.from_numpy(np.ascontiguousarray(ids)[None]), state)
    return logits[0].float().numpy(), state


class Reference:
    """The PyTorch model's outputs on ``ids``: prefill logits per block, teacher-forced
    decode logits after ``prompt`` tokens, and a greedy continuation of ``greedy`` tokens."""

    def __init__(self, model, ids: np.ndarray, prompt: int = PARITY_PROMPT, decode: int = 32, greedy: int = 64):
        if len(ids) <= prompt:
            raise DiJiangError(f"parity checks need at least {prompt + 1} tokens (got {len(ids)}); "
                               "give more parity tokens, or 0 to skip them")
        self.ids, self.prompt = ids, prompt
        self.blocks, state = [], None
        for i in range(0, len(ids), BLOCK):
            lg, state = torch_step(model, ids[i:i + BLOCK], state)
            self.blocks.append(lg)
        _, state = torch_step(model, ids[:prompt], None)
        start = state
        self.decode = []
        for j in range(prompt, min(prompt + decode, len(ids))):
            lg, state = torch_step(model, ids[j:j + 1], state)
            self.decode.append(lg[0])
        self.greedy: list[int] = []
        lg = self.blocks[0][prompt - 1] if prompt <= BLOCK else torch_step(model, ids[:prompt], None)[0][-1]
        state = start
        for _ in range(greedy):
            self.greedy.append(int(lg.argmax()))
            lg, state = torch_step(model, np.array([self.greedy[-1]], np.int64), state)
            lg = lg[-1]

    @property
    def logits(self) -> np.ndarray:
        return np.concatenate(self.blocks)


def run_prefill(runner, ids: np.ndarray) -> np.ndarray:
    """The runner's logits over ``ids`` from a fresh state, fed in ``BLOCK``-token calls."""
    runner.reset()
    return np.concatenate([runner.forward(ids[None, i:i + BLOCK])[0] for i in range(0, len(ids), BLOCK)])


def run_decode(runner, ids: np.ndarray, prompt: int, n: int) -> np.ndarray:
    """Prefill ``prompt`` tokens, then the next ``n`` one per call (teacher-forced)."""
    runner.reset()
    runner.forward(ids[None, :prompt])
    return np.stack([runner.forward(ids[None, j:j + 1])[0, 0] for j in range(prompt, prompt + n)])


def run_greedy(runner, ids: np.ndarray, prompt: int, n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` tokens of ``ids``."""
    runner.reset()
    lg = runner.forward(ids[None, :prompt])[0, -1]
    got: list[int] = []
    for _ in range(n):
        got.append(int(lg.argmax()))
        lg = runner.forward(np.array([[got[-1]]], np.int64))[0, -1]
    return got


def measure(model, runner, ids: np.ndarray, greedy: int = 64, ref: Reference | None = None) -> dict:
    """All parity figures (``compare``) of ``runner`` vs ``model`` on ``ids`` (real text)."""
    ref = ref or Reference(model, ids, greedy=greedy)
    decode = np.stack(ref.decode) if ref.decode else np.zeros((0, 0), np.float32)
    return compare(run_prefill(runner, ref.ids), ref.logits, ref.ids[1:],
                   decode=(run_decode(runner, ref.ids, ref.prompt, len(ref.decode)), decode),
                   greedy=(run_greedy(runner, ref.ids, ref.prompt, len(ref.greedy)), ref.greedy))
