"""Built-in English corpora: the ``general`` training mix and the held-out texts."""

from __future__ import annotations

import pytest

from dijiang_edge import corpora
from dijiang_edge.errors import DiJiangError
from dijiang_edge.text import sample_text


@pytest.fixture
def fresh(monkeypatch):
    """Corpora read anew (the document cache emptied before and after)."""
    corpora.documents.cache_clear()
    yield corpora
    corpora.documents.cache_clear()


def _fake(monkeypatch, docs: dict[str, list[str] | None]) -> None:
    monkeypatch.setattr(corpora, "BUILTIN", {n: corpora.Corpus(n, n, f"install it with `apt-get install {n}-pkg`",
                                                               lambda d=d: d) for n, d in docs.items()})


def test_mix_is_deterministic_and_balances_domains(fresh, monkeypatch):
    _fake(monkeypatch, {"big": [f"big document {i} " * 50 for i in range(40)],
                        "small": [f"small document {i} " * 10 for i in range(5)]})
    one = corpora.mix(("big", "small"), chars_per_domain=5_000)
    corpora.documents.cache_clear()
    assert corpora.mix(("big", "small"), chars_per_domain=5_000) == one
    big = sum(len(d) for d in one if d.startswith("big"))
    small = sum(len(d) for d in one if d.startswith("small"))
    assert 5_000 <= big < 5_000 + 800          # capped: the big domain stops at its share
    assert small == 5 * len("small document 0 ") * 10       # the small one gives all it has
    assert one[0].startswith("big") and one[1].startswith("small")   # interleaved, not one after the other
    assert [d for d in one if d.startswith("big")] != sorted(d for d in one if d.startswith("big"))  # shuffled


def test_missing_package_is_one_clear_error(fresh, monkeypatch):
    _fake(monkeypatch, {"here": ["some text " * 20], "gone": None})
    monkeypatch.setattr(corpora, "HELDOUT", {"heldout-x": "gone"})
    with pytest.raises(DiJiangError, match=r"'gone' is not installed: install it with `apt-get install gone-pkg`"):
        corpora.mix(("here", "gone"))
    with pytest.raises(DiJiangError, match=r"'heldout-x' \(gone\) is not installed: .*gone-pkg"):
        corpora.heldout("heldout-x")


def test_heldout_texts_are_never_trained_on(fresh):
    """By content: no passage of a held-out document occurs anywhere in the ``general`` mix."""
    assert not set(corpora.HELDOUT.values()) & set(corpora.GENERAL)
    train = sample_text("general", max_chars=10**9)
    for name in corpora.HELDOUT:
        docs = corpora.heldout(name)
        assert sum(map(len, docs)) >= 50_000
        for doc in docs:
            middle = doc[len(doc) // 2:][:300]
            assert len(middle) == 300 or len(doc) < 600
            assert middle not in train, f"{name} passage found in the training mix"


def test_general_has_every_domain(fresh):
    mixed = corpora.mix(corpora.GENERAL)
    assert sample_text("general", max_chars=10**9) == "\n\n".join(mixed)
    mixed = set(mixed)
    for name in corpora.GENERAL:
        docs = corpora.documents(name)
        present = sum(len(d) for d in docs if d in mixed)
        assert present >= min(sum(map(len, docs)), corpora.MIX_CHARS_PER_DOMAIN), name
    assert len({corpora.BUILTIN[n].domain for n in corpora.GENERAL}) >= 5


def test_builtin_texts_are_fixed_and_usable_by_name(fresh):
    for name in ("general", "heldout-a", "heldout-b", "brown-news", "jargon"):
        text = sample_text(name, max_chars=5_000)
        assert len(text) == 5_000 and text == sample_text(name, max_chars=5_000)
    assert sample_text("heldout-a", 2_000) != sample_text("heldout-b", 2_000)


def test_brown_tags_become_plain_text():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' (/( 1/2/cd )/) ,/, here/rb ./.\n"
    assert corpora.untag_brown(tagged) == 'The jury said "no evidence" (1/2), here.'
