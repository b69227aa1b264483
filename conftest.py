"""Tiny random-weight models of each supported architecture, so the suite stays fast."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error every parity bar in this project uses."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def fed_in_pieces(model, ids: torch.Tensor, splits: list[int]):
    """Logits of ``ids`` fed to ``model`` in calls of ``splits`` tokens, and the last state."""
    state, outs, at = None, [], 0
    for n in splits:
        lg, state = model(ids[:, at:at + n], state)
        outs.append(lg)
        at += n
    return torch.cat(outs, 1), state


def tiny_hf(arch: str, seed: int = 0, layers: int = 2):
    """A randomly initialised transformers model of ``arch`` with a few-thousand-weight config
    (``layers=1`` for a ``.pte``: lowering costs about a second per XNNPACK subgraph)."""
    import transformers as T
    torch.manual_seed(seed)
    if arch == "llama":        # grouped-query attention, untied head
        cfg = T.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    elif arch == "smollm2":    # SmolLM2's shape in miniature: GQA 3:1, tied embeddings, rope 1e5
        cfg = T.LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                            rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    elif arch == "qwen2":      # QKV bias
        cfg = T.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    elif arch == "gpt_neox":   # partial rotary, parallel residual
        cfg = T.GPTNeoXConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=256,
                              bos_token_id=1, eos_token_id=2, use_parallel_residual=True,
                              tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():      # HF inits some weights to constants; randomise so tests can tell them apart
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_real_vocab():
    """A random one-layer Llama with SmolLM2's vocabulary, GQA and tied embeddings."""
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


ARCHS = ["llama", "smollm2", "qwen2", "gpt_neox"]


def word_tokenizer(folder) -> None:
    """Write a ``tokenizer.json`` whose words ``w0 .. w96`` are the tiny models' 97 ids."""
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(Path(folder) / "tokenizer.json"))


def tiny_gguf(path) -> None:
    """Write a one-layer random Llama as a float32 GGUF file (``gguf``'s writer), with a
    byte-level BPE vocabulary of the 94 printable ASCII characters plus 3 specials (97
    ids) and no merges, so ``transformers`` converts its tokenizer too: text of those
    characters is one token per character."""
    import gguf
    import numpy as np
    rng = np.random.default_rng(0)
    vocab, hidden, ffn, heads, kv_heads = 97, 64, 96, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)])
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (kv, hidden),
              "blk.0.attn_v": (kv, hidden), "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
              "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn), "output": (vocab, hidden)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def hf_models():
    return {a: tiny_hf(a) for a in ARCHS}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: extra threads only spin and wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A saved tiny SmolLM2-shaped Hugging Face folder with a word-level tokenizer."""
    src = tmp_path_factory.mktemp("src") / "smollm2"
    tiny_hf("smollm2").save_pretrained(src)
    word_tokenizer(src)
    return src
