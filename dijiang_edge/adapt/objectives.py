"""The two training objectives, as modules so Accelerate can wrap them (DDP/FSDP
see one ``forward`` that returns the loss).

* transfer: each layer's DiJiang attention on the teacher's own layer input
  should give the teacher's softmax attention output (mean over layers of the MSE);
* finetune: ``(1 - w) CE(next token) + w KL(teacher || student)`` on the logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import DiJiangForCausalLM

NEW_PARAM_KEYS = (".attn.decay_logit", ".attn.gate.", ".attn.group_norm.", ".attn.window_weight")


def is_new_param(name: str) -> bool:
    """Whether ``name`` is a parameter DiJiang added (not a source weight)."""
    return any(k in name + "." for k in NEW_PARAM_KEYS)


def layer_attention(student: DiJiangForCausalLM, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each student layer's attention output for its given input (a fresh sequence each)."""
    b, t, _ = xs[0].shape
    positions = torch.arange(t, device=xs[0].device).expand(b, t)
    ctx = student.context(positions, like=positions)
    return [layer.attn(x, ctx, student.layer_state(b))[0] for layer, x in zip(student.layers, xs)]


class TransferObjective(nn.Module):
    def __init__(self, student: DiJiangForCausalLM):
        super().__init__()
        self.student = student

    def forward(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        outs = layer_attention(self.student, inputs)
        return torch.stack([F.mse_loss(o.float(), y.float()) for o, y in zip(outs, targets)]).mean()


def distill_losses(logits: torch.Tensor, teacher_logits: torch.Tensor,
                   ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE and mean per-token KL(teacher || student)."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    ce = F.nll_loss(lp.flatten(0, 1), ids[:, 1:].flatten())
    tlp = F.log_softmax(teacher_logits[:, :-1].float(), -1)
    kl = F.kl_div(lp.flatten(0, 1), tlp.flatten(0, 1), log_target=True, reduction="batchmean")
    return ce, kl


class FinetuneObjective(nn.Module):
    def __init__(self, student: DiJiangForCausalLM, kl_weight: float):
        super().__init__()
        self.student, self.kl_weight = student, kl_weight

    def forward(self, ids: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        logits, _ = self.student(ids)
        ce, kl = distill_losses(logits, teacher_logits, ids)
        return torch.stack([(1 - self.kl_weight) * ce + self.kl_weight * kl, ce.detach(), kl.detach()])
