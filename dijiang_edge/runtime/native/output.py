"""Reading what the native runs print: the C++ runner's last stdout line (JSON) and its
logits file, the emulated ONNX job's ``result.json``, and failures turned into one clear
line (the runner's own error, a missing or mismatched runtime library, the last line)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import DiJiangError

OWN_ERROR = "pte_runner: error: "        # how the runner (and the emulated ONNX job) report bad input


@dataclass
class NativeResult:
    """Greedy tokens, the logits of the asked steps (step 0: the prefill, [V], or [T, V]
    with ``prefill_logits``; step i: the i-th decode call, [V]) and the wall times."""
    tokens: list[int]
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)


def failure(what: str, arch: str, p: subprocess.CompletedProcess) -> DiJiangError:
    """One clear line for a failed run."""
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    own = [ln.split("error: ", 1)[1] for ln in lines if ln.startswith(OWN_ERROR)]
    if own:
        return DiJiangError(f"{what} ({arch}): {own[-1]}")
    lib = next((ln for ln in lines if "error while loading shared libraries" in ln), None)
    if lib:
        return DiJiangError(f"{what} ({arch}): a runtime library is missing ({lib.split(': ', 1)[-1]}); "
                            f"rebuild the runner folder with `bash export/runner/build.sh {arch}`")
    sym = next((ln for ln in lines if "undefined symbol" in ln or "version `" in ln), None)
    if sym:
        return DiJiangError(f"{what} ({arch}): the ExecuTorch runtime libraries do not match the runner "
                            f"({sym[-160:]}); rebuild it with `bash export/runner/build.sh {arch}`")
    tail = lines[-1] if lines else f"exit status {p.returncode}"
    return DiJiangError(f"{what} ({arch}) failed: {tail[:300]}")


def runner_result(stdout: str, logits_file: Path | None, prefill_logits: bool) -> NativeResult:
    """The runner's ``--json`` line; with ``--logits-out``, the float32 rows of each asked
    step, in the order of its ``logits_rows`` ([step, rows] pairs)."""
    out = json.loads(stdout.strip().splitlines()[-1])
    logits: dict[int, np.ndarray] = {}
    if logits_file is not None:
        flat, at, v = np.fromfile(logits_file, np.float32), 0, out["vocab_size"]
        for step, rows in out["logits_rows"]:
            block = flat[at:at + rows * v].reshape(rows, v)
            logits[step] = block if prefill_logits and step == 0 else block[0]
            at += rows * v
    return NativeResult(out["tokens"], logits, out["prefill_ms"], out["decode_ms"])


def job_result(tmp: Path) -> NativeResult:
    """What ``run.onnx_job`` left in its folder."""
    out = json.loads((tmp / "result.json").read_text())
    logits = {int(k): np.load(tmp / f"logits_{k}.npy") for k in out["logits_steps"]}
    return NativeResult(out["tokens"], logits, out["prefill_ms"], out["decode_ms"])


def write_job_result(tmp: Path, tokens: list[int], prefill_ms: float, decode_ms: list[float],
                     logits: dict[int, np.ndarray]) -> None:
    for k, v in logits.items():
        np.save(tmp / f"logits_{k}.npy", v)
    (tmp / "result.json").write_text(json.dumps({"tokens": tokens, "prefill_ms": prefill_ms,
                                                 "decode_ms": decode_ms, "logits_steps": sorted(logits)}))
