"""Running the exported files as native code: the C++ runner on the ``.pte`` (x86_64, or
aarch64 under qemu), and onnxruntime's aarch64 wheel on the ONNX files in an arm64
Python. Both return ``NativeResult`` (greedy tokens, chosen steps' logits, wall times)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import DiJiangError
from .output import OWN_ERROR, NativeResult, failure, job_result, runner_result, write_job_result
from .tools import arm64_python, arm64_root, launcher, require, runner_binary

PACKAGE_PARENT = Path(__file__).resolve().parents[3]     # the folder that holds dijiang_edge/


def runner_command(pte: Path, prompt_ids: Sequence[int], new_tokens: int, arch: str, threads: int = 1,
                   extra: Sequence[str] = ()) -> list[str]:
    """The runner's arguments for one greedy run printing ``--json`` (start it with
    ``launcher(arch)`` in front)."""
    exe = runner_binary(arch)
    return [str(exe), str(pte), "--prompt", ",".join(map(str, prompt_ids)),
                             "--new-tokens", str(new_tokens), "--threads", str(threads), "--json", *extra]


def run_pte(pte: Path, prompt_ids: list[int], new_tokens: int, arch: str = "x86_64",
            logits_steps: Sequence[int] = (), threads: int = 1, prefill_logits: bool = False,
            timeout: float | None = None) -> NativeResult:
    """Greedy ``new_tokens`` from ``prompt_ids`` with the C++ runner on ``arch``."""
    import subprocess
    pte = Path(pte)
    if not pte.exists():
        raise DiJiangError(f"{pte} does not exist")
    with tempfile.TemporaryDirectory(prefix="dj_native_") as tmp:
        lpath = Path(tmp) / "logits.bin"
        extra = ["--logits-steps", ",".join(map(str, logits_steps)), "--logits-out", str(lpath)] \
            if logits_steps else []
        if prefill_logits:
            extra.append("--prefill-logits")
        cmd = launcher(arch) + runner_command(pte, prompt_ids, new_tokens, arch, threads, extra)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise failure(f"running {pte.name}", arch, p)
        return runner_result(p.stdout, lpath if logits_steps else None, prefill_logits)


def run_onnx_arm64(folder: Path, file_entry: dict, prompt_ids: list[int], new_tokens: int,
                   logits_steps: Sequence[int] = (), prefill_logits: bool = False,
                   timeout: float | None = None) -> NativeResult:
    """The same greedy run with ``dijiang_edge.runtime.onnx`` and onnxruntime's aarch64
    wheel, in an arm64 Python 3.11 (under qemu on an x86_64 host)."""
    import subprocess
    require("aarch64")
    folder = Path(folder).resolve()
    from ...manifest import read
    manifest = read(folder).to_dict()
    with tempfile.TemporaryDirectory(prefix="dj_onnx_arm64_") as tmp:
        job = {"folder": str(folder), "entry": dict(file_entry), "manifest": manifest, "prompt": list(prompt_ids),
               "new_tokens": new_tokens, "logits_steps": list(logits_steps), "prefill_logits": prefill_logits}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        # the arm64 wheels first: the folder holding dijiang_edge may hold x86_64 wheels too
        path = [str(arm64_root() / "site"), str(PACKAGE_PARENT)]
        code = (f"import sys; sys.path[:0] = {path!r}; "
                f"from dijiang_edge.runtime.native.run import onnx_job; onnx_job({tmp!r})")
        env = dict(os.environ, PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        p = subprocess.run(launcher("aarch64") + arm64_python() + ["-I", "-c", code], capture_output=True,
                           text=True, env=env, timeout=timeout)
        if p.returncode != 0:
            raise failure(f"onnxruntime on {file_entry['path']}", "aarch64", p)
        return job_result(Path(tmp))


def onnx_job(tmp: str) -> None:
    """Inside the arm64 Python: one greedy run of ``job.json`` (numpy + onnxruntime only)."""
    import platform
    from ..onnx import OnnxRunner
    job = json.loads(Path(tmp, "job.json").read_text())
    if platform.machine() not in ("aarch64", "arm64"):
        print(f"{OWN_ERROR}expected an aarch64 Python, got {platform.machine()}", file=sys.stderr)
        sys.exit(2)
    try:
        from ...manifest import FileEntry, parse
        r = OnnxRunner(Path(job["folder"]), FileEntry.from_dict(job["entry"], "job.json entry"),
                       parse(job["manifest"]), threads=1)
        steps = set(job["logits_steps"])
        t0 = time.perf_counter()
        lg = r.forward(np.asarray([job["prompt"]], np.int64))[0]
        prefill_ms = 1000 * (time.perf_counter() - t0)
        keep = {0: lg if job["prefill_logits"] else lg[-1]} if 0 in steps else {}
        tokens, decode_ms = [int(lg[-1].argmax())], []
        for step in range(1, job["new_tokens"]):      # the runner's own record, as pte_runner prints
            t = time.perf_counter()
            row = r.forward(np.asarray([[tokens[-1]]], np.int64))[0, -1]
            decode_ms.append(1000 * (time.perf_counter() - t))
            if step in steps:
                keep[step] = row
            tokens.append(int(row.argmax()))
    except DiJiangError as e:
        print(f"{OWN_ERROR}{e}", file=sys.stderr)
        sys.exit(2)
    write_job_result(Path(tmp), tokens, prefill_ms, decode_ms, keep)
