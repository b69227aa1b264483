"""The optional libraries each command needs, checked before the command starts.

The base install is torch-free (numpy, tokenizers, jinja2: the manifest, the tokenizer,
chat templates, the argument checks); the rest comes with pip extras (``pyproject.toml``):
``[runtime]`` (onnxruntime: running an exported ONNX folder), ``[genai]``
(onnxruntime-genai), ``[torch]`` (converting, adapting, evaluating), ``[onnx]`` /
``[executorch]`` (exporting), ``[bench]`` (timing and plots), ``[all]``.
A command whose library is missing says so in one line naming the extra, before any
work: not a traceback, and not at the end of an hour of training.  Standard library
only, so that it can run where nothing else is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from .errors import DiJiangError

EXTRA = {          # top-level module -> the extra that installs it
    "torch": "torch", "transformers": "torch", "safetensors": "torch", "gguf": "torch",
    "accelerate": "torch", "onnxruntime": "runtime", "onnx": "onnx", "onnxscript": "onnx",
    "executorch": "executorch", "torchao": "executorch", "matplotlib": "bench", "onnxruntime_genai": "genai",
}
TORCH = ("torch", "transformers", "safetensors")
EXPORTER_NEEDS = {"onnx": TORCH + ("onnx", "onnxscript", "onnxruntime"), "pte": TORCH + ("executorch",)}
BENCH_NEEDS = {"onnx": ("onnxruntime", "onnx"), "pte": ("executorch",)}
BENCH_EXTRA = {"onnx": "bench", "matplotlib": "bench"}     # torch-free: bench runs on the device too


class MissingExtra(DiJiangError):
    """An optional library is not installed: the message names the pip extra."""


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (found without importing them)."""
    return [m for m in dict.fromkeys(modules) if not _installed(m)]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):      # a finder that blocks it, a broken package
        return False


def install_hint(modules: list[str], extra: dict[str, str] | None = None) -> str:
    """``pip install 'dijiang-edge[...]'`` for the extras that bring ``modules``
    (``extra``: a lighter extra where one brings the module, e.g. ``[bench]`` for onnx)."""
    extras = sorted({(extra or {}).get(m) or EXTRA.get(m, "all") for m in modules})
    return f"pip install 'dijiang-edge[{','.join(extras)}]'"


def require(modules: tuple[str, ...] | list[str], what: str, extra: dict[str, str] | None = None) -> None:
    """Raise ``MissingExtra`` (one line) when any of ``modules`` is not installed."""
    gone = missing(modules)
    if gone:
        verb = "is" if len(gone) == 1 else "are"
        raise MissingExtra(f"{what} needs {', '.join(gone)}, which {verb} not installed; install with "
                           f"`{install_hint(gone, extra)}`")


def import_error_line(e: ModuleNotFoundError) -> str | None:
    """The one line for an import of an optional library that failed mid-command (a path
    ``command_needs`` did not foresee); ``None`` for any other module (a real bug)."""
    root = (e.name or "").split(".")[0]
    if root not in EXTRA:
        return None
    return f"{root} is not installed; install with `{install_hint([root])}`"


def _is_export_folder(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _formats(a: argparse.Namespace) -> list[str]:
    return [f.strip() for f in (getattr(a, "formats", None) or "").split(",") if f.strip()]


def command_needs(a: argparse.Namespace) -> tuple[str, ...]:
    """The libraries the parsed command ``a`` will import, known from its flags alone.
    Runtimes chosen by a folder's files are checked where the file is opened
    (``runtime.open_entry``); formats taken from a ``--target`` profile by ``exporter``."""
    cmd = getattr(a, "cmd", None)
    model = str(getattr(a, "model", "") or "")
    gguf = ("gguf",) if model.endswith(".gguf") else ()
    if cmd in ("convert", "evaluate") or (cmd in ("generate", "chat") and not _is_export_folder(model)):
        return TORCH + gguf
    if cmd in ("export", "export-baseline"):
        return TORCH + gguf + sum((EXPORTER_NEEDS.get(f, ()) for f in _formats(a)), ())
    if cmd == "check":
        return TORCH
    if cmd == "adapt":                  # matplotlib: the report's loss curve, written at the very end
        return TORCH + gguf + ("accelerate", "matplotlib")
    if cmd == "bench":
        return _bench_needs(a)
    return ()


def _bench_needs(a: argparse.Namespace) -> tuple[str, ...]:
    """``--attention-forms`` times PyTorch; timing folders needs each format's runtime (and
    onnx, which counts the bytes a decode step reads) and matplotlib for the report's plots,
    as does ``--report``; ``--native`` nothing."""
    if getattr(a, "attention_forms", False):
        return ("torch",)
    if getattr(a, "native", None):
        return ()
    if getattr(a, "report", None):
        return ("matplotlib",)
    from .manifest import read
    formats = {f["format"] for d in [*(a.folders or []), *(a.baseline or [])] if _is_export_folder(d)
               for f in read(d)["files"]}
    wanted = _formats(a)
    return sum((BENCH_NEEDS[f] for f in sorted(formats) if f in BENCH_NEEDS and (not wanted or f in wanted)),
               ()) + ("matplotlib",)


def check_command(a: argparse.Namespace) -> None:
    """``require`` what ``a`` needs, before the command does anything."""
    require(command_needs(a), f"`dijiang-export {a.cmd}`", BENCH_EXTRA if a.cmd == "bench" else None)
