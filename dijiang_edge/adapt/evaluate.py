"""Held-out figures, each process scoring its share of the blocks and the sums
reduced, so the result does not depend on how many processes ran; and ``evaluate``,
the same perplexity of a finished model on any texts, in one process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import DiJiangError
from ..parity import nll_sum
from ..progress import bar
from .objectives import layer_attention
from .teacher import AttentionTap, teacher_logits

MAX_CHARS = 50_000_000        # of each text read (as adaptation's default)


def _my_blocks(blocks: torch.Tensor, acc) -> torch.Tensor:
    return blocks[acc.process_index::acc.num_processes]


def _chunks(blocks: torch.Tensor, batch: int, acc, what: str):
    """This process's batches of ``blocks``, with a progress bar on the main process
    (held-out sets of 2,048-token blocks take minutes on a CPU)."""
    chunks = _my_blocks(blocks, acc).split(batch)
    return bar(chunks, len(chunks), "eval", what, "batches") if acc.process_index == 0 else chunks


@torch.no_grad()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, batch: int, acc,
               what: str = "held-out perplexity") -> float:
    """exp(mean next-token NLL) over every held-out block (``parity.nll_sum``, the NLL of
    the export-time perplexities too)."""
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for chunk in _chunks(blocks, batch, acc, what):
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
        for chunk in _chunks(blocks, batch, acc, "layer attention error"):
            xs, ys = tap.run(chunk.to(acc.device))
            for i, (o, y) in enumerate(zip(layer_attention(student, xs), ys)):
                sums[0, i] += (o.double() - y.double()).pow(2).sum()
                sums[1, i] += y.double().pow(2).sum()
    sums = acc.reduce(sums, "sum")
    return float((sums[0] / sums[1].clamp_min(1e-30)).mean())


class Solo:
    """The one-process stand-in for an ``Accelerator`` that ``perplexity`` needs."""
    process_index, num_processes = 0, 1

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return t


def _load(model: Any, teacher: bool | str) -> tuple[Any, Any, Path, Any]:
    """``(teacher or None, DiJiang model, its tokenizer folder)``; a softmax source is
    converted on the fly, and the teacher loads only when asked for."""
    from ..tokenizer import resolve_source
    from .models import _is_converted_folder, load_pair, scratch_dir, tokenizer_folder
    from ..model import DiJiangForCausalLM
    if not teacher and isinstance(model, (str, Path)) and _is_converted_folder(resolve_source(model)):
        t, student = None, DiJiangForCausalLM.from_pretrained(resolve_source(model))
    else:
        t, student = load_pair(model, teacher if isinstance(teacher, str) and teacher else None)
    scratch = scratch_dir()
    return (t if teacher else None), student, tokenizer_folder(model, student, None, Path(scratch.name)), scratch


def evaluate(model: Any, texts: Sequence[str | Path], *, seq_len: int = 256, eval_tokens: int = 8192,
             teacher: bool | str = False, batch: int = 4, device: str = "cpu",
             window_only: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` (a converted or adapted folder, or anything ``convert`` takes)
    on each text, scored exactly as ``adapt --heldout`` scores it: the first ``seq_len``
    blocks of the text's tokens, at most ``eval_tokens`` per text.  ``teacher``: also the
    softmax source model (True: the one the folder records; a string: that model).
    ``window_only``: also the model with its DiJiang part switched off (a windowed model
    only), and with a teacher the long-range recovery ``(window_only - model) /
    (window_only - teacher)``: the share of what the window alone misses that DiJiang
    brings back."""
    from ..tokenizer import load_tokenizer
    from .data import heldout_sets, load_heldout
    if seq_len < 2 or eval_tokens < seq_len:
        raise DiJiangError(f"--seq-len must be at least 2 and --eval-tokens at least --seq-len (got {seq_len}, "
                           f"{eval_tokens})")
    raw = load_heldout(texts, MAX_CHARS)                     # a bad text fails before a model loads
    t, student, tok_dir, scratch = _load(model, teacher)
    if window_only and not student.args.window:
        raise DiJiangError("--window-only needs a model with a window (converted with --window N)")
    try:
        sets = heldout_sets(raw, load_tokenizer(tok_dir), seq_len, eval_tokens)
    finally:
        scratch.cleanup()
    acc, rows = Solo(device), {}
    student.eval().to(acc.device)
    for name, blocks in sets.items():
        if int(blocks.max()) >= student.args.vocab_size:
            raise DiJiangError("the tokenizer gives ids the model has no embedding for; use the model's own")
        row = {"tokens": blocks.numel(), "model": perplexity(lambda x: student(x)[0], blocks, batch, acc,
                                                                   f"model on {name}")}
        if t is not None:
            t.eval().to(acc.device)
            row["teacher"] = perplexity(lambda x: teacher_logits(t, x), blocks, batch, acc, f"teacher on {name}")
            row["ratio"] = row["model"] / row["teacher"]
        if window_only:
            row["window_only"] = _window_only(student, blocks, batch, acc)
            if t is not None:
                row["long_range_recovery"] = ((row["window_only"] - row["model"])
                                              / (row["window_only"] - row["teacher"]))
        rows[name] = row
    return {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
            "source": student.args.source.get("name", ""), "seq_len": seq_len, "eval_tokens": eval_tokens,
            "batch": batch, "texts": rows}


def _window_only(student: Any, blocks: torch.Tensor, batch: int, acc) -> float:
    """Perplexity with every layer's DiJiang part off: the window's softmax alone."""
    attns = [layer.attn for layer in student.layers]
    try:
        for at in attns:
            at.linear_on = False
        return perplexity(lambda x: student(x)[0], blocks, batch, acc, "window alone")
    finally:
        for at in attns:
            at.linear_on = True


def table(result: dict[str, Any]) -> str:
    """The result of ``evaluate`` as a Markdown table (one row per text)."""
    from .report import ppl_table
    rows = {n: {k: v for k, v in r.items() if k in ("model", "teacher", "window_only")}
            for n, r in result["texts"].items()}
    tokens = {n: r["tokens"] for n, r in result["texts"].items()}
    cols = (("teacher", "teacher (softmax)"), ("model", "DiJiang"))
    if any("window_only" in r for r in rows.values()):
        cols += (("window_only", "window only"),)
    out = "\n".join(ppl_table(rows, tokens, cols, ("model", "teacher")))
    rec = {n: r["long_range_recovery"] for n, r in result["texts"].items() if "long_range_recovery" in r}
    return out + "".join(f"\nlong-range recovery on {n}: {v:.1%}" for n, v in rec.items())
