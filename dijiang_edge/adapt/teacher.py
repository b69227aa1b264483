"""The softmax teacher: its attention inputs/outputs (forward hooks on the
transformers ``self_attn`` modules) and its logits, both without gradients."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..errors import DiJiangError


def attention_modules(teacher: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module (Llama family: ``self_attn``, GPT-NeoX: ``attention``)."""
    layers = getattr(teacher.base_model, "layers", None)
    if layers is None:
        raise DiJiangError(f"cannot find the decoder layers of the teacher {type(teacher).__name__}")
    mods = [getattr(layer, "self_attn", None) or getattr(layer, "attention", None) for layer in layers]
    if any(m is None for m in mods):
        raise DiJiangError(f"cannot find the attention modules of the teacher {type(teacher).__name__}")
    return mods


class AttentionTap:
    """Records, for each layer, the hidden states fed to attention and what it returned."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.inputs: list[torch.Tensor | None] = []
        self.outputs: list[torch.Tensor | None] = []

    @contextlib.contextmanager
    def hooked(self) -> Iterator["AttentionTap"]:
        mods = attention_modules(self.teacher)
        self.inputs, self.outputs = [None] * len(mods), [None] * len(mods)
        handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(mods)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.inputs[i] = x.detach()
            self.outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer attention inputs and outputs for ``ids`` (the LM head is skipped)."""
        self.teacher.base_model(input_ids=ids)
        if any(t is None for t in self.inputs):
            raise DiJiangError("the teacher's attention hooks did not fire for every layer")
        return list(self.inputs), list(self.outputs)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return teacher(input_ids=ids).logits.float()
