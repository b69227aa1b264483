"""``DiJiangConfig``: a converted folder's ``config.json`` as a transformers config.

The folder's ``config.json`` is ``{"model_type": "dijiang", "dijiang_edge": {...}}``
(``ModelArgs``); that dict stays the one source of truth, so a folder saved by
transformers still loads with ``dijiang_edge.load``.  The names transformers and its
tools read (``vocab_size``, ``num_hidden_layers``, ``eos_token_id``, ...) are derived
from it on every construction, and ``layer_types`` / ``sliding_window`` /
``number_of_conv_states`` make ``DynamicCache(config=...)`` build the right cache
layers (``hf_model.py``): a ``LinearAttentionLayer`` per layer for pure DiJiang, a
``LinearAttentionAndSlidingWindowAttentionLayer`` with a softmax window.

Imports transformers' config module only (which itself imports torch), not the model.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from .model import ModelArgs

MODEL_TYPE = "dijiang"
STATES_PER_LAYER = 2        # recurrent state 0: the DiJiang state; 1: each sequence's position


class DiJiangConfig(PreTrainedConfig):
    """transformers' view of ``ModelArgs`` (kept whole under ``dijiang_edge``)."""

    model_type = MODEL_TYPE

    dijiang_edge: dict | None = None
    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1376
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    number_of_conv_states: int = STATES_PER_LAYER
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        args = ModelArgs.from_dict(self.dijiang_edge or {})
        self.dijiang_edge = args.to_dict()
        for name, value in hf_fields(args).items():
            setattr(self, name, value)
        super().__post_init__(**kwargs)

    def model_args(self) -> ModelArgs:
        """The ``ModelArgs`` that build the eager model."""
        return ModelArgs.from_dict(self.dijiang_edge or {})


def hf_fields(a: ModelArgs) -> dict[str, Any]:
    """The transformers-named attributes of ``a`` (a window: HF's ``sliding_window`` is
    the tokens a query sees, itself included, which is what ``window`` counts)."""
    eos = list(a.eos_ids)
    return {
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "intermediate_size": a.intermediate_size, "hidden_act": a.act, "tie_word_embeddings": a.tie_embeddings,
        "bos_token_id": a.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": a.pad_id,
        "layer_types": ["hybrid_sliding" if a.window else "linear_attention"] * a.n_layers,
        "sliding_window": a.window or None, "number_of_conv_states": STATES_PER_LAYER,
    }


__all__ = ["DiJiangConfig", "MODEL_TYPE"]
