"""The incremental detokenizer of ``generate``: its pieces joined are exactly the full
decode, for random token streams over tokenizers whose tokens split multi-byte
characters (byte-level BPE, SentencePiece-style byte fallback) or add spaces between
words (word level), and it holds only a short window of tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dijiang_edge.detokenize import CONTEXT, MAX_PENDING, IncrementalDecoder

ALPHABET = list("abcdefghij klmnop ,.!?") + list("éüñçø") + list("你好世界日本語") + ["🙂", "🚀", "☃", "—"]
CORPUS = ["héllo wörld, ça va? 你好，世界！ 🙂🚀 naïve café — ñandú",
          "the quick brown fox 日本語のテキスト ☃ 🎉 Ünïcödé"] * 20


def _byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _sentencepiece_like():
    """Metaspace words and byte-fallback tokens for characters outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(CORPUS[:1], trainers.BpeTrainer(
        vocab_size=120, show_progress=False, special_tokens=[f"<0x{i:02X}>" for i in range(256)]))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []            # byte tokens are ordinary vocabulary, as in SentencePiece
    return Tokenizer.from_str(json.dumps(spec))


def _word_level():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


TOKENIZERS = {"byte_level": _byte_level, "sentencepiece_like": _sentencepiece_like, "word_level": _word_level}


def _streamed(tok, ids: list[int], context: list[int] | None = None) -> str:
    d = IncrementalDecoder(tok.decode, context)
    return "".join(d.push(t) for t in ids) + d.flush()


def _random_text(rng: np.random.Generator, n: int) -> str:
    return "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), n))


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def test_equals_full_decode_on_random_text(tok) -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        if tok.get_vocab_size() == 98:          # word level: random words
            ids = [int(i) for i in rng.integers(0, 97, 50)]
        else:
            ids = tok.encode(_random_text(rng, 60)).ids
        assert _streamed(tok, ids) == tok.decode(ids), ids


def test_equals_full_decode_on_random_ids_of_a_byte_level_vocabulary() -> None:
    """Any id sequence a model might sample, multi-byte characters split anywhere."""
    tok = _byte_level()
    rng = np.random.default_rng(1)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, tok.get_vocab_size(), 40)]
        assert _streamed(tok, ids) == tok.decode(ids), ids


def test_a_split_character_comes_whole_once_its_bytes_are_in() -> None:
    tok = _byte_level()
    ids = tok.encode("a🙂").ids
    d = IncrementalDecoder(tok.decode)
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == "a🙂" and "\ufffd" not in "".join(pieces)


def test_context_gives_the_first_token_its_space(tok) -> None:
    """Started from the prompt's last tokens, the first new token's text is what the
    whole decode adds after the prompt (the space between words included)."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        prompt = tok.encode("w1 w2" if tok.get_vocab_size() == 98 else _random_text(rng, 20)).ids
        new = tok.encode("w3 w4" if tok.get_vocab_size() == 98 else _random_text(rng, 20)).ids
        full = tok.decode(prompt + new)
        assert tok.decode(prompt) + _streamed(tok, new, prompt[-4:]) == full


def test_window_stays_short() -> None:
    """Constant work per token: the decoder keeps a few tokens, not the whole output."""
    tok = _byte_level()
    d = IncrementalDecoder(tok.decode)
    for t in tok.encode("你好世界 " * 500).ids:
        d.push(t)
        assert len(d._ids) <= CONTEXT + 3 + MAX_PENDING     # + a character's other bytes
