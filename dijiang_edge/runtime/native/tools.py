"""Building and locating the C++ ``.pte`` runner and the tools around it: the
compiler, qemu-user for aarch64 on an x86_64 host, the arm64 sysroot and wheels.

Tools: ``bash scripts/setup_arm64.sh`` (qemu-user 10, g++-aarch64-linux-gnu, an arm64
sysroot with Python 3.11 and the aarch64 wheels under ``$DIJIANG_ARM64_ROOT``). The
runner's sources are ``export/runner`` of a checkout, else the installed package's copy
(``dijiang_edge.shipped``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ...errors import DiJiangError
from ...shipped import build_root, shipped

ARCHES = ("x86_64", "aarch64")
SETUP = "bash scripts/setup_arm64.sh"
QEMU_MIN = 10        # Debian 12's qemu 7.2 crashes onnxruntime and gets XNNPACK int8 wrong
# The emulated core: Cortex-A76 (Raspberry Pi 5, many phones' big cores; ARMv8.2 with
# dotprod, no SVE), so XNNPACK picks the kernels such devices run. "max" (SVE2, i8mm,
# SME) or "cortex-a710" (ARMv9 phones) via $DIJIANG_QEMU_CPU.
QEMU_CPU = os.environ.get("DIJIANG_QEMU_CPU", "cortex-a76")


def runner_source() -> Path:
    """The folder holding ``pte_runner.cpp`` and ``build.sh``."""
    return shipped("runner")


def arm64_root() -> Path:
    return Path(os.environ.get("DIJIANG_ARM64_ROOT", Path.home() / ".cache" / "dijiang_edge" / "arm64"))


def build_dir(arch: str) -> Path:
    return build_root() / arch


def check_arch(arch: str) -> None:
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


def _missing_emulation() -> str | None:
    """What the emulated aarch64 tier lacks (qemu, cross compiler, arm64 wheels), if anything."""
    v = qemu_version()
    if v is None:
        return f"qemu-aarch64 is not installed; install the ARM64 tools with `{SETUP}`"
    if v[0] < QEMU_MIN:
        return (f"qemu-aarch64 is version {v[0]}.{v[1]}, which crashes onnxruntime and computes wrong "
                f"XNNPACK int8 results; install qemu-user {QEMU_MIN} (bookworm-backports) with `{SETUP}`")
    if not shutil.which("aarch64-linux-gnu-g++"):
        return f"aarch64-linux-gnu-g++ is not installed; run `{SETUP}`"
    et = _executorch_dir("aarch64")
    if et is None or not (et / "lib" / "libexecutorch.so").exists():
        return f"the aarch64 executorch wheel is not unpacked under {arm64_root()}; run `{SETUP}`"
    if not (arm64_root() / "sysroot" / "usr" / "bin" / "python3.11").exists():
        return f"no arm64 Python 3.11 sysroot under {arm64_root()}; run `{SETUP}`"
    if not (arm64_root() / "site" / "onnxruntime").is_dir():
        return f"the aarch64 onnxruntime wheel is not unpacked under {arm64_root()}; run `{SETUP}`"
    return None


def missing_tools(arch: str) -> str | None:
    """None when the runner can be built and run for ``arch`` (and, for emulated
    aarch64, the arm64 Python with onnxruntime is there), else a one-line reason."""
    check_arch(arch)
    src = runner_source()
    if not (src / "pte_runner.cpp").exists():
        return f"the runner source {src} is missing from this install; reinstall dijiang-edge"
    if arch == "x86_64" or not emulated(arch):
        if _executorch_dir(arch) is None:
            return "executorch is not installed: pip install executorch"
        if not shutil.which(os.environ.get("CXX", "g++")):
            return "no C++ compiler (g++): apt-get install g++"
        return None
    return _missing_emulation()


def require(arch: str) -> None:
    why = missing_tools(arch)
    if why:
        raise DiJiangError(f"cannot run the {arch} runner: {why}")


def runner_binary(arch: str) -> Path:
    """``pte_runner`` for ``arch`` under ``build_dir(arch)``, (re)built by the runner's
    ``build.sh`` when its source or the ExecuTorch libraries changed."""
    require(arch)
    out = build_dir(arch)
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(runner_source() / "build.sh"), arch, str(out)], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0 or not (out / "pte_runner").exists():
        err = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()] or p.stderr.splitlines()[-3:]
        raise DiJiangError(f"building the {arch} .pte runner failed: {' | '.join(err)[:400]}")
    return out / "pte_runner"


def launcher(arch: str) -> list[str]:
    """How to start an ``arch`` program here: directly, or under qemu with the sysroot."""
    if not emulated(arch):
        return []
    return ["qemu-aarch64", "-cpu", QEMU_CPU, "-L", str(arm64_root() / "sysroot")]


def arm64_python() -> list[str]:
    """The Python that runs the ONNX files as aarch64 code (this one on an aarch64 host)."""
    if emulated("aarch64"):
        return [str(arm64_root() / "sysroot" / "usr" / "bin" / "python3.11")]
    return [sys.executable]
