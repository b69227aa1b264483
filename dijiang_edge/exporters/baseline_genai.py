"""The onnxruntime-genai peer: the softmax model of the same source built by
onnxruntime-genai's own model builder (``onnxruntime_genai.models.builder``), the ONNX
a user of onnxruntime-genai would run (``GroupQueryAttention`` over a KV cache shared
between past and present, ``MatMulNBits`` weights, its ``genai_config.json``).

Each quantization is its own genai folder ``genai/<quant>/`` (``model.onnx``, its
weights, ``genai_config.json``, the tokenizer), built offline from the very weights the
other baseline files are exported from (saved by ``baseline.source_folder``): ``fp32``,
``int8`` and ``int4`` are the builder's precisions of those names, with its CPU defaults
(block 32, int8 activations: accuracy level 4, as the DiJiang int4 file uses).
The builder runs in a child process: it imports much, prints much, and a failure is
then one line quoting its last message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .. import manifest as M
from ..errors import DiJiangError
from ..progress import stage

QUANTS = ("fp32", "int8", "int4")
CONTEXT = 32768     # positions the builder's rotary tables cover at least (bench reaches 16k + decode)


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise DiJiangError(f"unknown onnxruntime-genai precision {quant!r}; choose from {', '.join(QUANTS)}")


def _builder_available() -> None:
    import importlib.util
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise DiJiangError("the genai baseline needs onnxruntime-genai's model builder: "
                           "`pip install onnxruntime-genai`")


def preflight(quants: list[str], **_) -> None:
    _builder_available()


def build(src: Path, out: Path, quant: str, cache: Path) -> None:
    """Run the builder on the HF folder ``src`` into ``out`` (CPU, ``quant`` precision)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", quant, "-e", "cpu", "-c", str(cache), "--extra_options", "filename=model.onnx"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not (out / "genai_config.json").exists():
        lines = [x for x in proc.stdout.splitlines() if x.strip()]
        raise DiJiangError(f"onnxruntime-genai's builder failed on the baseline ({quant}): "
                           f"{(lines or ['no output'])[-1][:300]}")


def _widened(src: Path, context: int) -> Path:
    """``src`` as the builder should read it: its files linked, its config's
    ``max_position_embeddings`` at least ``context`` so the builder's rotary tables reach
    that far (the model's function at the positions it was trained on is unchanged;
    ``bench`` times up to 16k).  The shared source folder itself stays as saved."""
    out = src.with_name(src.name + "-genai")
    if not out.exists():
        out.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((src / "config.json").read_text())
        cfg["max_position_embeddings"] = max(int(cfg.get("max_position_embeddings") or 0), context)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def export(lm, out_dir: str | Path, quant: str = "int4", parity_tokens: int = 64,
           threads: int = 0) -> list[M.FileEntry]:
    """Build ``genai/<quant>/`` with onnxruntime-genai's builder; return its manifest entry."""
    from .baseline import source_folder
    check_quant(quant)
    _builder_available()
    out = Path(out_dir)
    src = _widened(source_folder(lm, out), CONTEXT)
    folder = out / "genai" / quant
    with stage("genai", f"onnxruntime-genai builder, {quant} (a minute or more)"):
        build(src, folder, quant, src.parent / "genai-cache")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith(("model.onnx", "genai_config")))
    rel = [f"genai/{quant}/{n}" for n in names]          # the model's files (the tokenizer's are not weights)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    e = M.FileEntry(format="genai", quant=quant, path=f"genai/{quant}/model.onnx", role="both",
                    attention="softmax", default=True, checksums=M.checksums(out, rel),
                    outputs={"logits": {"dtype": "float32", "shape": [1, "seq", int(cfg["vocab_size"])]}},
                    extras={"graph": "onnxruntime-genai builder", "runtime": "onnxruntime-genai",
                            "context_length": int(cfg["context_length"])})
    if parity_tokens:
        from ..runtime.genai import GenaiRunner
        from .baseline import parity
        with stage("genai", f"parity of {e.path} vs the Hugging Face model"):
            e.parity = parity(lm.hf, GenaiRunner(folder, max_length=parity_tokens + 8, threads=threads), parity_tokens,
                              lm.hf.config.vocab_size)
    return [e]
