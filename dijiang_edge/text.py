"""Real English text, offline, by name: the built-in corpora of ``corpora`` (Shakespeare,
Python's documentation, the Brown corpus, ...), the ``general`` mix, the held-out texts;
or the user's own files."""

from __future__ import annotations

import gzip
from pathlib import Path

from . import corpora
from .corpora import PYDOC_INFO, shakespeare_files
from .errors import DiJiangError

CORPORA = corpora.names()          # every built-in text name


def read_text(path: str | Path) -> str:
    """A text file (``.gz`` too) or every ``.txt`` file of a folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise DiJiangError(f"{p} has no .txt files")
        return "\n".join(read_text(f) for f in files)
    if not p.exists():
        raise DiJiangError(f"text file {p} does not exist")
    if p.suffix == ".gz":
        return gzip.open(p, "rt", encoding="utf-8", errors="replace").read()
    return p.read_text(encoding="utf-8", errors="replace")


def _corpus(name: str) -> str:
    """The raw text of built-in ``name``.  ``shakespeare`` and ``pydoc`` keep the slice
    they always had (parity and calibration texts recorded in manifests by name)."""
    if name == "shakespeare":
        files = [f for f in shakespeare_files() if f.name.endswith("_gut.txt")] or shakespeare_files()
        if not files:
            raise corpora.not_installed(name)
        return _skip_front_matter("".join(read_text(f) for f in files[:6]))
    if name == "pydoc":
        if not PYDOC_INFO.exists():
            raise corpora.not_installed(name)
        return _skip_front_matter(read_text(PYDOC_INFO))
    return corpora.corpus_text(name)


def sample_text(name: str, max_chars: int = 200_000) -> str:
    """A fixed, reproducible slice of the English text ``name``: a built-in corpus
    (``CORPORA``) or a text file/folder of the user's.

    No fallback to another text: parity and calibration texts are chosen apart, and
    a missing one silently replaced by the other would measure a file on the text it
    was calibrated on.
    """
    if name in CORPORA:
        return _corpus(name)[:max_chars]
    if not Path(name).expanduser().exists():
        raise DiJiangError(f"unknown text {name!r}: give one of {', '.join(CORPORA)} or a text file or folder")
    return read_text(Path(name).expanduser())[:max_chars]


def _skip_front_matter(text: str) -> str:
    """Skip licence headers so samples start in real prose."""
    for marker in ("*** START OF", "*END*THE SMALL PRINT", "File: python.info"):
        i = text.find(marker)
        if 0 <= i < 20_000:
            j = text.find("\n", i)
            return text[j + 1:] if j >= 0 else text
    return text
