"""``dijiang-export bench``: DiJiang files against the softmax KV-cache baseline of the
same source model, on the same runtime at the same precision.

    from dijiang_edge.benchmark import bench
    data = bench(["out/smol"], baselines=["out/smol-softmax"], out="out/bench")

For every runnable file (the default runner of each format and quantization) and
thread count, one fresh process (``measure``) prefills up to each context length and
times decode there; this module adds the machine (bandwidth, the floor), file sizes
and state vs KV-cache bytes, and writes ``bench.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import DiJiangError
from . import machine as M
from .measure import in_subprocess, progress
from .timing import WARMUP_TOKENS

LENGTHS = [128, 512, 2048, 8192, 16384]
QUICK_LENGTHS = [128, 2048]
THREADS = [1, 2]


def runnable(folder: str | Path, formats: list[str] | None, quants: list[str] | None) -> list[dict]:
    """The file a runner uses for each format and quantization of ``folder`` (its default)."""
    from ..exporters import read_manifest
    manifest = read_manifest(folder)
    picked: dict[tuple[str, str], dict] = {}
    for f in manifest.get("files", []):
        k = (f["format"], f["quant"])
        if (formats and k[0] not in formats) or (quants and k[1] not in quants):
            continue
        if f["format"] == "onnx" and f.get("role") not in ("both", "prefill"):
            continue                                   # decode-only graphs run beside a prefill one
        if k not in picked or (f.get("default") and not picked[k].get("default")):
            picked[k] = f
    return [{"folder": str(folder), "entry": e, "manifest": manifest} for e in picked.values()]


def cache_bytes(manifest: dict, entry: dict, lengths: list[int]) -> dict[str, int]:
    """Per-sequence state (DiJiang: fixed) or KV cache (softmax: ``2 L Hkv d`` per layer) in fp32."""
    m = manifest["model"]
    if entry.get("attention") == "softmax":
        return {str(n): 2 * m["n_layers"] * m["n_kv_heads"] * m["head_dim"] * n * 4 for n in lengths}
    per = 4
    for d in manifest["state_shape"]:
        per *= d
    return {str(n): per * m["n_layers"] for n in lengths}


def file_bytes(folder: str | Path, entry: dict) -> int:
    paths = set(entry.get("checksums", {})) or {entry["path"]}
    return sum((Path(folder) / p).stat().st_size for p in paths)


def _check_baselines(dijiang: list[dict], softmax: list[dict]) -> None:
    have = {(s["entry"]["format"], s["entry"]["quant"]) for s in softmax}
    missing = sorted({(d["entry"]["format"], d["entry"]["quant"]) for d in dijiang} - have)
    if missing:
        want = ", ".join(f"{f}/{q}" for f, q in missing)
        raise DiJiangError(f"the baseline folder(s) have no softmax file for {want}; export them with "
                           f"`dijiang-export export-baseline MODEL --out DIR --formats ... --quant ...`, "
                           f"narrow --formats/--quant, or pass --no-baseline")


def bench(folders: list[str | Path], baselines: list[str | Path] | None = None, out: str | Path = "out/bench",
          lengths: list[int] | None = None, threads: list[int] | None = None, tokens: int | None = None,
          formats: list[str] | None = None, quants: list[str] | None = None, quick: bool = False,
          force: bool = False, bandwidth_mib: int | None = None) -> dict:
    """Measure, then write ``out/bench.json``, ``out/report.md``, ``out/*.png``; returns the JSON."""
    from ..exporters import staged_dir
    lengths = sorted(lengths or (QUICK_LENGTHS if quick else LENGTHS))
    threads = threads or ([2] if quick else THREADS)
    tokens = tokens or (16 if quick else 32)
    if tokens < 1 or not lengths or lengths[0] < 1:
        raise DiJiangError("need --tokens >= 1 and positive --lengths")
    dijiang = [r for f in folders for r in runnable(f, formats, quants)]
    if any(r["entry"].get("attention") == "softmax" for r in dijiang):
        raise DiJiangError("a DIR holds softmax baseline files; give baseline folders with --baseline")
    if not dijiang:
        raise DiJiangError(f"no DiJiang file for formats={formats or 'any'} quants={quants or 'any'} in "
                           f"{', '.join(map(str, folders))}")
    softmax = [r for f in baselines or [] for r in runnable(f, formats, quants)]
    if baselines is not None:
        if any(r["entry"].get("attention") != "softmax" for r in softmax):
            raise DiJiangError("a --baseline folder holds DiJiang files, not a softmax baseline; make one "
                               "with `dijiang-export export-baseline MODEL --out DIR`")
        _check_baselines(dijiang, softmax)
    if Path(out).exists() and not force:
        raise DiJiangError(f"{out} already exists; choose another --out or pass --force to replace it")
    progress(f"{len(dijiang) + len(softmax)} file(s) x {len(threads)} thread count(s), contexts {lengths}")
    bw = {}
    for t in sorted(set(threads)):
        bw[str(t)] = M.bandwidth(t, bandwidth_mib or (256 if quick else 1024))
        progress(f"read bandwidth with {t} thread(s): {bw[str(t)] / 1e9:.2f} GB/s")
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": M.machine(),
            "bandwidth_bytes_per_s": bw,
            "settings": {"lengths": lengths, "threads": threads, "tokens": tokens, "warmup": WARMUP_TOKENS,
                         "quick": quick},
            "runs": []}
    for r in dijiang + softmax:
        e, man = r["entry"], r["manifest"]
        att = "softmax" if e.get("attention") == "softmax" else "dijiang"
        wr = M.weight_bytes_per_token(r["folder"], e, man)
        for t in threads:
            res = in_subprocess(r["folder"], e["path"], t, lengths, tokens, f"{att} {e['format']} {e['quant']}")
            data["runs"].append({
                "folder": r["folder"], "path": e["path"], "format": e["format"], "quant": e["quant"],
                "attention": att, "graph": e.get("graph", e["format"]), "source": man.get("source", {}),
                "file_bytes": file_bytes(r["folder"], e), "weights_read": wr,
                "bandwidth_bytes_per_s": bw[str(t)], "floor_ms": M.floor_ms(wr["bytes"], bw[str(t)]),
                "cache_bytes": cache_bytes(man, e, lengths), **res})
    with staged_dir(out, force) as tmp:
        (tmp / "bench.json").write_text(json.dumps(data, indent=1))
        from .report import write_report
        names = write_report(data, tmp)
    progress(f"wrote {out}/bench.json, " + ", ".join(f"{out}/{n}" for n in names))
    return data
