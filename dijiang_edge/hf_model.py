"""``DiJiangHFForCausalLM``: the converted model as a transformers ``PreTrainedModel``.

It holds the eager model's own modules under the eager model's own names (``embed``,
``layers``, ``norm``, ``lm_head``, ``inv_freq``), so its ``state_dict`` is the
converted folder's ``model.safetensors`` key for key: ``from_pretrained`` reads a
``dijiang-export convert`` folder as it is, and ``save_pretrained`` writes one that
``dijiang_edge.load`` reads.  Every call runs the eager model's ``forward`` (the
chunked form for several tokens, the recurrent step for one) on those modules; the
state travels between calls in transformers' cache classes (``hf_cache.py``), which
``generate`` creates from the config.  Nothing here computes attention itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import hf_cache
from .hf_config import DiJiangConfig
from .model import DiJiangAttention, DiJiangForCausalLM, RecurrentState, rope_permutation, rope_rotation
from .runtime import PREFILL_PIECE

Tensor = torch.Tensor


class DiJiangHFForCausalLM(PreTrainedModel, GenerationMixin):
    """A converted or adapted DiJiang model for ``AutoModelForCausalLM``, ``generate``
    and ``pipeline``; the same weights and logits as ``DiJiangForCausalLM``."""

    config_class = DiJiangConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _input_embed_layer = "embed"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}      # applied when tie_word_embeddings
    _no_split_modules = ["Block"]
    _is_stateful = True          # a recurrent state cannot be rolled back: no assisted decoding

    def __init__(self, config: DiJiangConfig):
        super().__init__(config)
        net = DiJiangForCausalLM(config.model_args())
        for name, child in net.named_children():
            self.add_module(name, child)
        for name, buf in net.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.__dict__["_net"] = net           # not a submodule: its modules are this model's
        self.post_init()

    # -- the eager model ---------------------------------------------------------------
    @property
    def eager(self) -> DiJiangForCausalLM:
        """The eager model on this model's current modules and buffers (loading, ``.to()``,
        resizing or PEFT may have replaced any of them since ``__init__``)."""
        net = self.__dict__["_net"]
        for name in dict(net.named_children()):
            setattr(net, name, getattr(self, name))
        for name in dict(net.named_buffers(recurse=False)):
            setattr(net, name, getattr(self, name))
        net.train(self.training)
        return net

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only what a checkpoint never holds: everything else comes from the file, or
        from the eager model's own initialisation for a model built from a config."""
        if isinstance(module, DiJiangAttention):
            module.rope_perm = rope_permutation(module.a).to(module.proj.device)
            module.rope_rot = rope_rotation(module.a).to(module.proj.device)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new: torch.nn.Module) -> None:
        self.lm_head = new

    # -- forward -----------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: Cache | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, inputs_embeds: Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """Logits of ``input_ids`` after the state in ``cache`` (empty: a new sequence).

        ``attention_mask`` may cover the cached tokens too (as ``generate`` passes it);
        only its last ``T`` columns are read: padded tokens are invisible (left or right
        padding).  ``logits_to_keep > 0`` keeps only that many last positions, and the
        prompt then goes in ``PREFILL_PIECE``-token pieces (as ``dijiang_edge.generate``
        does), so a long prompt never holds ``[T, vocab]`` logits."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("DiJiang models take input_ids (inputs_embeds is not supported)")
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise ValueError("DiJiang models return no per-layer hidden states or attention weights")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        net = self.eager
        b, t = input_ids.shape
        state = hf_cache.read_state(cache, net, b) if cache is not None else None
        logits, state = run(net, input_ids, state, current_mask(attention_mask, t), logits_to_keep)
        if cache is not None:
            hf_cache.write_state(cache, state, t, net)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()

    # -- persistence -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' ``from_pretrained``; a ``convert`` folder has no
        ``generation_config.json``, and transformers then reads generation settings from
        ``config.json``'s top level, where a converted config has no token ids: the
        config's ``eos_token_id`` (and bos, pad) fill what is unset, or ``generate``
        would never stop at the end of a text."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(model.generation_config, name, None) is None:
                setattr(model.generation_config, name, getattr(model.config, name, None))
        return loaded

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, then the model card (``modelcard.py``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .modelcard import write_card
            net = self.eager
            write_card(save_directory, params=net.num_params(), state_bytes=net.init_state(1).nbytes())


def current_mask(attention_mask: Tensor | None, t: int) -> Tensor | None:
    """The mask of this call's ``t`` tokens (None when all are real: the fast path)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("DiJiang models take a 2-D attention_mask [batch, tokens] (1 = token, 0 = padding)")
    mask = attention_mask[:, -t:]
    return None if bool(mask.all()) else mask


def run(net: DiJiangForCausalLM, ids: Tensor, state: RecurrentState | None, mask: Tensor | None,
        keep: int | Tensor) -> tuple[Tensor, RecurrentState]:
    """``net``'s logits (all, the last ``keep``, or the positions a tensor ``keep`` names)
    and the state after ``ids``."""
    if isinstance(keep, Tensor) or keep <= 0:
        logits, state = net(ids, state, attention_mask=mask)
        return (logits[:, keep] if isinstance(keep, Tensor) else logits), state
    t, first, kept = ids.shape[1], ids.shape[1] - keep, []
    for at in range(0, t, PREFILL_PIECE):
        piece = slice(at, at + PREFILL_PIECE)
        logits, state = net(ids[:, piece], state, attention_mask=None if mask is None else mask[:, piece])
        if at + logits.shape[1] > first:
            kept.append(logits[:, max(first - at, 0):])
    return torch.cat(kept, dim=1), state


__all__ = ["DiJiangHFForCausalLM", "DiJiangConfig"]
