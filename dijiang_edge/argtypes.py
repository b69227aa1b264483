"""``type=`` functions of the command line's numeric flags: a bad value is refused by
argparse itself (one line, exit 2) before any model is loaded, instead of a
traceback, or a negative count quietly meaning something else, later."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An integer ``>= low``; ``what`` says what the bound means (e.g. "0 = skip")."""
    def parse(text: str) -> int:
        n = _int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{' (' + what + ')' if what else ''}, "
                                             f"got {n}")
        return n
    parse.__name__ = "integer"           # argparse names the type in its messages
    return parse


def count_or_zero(low: int, what: str) -> Callable[[str], int]:
    """0 (off) or an integer ``>= low``."""
    def parse(text: str) -> int:
        n = _int(text)
        if n != 0 and n < low:
            raise argparse.ArgumentTypeError(f"must be 0 ({what}) or an integer >= {low}, got {n}")
        return n
    parse.__name__ = "integer"
    return parse


def number_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        x = _float(text)
        if (x <= low if low_open else x < low) or (high is not None and x > high):
            span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text}")
        return x
    parse.__name__ = "number"
    return parse


def int_list(low: int = 0) -> Callable[[str], str]:
    """A comma list of integers ``>= low``, kept as the text the commands split themselves."""
    def parse(text: str) -> str:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
        for p in parts:
            try:
                n = int(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
            if n < low:
                raise argparse.ArgumentTypeError(f"every value must be >= {low}, got {n}")
        return text
    parse.__name__ = "list"
    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one stderr line (the usage block would be a dozen lines of
    noise around the one that matters); ``--help`` still prints the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
