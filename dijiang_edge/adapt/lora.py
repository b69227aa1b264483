"""Low-rank updates as weight parametrizations: ``W + (alpha / r) B A``.

A parametrization keeps every parameter name and the model code untouched, and
``merge`` folds the update into ``W`` so the saved model is a plain one that
``dijiang-export export`` reads like any other.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

# the source model's projections; DiJiang's own ``attn.gate`` is trained in full instead
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class LowRank(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))     # zero: starts as the identity update

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.B @ self.A).to(w.dtype) * self.scale


def lora_targets(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The source projections of every layer that get a low-rank update (one rule for
    ``add_lora`` and for the adapter's size, ``adapter.adapter_nbytes``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("layers.") and name.rsplit(".", 1)[-1] in TARGETS:
            yield name, mod


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Parametrize the source projections of every layer; returns the new (A, B) parameters."""
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for _, mod in list(lora_targets(model)):
        lr = LowRank(mod.out_features, mod.in_features, rank, alpha, gen).to(mod.weight.device)
        parametrize.register_parametrization(mod, "weight", lr)
        params += [lr.A, lr.B]
    return params


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def merge_lora(model: nn.Module) -> None:
    """Fold every low-rank update into its weight and drop the parametrization."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
