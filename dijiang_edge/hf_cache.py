"""The model's ``RecurrentState`` kept in transformers' own cache layers.

``DynamicCache(config=DiJiangConfig)`` holds one layer object per model layer
(``hf_config.hf_fields``' ``layer_types``).  Each holds, as recurrent states,

* state 0: the layer's DiJiang state ``[B, H, m, dv]``;
* state 1: each sequence's position ``[B]`` (the count of real tokens seen, which
  left padding does not advance, so it is not the cache's sequence length);

and with a window, in its sliding-window part, the ring of the last ``W`` keys (after
RoPE) and values ``[B, H_kv, W, d]`` as its ``keys`` / ``values``, which is
transformers' layout for them.  The ring keeps ``W`` tokens where transformers'
sliding layer keeps ``W - 1``: the oldest one enters the DiJiang state at the next
step.  ``cumulative_length`` counts the tokens fed (padding included), so
``get_seq_length`` answers as for any sliding layer.  ``reset`` and ``reorder_cache``
(beam search) need nothing more: zeros are the empty state, and every tensor's first
axis is the batch.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (Cache, LinearAttentionAndSlidingWindowAttentionLayer,
                                      LinearAttentionLayer)

from .model import DiJiangForCausalLM, RecurrentState

S, POS = 0, 1          # recurrent state indices


def layer_class(net: DiJiangForCausalLM) -> type:
    return LinearAttentionAndSlidingWindowAttentionLayer if net.args.window else LinearAttentionLayer


def check_cache(cache: Cache, net: DiJiangForCausalLM) -> None:
    """Refuse a cache whose layers cannot hold this model's state (e.g. a ``StaticCache``
    for a windowed model, or a cache made for another model)."""
    want = layer_class(net)
    if len(cache.layers) != net.args.n_layers or not all(type(x) is want for x in cache.layers):
        got = sorted({type(x).__name__ for x in cache.layers}) or ["no layers"]
        raise ValueError(f"this DiJiang model keeps its state in {net.args.n_layers} {want.__name__} layers; "
                         f"the cache given has {len(cache.layers)} ({', '.join(got)}): pass "
                         "DynamicCache(config=model.config), or none")


def read_state(cache: Cache, net: DiJiangForCausalLM, batch: int) -> RecurrentState | None:
    """The state the cache holds, or None for an empty (new or reset) cache."""
    check_cache(cache, net)
    if not all(x.is_recurrent_states_initialized[S] for x in cache.layers):
        return None
    layers: list[torch.Tensor] = []
    for x in cache.layers:
        layers.append(x.recurrent_states[S])
        if net.args.window:          # after ``reset`` the sliding part is empty again: an empty ring
            ring = x.is_initialized and x.keys is not None and x.keys.dim() == 4
            layers += [x.keys, x.values] if ring else net.layer_state(batch)[1:]
    return RecurrentState(layers, cache.layers[0].recurrent_states[POS])


def write_state(cache: Cache, state: RecurrentState, fed: int, net: DiJiangForCausalLM) -> None:
    """Store ``state`` (after ``fed`` more tokens) in the cache's layers."""
    k = len(net.layer_state_shapes())
    for i, x in enumerate(cache.layers):
        mine = state.layers[i * k:(i + 1) * k]
        cache.update_recurrent_state(mine[0], i, state_idx=S)
        cache.update_recurrent_state(state.pos, i, state_idx=POS)
        x.has_previous_state[S] = x.has_previous_state[POS] = True
        if net.args.window:
            if not x.is_initialized:
                x.lazy_initialization(mine[1], mine[2])       # the sliding part's own set-up
            x.keys, x.values = mine[1], mine[2]
            x.cumulative_length += fed
