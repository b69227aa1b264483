"""The exported files on ARM64 (a Cortex-A76 emulated with qemu-user 10 on x86_64 hosts;
``DIJIANG_QEMU_CPU`` picks another core): the C++
runner cross-built for aarch64 on the ``.pte`` files and onnxruntime's aarch64 wheel on
the ONNX files, against PyTorch. fp32: logits to 1e-4 relative and identical greedy
tokens; int8: the agreement bars of the x86 tier (``parity.failures``: top-1, perplexity).

Needs ``bash scripts/setup_arm64.sh`` (scripts/setup.sh runs it, so CI has the tools);
skipped with the reason where the tools are missing. A tiny model and few tokens keep
it to about a minute under emulation.
"""

from __future__ import annotations

import pytest

pytest.importorskip("executorch.runtime")
pytest.importorskip("onnxruntime")

from dijiang_edge.bars import BARS  # noqa: E402
from dijiang_edge.exporters import read_manifest  # noqa: E402
from dijiang_edge.benchmark.instructions import instructions_per_token  # noqa: E402
from dijiang_edge.runtime import native  # noqa: E402
from dijiang_edge.manifest import select  # noqa: E402
from dijiang_edge.parity import failures  # noqa: E402
from native_models import MAX_SEQ, agreement, rel, text_prompt, tiny_export, torch_greedy  # noqa: E402

BAR_FP32 = BARS["fp32_max_rel_err"]
WHY = native.missing_tools("aarch64")
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"ARM64 tier: {WHY}")
NEW = 12                        # greedy tokens per run: prefill + 11 decode calls
LOGIT_STEPS = (0, 1, NEW - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory.getbasetemp())


def _run(folder, fmt, quant, prompt, new, **kw):
    entry = select(read_manifest(folder), fmt, quant)
    if fmt == "pte":
        return native.run_pte(folder / entry["path"], prompt, new, "aarch64", **kw)
    return native.run_onnx_arm64(folder, entry, prompt, new, **kw)


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_fp32_on_arm64_equals_pytorch(tiny, fmt):
    folder, model = tiny
    prompt = text_prompt(model, 2 * MAX_SEQ + 5)              # the .pte prefill takes three calls
    want_prefill, want_tokens, want_steps = torch_greedy(model, prompt, NEW)
    got = _run(folder, fmt, "fp32", prompt, NEW, logits_steps=LOGIT_STEPS, prefill_logits=True)
    errs = {"prefill": rel(got.logits[0], want_prefill), "decode_1": rel(got.logits[1], want_steps[0]),
            f"decode_{NEW - 1}": rel(got.logits[NEW - 1], want_steps[NEW - 2])}
    print(f"\naarch64 {fmt} fp32 vs PyTorch: max rel err {errs}; greedy {got.tokens}")
    assert max(errs.values()) <= BAR_FP32, errs
    assert got.tokens == want_tokens


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_int8_on_arm64_meets_the_x86_bars(tiny, fmt):
    """Teacher-forced over 384 tokens of English text (the prefill's logits at every
    position), as the x86 tier's int8 agreement and perplexity checks.  The random tiny
    model's next-token distribution is flat (perplexity ~ its vocabulary), so a short
    sample's top-1 is mostly chance: its first 96 tokens flip 6, the 384 flip 9 (x86)."""
    folder, model = tiny
    ids = text_prompt(model, 384)
    want, _, _ = torch_greedy(model, ids, 1)
    got = _run(folder, fmt, "int8", ids, 1, logits_steps=(0,), prefill_logits=True).logits[0]
    fig = agreement(got, want, ids)
    print(f"\naarch64 {fmt} int8 vs PyTorch over {len(ids)} tokens: {fig}")
    assert failures("int8", fig) == ([], ""), fig


def test_int8_pte_greedy_equals_x86(tiny):
    """The same int8 program on both CPUs: XNNPACK's kernels differ (NEON vs AVX), the
    tokens of a short greedy run do not (the tiny model's logits are far apart)."""
    folder, model = tiny
    if native.missing_tools("x86_64"):
        pytest.skip(native.missing_tools("x86_64"))
    prompt = text_prompt(model, 20)
    pte = folder / select(read_manifest(folder), "pte", "int8")["path"]
    arm = native.run_pte(pte, prompt, NEW, "aarch64", logits_steps=(0,))
    x86 = native.run_pte(pte, prompt, NEW, "x86_64", logits_steps=(0,))
    print(f"\nint8 .pte prefill logits aarch64 vs x86_64: rel diff {rel(arm.logits[0], x86.logits[0]):.2e}")
    assert arm.tokens == x86.tokens


@pytest.mark.slow
def test_arm64_instruction_count_is_stable(tiny):
    folder, _ = tiny
    pte = folder / select(read_manifest(folder), "pte", "fp32")["path"]
    a = instructions_per_token(pte, "aarch64", prompt_len=4, new_tokens=3)
    b = instructions_per_token(pte, "aarch64", prompt_len=4, new_tokens=3)
    assert a["method"] == "qemu-trace" and a["decode_instructions_per_token"] > 0
    assert a["decode_instructions_per_token"] == b["decode_instructions_per_token"], (a, b)
    assert a["prefill_instructions"] == b["prefill_instructions"], (a, b)


def test_arm64_instruction_count(tiny):
    """The cost figure `bench --native` reports: the decode span is found in the trace, and
    a decode call (1 token) costs less than a prefill of 16."""
    folder, _ = tiny
    pte = folder / select(read_manifest(folder), "pte", "fp32")["path"]
    c = instructions_per_token(pte, "aarch64", prompt_len=16, new_tokens=2)
    assert c["method"] == "qemu-trace" and 0 < c["decode_instructions_per_token"] < c["prefill_instructions"], c


def test_arm64_runner_refuses_a_bad_file(tiny, tmp_path):
    from dijiang_edge.errors import DiJiangError
    (tmp_path / "junk.pte").write_bytes(b"not a program" * 100)
    with pytest.raises(DiJiangError, match=r"\(aarch64\).*not a loadable ExecuTorch program"):
        native.run_pte(tmp_path / "junk.pte", [1], 2, "aarch64")
