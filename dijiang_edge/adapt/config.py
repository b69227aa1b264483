"""Settings of one adaptation run, validated up front so a bad flag fails in a
second, not after the teacher has loaded."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import DiJiangError

STAGES = ("transfer", "finetune")
FINETUNE_MODES = ("lora", "full")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")      # adapter.safetensors' tensors


@dataclass
class AdaptConfig:
    """What to train, on how much text, for how long.

    Budgets count training only (evaluations are reported apart); with both
    stages, ``transfer_share`` of each budget goes to transfer, the rest to finetune.
    """

    stages: tuple[str, ...] = STAGES
    token_budget: int = 0              # tokens over all stages and processes (0 = no limit)
    time_budget: float = 0.0           # training seconds over all stages (0 = no limit)
    transfer_share: float = 0.3
    seq_len: int = 256
    batch_size: int = 4                # sequences per step, all processes together
    transfer_lr: float = 1e-2
    finetune_lr: float = 0.0           # 0 = 1e-3 for lora, 1e-4 for full
    finetune_mode: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    kl_weight: float = 0.7             # finetune loss = (1 - w) CE + w KL(teacher || student)
    warmup_steps: int = 3                # CPU budgets are tens of steps: keep warm-up short
    grad_clip: float = 1.0
    heldout_fraction: float = 0.05
    eval_tokens: int = 16384           # at most this many held-out tokens
    eval_batch: int = 4
    max_chars: int = 50_000_000        # of training text read
    seed: int = 0
    checkpoint_steps: int = 0          # 0 = by time only
    checkpoint_minutes: float = 5.0
    log_seconds: float = 10.0
    adapter_dtype: str = "float32"     # of adapter.safetensors; 16-bit halves its size

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            self.stages = tuple(s.strip() for s in self.stages.split(",") if s.strip())
        self.stages = tuple(self.stages)
        bad = [s for s in self.stages if s not in STAGES]
        if not self.stages or bad:
            raise DiJiangError(f"unknown stage(s) {bad or self.stages}; choose from {', '.join(STAGES)}")
        self.stages = tuple(s for s in STAGES if s in self.stages)     # always in order
        if self.finetune_mode not in FINETUNE_MODES:
            raise DiJiangError(f"finetune mode {self.finetune_mode!r}; choose from {', '.join(FINETUNE_MODES)}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise DiJiangError(f"adapter dtype {self.adapter_dtype!r}; choose from {', '.join(ADAPTER_DTYPES)}")
        if self.token_budget <= 0 and self.time_budget <= 0:
            raise DiJiangError("give a budget: --token-budget (e.g. 200k) and/or --time-budget (e.g. 20m)")
        if not 0 < self.transfer_share < 1:
            raise DiJiangError("transfer_share must be between 0 and 1")
        for name in ("seq_len", "batch_size", "eval_batch", "lora_rank"):
            if getattr(self, name) < 1:
                raise DiJiangError(f"{name} must be a positive integer")
        if self.seq_len < 2:
            raise DiJiangError("seq_len must be at least 2 tokens")
        if not 0 <= self.kl_weight <= 1:
            raise DiJiangError("kl_weight must be between 0 and 1")
        if not self.finetune_lr:
            self.finetune_lr = 1e-3 if self.finetune_mode == "lora" else 1e-4

    def share(self, stage: str) -> float:
        """Fraction of the budgets that ``stage`` gets."""
        if len(self.stages) == 1:
            return 1.0
        return self.transfer_share if stage == "transfer" else 1 - self.transfer_share

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = list(self.stages)
        return d


_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_TIME = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_count(text: str) -> int:
    """``"200k"`` -> 200000; ``"1.5M"`` -> 1500000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgKMG]?)\s*", str(text))
    if not m:
        raise DiJiangError(f"cannot read {text!r} as a token count (e.g. 50000, 200k, 1.5M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_seconds(text: str) -> float:
    """``"20m"`` -> 1200.0; ``"90"`` or ``"90s"`` -> 90.0; ``"1h"`` -> 3600.0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhSMH]?)\s*", str(text))
    if not m:
        raise DiJiangError(f"cannot read {text!r} as a duration (e.g. 90s, 20m, 1.5h)")
    return float(m.group(1)) * _TIME[m.group(2).lower()]
