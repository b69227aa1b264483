"""The product's pass/fail bars, in one place: ``check``, the export-time tests and the
benchmark report read them from here (no bar is restated as a literal elsewhere)."""

from __future__ import annotations

BARS = {
    # parity (``parity.failures``): a file's logits against PyTorch's on English text
    "fp32_max_rel_err": 1e-4,      # fp32 files: max |a - b| / max |b|, prefill and decode; greedy identical
    "int8_top1_agreement": 0.95,   # quantized files: teacher-forced top-1 agreement with PyTorch fp32
    "int8_ppl_change": 0.05,       # quantized files: |perplexity / PyTorch fp32's - 1|
    # benchmark (``benchmark.report.checks``): decode time
    "decode_flat": 0.15,           # decode at the longest context within 15% of the shortest (fixed state)
    "speedup_vs_softmax": 3.0,     # DiJiang decode >= 3x the softmax KV cache's at 8k context
    "floor_ratio": 2.0,            # decode within 2x the bandwidth floor
}
