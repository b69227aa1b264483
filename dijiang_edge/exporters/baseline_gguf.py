"""The llama.cpp peer: GGUF files of the same source made the way llama.cpp users make
them, by llama.cpp's own tools: its converter (``convert_hf_to_gguf.py``) writes an F32
GGUF of the very weights the other baseline files are exported from
(``baseline.source_folder``), and its quantizer (``llama_model_quantize``, what the
``llama-quantize`` tool calls, reached through llama-cpp-python's bindings) makes the
quantized files with its default recipe: ``int8`` is Q8_0, ``int4`` Q4_0, ``fp32`` the
F32 file itself.  Files: ``gguf/model-<type>.gguf``.

Both tools come with llama-cpp-python's source distribution (``vendor/llama.cpp``); the
installed wheel has the library but not the converter script, so the converter is found
in a llama.cpp source tree: ``llama_cpp_dir``, else ``$DIJIANG_LLAMA_CPP``, else the one
``scripts/setup_llama_cpp.sh`` unpacks under the cache folder.  Each tool runs in a child
process (llama.cpp prints a line per tensor); a failure is one line quoting its last one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import manifest as M
from ..errors import DiJiangError
from ..progress import stage

GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
CONVERTER = "convert_hf_to_gguf.py"


def check_quant(quant: str) -> None:
    if quant not in GGUF_TYPES:
        raise DiJiangError(f"unknown gguf quantization {quant!r}; choose from "
                           + ", ".join(f"{q} ({t})" for q, t in GGUF_TYPES.items()))


def default_tree() -> Path:
    """Where ``scripts/setup_llama_cpp.sh`` unpacks the llama.cpp sources it installs."""
    from ..default_model import cache_root
    from ..runtime.llama import PIN
    return cache_root() / f"llama.cpp-{PIN}"


def converter(llama_cpp_dir: str | Path | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``, or one line on where to get it."""
    tree = llama_cpp_dir or os.environ.get("DIJIANG_LLAMA_CPP") or default_tree()
    script = Path(tree).expanduser() / CONVERTER
    if not script.is_file():
        raise DiJiangError(f"the gguf baseline needs llama.cpp's {CONVERTER}, not found in {Path(tree)}: run "
                           f"`scripts/setup_llama_cpp.sh` (llama-cpp-python and its sources, about 15 min) or give "
                           f"--llama-cpp DIR, a llama.cpp source tree")
    return script


def preflight(quants: list[str], llama_cpp_dir: str | None = None, **_) -> None:
    """The converter is there, and the quantizer's library when a quantized file is asked."""
    converter(llama_cpp_dir)
    from ..runtime.llama import available
    why = available() if any(GGUF_TYPES[q] in FTYPES for q in quants) else None
    if why:
        raise DiJiangError(f"the gguf baseline is quantized by llama.cpp: {why}")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [x for x in proc.stdout.splitlines() if x.strip()]
        raise DiJiangError(f"{what} failed: {(lines or ['no output'])[-1][:300]}")


def convert(src: Path, out: Path, script: Path) -> None:
    """The F32 GGUF of the HF folder ``src`` (llama.cpp's converter, its own gguf-py)."""
    _run([sys.executable, str(script), str(src), "--outfile", str(out), "--outtype", "f32"],
         f"llama.cpp's converter on {src}")


QUANTIZE = """import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def quantize(f32: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer with its defaults (as ``llama-quantize F32 OUT TYPE``)."""
    from ..runtime.llama import available
    why = available()
    if why:
        raise DiJiangError(f"the {gguf_type} gguf baseline is quantized by llama.cpp: {why}")
    _run([sys.executable, "-c", QUANTIZE, str(f32), str(out), FTYPES[gguf_type]], f"llama.cpp's {gguf_type} quantizer")


def export(lm, out_dir: str | Path, quant: str = "int4", parity_tokens: int = 64, threads: int = 0,
           llama_cpp_dir: str | None = None) -> list[M.FileEntry]:
    """Write ``gguf/model-<type>.gguf``; return its manifest entry."""
    from .baseline import source_folder
    check_quant(quant)
    script = converter(llama_cpp_dir)
    out = Path(out_dir)
    src = source_folder(lm, out)
    f32 = src.parent / "model-F32.gguf"
    if not f32.exists():
        with stage("gguf", "llama.cpp's converter to F32"):
            convert(src, f32, script)
    kind = GGUF_TYPES[quant]
    path = f"gguf/model-{kind}.gguf"
    (out / "gguf").mkdir(exist_ok=True)
    if kind == "F32":
        shutil.copyfile(f32, out / path)      # kept: a quantization after this one starts from it
    else:
        with stage("gguf", f"llama.cpp's quantizer to {kind}"):
            quantize(f32, out / path, kind)
    e = M.FileEntry(format="gguf", quant=quant, path=path, role="both", attention="softmax", default=True,
                    checksums=M.checksums(out, [path]),
                    outputs={"logits": {"dtype": "float32", "shape": [1, "seq", lm.hf.config.vocab_size]}},
                    extras={"graph": f"llama.cpp {kind}", "runtime": "llama.cpp (llama-cpp-python)",
                            "gguf_type": kind})
    if parity_tokens:
        from ..runtime.llama import LlamaRunner
        from .baseline import parity
        with stage("gguf", f"parity of {path} vs the Hugging Face model"):
            e.parity = parity(lm.hf, LlamaRunner(out / path, threads=threads), parity_tokens,
                              lm.hf.config.vocab_size)
    return [e]
