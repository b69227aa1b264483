"""The exported files on the CPUs they are for: the C++ ``.pte`` runner
(``export/runner``) built for x86_64 or cross-built for aarch64, and onnxruntime's
aarch64 wheel; aarch64 runs under qemu-user on an x86_64 host.

    r = run_pte(Path("out/model_int8.pte"), [1, 2, 3], new_tokens=8, arch="aarch64",
                logits_steps=(0, 7))
    r.tokens, r.logits[0], r.prefill_ms, r.decode_ms

Emulated times are not latencies: the cost figure of the ARM64 path is the number of
instructions per decoded token (``instructions_per_token``), counted by callgrind on
x86_64 and from qemu's execution trace on aarch64.

Tools: ``bash scripts/setup_arm64.sh`` (qemu-user 10, g++-aarch64-linux-gnu, an arm64
sysroot with Python 3.11 and the aarch64 wheels under ``$DIJIANG_ARM64_ROOT``).
Everything here imports without torch (the emulated Python runs ``_onnx_main``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DiJiangError

ARCHES = ("x86_64", "aarch64")
REPO = Path(__file__).resolve().parents[2]
RUNNER_SRC = REPO / "export" / "runner"
SETUP = "bash scripts/setup_arm64.sh"
QEMU_MIN = 10        # Debian 12's qemu 7.2 crashes onnxruntime and gets XNNPACK int8 wrong
# The emulated core: Cortex-A76 (Raspberry Pi 5, many phones' big cores; ARMv8.2 with
# dotprod, no SVE), so XNNPACK picks the kernels such devices run. "max" (SVE2, i8mm,
# SME) or "cortex-a710" (ARMv9 phones) via $DIJIANG_QEMU_CPU.
QEMU_CPU = os.environ.get("DIJIANG_QEMU_CPU", "cortex-a76")


@dataclass
class NativeResult:
    """Greedy tokens, the logits of the asked steps (step 0: the prefill, [V], or [T, V]
    with ``prefill_logits``; step i: the i-th decode call, [V]) and the wall times."""
    tokens: list[int]
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)


# -- tools --------------------------------------------------------------------------

def arm64_root() -> Path:
    return Path(os.environ.get("DIJIANG_ARM64_ROOT", Path.home() / ".cache" / "dijiang_edge" / "arm64"))


def build_dir(arch: str) -> Path:
    return Path(os.environ.get("DIJIANG_RUNNER_BUILD", REPO / "build" / "runner")) / arch


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise DiJiangError(f"unknown arch {arch!r}: choose from {', '.join(ARCHES)}")


def emulated(arch: str) -> bool:
    """Whether ``arch`` runs under qemu here (not on a host of that architecture)."""
    return platform.machine() not in (arch, {"x86_64": "amd64", "aarch64": "arm64"}[arch])


def qemu_version() -> tuple[int, int] | None:
    exe = shutil.which("qemu-aarch64")
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _executorch_dir(arch: str) -> Path | None:
    if arch == "aarch64" and emulated(arch):
        d = arm64_root() / "site" / "executorch"
        return d if d.is_dir() else None
    from importlib.util import find_spec
    spec = find_spec("executorch")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def missing_tools(arch: str) -> str | None:
    """None when the runner can be built and run for ``arch`` (and, for emulated
    aarch64, the arm64 Python with onnxruntime is there), else a one-line reason."""
    _check_arch(arch)
    if not RUNNER_SRC.joinpath("pte_runner.cpp").exists():
        return f"the runner source {RUNNER_SRC} is not in this install (use a checkout of dijiang-edge)"
    et = _executorch_dir(arch)
    if arch == "x86_64" or not emulated(arch):
        if et is None:
            return "executorch is not installed: pip install executorch"
        if not shutil.which(os.environ.get("CXX", "g++")):
            return "no C++ compiler (g++): apt-get install g++"
        return None
    v = qemu_version()
    if v is None:
        return f"qemu-aarch64 is not installed; install the ARM64 tools with `{SETUP}`"
    if v[0] < QEMU_MIN:
        return (f"qemu-aarch64 is version {v[0]}.{v[1]}, which crashes onnxruntime and computes wrong "
                f"XNNPACK int8 results; install qemu-user {QEMU_MIN} (bookworm-backports) with `{SETUP}`")
    if not shutil.which("aarch64-linux-gnu-g++"):
        return f"aarch64-linux-gnu-g++ is not installed; run `{SETUP}`"
    if et is None or not (et / "lib" / "libexecutorch.so").exists():
        return f"the aarch64 executorch wheel is not unpacked under {arm64_root()}; run `{SETUP}`"
    if not (arm64_root() / "sysroot" / "usr" / "bin" / "python3.11").exists():
        return f"no arm64 Python 3.11 sysroot under {arm64_root()}; run `{SETUP}`"
    if not (arm64_root() / "site" / "onnxruntime").is_dir():
        return f"the aarch64 onnxruntime wheel is not unpacked under {arm64_root()}; run `{SETUP}`"
    return None


def _require(arch: str) -> None:
    why = missing_tools(arch)
    if why:
        raise DiJiangError(f"cannot run the {arch} runner: {why}")


def runner_binary(arch: str) -> Path:
    """``build/runner/ARCH/pte_runner``, (re)built by ``export/runner/build.sh`` when its
    source or the ExecuTorch libraries changed."""
    _require(arch)
    out = build_dir(arch)
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(RUNNER_SRC / "build.sh"), arch, str(out)], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0 or not (out / "pte_runner").exists():
        err = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()] or p.stderr.splitlines()[-3:]
        raise DiJiangError(f"building the {arch} .pte runner failed: {' | '.join(err)[:400]}")
    return out / "pte_runner"


def _prefix(arch: str) -> list[str]:
    """How to start an ``arch`` program here: directly, or under qemu with the sysroot."""
    if not emulated(arch):
        return []
    return ["qemu-aarch64", "-cpu", QEMU_CPU, "-L", str(arm64_root() / "sysroot")]


# -- running ------------------------------------------------------------------------

def _fail(what: str, arch: str, p: subprocess.CompletedProcess) -> DiJiangError:
    """One clear line for a failed run: our runner's own error, a missing or
    mismatched runtime library, or the last line it printed."""
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    own = [ln.split("error: ", 1)[1] for ln in lines if ln.startswith("pte_runner: error:")]
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


def run_pte(pte: Path, prompt_ids: list[int], new_tokens: int, arch: str = "x86_64",
            logits_steps: Sequence[int] = (), threads: int = 1, prefill_logits: bool = False,
            timeout: float | None = None) -> NativeResult:
    """Greedy ``new_tokens`` from ``prompt_ids`` with the C++ runner on ``arch``."""
    pte = Path(pte)
    if not pte.exists():
        raise DiJiangError(f"{pte} does not exist")
    exe = runner_binary(arch)
    with tempfile.TemporaryDirectory(prefix="dj_native_") as tmp:
        lpath = Path(tmp) / "logits.bin"
        cmd = _prefix(arch) + [str(exe), str(pte), "--prompt", ",".join(map(str, prompt_ids)),
                               "--new-tokens", str(new_tokens), "--threads", str(threads), "--json"]
        if logits_steps:
            cmd += ["--logits-steps", ",".join(map(str, logits_steps)), "--logits-out", str(lpath)]
        if prefill_logits:
            cmd += ["--prefill-logits"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise _fail(f"running {pte.name}", arch, p)
        out = json.loads(p.stdout.strip().splitlines()[-1])
        logits: dict[int, np.ndarray] = {}
        if logits_steps:
            flat, at, v = np.fromfile(lpath, np.float32), 0, out["vocab_size"]
            for step, rows in out["logits_rows"]:
                block = flat[at:at + rows * v].reshape(rows, v)
                logits[step] = block if prefill_logits and step == 0 else block[0]
                at += rows * v
    return NativeResult(out["tokens"], logits, out["prefill_ms"], out["decode_ms"])


def run_onnx_arm64(folder: Path, file_entry: dict, prompt_ids: list[int], new_tokens: int,
                   logits_steps: Sequence[int] = (), prefill_logits: bool = False,
                   timeout: float | None = None) -> NativeResult:
    """The same greedy run with ``dijiang_edge.runtime.onnx`` and onnxruntime's aarch64
    wheel, in an arm64 Python 3.11 (under qemu on an x86_64 host)."""
    _require("aarch64")
    folder = Path(folder).resolve()
    from ..manifest import read
    manifest = read(folder).to_dict()
    root = arm64_root()
    python = [str(root / "sysroot" / "usr" / "bin" / "python3.11")] if emulated("aarch64") else [sys.executable]
    with tempfile.TemporaryDirectory(prefix="dj_onnx_arm64_") as tmp:
        job = {"folder": str(folder), "entry": dict(file_entry), "manifest": manifest, "prompt": list(prompt_ids),
               "new_tokens": new_tokens, "logits_steps": list(logits_steps), "prefill_logits": prefill_logits,
               "out": tmp}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(root / 'site')!r}]; "
                f"from dijiang_edge.runtime.native import _onnx_main; _onnx_main({tmp!r})")
        env = dict(os.environ, PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        p = subprocess.run(_prefix("aarch64") + python + ["-I", "-c", code], capture_output=True, text=True,
                           env=env, timeout=timeout)
        if p.returncode != 0:
            raise _fail(f"onnxruntime on {file_entry['path']}", "aarch64", p)
        out = json.loads((Path(tmp) / "result.json").read_text())
        logits = {int(k): np.load(Path(tmp) / f"logits_{k}.npy") for k in out["logits_steps"]}
    return NativeResult(out["tokens"], logits, out["prefill_ms"], out["decode_ms"])


def _onnx_main(tmp: str) -> None:
    """Inside the emulated arm64 Python: one greedy run of ``job.json`` (numpy + onnxruntime only)."""
    import platform as pf
    from ..manifest import FileEntry, parse
    from .onnx import OnnxRunner
    job = json.loads(Path(tmp, "job.json").read_text())
    if pf.machine() not in ("aarch64", "arm64"):
        print(f"pte_runner: error: expected an aarch64 Python, got {pf.machine()}", file=sys.stderr)
        sys.exit(2)
    try:
        r = OnnxRunner(Path(job["folder"]), FileEntry.from_dict(job["entry"], "job.json entry"),
                       parse(job["manifest"]), threads=1)
        steps = set(job["logits_steps"])
        t0 = time.perf_counter()
        lg = r.forward(np.asarray([job["prompt"]], np.int64))[0]
        prefill_ms = 1000 * (time.perf_counter() - t0)
        keep = {0: lg if job["prefill_logits"] else lg[-1]} if 0 in steps else {}
        tokens, decode_ms = [int(lg[-1].argmax())], []
        for step in range(1, job["new_tokens"]):
            t = time.perf_counter()
            row = r.forward(np.asarray([[tokens[-1]]], np.int64))[0, -1]
            decode_ms.append(1000 * (time.perf_counter() - t))
            if step in steps:
                keep[step] = row
            tokens.append(int(row.argmax()))
    except DiJiangError as e:
        print(f"pte_runner: error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in keep.items():
        np.save(Path(tmp, f"logits_{k}.npy"), v)
    Path(tmp, "result.json").write_text(json.dumps({"tokens": tokens, "prefill_ms": prefill_ms,
                                                    "decode_ms": decode_ms, "logits_steps": sorted(keep)}))


# -- cost: instructions per decoded token ----------------------------------------------

def instructions_per_token(pte: Path, arch: str, prompt_len: int = 8, new_tokens: int = 4,
                           timeout: float | None = None) -> dict:
    """Instructions executed in the prefill and per decode call (one thread), counted:

    - x86_64: callgrind (``--toggle-collect`` on the runner's ``dj_prefill`` and
      ``dj_decode_step``; Ir = instructions, deterministic);
    - aarch64: qemu's own trace (``-d nochain,exec,in_asm``): every translated block
      entered adds its guest instruction count; the phase is the runner function the
      trace is in (Debian's qemu-user is static and loads no TCG plugins).

    Both count the same span: from entering ``dj_prefill``/``dj_decode_step`` to
    returning to ``main``."""
    pte = Path(pte)
    if not pte.exists():
        raise DiJiangError(f"{pte} does not exist")
    if new_tokens < 2:
        raise DiJiangError("instructions_per_token needs new_tokens >= 2 (one decode call at least)")
    exe = runner_binary(arch)
    prompt = [(7 * i + 3) % 50 + 3 for i in range(prompt_len)]     # ids valid for any vocabulary > 53
    args = [str(exe), str(pte), "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(new_tokens),
            "--threads", "1", "--json"]
    if arch == "x86_64" and not emulated(arch):
        counts = _callgrind(args, timeout)
        method = "callgrind"
    elif emulated(arch):
        counts = _qemu_trace(args, timeout)
        method = "qemu-trace"
    else:
        raise DiJiangError(f"counting instructions natively on {arch} is not supported here "
                           f"(run valgrind --tool=callgrind on the device)")
    decodes = new_tokens - 1
    return {"arch": arch, "method": method, "prompt_len": prompt_len, "decode_calls": decodes,
            "prefill_instructions": counts["prefill"],
            "decode_instructions_per_token": counts["decode"] / decodes}


def _callgrind(args: list[str], timeout: float | None) -> dict[str, int]:
    if not shutil.which("valgrind"):
        raise DiJiangError("valgrind is not installed: apt-get install valgrind")
    counts = {}
    with tempfile.TemporaryDirectory(prefix="dj_cg_") as tmp:
        for phase, fn in (("prefill", "dj_prefill"), ("decode", "dj_decode_step")):
            out = Path(tmp) / f"{phase}.out"
            p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                "--collect-atstart=no", f"--toggle-collect={fn}"] + args,
                               capture_output=True, text=True, timeout=timeout)
            if p.returncode != 0 or not out.exists():
                raise _fail("callgrind", "x86_64", p)
            m = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M) or \
                re.search(r"^summary:\s+(\d+)", out.read_text(errors="replace"), re.M)
            if not m:
                raise DiJiangError(f"callgrind wrote no instruction total to {out}")
            counts[phase] = int(m.group(1))
    return counts


def count_trace(lines) -> dict[str, int]:
    """Guest instructions per phase from qemu's ``-d nochain,exec,in_asm`` log lines:
    ``IN:`` blocks give each translated block's size; each ``Trace 0: HOST [FLAGS/PC/..] SYM``
    line is one block entered. ``SYM`` (the runner's own functions only) moves the phase."""
    size: dict[bytes, int] = {}
    counts = {"prefill": 0, "decode": 0}
    phase, block_pc, n = None, b"", 0
    for ln in lines:                       # hot loop: plain bytes operations, no regex
        c = ln[:1]
        if c == b"T":
            if ln.endswith(b" dj_decode_step\n"):
                phase = "decode"
            elif ln.endswith(b" dj_prefill\n"):
                phase = "prefill"
            elif ln.endswith(b" main\n"):
                phase = None
            if phase:
                counts[phase] += size.get(ln.split(b"/", 2)[1].lstrip(b"0"), 0)
        elif c == b"0":
            if n == 0:
                block_pc = ln[2:ln.index(b":")].lstrip(b"0")
            n += 1
            size[block_pc] = n
        elif c == b"I":
            n = 0
    return counts


def _qemu_trace(args: list[str], timeout: float | None) -> dict[str, int]:
    """Run under qemu with the trace on stderr and count it as it streams."""
    cmd = _prefix("aarch64") + ["-d", "nochain,exec,in_asm"] + args
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        counts = count_trace(p.stderr)
        out = p.stdout.read()
        rc = p.wait(timeout=timeout and max(1.0, timeout - (time.time() - t0)))
    finally:
        if p.poll() is None:
            p.kill()
    if rc != 0 or not out.strip():
        raise DiJiangError(f"the traced aarch64 run failed (exit status {rc}); run it without tracing "
                           f"(`dijiang-export bench-native --arch aarch64`) to see its error")
    if not counts["decode"]:
        raise DiJiangError("qemu's trace showed no instructions in dj_decode_step: is the runner built "
                           "with its symbols (export/runner/build.sh)?")
    return counts


# -- benchmark: x86 times beside instruction counts --------------------------------------

def bench(folder: str | Path, arches: Sequence[str] = ARCHES, quants: Sequence[str] | None = None,
          tokens: int = 32, count_tokens: int = 4, prompt_len: int = 8, threads: int = 1) -> list[dict]:
    """Per ``.pte`` file and arch: median decode ms/token of the C++ runner (native
    arch: a latency; emulated: only how long qemu took), and instructions per decoded
    token (the stable cost figure of the ARM64 path). Prints a table; returns the rows."""
    from ..manifest import read as read_manifest
    from .pte_bench import pte_entries
    for a in arches:
        _check_arch(a)
        _require(a)
    folder = Path(folder)
    entries = pte_entries(read_manifest(folder), list(quants) if quants else None)
    prompt = [(7 * i + 3) % 50 + 3 for i in range(prompt_len)]
    print(f"{'.pte file':<24} {'quant':<6} {'arch':<8} {'decode ms/token':>32} {'instr/token':>12} "
          f"{f'prefill instr ({prompt_len} tok)':>22}  method")
    rows = []
    for e in entries:
        pte = folder / e["path"]
        for a in arches:
            r = run_pte(pte, prompt, tokens + 1, a, threads=threads)
            ms = float(np.median(r.decode_ms))
            c = instructions_per_token(pte, a, prompt_len, count_tokens + 1)
            label = f"{ms:.3f} ({threads} thr)" if not emulated(a) else f"({ms:.1f} emulated, not a latency)"
            print(f"{e['path']:<24} {e['quant']:<6} {a:<8} {label:>32} {c['decode_instructions_per_token'] / 1e6:>11.2f}M "
                  f"{c['prefill_instructions'] / 1e6:>21.2f}M  {c['method']}", flush=True)
            rows.append({"path": e["path"], "quant": e["quant"], "arch": a, "emulated": emulated(a),
                         "decode_ms": ms, "threads": threads, **c})
    return rows
