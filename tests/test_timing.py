"""The one timing loop (``benchmark.timing``): what each figure counts, on fake runners
and a fake clock, so the definitions are tested without timing anything real; and
``generate`` prints the same figures on its PyTorch and exported-file paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dijiang_edge.benchmark import timing


class CountingRunner:
    """Records the ids of each call; its greedy token is (last id + 1) mod 10."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.keeps: list[int] = []

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        self.calls.append(ids[0].tolist())
        self.keeps.append(keep)
        logits = np.zeros((1, ids.shape[1], 10), np.float32)
        logits[0, -1, (int(ids[0, -1]) + 1) % 10] = 1.0
        return logits[:, -keep:] if keep else logits


def test_call_times_warm_up_off_the_clock():
    n = itertools.count()
    times = timing.call_times_s(lambda: next(n), repeats=5, warmup=3)
    assert len(times) == 5 and next(n) == 8 and all(t >= 0 for t in times)
    with pytest.raises(ValueError):
        timing.call_times_s(lambda: None, repeats=0)


def test_decode_ms_feeds_back_the_greedy_token_one_at_a_time():
    r = CountingRunner()
    ms = timing.decode_ms(r, tokens=6, warmup=2)
    assert ms >= 0 and len(r.calls) == 8
    assert r.calls == [[1], [2], [3], [4], [5], [6], [7], [8]]       # each call: the previous greedy token


def test_prefill_goes_in_calls_of_at_most_call_tokens():
    r = CountingRunner()
    timing.prefill_s(r, np.arange(23)[None], call=10)
    assert [len(c) for c in r.calls] == [10, 10, 3] and sum(r.calls, []) == list(range(23))
    assert r.keeps == [1, 1, 1]          # each call asks for its last position only, as generation does


def test_generation_clock_one_definition_of_tokens_per_s():
    ticks = iter([0.0, 0.5, 0.6, 0.8, 1.0])           # start, then 4 tokens
    clock = timing.GenerationClock(clock=lambda: next(ticks))
    for _ in range(4):
        clock.token()
    assert clock.prefill_s == 0.5                      # time to the first new token
    assert clock.decode_tokens_per_s == pytest.approx(3 / 0.5)   # tokens after the first / their time
    line = clock.summary(7, "onnx int8")
    assert line == "[4 tokens; prefill 7 tokens in 0.50s; decode 6.0 tokens/s; onnx int8]"
    one = timing.GenerationClock(clock=iter([0.0, 0.2]).__next__)
    one.token()
    assert np.isnan(one.decode_tokens_per_s) and np.isnan(timing.tokens_per_s(0, 1.0))


def test_generate_prints_the_same_figures_on_both_paths(tiny_src, tmp_path, capsys):
    """PyTorch (a model folder) and onnxruntime (an export folder): one summary line."""
    pytest.importorskip("onnxruntime")
    from dijiang_edge.cli import main
    from dijiang_edge.exporters import export
    out = tmp_path / "exp"
    export(str(tiny_src), out, ["onnx"], ["fp32"], parity_tokens=0, threads=1)
    lines = []
    for folder in (tiny_src, out):
        assert main(["generate", str(folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
                     "--threads", "1"]) == 0
        lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    for line, what in zip(lines, ("PyTorch", "onnx fp32")):
        assert line.startswith("[4 tokens; prefill 3 tokens in ") and " tokens/s; " in line, line
        assert line.endswith(f"; {what}]"), line


def test_no_test_reads_a_clock():
    """Timings are the benchmark's (``dijiang-export bench``): a test that asserts on one
    fails at random on a loaded machine, so no test module reads a clock."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    clock = re.compile(r"\b(perf_counter(_ns)?|monotonic(_ns)?|process_time)\s*\(|\btime\.time\s*\(")
    offenders = [f"{p.relative_to(root)}:{i}" for d in ("tests", "runtime_tests") for p in (root / d).glob("*.py")
                 if p.name != Path(__file__).name
                 for i, line in enumerate(p.read_text().splitlines(), 1) if clock.search(line)]
    assert offenders == [], offenders
