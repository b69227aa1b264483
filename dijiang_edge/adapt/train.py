"""The training loop shared by both stages: budgets, learning-rate schedule,
progress display, periodic checkpoints.  Accelerate owns the processes and the
gradient all-reduce; every process takes its equal slice of each global batch."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..progress import tty_meter
from .data import BatchOrder, shard

BAR_STEPS = 1000          # a terminal's bar counts the budget in thousandths


@dataclass
class StageProgress:
    """A stage's position: its step is also the data position (see ``BatchOrder``)."""

    stage: str
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    done: bool = False
    curve: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    tokens: int | None
    seconds: float | None

    def spent(self, p: StageProgress) -> bool:
        return bool((self.tokens and p.tokens >= self.tokens) or (self.seconds and p.seconds >= self.seconds))

    def fraction(self, p: StageProgress) -> float:
        fr = [p.tokens / self.tokens if self.tokens else 0.0, p.seconds / self.seconds if self.seconds else 0.0]
        return min(1.0, max(fr))

    def seconds_left(self, p: StageProgress) -> float:
        left = [self.seconds - p.seconds] if self.seconds else []
        if self.tokens and p.tokens:
            left.append((self.tokens - p.tokens) * p.seconds / p.tokens)
        return max(0.0, min(left)) if left else float("nan")


def lr_at(base: float, step: int, warmup: int, frac: float) -> float:
    """Linear warm-up, then cosine down to a tenth over the budget spent."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


@dataclass
class Loop:
    """One stage's run: ``step_fn(ids) -> [loss, *metrics]`` on this process's shard."""

    acc: Any
    train_blocks: torch.Tensor
    order: BatchOrder
    batch_size: int
    budget: Budget
    base_lr: float
    warmup: int
    grad_clip: float
    metric_names: tuple[str, ...]
    save: Callable[[], None]                      # writes a checkpoint (main process)
    checkpoint_steps: int = 0
    checkpoint_seconds: float = 300.0
    log_seconds: float = 10.0
    on_step: Callable[[StageProgress], None] | None = None

    def run(self, p: StageProgress, model: torch.nn.Module, opt: Any, step_fn) -> None:
        """Steps until the budget is spent.  Progress: a bar over the budget on a terminal
        (redrawn every step), a plain line every ``log_seconds`` in a log, and the last
        line in both."""
        start, last_ckpt, last_log = time.time() - p.seconds, p.seconds, -1e9
        self._bar = tty_meter(BAR_STEPS, p.stage, "budget", bar_format="{l_bar}{bar}|{postfix}") \
            if self.acc.is_main_process else None
        try:
            self._steps(p, model, opt, step_fn, start, last_ckpt, last_log)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        p.done = True
        self._log(p)

    def _steps(self, p: StageProgress, model, opt, step_fn, start: float, last_ckpt: float, last_log: float) -> None:
        while True:
            p.seconds = self._synced(time.time() - start)
            if self.budget.spent(p):
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(self.base_lr, p.step, self.warmup, self.budget.fraction(p))
            metrics = self._step(p.step, model, opt, step_fn)
            p.step += 1
            p.tokens += self.batch_size * self.train_blocks.shape[1]
            p.curve.append({"step": p.step, "tokens": p.tokens, "seconds": round(time.time() - start, 3),
                            **dict(zip(self.metric_names, metrics))})
            if self.on_step:
                self.on_step(p)
            if (self.checkpoint_steps and p.step % self.checkpoint_steps == 0) or \
                    (self.checkpoint_seconds and p.seconds - last_ckpt >= self.checkpoint_seconds):
                self.save()
                last_ckpt = p.seconds
            if self._bar is not None:
                self._bar.n = int(BAR_STEPS * self.budget.fraction(p))
                self._bar.set_postfix_str(self._summary(p), refresh=True)
            elif p.seconds - last_log >= self.log_seconds:
                self._log(p)
                last_log = p.seconds

    def _step(self, step: int, model, opt, step_fn) -> list[float]:
        ids = self.train_blocks[self.order.indices(step)]
        ids = shard(ids, self.acc.process_index, self.acc.num_processes).to(self.acc.device)
        out = step_fn(ids)
        self.acc.backward(out[0])
        if self.grad_clip:
            self.acc.clip_grad_norm_(model.parameters(), self.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return [float(x) for x in self.acc.reduce(out.detach(), "mean")]

    def _synced(self, seconds: float) -> float:
        """The slowest process's clock, so every process stops at the same step."""
        t = torch.tensor([seconds], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, "max")) if self.acc.num_processes > 1 else seconds

    def _summary(self, p: StageProgress) -> str:
        last = p.curve[-1]
        tps = p.tokens / max(last["seconds"], 1e-3)
        left = self.budget.seconds_left(p)
        extra = "".join(f" {k} {last[k]:.4g}" for k in self.metric_names[1:])
        return (f"step {p.step} | {p.tokens:,} tokens | {tps:,.0f} tok/s | loss {last['loss']:.4g}{extra}"
                f" | {last['seconds']:.0f}s spent, {_fmt(left)} left")

    def _log(self, p: StageProgress) -> None:
        if not self.acc.is_main_process or not p.curve:
            return
        print(f"[{p.stage}] {self._summary(p)}", file=sys.stderr, flush=True)


def _fmt(s: float) -> str:
    if s != s:
        return "?"
    return f"{int(s // 60)}m{int(s % 60):02d}s"
