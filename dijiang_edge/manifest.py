"""``manifest.json``, the contract between the exporters and every reader of a folder.

One typed schema (``Manifest``, ``FileEntry`` and the records inside them), read and
written here only, so the exporters, the runtimes, ``check`` and ``bench`` agree on
it by construction, and neither side imports the other to share it.

* ``read(folder)``: the folder's manifest, or one ``DiJiangError`` line saying what is
  wrong (missing, not UTF-8, not JSON, not an object, a key missing) and what to do.
* ``write(folder, manifest)``.
* ``checksums(folder, paths)`` / ``verify_files(folder, entry)``: sizes and sha256 of
  the files an entry reads, refused clearly when missing, truncated or modified.
* ``select(manifest, format, quant, role)``: the file a runner uses, chosen by the
  entries' explicit ``default`` flag and ``role``, never by list order.

Records read by attribute (``entry.path``) or, as the JSON layout names them, by key
(``entry["path"]``, ``entry.get("prefill_block")``): keys that are not fields of the
schema are a file's format-specific facts (``extras``: ONNX ``graph``, ``weights``,
``prefill_block``; ``.pte`` ``qlinear``, ``max_seq_len`` ...), kept as written.  This
module imports nothing but the standard library: the torch-free runtimes read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DiJiangError

NAME = "manifest.json"
ROLES = ("prefill", "decode", "both")
DIJIANG_SETTINGS = ("variant", "chunk_size", "norm_groups", "pos_table_len", "eps", "window", "window_mode")
MODEL_FACTS = ("arch", "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "bos_id", "eos_ids")


class Record(Mapping):
    """A dataclass that also reads as its JSON object (``None`` fields are absent)."""

    extras: dict[str, Any]

    def _items(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "extras" and getattr(self, f.name) is not None}
        return d | getattr(self, "extras", {})

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, recursively (``extras`` flattened into it)."""
        return {k: _plain(v) for k, v in self._items().items()}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Record":
        """Parse ``d``; a missing required key or a non-object is one ``DiJiangError``."""
        if not isinstance(d, dict):
            raise DiJiangError(f"{where} is {type(d).__name__}, not a JSON object; re-export the folder")
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        required = [f.name for f in dataclasses.fields(cls) if f.name != "extras"
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise DiJiangError(f"{where} lacks {', '.join(map(repr, missing))}; it was not written by this "
                               f"version of dijiang-export or was edited: re-export the folder")
        kw = {k: cls._parse(k, v, f"{where} {k}") for k, v in d.items() if k in names}
        extras = {k: v for k, v in d.items() if k not in names}
        return cls(**kw, extras=extras)

    @classmethod
    def _parse(cls, key: str, value: Any, where: str) -> Any:
        return value


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@dataclass(eq=False)
class ModelFacts(Record):
    """The model's shape, as the runners and the benchmark need it."""
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, args: Any) -> "ModelFacts":
        """From a ``ModelArgs``-like object (attributes named as the fields)."""
        return cls(**{k: getattr(args, k) for k in MODEL_FACTS})


@dataclass(eq=False)
class Texts(Record):
    """The English texts of a folder's figures: ``parity`` (every file's parity figures)
    and ``calibration`` (int8 outlier calibration; ``None`` where nothing calibrated).
    Never the same text: a figure measured on the calibration text flatters the file."""
    parity: str | None = None
    calibration: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class FileEntry(Record):
    """One exported file.  ``role``: ``prefill`` | ``decode`` | ``both``; ``attention``:
    ``plain`` (the recurrence in standard ops), ``native`` (onnxruntime's
    ``LinearAttention``) or ``softmax`` (the KV-cache baseline); ``default``: the file
    a runner of this format and quantization uses unless told otherwise."""
    format: str
    quant: str
    path: str
    role: str
    attention: str | None = None
    default: bool = False
    inputs: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    state: list[dict[str, Any]] | None = None
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, key: str, value: Any, where: str) -> Any:
        if key == "role" and value not in ROLES:
            raise DiJiangError(f"{where} is {value!r}, not one of {', '.join(ROLES)}; re-export the folder")
        if key == "checksums" and not (isinstance(value, dict) and all(
                isinstance(c, dict) and {"bytes", "sha256"} <= set(c) for c in value.values())):
            raise DiJiangError(f"{where} must map each path to its 'bytes' and 'sha256'; re-export the folder")
        return value


@dataclass(eq=False)
class Manifest(Record):
    """What a folder holds and where it came from (``files`` in the order written)."""
    created: str
    source: dict[str, Any]
    model: ModelFacts
    files: list[FileEntry]
    exported_from: str | None = None        # what ``check`` rebuilds the reference from
    dijiang: dict[str, Any] | None = None   # the conversion settings (``DIJIANG_SETTINGS``)
    state_shape: list[int] | None = None
    tokenizer: str | None = None
    target: dict[str, Any] | None = None    # the device profile (``profiles.Profile.to_manifest``)
    adapter: dict[str, Any] | None = None   # {"applied": false} or the adapter applied (file, sha256, path)
    texts: Texts = field(default_factory=Texts)
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, key: str, value: Any, where: str) -> Any:
        if key == "model":
            return ModelFacts.from_dict(value, where)
        if key == "texts":
            return Texts.from_dict(value, where)
        if key == "files":
            if not isinstance(value, list):
                raise DiJiangError(f"{where} is not a list of files; re-export the folder")
            return [FileEntry.from_dict(f, f"{where}[{i}]") for i, f in enumerate(value)]
        return value


def now() -> str:
    """The ``created`` stamp (UTC): the one part of a manifest that differs between two exports."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- reading and writing --------------------------------------------------------------

def read(folder: str | Path) -> Manifest:
    """The manifest of ``folder``; anything unreadable is one line saying what to do."""
    p = Path(folder) / NAME
    if not p.is_file():
        raise DiJiangError(f"{folder} is not an export folder (no {NAME}); make one with `dijiang-export export`")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DiJiangError(f"{p} is not UTF-8 text (the file is damaged); re-export the folder") from None
    except json.JSONDecodeError as e:
        raise DiJiangError(f"{p} is not valid JSON ({e}); re-export the folder") from None
    return Manifest.from_dict(data, str(p))


def parse(data: dict[str, Any], where: str = NAME) -> Manifest:
    """A manifest from its JSON object (one a subprocess received, say)."""
    return Manifest.from_dict(data, where)


def write(folder: str | Path, manifest: Manifest) -> Path:
    p = Path(folder) / NAME
    p.write_text(json.dumps(manifest.to_dict(), indent=2))
    return p


# -- checksums ------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checksums(folder: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    """``{path: {bytes, sha256}}`` of files of ``folder`` (the entry's ``checksums``)."""
    return {p: {"bytes": (folder / p).stat().st_size, "sha256": sha256(folder / p)} for p in paths}


def verify_file(path: Path, want: Mapping | None) -> None:
    """Refuse a missing, truncated or modified file before a runtime reads it."""
    if not path.exists():
        raise DiJiangError(f"{path} is missing from the export folder; re-export it with `dijiang-export export`")
    if not want:
        return
    if path.stat().st_size != want["bytes"]:
        raise DiJiangError(f"{path} is {path.stat().st_size} bytes but the manifest says {want['bytes']}: "
                           f"the file is truncated or damaged; re-export the folder")
    if sha256(path) != want["sha256"]:
        raise DiJiangError(f"{path} does not match its sha256 in {NAME}: the file was modified "
                           f"or damaged; re-export the folder")


def verify_files(folder: Path, entry: Mapping) -> None:
    """Every file ``entry`` reads (the graph and its weights) against its checksum."""
    for rel, want in (entry.get("checksums") or {}).items():
        verify_file(Path(folder) / rel, want)


# -- choosing a file ------------------------------------------------------------------

def select(manifest: Mapping, format: str | None = None, quant: str | None = None,
           role: str | None = None) -> FileEntry:
    """The file a runner uses: among the entries of ``format``/``quant`` that serve
    ``role`` (``both`` serves either), the one marked ``default``; a lone match needs no
    mark.  Several left (format or quant not given): an error naming the choices."""
    files = manifest["files"]
    match = [f for f in files if (format is None or f["format"] == format) and (quant is None or f["quant"] == quant)
             and (role is None or f.get("role") in (role, "both"))]
    if not match:
        have = ", ".join(f"{f['format']}/{f['quant']}" for f in files) or "none"
        raise DiJiangError(f"no exported file for format={format or 'any'} quant={quant or 'any'}"
                           f"{f' role={role}' if role else ''} (the folder has: {have})")
    pool = [f for f in match if f.get("default")] or match
    if len(pool) > 1:
        kinds = ", ".join(dict.fromkeys(f"{f['format']}/{f['quant']}" for f in pool))
        if len({(f["format"], f["quant"]) for f in pool}) > 1:
            raise DiJiangError(f"the folder has several files ({kinds}); choose one with --format and --quant")
        raise DiJiangError(f"the folder marks no single default file for {kinds} "
                           f"({', '.join(f['path'] for f in pool)}); re-export the folder")
    return pool[0]
