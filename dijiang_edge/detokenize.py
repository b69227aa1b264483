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
