"""The cost figure of the ARM64 path: instructions executed per decoded token by the
C++ ``.pte`` runner, counted rather than timed (an emulated time is not a latency; a
count is deterministic and tells two files apart on any host).

- x86_64: callgrind (``--toggle-collect`` on the runner's ``dj_prefill`` and
  ``dj_decode_step``; Ir = instructions);
- aarch64: qemu's own trace (``-d nochain,exec,in_asm``): every translated block entered
  adds its guest instruction count; the phase is the runner function the trace is in
  (Debian's qemu-user is static and loads no TCG plugins).

Both count the same span: from entering ``dj_prefill``/``dj_decode_step`` to returning
to ``main``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import DiJiangError
from ..runtime.native import emulated, failure, launcher, runner_command


def probe_prompt(n: int) -> list[int]:
    """``n`` token ids valid for any vocabulary above 53."""
    return [(7 * i + 3) % 50 + 3 for i in range(n)]


def instructions_per_token(pte: Path, arch: str, prompt_len: int = 8, new_tokens: int = 4,
                           timeout: float | None = None) -> dict:
    """Instructions executed in the prefill and per decode call (one thread)."""
    pte = Path(pte)
    if not pte.exists():
        raise DiJiangError(f"{pte} does not exist")
    if new_tokens < 2:
        raise DiJiangError("instructions_per_token needs new_tokens >= 2 (one decode call at least)")
    args = runner_command(pte, probe_prompt(prompt_len), new_tokens, arch, threads=1)
    if arch == "x86_64" and not emulated(arch):
        counts, method = _callgrind(args, timeout), "callgrind"
    elif emulated(arch):
        counts, method = _qemu_trace(arch, args, timeout), "qemu-trace"
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
                raise failure("callgrind", "x86_64", p)
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


def _qemu_trace(arch: str, args: list[str], timeout: float | None) -> dict[str, int]:
    """Run under qemu with the trace on stderr and count it as it streams."""
    cmd = launcher(arch) + ["-d", "nochain,exec,in_asm"] + args
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
                           f"(`dijiang-export bench DIR --native aarch64`) to see its error")
    if not counts["decode"]:
        raise DiJiangError("qemu's trace showed no instructions in dj_decode_step: is the runner built "
                           "with its symbols (export/runner/build.sh)?")
    return counts
