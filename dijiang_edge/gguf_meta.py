"""The ``general.*`` metadata of a GGUF file (name, license, organization, ...), read
from its header alone.

``gguf.GGUFReader`` parses every key and tensor record, and a model with a 49k-token
vocabulary takes it about 12 s; the header's key/value section is read here in a
fraction of that, skipping array values (the tokenizer) without decoding them.
Layout (GGUF v2/v3): magic ``GGUF``, version u32, tensor count u64, key count u64,
then per key: name (u64 length + UTF-8), value type u32, value.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from .errors import DiJiangError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise EOFError
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    raw = f.read(n)
    if len(raw) != n:
        raise EOFError
    return raw.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool):
    """One value of type ``kind`` (None for arrays, which are skipped, and when not ``keep``)."""
    if kind == STRING:
        if keep:
            return _string(f)
        f.seek(_read(f, "<Q"), 1)
        return None
    if kind in SCALARS:
        return _read(f, SCALARS[kind])
    if kind != ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, count = _read(f, "<I"), _read(f, "<Q")
    if item in SCALARS:
        f.seek(count * struct.calcsize(SCALARS[item]), 1)
    else:
        for _ in range(count):
            _value(f, item, keep=False)
    return None


def read_general(path: str | Path) -> dict[str, str]:
    """``{"license": ..., "organization": ..., ...}``: the scalar ``general.*`` values."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or _read(f, "<I") not in (2, 3):
                raise ValueError("not a GGUF v2/v3 file")
            _read(f, "<Q")
            for _ in range(_read(f, "<Q")):
                key, kind = _string(f), _read(f, "<I")
                value = _value(f, kind, keep=key.startswith("general."))
                if value is not None and key.startswith("general."):
                    out[key[len("general."):]] = str(value)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DiJiangError(f"could not read the GGUF metadata of {path} ({e})") from None
    return out
