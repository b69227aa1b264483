"""Incremental detokenization: the text of each new token in constant time.

Decoding the whole output at every step and printing the new suffix is exact but
quadratic (20,000 tokens ran 8x slower at the end than at the start).  Decoding only
the last token is wrong for most tokenizers: a SentencePiece/byte-level token's
leading space or a character whose UTF-8 bytes are split over tokens depends on its
neighbours.  So, as a streaming decoder must: decode a short window, the tokens since
the last emitted boundary plus the few before it as context, and emit the suffix the
new tokens add; while the window's text ends in an incomplete character (decoders show
it as U+FFFD) wait for the next token.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"
MAX_PENDING = 16        # tokens held back waiting for a character to complete: then emit anyway
CONTEXT = 4             # emitted tokens kept before the new ones: a lone space token or one whose
                        # text is empty (a special token) is no context for a SentencePiece decoder


class IncrementalDecoder:
    """``push(token) -> new text``; the concatenation of every ``push`` and a final
    ``flush`` equals ``decode(all tokens)`` for decoders that are consistent on windows
    that start at an emitted boundary (byte-level BPE, SentencePiece, WordPiece, word
    level), while keeping only the tokens of the current window."""

    def __init__(self, decode: Callable[[list[int]], str], context: list[int] | None = None):
        """``context``: the last few prompt tokens, already shown, so the first new token's
        text comes with the space or the bytes it shares with them."""
        self._decode = decode
        self._ids: list[int] = [int(t) for t in context or []]   # context, then the new tokens
        self._ids = self._ids[self._context_start():]
        self._done = len(self._ids)    # how many of _ids are emitted (the context)

    def push(self, token: int) -> str:
        """The text ``token`` adds (``""`` while a character is incomplete)."""
        self._ids.append(int(token))
        return self._emit(force=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end of the output)."""
        return self._emit(force=True) if self._done < len(self._ids) else ""

    def _emit(self, force: bool) -> str:
        before = self._decode(self._ids[:self._done]) if self._done else ""
        text = self._decode(self._ids)
        pending = len(self._ids) - self._done
        if not force and text.endswith(REPLACEMENT) and pending < MAX_PENDING:
            return ""                  # a character split over tokens: wait for its other bytes
        if not text.startswith(before):
            new = text[_common_prefix(before, text):]   # a decoder that rewrote the context's end
        else:
            new = text[len(before):]
        # the last tokens emitted are the next window's context: the window stays short
        self._ids = self._ids[self._context_start():]
        self._done = len(self._ids)
        return new

    def _context_start(self) -> int:
        """Where the next window starts: ``CONTEXT`` tokens back, or as little further
        back as reaches a character boundary (a window that starts on the second byte of
        a character decodes to U+FFFD there, and byte-fallback decoders then garble the
        whole run of byte tokens after it). The window's own start is a boundary."""
        for s in range(max(len(self._ids) - CONTEXT, 0), 0, -1):
            if not self._decode(self._ids[s:]).startswith(REPLACEMENT):
                return s
        return 0


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StopStrings:
    """``push(text) -> (printable text, stopped)`` over a stream of text pieces: stop at
    the first occurrence of any stop string, which is not printed.  The tail that could
    still be the start of a stop string is held back until the next piece settles it,
    so a stop string split over tokens is caught and none of it is printed; the work
    per piece is bounded by the stop strings' lengths, not the output's."""

    def __init__(self, stops: list[str] | None = None):
        self.stops = [s for s in stops or [] if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        if self.stopped:
            return "", True
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out, True
        keep = self._open_tail()
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        """The held-back tail at the end of the output (it never became a stop string)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _open_tail(self) -> int:
        """Length of the longest end of ``held`` that is the start of a stop string."""
        for n in range(min(len(self.held), max(map(len, self.stops)) - 1), 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
