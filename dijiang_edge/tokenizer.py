"""Tokenizer files travel with every model folder and export: ``tokenizer.json`` (what
the ExecuTorch runner, transformers.js and our onnxruntime runtime read) plus
``tokenizer_config.json`` / ``chat_template.jinja`` where the source has them."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import DiJiangError

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def resolve_source(model_src: str | Path) -> Path:
    """The folder holding the tokenizer of ``model_src`` ("default", a folder, a .gguf)."""
    if str(model_src) == "default":
        from .default_model import default_source_dir
        return default_source_dir()
    return Path(model_src).expanduser()


def save_tokenizer(model_src: str | Path, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` (and friends) of ``model_src`` into ``out_dir``."""
    src, out = resolve_source(model_src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = src if src.is_dir() else src.parent
    if src.is_dir() and (src / "tokenizer.json").exists():
        for name in FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, out / name)
        return out / "tokenizer.json"
    try:   # a slow tokenizer, or one inside a GGUF file: let transformers convert it
        from transformers import AutoTokenizer
        kw = {"gguf_file": src.name} if src.is_file() else {}
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        tok.save_pretrained(str(out))
    except Exception as e:
        raise DiJiangError(f"no tokenizer found for {src} ({str(e)[:160]}); put a tokenizer.json beside the model") from None
    if not (out / "tokenizer.json").exists():
        raise DiJiangError(f"the tokenizer of {src} has no fast (tokenizer.json) form")
    return out / "tokenizer.json"


def load_tokenizer(folder: str | Path):
    """A ``tokenizers.Tokenizer`` from ``folder/tokenizer.json`` (no torch, no transformers)."""
    p = Path(folder) / "tokenizer.json"
    if not p.exists():
        raise DiJiangError(f"{p} is missing; every model folder and export has its tokenizer.json beside it")
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise DiJiangError(f"{p} is not a valid tokenizer.json ({str(e)[:160]})") from None


def source_tokenizer(model_src: str | Path):
    """The ``tokenizers.Tokenizer`` of a source model: its ``tokenizer.json``, or, where it
    has none (a ``.gguf``, a slow tokenizer), the one ``save_tokenizer`` converts, made in a
    scratch folder that goes at once (``generate`` writes nothing beside the model)."""
    import tempfile
    src = resolve_source(model_src)
    if src.is_dir() and (src / "tokenizer.json").exists():
        return load_tokenizer(src)
    with tempfile.TemporaryDirectory(prefix="dijiang-tokenizer-") as tmp:
        save_tokenizer(src, tmp)
        return load_tokenizer(tmp)
