"""``dijiang-export bench``: the one benchmark command. Its main form times DiJiang
files against the softmax KV-cache baseline of the same source model, on the same
runtime at the same precision:

    from dijiang_edge.benchmark import bench
    data = bench(["out/smol"], baselines=["out/smol-softmax"], out="out/bench")

The baseline folders may also hold the peers, the same source model as other runtimes'
own tools build it (``export-baseline --formats genai,gguf``): onnxruntime-genai's
builder and llama.cpp's GGUF files, timed in the same run by the same loop (same
random-id prompt, greedy decode, same contexts and thread counts).  A peer whose
runtime is not installed (llama-cpp-python is optional) is a row saying why.

For every runnable file (the default runner of each format and quantization, or the
files ``--files`` names) and thread count, one fresh process (``measure``) prefills up to
each context length and times decode there (``timing``, the one timing loop); ``rounds``
repeats that in turns over the files, so background load hits them alike, and reports
medians. This module adds the machine (bandwidth, the floor), file sizes and state vs
KV-cache bytes, and writes ``bench.json``, ``report.md`` and PNG plots (``report``).

The other forms: ``native`` (the C++ runner per CPU: ms/token and instructions per
token), ``attention_forms`` (prefill, chunked vs parallel form), ``report.merge``
(one report from several ``bench.json``).
"""

from __future__ import annotations

import json
import math
import time
from fnmatch import fnmatch
from pathlib import Path

from ..errors import DiJiangError
from ..manifest import read as read_manifest, select
from . import machine as M
from .measure import combine_rounds, in_subprocess, progress
from .timing import WARMUP_TOKENS

LENGTHS = [128, 512, 2048, 8192, 16384]
PEER_FORMATS = ("genai", "gguf")      # = exporters.baseline.PEERS (not imported: that module needs torch)
QUICK_LENGTHS = [128, 2048]
THREADS = [1, 2]


def _wanted(f: dict, formats: list[str] | None, quants: list[str] | None) -> bool:
    return (not formats or f["format"] in formats) and (not quants or f["quant"] in quants)


def runnable(folder: str | Path, formats: list[str] | None, quants: list[str] | None,
             files: list[str] | None = None) -> list[dict]:
    """What to time in ``folder``: the files whose paths match ``files`` (shell patterns;
    a decode-only ONNX graph runs with its quantization's prefill graph), else the file a
    runner uses for each format and quantization (its default)."""
    manifest = read_manifest(folder)
    cands = [f for f in manifest.get("files", []) if _wanted(f, formats, quants)]
    if files:
        picked = [f for f in cands if any(fnmatch(f["path"], p) for p in files)]
    else:
        best: dict[tuple[str, str], dict] = {}
        for f in cands:
            if f["format"] == "onnx" and f.get("role") not in ("both", "prefill"):
                continue                               # decode-only graphs run beside a prefill one
            k = (f["format"], f["quant"])
            if k not in best or (f.get("default") and not best[k].get("default")):
                best[k] = f
        picked = list(best.values())
    return [{"folder": str(folder), "entry": e, "manifest": manifest} for e in picked]


def cache_bytes(manifest: dict, entry: dict, lengths: list[int]) -> dict[str, int]:
    """Per-sequence state (DiJiang: fixed) or KV cache (softmax: ``2 L Hkv d`` per layer) in fp32."""
    m = manifest["model"]
    if entry.get("attention") == "softmax":
        return {str(n): 2 * m["n_layers"] * m["n_kv_heads"] * m["head_dim"] * n * 4 for n in lengths}
    states = entry.get("state") or entry["inputs"]["state"]
    per = sum(4 * math.prod(1 if d == "batch" else d for d in s["shape"]) for s in states)
    return {str(n): per for n in lengths}


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


def _select(folders, baselines, formats, quants, files) -> tuple[list[dict], list[dict]]:
    """The DiJiang and the softmax files to time, refused clearly when they do not fit."""
    dijiang = [r for f in folders for r in runnable(f, formats, quants, files)]
    if any(r["entry"].get("attention") == "softmax" for r in dijiang):
        raise DiJiangError("a DIR holds softmax baseline files; give baseline folders with --baseline")
    if not dijiang:
        raise DiJiangError(f"no DiJiang file for formats={formats or 'any'} quants={quants or 'any'}"
                           + (f" files={','.join(files)}" if files else "") + f" in {', '.join(map(str, folders))}")
    peer_formats = [*formats, *PEER_FORMATS] if formats else None      # --formats narrows ours; peers come along
    softmax = [r for f in baselines or [] for r in runnable(f, peer_formats, quants)]
    if baselines is not None:
        if any(r["entry"].get("attention") != "softmax" for r in softmax):
            raise DiJiangError("a --baseline folder holds DiJiang files, not a softmax baseline; make one "
                               "with `dijiang-export export-baseline MODEL --out DIR`")
        _check_baselines(dijiang, softmax)
    return dijiang, softmax


def _run_record(r: dict, threads: int, bw: float, lengths: list[int], res: dict) -> dict:
    e, man = r["entry"], r["manifest"]
    if res.get("missing"):                      # not run here: what its runtime would have read is not counted
        wr, floor = None, None
    else:
        wr = M.weight_bytes_per_token(r["folder"], e, man)
        floor = M.floor_ms(wr["bytes"], bw)
    return {"folder": r["folder"], "path": e["path"], "format": e["format"], "quant": e["quant"],
            "attention": "softmax" if e.get("attention") == "softmax" else "dijiang",
            "graph": e.get("graph", e["format"]), "source": man.get("source", {}), "peer": e["format"] in PEER_FORMATS,
            "file_bytes": file_bytes(r["folder"], e), "weights_read": wr, "bandwidth_bytes_per_s": bw,
            "floor_ms": floor, "cache_bytes": cache_bytes(man, e, lengths), **res}


def missing_runtime(entry: dict) -> str | None:
    """Why ``entry``'s runtime cannot run here (an optional peer not installed), else None."""
    if entry["format"] == "gguf":
        from ..runtime.llama import available
        return available()
    if entry["format"] == "genai":
        import importlib.util
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed (`pip install onnxruntime-genai`)"
    return None


def _measure_all(todo: list[dict], st: dict, bw: dict[str, float]) -> list[dict]:
    """Every (file, threads) in a fresh process, ``rounds`` times in turns; medians.
    A file whose runtime is missing is recorded with the reason and no points."""
    jobs = [(r, t) for r in todo for t in st["threads"]]
    results: list[list[dict]] = [[] for _ in jobs]
    for k in range(st["rounds"]):
        for (r, t), got in zip(jobs, results):
            e = r["entry"]
            why = missing_runtime(e)
            if why:
                if k == 0:
                    progress(f"{e['format']} {e['quant']} {e['path']} thr={t}: not measured: {why}")
                    got.append({"threads": t, "missing": why, "points": [], "rss_idle_bytes": None,
                                "rss_loaded_bytes": None, "peak_rss_bytes": None})
                continue
            att = "softmax" if e.get("attention") == "softmax" else "dijiang"
            label = f"{att} {e['format']} {e['quant']}" + (f" {e['path']}" if st["files"] else "") + \
                (f" round {k + 1}/{st['rounds']}" if st["rounds"] > 1 else "")
            got.append(in_subprocess(r["folder"], e["path"], t, st["lengths"], st["tokens"], label))
    return [_run_record(r, t, bw[str(t)], st["lengths"], combine_rounds(got)) for (r, t), got in zip(jobs, results)]


def bench(folders: list[str | Path], baselines: list[str | Path] | None = None, out: str | Path = "out/bench",
          lengths: list[int] | None = None, threads: list[int] | None = None, tokens: int | None = None,
          formats: list[str] | None = None, quants: list[str] | None = None, quick: bool = False,
          force: bool = False, bandwidth_mib: int | None = None, files: list[str] | None = None,
          rounds: int = 1) -> dict:
    """Measure, then write ``out/bench.json``, ``out/report.md``, ``out/*.png``; returns the JSON."""
    from ..exporters import check_out, staged_dir
    st = {"lengths": sorted(lengths or (QUICK_LENGTHS if quick else LENGTHS)),
          "threads": threads or ([2] if quick else THREADS), "tokens": tokens or (16 if quick else 32),
          "warmup": WARMUP_TOKENS, "rounds": rounds, "quick": quick, "files": files or None}
    if st["tokens"] < 1 or rounds < 1 or not st["lengths"] or st["lengths"][0] < 1:
        raise DiJiangError("need --tokens >= 1, --rounds >= 1 and positive --lengths")
    dijiang, softmax = _select(folders, baselines, formats, quants, files)
    check_out(out, force)
    progress(f"{len(dijiang) + len(softmax)} file(s) x {len(st['threads'])} thread count(s), "
             f"contexts {st['lengths']}" + (f", {rounds} rounds" if rounds > 1 else ""))
    bw = {}
    for t in sorted(set(st["threads"])):
        bw[str(t)] = M.bandwidth(t, bandwidth_mib or (256 if quick else 1024))
        progress(f"read bandwidth with {t} thread(s): {bw[str(t)] / 1e9:.2f} GB/s")
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": M.machine(),
            "bandwidth_bytes_per_s": bw, "settings": st, "runs": _measure_all(dijiang + softmax, st, bw)}
    with staged_dir(out, force) as tmp:
        (tmp / "bench.json").write_text(json.dumps(data, indent=1))
        from .report import write_report
        names = write_report(data, tmp)
    progress(f"wrote {out}/bench.json, " + ", ".join(f"{out}/{n}" for n in names))
    return data
