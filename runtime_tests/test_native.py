"""The C++ ``.pte`` runner (export/runner) on x86_64: greedy tokens identical to the
Python runtime (``executorch.runtime``), logits equal to PyTorch's, the instruction
count of a decode step, and bad input (missing or mismatched runtime libraries, files
of another exporter or for another target) refused with one clear line.

The emulated ARM64 tier is ``test_arm64.py``.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("executorch.runtime")

from dijiang_edge.cli import main  # noqa: E402
from dijiang_edge.errors import DiJiangError  # noqa: E402
from dijiang_edge.bars import BARS  # noqa: E402
from dijiang_edge.exporters import read_manifest  # noqa: E402
from dijiang_edge.manifest import select  # noqa: E402
from dijiang_edge.runtime import native  # noqa: E402
from dijiang_edge.benchmark.instructions import instructions_per_token  # noqa: E402
from dijiang_edge.runtime.executorch import PteRunner  # noqa: E402
from native_models import MAX_SEQ, rel, text_prompt, tiny_export, torch_greedy  # noqa: E402

BAR_FP32 = BARS["fp32_max_rel_err"]
WHY = native.missing_tools("x86_64")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"native x86_64 runner: {WHY}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory.getbasetemp())


def _pte(folder, quant):
    return folder / select(read_manifest(folder), "pte", quant)["path"]


def _python_greedy(path, prompt, n):
    """The Python runtime's greedy run (as ``dijiang-export generate`` does it)."""
    r = PteRunner(path)
    lg = r.forward(np.asarray([prompt]))[0, -1]
    out = []
    for _ in range(n):
        out.append(int(lg.argmax()))
        lg = r.forward(np.asarray([[out[-1]]]))[0, -1]
    return out


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_runner_greedy_equals_python_runtime(tiny, quant):
    folder, model = tiny
    prompt = text_prompt(model, 2 * MAX_SEQ + 5)              # three forward calls of prefill
    got = native.run_pte(_pte(folder, quant), prompt, 24)
    assert got.tokens == _python_greedy(_pte(folder, quant), prompt, 24)
    assert len(got.decode_ms) == 23 and got.prefill_ms > 0


def test_runner_logits_equal_pytorch(tiny):
    folder, model = tiny
    prompt = text_prompt(model, 2 * MAX_SEQ + 5)
    want_prefill, want_tokens, want_steps = torch_greedy(model, prompt, 12)
    got = native.run_pte(_pte(folder, "fp32"), prompt, 12, logits_steps=(0, 1, 11), prefill_logits=True)
    assert got.logits[0].shape == want_prefill.shape
    assert rel(got.logits[0], want_prefill) <= BAR_FP32
    assert rel(got.logits[1], want_steps[0]) <= BAR_FP32 and rel(got.logits[11], want_steps[10]) <= BAR_FP32
    assert got.tokens == want_tokens


def test_runner_prints_tokens_and_timings(tiny):
    folder, model = tiny
    p = subprocess.run([str(native.runner_binary("x86_64")), str(_pte(folder, "fp32")), "--prompt", "3,4,5",
                        "--new-tokens", "4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    want = native.run_pte(_pte(folder, "fp32"), [3, 4, 5], 4).tokens
    assert f"tokens: {','.join(map(str, want))}" in p.stdout and "ms/token" in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instruction_count_is_stable(tiny):
    folder, _ = tiny
    a = instructions_per_token(_pte(folder, "fp32"), "x86_64", prompt_len=4, new_tokens=3)
    b = instructions_per_token(_pte(folder, "fp32"), "x86_64", prompt_len=4, new_tokens=3)
    assert a["method"] == "callgrind" and a["decode_instructions_per_token"] > 0
    # deterministic up to allocator noise; a prefill of 16 tokens costs more than one of 4
    assert abs(a["decode_instructions_per_token"] / b["decode_instructions_per_token"] - 1) < 0.01
    c = instructions_per_token(_pte(folder, "fp32"), "x86_64", prompt_len=16, new_tokens=2)
    assert c["prefill_instructions"] > a["prefill_instructions"]


# -- bad input ------------------------------------------------------------------------

def test_missing_and_foreign_files_are_refused(tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(DiJiangError, match="does not exist"):
        native.run_pte(tmp_path / "none.pte", [1], 2)
    (tmp_path / "junk.pte").write_bytes(b"not a program" * 100)
    with pytest.raises(DiJiangError, match="not a loadable ExecuTorch program"):
        native.run_pte(tmp_path / "junk.pte", [1], 2)
    with pytest.raises(DiJiangError, match=r"outside \[0, 97\)"):
        native.run_pte(_pte(folder, "fp32"), [1, 500], 2)


def test_pte_of_another_exporter_is_refused(tmp_path):
    import torch
    from executorch.exir import to_edge
    ep = torch.export.export(torch.nn.Linear(4, 4).eval(), (torch.randn(1, 4),))
    (tmp_path / "lin.pte").write_bytes(to_edge(ep).to_executorch().buffer)
    with pytest.raises(DiJiangError, match="not written by dijiang-export"):
        native.run_pte(tmp_path / "lin.pte", [1], 2)


def test_pte_for_another_target_is_refused(tiny, tmp_path):
    """The same file delegated to a backend this runtime does not have (the XNNPACK
    backend id renamed, as a file lowered for another accelerator would read)."""
    folder, _ = tiny
    data = _pte(folder, "fp32").read_bytes()
    assert b"XnnpackBackend" in data
    (tmp_path / "other.pte").write_bytes(data.replace(b"XnnpackBackend", b"NeutronBackend"))
    with pytest.raises(DiJiangError, match="exported for another target"):
        native.run_pte(tmp_path / "other.pte", [1, 2], 2)


def test_missing_or_mismatched_runtime_library(tiny, tmp_path):
    folder, _ = tiny
    exe = native.runner_binary("x86_64")
    lone = tmp_path / "alone"
    lone.mkdir()
    shutil.copy(exe, lone / "pte_runner")                       # shipped without its libraries
    p = subprocess.run([str(lone / "pte_runner"), str(_pte(folder, "fp32")), "--prompt", "1"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    err = native.failure("running", "x86_64", p)
    assert "runtime library is missing" in str(err) and "libexecutorch" in str(err)
    for f in exe.parent.glob("*.so"):                           # a libexecutorch.so of another build
        shutil.copy(f, lone / f.name)
    shutil.copy(exe.parent / "libexecutorch_threadpool.so", lone / "libexecutorch.so")
    p = subprocess.run([str(lone / "pte_runner"), str(_pte(folder, "fp32")), "--prompt", "1"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "do not match" in str(native.failure("running", "x86_64", p))


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_cli_bench_native(tiny, capsys):
    folder, _ = tiny
    assert main(["bench", str(folder), "--native", "x86_64", "--tokens", "8", "--count-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "model_fp32.pte" in out and "model_int8.pte" in out and "instr/token" in out
    assert main(["bench", str(folder), "--native", "sparc"]) == 2
