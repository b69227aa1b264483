"""The one sampler (``dijiang_edge.sampling``) against Hugging Face's meaning of each knob,
and ``generate``'s ``--top-p``, ``--repetition-penalty`` and ``--stop`` on the PyTorch path
(the exported-folder path: runtime_tests/test_chat_exports.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dijiang_edge.cli import main
from dijiang_edge.detokenize import StopStrings
from dijiang_edge.sampling import Sampler, Sampling, nucleus, penalize

V = 500


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def test_repetition_penalty_is_hugging_faces():
    """Same penalised logits as transformers' processor: positive seen logits divided,
    negative ones multiplied, unseen ones untouched."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits, seen_ids = _logits(1), [3, 7, 7, 42, 499, 0]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seen_ids]), torch.from_numpy(logits)[None])[0]
    seen = np.zeros(V, bool)
    seen[seen_ids] = True
    got = penalize(logits, seen, 1.7)
    assert np.allclose(got, want.double().numpy(), rtol=1e-6)
    assert (got[seen] != logits[seen]).all() and (got[~seen] == logits[~seen]).all()


def test_repetition_penalty_moves_a_seen_argmax():
    logits = _logits(2)
    top = int(np.argmax(logits))
    s = Sampler(Sampling(repetition_penalty=1.0), V)
    s.observe([top])
    assert s(logits) == top                                  # 1.0 is off
    s = Sampler(Sampling(repetition_penalty=100.0), V)
    assert s(logits) == top                                  # nothing seen yet
    s.observe([top])
    assert s(logits) == int(np.argsort(logits)[-2])          # seen: the runner-up wins
    s.forget()
    assert s(logits) == top


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_is_hugging_faces_top_p(top_p):
    """The kept set equals transformers' TopPLogitsWarper's on a peaked and a flat
    distribution (the flat one needs more than the first sorted candidates)."""
    from transformers.generation.logits_process import TopPLogitsWarper
    for scale in (3.0, 0.05):
        z = _logits(3) / 3 * scale
        p = np.exp(z - z.max())
        p /= p.sum()
        kept = TopPLogitsWarper(top_p)(None, torch.from_numpy(z.astype(np.float64))[None])[0]
        want = set(np.flatnonzero(np.isfinite(kept.numpy())).tolist())
        assert set(nucleus(p, top_p).tolist()) == want


def test_tiny_top_p_is_greedy_and_top_p_bounds_every_draw():
    logits = _logits(4)
    hot = Sampler(Sampling(temperature=50.0, top_p=1e-9, seed=1), V)
    assert all(hot(logits) == int(np.argmax(logits)) for _ in range(50))
    free = Sampler(Sampling(temperature=50.0, seed=1), V)
    assert len({free(logits) for _ in range(50)}) > 10       # the temperature alone spreads it
    s = Sampler(Sampling(temperature=2.0, top_p=0.5, seed=2), V)
    z = logits.astype(np.float64) / 2.0
    p = np.exp(z - z.max())
    allowed = set(nucleus(p / p.sum(), 0.5).tolist())
    draws = {s(logits) for _ in range(300)}
    assert draws <= allowed and len(draws) > 1


def test_top_k_then_top_p_and_seeded():
    logits = _logits(5)
    a = [Sampler(Sampling(temperature=1.0, top_k=3, seed=9), V) for _ in range(2)]
    runs = [[s(logits) for _ in range(40)] for s in a]
    assert runs[0] == runs[1] and set(runs[0]) <= set(np.argsort(logits)[-3:].tolist())


def test_stop_strings_split_over_pieces():
    s = StopStrings(["END", "xyz"])
    out = [s.push(p) for p in ["ab", "cE", "N", "Dtail"]]
    assert "".join(t for t, _ in out) == "abc" and out[-1][1] and s.flush() == ""
    s = StopStrings(["END"])
    assert s.push("aE")[0] == "a" and s.push("Nx")[0] == "ENx" and s.flush() == ""
    s = StopStrings(["END"])
    assert s.push("aEN") == ("a", False) and s.flush() == "EN"       # a held tail that never stopped
    s = StopStrings(["lo", "hello"])
    assert s.push("say hello") == ("say ", True)                    # the earliest occurrence of any


# -- generate on the PyTorch path -----------------------------------------------------

def _generate(capsys, src, *flags) -> list[str]:
    code = main(["generate", str(src), "--prompt", "w5 w6 w7", "--chunk-size", "8", "--no-adapter", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out.split()[3:]


def test_generate_top_p_tiny_is_greedy(chat_src, capsys):
    greedy = _generate(capsys, chat_src, "--max-new-tokens", "12")
    hot = _generate(capsys, chat_src, "--max-new-tokens", "12", "--temperature", "100", "--seed", "3")
    assert hot != greedy
    assert _generate(capsys, chat_src, "--max-new-tokens", "12", "--temperature", "100", "--seed", "3",
                     "--top-p", "1e-9") == greedy


def test_generate_repetition_penalty_and_stop(capsys, tmp_path):
    """The plain tiny model repeats one token; a penalty makes every token new."""
    from conftest import tiny_hf, word_tokenizer
    src = tmp_path / "plain"
    tiny_hf("smollm2").save_pretrained(src)
    word_tokenizer(src)
    plain = _generate(capsys, src, "--max-new-tokens", "10")
    assert len(set(plain)) < len(plain)                      # a repeat: what the penalty must change
    pen = _generate(capsys, src, "--max-new-tokens", "10", "--repetition-penalty", "1000")
    assert len(set(pen)) == len(pen) and not set(pen) & {"w5", "w6", "w7"}   # the prompt counts as seen
    cut = f" {pen[4]} "                                       # the whole word: " w1 " is not in " w13 "
    assert _generate(capsys, src, "--max-new-tokens", "10", "--repetition-penalty", "1000",
                     "--stop", "never", "--stop", cut) == pen[:4]
