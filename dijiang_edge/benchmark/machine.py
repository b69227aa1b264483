"""The machine and the floor: what no runtime can beat on it.

A decode step must read every weight it uses once (the activations are tiny at
batch 1), so ``weight bytes read per token / memory bandwidth`` is a lower bound on
the decode time.  Bandwidth is measured here (numpy max reductions over a buffer far larger
than the caches, best of N, with 1 and 2 threads), weight bytes are counted from the
file the runner reads: everything but the embedding table, of which one row is read
per token (a tied head is a separate matrix in these files and is counted).
"""

from __future__ import annotations

import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .timing import best_s


def bandwidth(threads: int = 1, mib: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth in bytes/s: ``threads`` numpy ``max`` reductions
    over disjoint parts of a ``mib`` MiB float32 buffer (numpy releases the GIL there).
    ``max`` is SIMD-vectorized and memory-bound here; ``sum`` (pairwise) measured ~2x
    lower on this machine, i.e. compute-bound, which would make the floor too lenient."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        return a.nbytes / best_s(lambda: list(pool.map(np.max, parts)), repeats)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    import onnxruntime
    info = {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "memory_bytes": mem,
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": list(os.getloadavg())}
    from importlib.metadata import PackageNotFoundError, version
    for key, dist in (("executorch", "executorch"), ("onnxruntime_genai", "onnxruntime-genai"),
                      ("llama_cpp_python", "llama-cpp-python")):
        try:
            info[key] = version(dist)
        except (PackageNotFoundError, ValueError):
            pass
    return info


def _onnx_initializer_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes of gathered tables minus one row each) of a graph."""
    import onnx
    mp = onnx.load(str(path), load_external_data=False)
    size = {}
    for t in mp.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = (int(ext["length"]) if "length" in ext else len(t.raw_data), list(t.dims))
    gather = ("Gather", "GatherBlockQuantized")
    gathered = {n.input[0] for n in mp.graph.node if n.op_type in gather and n.input[0] in size}
    gathered -= {i for n in mp.graph.node if n.op_type not in gather for i in n.input}   # a shared head reads it all
    unread = sum(b - b // d[0] for name, (b, d) in size.items() if name in gathered and len(d) == 2 and d[0] > 1)
    return sum(b for b, _ in size.values()), unread


def _gguf_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes of the token-embedding table minus one row) of a GGUF;
    a file with no ``output.weight`` reads the embedding as its head: all of it."""
    from gguf import GGUFReader
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    emb = tensors.get("token_embd.weight")
    if emb is None or "output.weight" not in tensors:
        return total, 0
    rows = int(emb.shape[-1])          # gguf lists dims fastest first: [hidden, vocab]
    return total, int(emb.n_bytes) - int(emb.n_bytes) // rows


def weight_bytes_per_token(folder: str | Path, entry: dict, manifest: dict) -> dict:
    """Weight bytes a decode step of ``entry`` reads, and how they were counted."""
    folder = Path(folder)
    m = manifest["model"]
    if entry["format"] == "genai":
        total, unread = _onnx_initializer_bytes(folder / entry["path"])
        return {"bytes": total - unread, "file": entry["path"], "initializer_bytes": total,
                "embedding_rows_not_read": unread, "method": "ONNX initializers of onnxruntime-genai's "
                "model minus the rows of gathered tables that one token does not read"}
    if entry["format"] == "gguf":
        try:
            total, unread = _gguf_bytes(folder / entry["path"])
        except ImportError:             # gguf-py absent: the file size, the head and embedding all counted
            total, unread = (folder / entry["path"]).stat().st_size, 0
        return {"bytes": total - unread, "file": entry["path"], "tensor_bytes": total,
                "embedding_rows_not_read": unread, "method": "GGUF tensor bytes minus the token-embedding "
                "rows one token does not read (all of it when it is the head too)"}
    if entry["format"] == "onnx":
        from ..runtime.onnx import companion
        dec = entry if entry.get("attention") == "softmax" else companion(manifest, entry, "decode")
        total, unread = _onnx_initializer_bytes(folder / dec["path"])
        return {"bytes": total - unread, "file": dec["path"], "initializer_bytes": total,
                "embedding_rows_not_read": unread, "method": "ONNX initializers of the decode graph "
                "minus the rows of gathered tables that one token does not read"}
    size = (folder / entry["path"]).stat().st_size
    per = 1 if entry.get("qembedding") else 4
    table = m["vocab_size"] * m["hidden_size"] * per
    unread = table - table // m["vocab_size"]
    return {"bytes": size - unread, "file": entry["path"], "file_bytes": size,
            "embedding_rows_not_read": unread, "method": ".pte file size minus the embedding rows one "
            "token does not read (table size from the manifest's shape and the embedding recipe)"}


def floor_ms(weight_bytes: int, bytes_per_s: float) -> float:
    return 1000.0 * weight_bytes / bytes_per_s
