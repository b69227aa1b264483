"""The exported files on the CPUs they are for: the C++ ``.pte`` runner
(``export/runner``) built for x86_64 or cross-built for aarch64, and onnxruntime's
aarch64 wheel; aarch64 runs under qemu-user on an x86_64 host.

    r = run_pte(Path("out/model_int8.pte"), [1, 2, 3], new_tokens=8, arch="aarch64",
                logits_steps=(0, 7))
    r.tokens, r.logits[0], r.prefill_ms, r.decode_ms

One module per concern: ``tools`` (building and locating the runner, qemu, the arm64
sysroot), ``run`` (running it), ``output`` (reading what it prints, its failures).
Emulated times are not latencies; the cost figure of the ARM64 path (instructions per
decoded token) is ``dijiang_edge.benchmark.instructions``. Everything here imports
without torch (the emulated Python runs ``run.onnx_job``).
"""

from .output import NativeResult, failure
from .run import run_onnx_arm64, run_pte, runner_command
from .tools import ARCHES, check_arch, emulated, launcher, missing_tools, require, runner_binary

__all__ = ["ARCHES", "NativeResult", "check_arch", "emulated", "failure", "launcher", "missing_tools",
           "require", "run_onnx_arm64", "run_pte", "runner_binary", "runner_command"]
