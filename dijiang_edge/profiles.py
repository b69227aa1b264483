"""Device profiles: one TOML file per target under ``export/profiles/`` (an Android
phone, a Linux arm64 board, an x86 laptop) choosing what to export for it. An installed
wheel carries them as package data (``shipped``), so ``--target`` works outside a checkout.

A profile's values are defaults: ``dijiang-export export --target NAME`` uses them
where no flag is given, and records the profile in the manifest (``"target"``), so
``dijiang-export check`` knows which files and which platform tiers the folder is for.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import DiJiangError
from .shipped import shipped

ARCHES = ("x86_64", "aarch64")
FORMATS = ("onnx", "pte")
ONNX_QUANTS = ("fp32", "int8", "int4")
VARIANTS = ("official", "normalized", "normalized_gated")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str                          # x86_64 | aarch64: the CPU the files run on
    formats: tuple[str, ...]           # onnx, pte
    quant: tuple[str, ...]             # fp32, int8, or a .pte recipe label (8da4w, 8da8w+emb8w, ...)
    threads: int                       # threads the app/runner uses (0 = the runtime's default)
    max_context: int                   # tokens per sequence the app/runner allows
    max_seq_len: int | None = None     # .pte: tokens per forward call
    qlinear: str | None = None         # .pte: one more file with linears quantized so
    qembedding: str | None = None      # .pte: ... and the embedding
    variant: str | None = None         # DiJiang form to convert to (None: the CLI's default)
    path: str = ""

    def quants(self) -> list[str]:
        """The quantization labels to export (``qlinear``/``qembedding`` add a .pte recipe)."""
        qs = list(self.quant)
        if self.qlinear or self.qembedding:
            from .exporters.executorch import quant_label
            qs = list(dict.fromkeys(qs + [quant_label(self.qlinear, self.qembedding)]))
        return qs

    def export_options(self, formats: list[str]) -> dict[str, Any]:
        """Exporter keyword options this profile sets (the .pte's context limit)."""
        if "pte" not in formats:
            return {}
        opts: dict[str, Any] = {"max_context_len": self.max_context}
        if self.max_seq_len:
            opts["max_seq_len"] = self.max_seq_len
        return opts

    def to_manifest(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}
        d["path"] = Path(self.path).name
        return d


def profile_dir() -> Path:
    """The shipped profiles: ``export/profiles`` of a checkout, else the installed copy."""
    return shipped("profiles")


def available(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (folder or profile_dir()).glob("*.toml"))


def load_profile(target: str, folder: Path | None = None) -> Profile:
    """The profile named ``target`` (a file of ``folder``, default the shipped ones), or a
    path to a ``.toml`` file."""
    folder = folder or profile_dir()
    p = Path(target).expanduser()
    if p.suffix == ".toml" and p.is_file():
        return parse_profile(p)
    path = folder / f"{target}.toml"
    if not path.is_file():
        names = ", ".join(available(folder)) or f"none: {folder} has no .toml files"
        raise DiJiangError(f"unknown target {target!r}; available targets: {names} "
                           f"(or pass the path of a profile .toml file)")
    return parse_profile(path)


def parse_profile(path: Path) -> Profile:
    """Read and validate one profile file; errors name the file and the field."""
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DiJiangError(f"profile {path} is not valid TOML ({e})") from None
    return Profile(name=path.stem, path=str(path), **_validate(raw, path))


def _validate(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    def bad(field: str, why: str) -> DiJiangError:
        return DiJiangError(f"profile {path}: field {field!r} {why}")

    fields = {f for f in Profile.__dataclass_fields__ if f not in ("name", "path")}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise bad(unknown[0], f"is not a profile field (fields: {', '.join(sorted(fields))})")
    for f in ("description", "arch", "formats", "quant", "threads", "max_context"):
        if f not in raw:
            raise bad(f, "is missing")
    if not isinstance(raw["description"], str) or not raw["description"].strip():
        raise bad("description", "must be a non-empty string")
    if raw["arch"] not in ARCHES:
        raise bad("arch", f"is {raw['arch']!r}; must be one of {', '.join(ARCHES)}")
    out = dict(raw)
    for f, allowed in (("formats", FORMATS), ("quant", None)):
        v = raw[f]
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise bad(f, "must be a non-empty list of strings")
        if allowed and set(v) - set(allowed):
            raise bad(f, f"has {sorted(set(v) - set(allowed))}; choose from {', '.join(allowed)}")
        out[f] = tuple(v)
    for f, low in (("threads", 0), ("max_context", 1), ("max_seq_len", 1)):
        if f in raw and (not isinstance(raw[f], int) or isinstance(raw[f], bool) or raw[f] < low):
            raise bad(f, f"must be an integer >= {low} (got {raw[f]!r})")
    if raw.get("max_seq_len") and raw["max_seq_len"] >= raw["max_context"]:
        raise bad("max_seq_len", f"must be below max_context ({raw['max_context']})")
    if "variant" in raw and raw["variant"] not in VARIANTS:
        raise bad("variant", f"is {raw['variant']!r}; must be one of {', '.join(VARIANTS)}")
    _validate_quant(raw, out, bad)
    return out


def _validate_quant(raw: dict[str, Any], out: dict[str, Any], bad) -> None:
    """Labels every chosen format can write: ONNX knows fp32/int8/int4, .pte also its recipes."""
    from .exporters.executorch import QEMBEDDING, QLINEAR, parse_quant
    if "onnx" in out["formats"]:
        other = [q for q in out["quant"] if q not in ONNX_QUANTS]
        if other or raw.get("qlinear") or raw.get("qembedding"):
            raise bad("quant" if other else ("qlinear" if raw.get("qlinear") else "qembedding"),
                      f"asks for a .pte-only quantization {other or ''} but formats include onnx "
                      f"(ONNX files are {' or '.join(ONNX_QUANTS)})")
    for f, choices in (("qlinear", QLINEAR), ("qembedding", QEMBEDDING)):
        if raw.get(f) is not None and raw[f] not in choices:
            raise bad(f, f"is {raw[f]!r}; must be one of {', '.join(choices)}")
    for q in out["quant"]:
        try:
            parse_quant(q)
        except DiJiangError as e:
            raise bad("quant", f"has {q!r}: {e}") from None
