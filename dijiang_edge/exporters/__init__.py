"""Export targets, one module each (``onnx.py``, ``executorch.py``), and what they
share: the output folder that appears only when complete, the tokenizer, the manifest.

An exporter is ``export(model, out_dir, quant, **opts) -> list[dict]``: it writes its
files into ``out_dir`` and returns one manifest entry per file (``format``, ``quant``,
``path``, ``role``, state names/shapes, ``parity`` figures measured at export time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DiJiangError

MANIFEST = "manifest.json"
PARITY_TOKENS = 2048     # tokens of real text each exported file is checked on at export (every format)
FORMATS = {"onnx": "onnx", "pte": "executorch"}     # --formats name -> module


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``out`` only if the block succeeds.

    An existing ``out`` is refused unless ``force``; a failure half-way leaves no
    half-written ``out`` behind (the scratch folder is removed).
    """
    out = Path(out)
    if out.exists() and not force:
        raise DiJiangError(f"{out} already exists; choose another --out or pass --force to replace it")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def exporter(fmt: str) -> Callable[..., list[dict]]:
    if fmt not in FORMATS:
        raise DiJiangError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    try:
        mod = import_module(f".{FORMATS[fmt]}", __name__)
    except ImportError as e:
        raise DiJiangError(f"the {fmt} exporter needs a package that is missing ({e.name}); "
                           f"install it with `pip install 'dijiang-edge[{FORMATS[fmt]}]'`") from None
    return mod.export


def read_manifest(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / MANIFEST
    if not p.exists():
        raise DiJiangError(f"{folder} is not an export folder (no {MANIFEST}); make one with `dijiang-export export`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DiJiangError(f"{p} is not valid JSON ({e}); re-export the folder") from None


def tokenizer_source(model_src: str | Path, model) -> str | Path:
    """Where the tokenizer of ``model_src`` lives: beside it, or beside its source."""
    p = Path(str(model_src)).expanduser()
    if str(model_src) == "default" or (p / "tokenizer.json").exists() or p.suffix == ".gguf":
        return model_src
    return model.args.source.get("name", model_src)


def _model_path(model_src: str | Path) -> str:
    """``model_src`` as given to ``convert``: an absolute path when it is one."""
    p = Path(str(model_src)).expanduser()
    return str(p.resolve()) if p.exists() else str(model_src)


def export(model_src: str, out: str | Path, formats: list[str], quants: list[str],
           force: bool = False, convert_options: dict | None = None, target: dict | None = None,
           **opts: Any) -> dict[str, Any]:
    """Convert ``model_src`` and export it in each format and quantization into ``out``.

    ``target``: the device profile the files are for (``profiles.Profile.to_manifest``),
    recorded in the manifest. Returns the manifest (also written to ``out/manifest.json``).
    """
    from ..conversion import convert
    from ..tokenizer import save_tokenizer
    exporters = {f: exporter(f) for f in formats}          # fail fast on a missing runtime
    model = convert(model_src, **(convert_options or {}))
    with staged_dir(out, force) as tmp:
        save_tokenizer(tokenizer_source(model_src, model), tmp)
        files: list[dict] = []
        for fmt, fn in exporters.items():
            for q in quants:
                files += fn(model, tmp, quant=q, **opts)
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": model.args.source,
            "exported_from": _model_path(model_src),     # what `check` rebuilds the reference from
            "dijiang": {k: getattr(model.args, k) for k in
                        ("variant", "chunk_size", "norm_groups", "pos_table_len", "eps")},
            "model": {k: getattr(model.args, k) for k in
                      ("arch", "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                       "head_dim", "bos_id", "eos_ids")},
            "state_shape": list(model.state_shape(1)),
            "tokenizer": "tokenizer.json",
            "files": files,
        }
        if target:
            manifest["target"] = target
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
