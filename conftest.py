"""Tiny random-weight models of each supported architecture, so the suite stays fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def q41(w: torch.Tensor) -> torch.Tensor:
    """``w`` through ggml's Q4_1 (blocks of 32 along the input: min, d = (max - min) / 15,
    codes rounded, d and min stored as fp16), dequantized as transformers' GGUF reader does."""
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = ((b - lo) / torch.where(d == 0, torch.ones_like(d), d) + 0.5).floor().clamp(0, 15)
    return (lo.half().float() + d.half().float() * q).reshape(n, k)


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


def saved_tiny(tmp_path_factory, arch: str):
    """A saved tiny Hugging Face folder of ``arch`` with a word-level tokenizer."""
    src = tmp_path_factory.mktemp("src") / arch
    tiny_hf(arch).save_pretrained(src)
    word_tokenizer(src)
    return src


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A saved tiny SmolLM2-shaped Hugging Face folder with a word-level tokenizer."""
    return saved_tiny(tmp_path_factory, "smollm2")


# A chat template over the word tokenizer's words, ChatML's shape: "w1" opens a message,
# "w2" (the tiny models' EOS) ends it, roles are words too. Every piece is whitespace-
# separated words, so text and ids convert both ways exactly (decode joins with spaces).
WORD_CHAT_TEMPLATE = (
    "{% set roles = {'system': 'w3', 'user': 'w5', 'assistant': 'w4'} %}"
    "{% for m in messages %}w1 {{ roles[m['role']] }} {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w1 w4 {% endif %}")


def chat_hf(seed: int = 0, scale: float = 3.0):
    """``tiny_hf("smollm2")`` with its weights scaled up (a plain random init repeats one
    token) and the rows of EOS (``w2``) and of id 0 (both ``w0`` and ``[UNK]``, so its text
    does not read back as the same id) in the tied embedding zeroed: their logits are
    exactly 0, a greedy reply never ends early and every turn runs its full length."""
    model = tiny_hf("smollm2", seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        model.get_input_embeddings().weight[[0, 2]] = 0
    return model


@pytest.fixture(scope="module")
def chat_src(tmp_path_factory):
    """A saved chat-able tiny Hugging Face folder: word tokenizer, ``WORD_CHAT_TEMPLATE``
    in its tokenizer_config.json (as the Hub's models carry it), EOS ``w2``."""
    import json
    src = tmp_path_factory.mktemp("chat") / "smollm2"
    chat_hf().save_pretrained(src)
    word_tokenizer(src)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": WORD_CHAT_TEMPLATE, "bos_token": "w1", "eos_token": "w2"}))
    return src


# -- chat: a conversation and the checks that its state was carried (tests/test_chat.py,
# runtime_tests/test_chat_exports.py) ------------------------------------------------------

TURNS = ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18"]
MAX_NEW = 8


def chat_session(lm, folder, **kw):
    """A greedy ``ChatSession`` over ``lm`` with the tokenizer and template of ``folder``."""
    from dijiang_edge.chat import ChatSession
    from dijiang_edge.chat_template import load_chat_template
    from dijiang_edge.sampling import Sampling
    from dijiang_edge.tokenizer import load_tokenizer
    tok, template = load_tokenizer(folder), load_chat_template(folder)
    return ChatSession(lm, tok, template, kw.pop("sampling", Sampling()), kw.pop("eos", [2]),
                       kw.pop("max_new", MAX_NEW), **kw)


class Counting:
    """An ``LM`` that records every id it is fed, call by call."""

    def __init__(self, lm):
        self.lm, self.vocab_size, self.calls, self.resets = lm, lm.vocab_size, [], 0

    def feed(self, ids):
        self.calls.append(list(ids))
        return self.lm.feed(ids)

    def reset(self):
        self.resets += 1
        self.lm.reset()


def conversation(session, lm: Counting, turns=TURNS) -> list[list[int]]:
    """Run ``turns``; the ids of each turn's prefill call (the first call of the turn)."""
    prefills = []
    for t in turns:
        n = len(lm.calls)
        "".join(session.send(t))
        prefills.append(lm.calls[n])
    return prefills


def rendered_ids(session, upto: int) -> list[int]:
    """The tokens of the conversation's first ``upto`` turns rendered in one piece,
    ending with the assistant's header of turn ``upto``."""
    msgs = session.messages[:2 * upto - 1 + (session.system is not None)]
    return session.tok.encode(session.template.render(msgs, True), add_special_tokens=False).ids


def check_state_carried(session, lm: Counting, prefills: list[list[int]], greedy) -> None:
    """Fed once, in order: the ids fed by the end equal the rendered conversation
    (minus the owed last token); each prefill holds only its turn's new tokens; and a
    fresh single prefill of the whole history + greedy gives each turn's reply."""
    turns = session.turns
    fed = [i for call in lm.calls for i in call]
    whole = rendered_ids(session, len(turns)) + turns[-1].reply
    assert fed == whole[:-1]
    for k in range(1, len(turns)):
        before = len(rendered_ids(session, k)) + len(turns[k - 1].reply) - 1
        assert prefills[k] == rendered_ids(session, k + 1)[before:]   # only turn k+1's tokens
        assert len(prefills[k]) < before                                # less than the history
    for k, turn in enumerate(turns):
        assert len(turn.reply) == MAX_NEW
        assert greedy(rendered_ids(session, k + 1)) == turn.reply, f"turn {k + 1}"

REPO = Path(__file__).resolve().parent
WHEEL_SOURCES = ("dijiang_edge", "export", "pyproject.toml", "README.md", "LICENSE")
WHEEL_PROBE = "dijiang_edge/adapters/wheel-probe.safetensors"   # proves the adapters' package-data rule


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """This checkout as a wheel, built offline from a copy of its sources (``pip wheel
    --no-deps --no-build-isolation``), with an empty ``WHEEL_PROBE`` adapter in it."""
    src = tmp_path_factory.mktemp("src")
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    (src / WHEEL_PROBE).parent.mkdir(exist_ok=True)
    (src / WHEEL_PROBE).write_bytes(b"")
    dist = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"PIP_NO_INDEX": "1"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        str(src), "-w", str(dist)], cwd=src, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = dist.glob("dijiang_edge-*.whl")
    return whl
