"""The tiny export the native and ARM64 tiers share (built once per test session):
a random one-layer Llama (GQA, untied head; lowering costs ~1 s per XNNPACK subgraph, so
one layer) as fp32 and int8 ``.pte`` with a small ``max_seq_len`` (prompts cross several
forward calls) and fp32 and int8 ONNX (the default graph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MAX_SEQ = 16
_cache: dict[tuple, tuple[Path, object]] = {}


def _one_layer_llama():
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_export(root: Path):
    """``(folder, model)``: the export folder and the converted PyTorch model it came from."""
    import dijiang_edge
    from conftest import word_tokenizer
    from dijiang_edge.exporters import export
    key = str(root)
    if key not in _cache:
        src = root / "native_src"
        if not src.exists():
            _one_layer_llama().save_pretrained(src)
            word_tokenizer(src)
        out = root / "native_export"
        export(str(src), out, ["pte", "onnx"], ["fp32", "int8"], force=True, convert_options={"chunk_size": 8},
               max_seq_len=MAX_SEQ, parity_tokens=0, kinds=("native",))
        _cache[key] = out, dijiang_edge.convert(str(src), chunk_size=8)
    return _cache[key]


def text_prompt(model, n: int) -> list[int]:
    """``n`` ids of real English text (its UTF-8 bytes modulo the tiny vocabulary)."""
    from dijiang_edge.parity import text_ids
    return [int(i) for i in text_ids(None, model.args.vocab_size, n, "shakespeare")[0]]


@torch.no_grad()
def torch_greedy(model, prompt: list[int], new_tokens: int) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """PyTorch's prefill logits [T, V], greedy tokens, and the logits of each decode call."""
    logits, state = model(torch.tensor([prompt]), None)
    prefill = logits[0].float().numpy()
    tokens, steps = [int(prefill[-1].argmax())], []
    for _ in range(new_tokens - 1):
        logits, state = model(torch.tensor([[tokens[-1]]]), state)
        steps.append(logits[0, -1].float().numpy())
        tokens.append(int(steps[-1].argmax()))
    return prefill, tokens, steps


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the project's parity measure, ``parity.rel_err``)."""
    from dijiang_edge.parity import rel_err
    return rel_err(np.asarray(a, np.float64), np.asarray(b, np.float64))


def agreement(got: np.ndarray, want: np.ndarray, ids: list[int]) -> dict:
    """Teacher-forced figures of logits [T, V] over ``ids`` (``parity.compare``)."""
    from dijiang_edge.parity import compare
    return compare(np.asarray(got, np.float32), np.asarray(want, np.float32), np.asarray(ids[1:], np.int64))
