"""An export's onnxruntime-genai folder (``onnx/``, see ``exporters/genai.py``) driven
as a ``runtime.Runner``: ``forward(ids) -> logits`` through genai's own ``Generator``
(``append_tokens``, then the decoder's ``logits`` output), so the parity functions that
check this project's runners check the genai layout too; the same runner drives the
onnxruntime-genai peer of the softmax baseline (``exporters/baseline_genai.py``) in
``bench``.  Needs ``onnxruntime-genai``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from . import input_ids


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise DiJiangError("running the onnxruntime-genai folder needs onnxruntime-genai: "
                           "`pip install onnxruntime-genai`") from None
    return og


class GenaiRunner:
    """One sequence of batch 1 through ``onnxruntime_genai.Generator``.

    ``graph``: the decoder file of the folder to run (default: the one
    ``genai_config.json`` names), chosen with genai's own ``Config.overlay``;
    ``max_length``: tokens the sequence may reach (default: the config's)."""

    def __init__(self, folder: str | Path, graph: str | None = None, max_length: int | None = None,
                 threads: int = 0, entry: dict | None = None):
        og = _og()
        folder = Path(folder)
        self.entry, self.pos = entry or {}, 0
        try:
            config = json.loads((folder / "genai_config.json").read_text())
        except (OSError, ValueError) as e:
            raise DiJiangError(f"{folder} is not an onnxruntime-genai folder ({e}); re-export it") from None
        self.chunk = int(config["search"].get("chunk_size") or 1 << 30)
        self.vocab_size = int(config["model"]["vocab_size"])
        overlay: dict = {"model": {"decoder": {}}}
        if max_length and max_length > int(config["model"]["context_length"]):
            overlay["model"]["context_length"] = max_length        # genai caps max_length by it
        if graph:
            overlay["model"]["decoder"]["filename"] = graph
        if threads:                     # as the ONNX runners' sessions: intra-op threads, one inter-op
            overlay["model"]["decoder"]["session_options"] = {"intra_op_num_threads": threads,
                                                              "inter_op_num_threads": 1}
        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps(overlay))
        try:
            self.model = og.Model(cfg)
        except Exception as e:
            raise DiJiangError(f"onnxruntime-genai could not load {folder} ({str(e)[:200]}); re-export it") from None
        self.reserve(max_length or int(config["search"]["max_length"]))

    def reserve(self, max_length: int) -> None:
        """A new sequence of at most ``max_length`` tokens.  genai allocates the KV cache it
        shares between past and present for that many positions at once, so the generator
        is made at the first call, after ``bench`` has asked for what its longest context
        needs (a peer's config says 32k: 1.5 GB of cache for SmolLM2)."""
        self.max_length, self.generator, self.pos = max_length, None, 0

    def _generator(self):
        if self.generator is None:
            og = _og()
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.max_length)
            self.generator = og.Generator(self.model, params)
        return self.generator

    def reset(self) -> None:
        """Start a new sequence: genai zeroes the recurrent state (``rewind_to(0)``)."""
        if self.generator is not None:
            self.generator.rewind_to(0)
        self.pos = 0

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits ``[1, T, V]`` of ``ids [1, T]`` (the last ``keep`` rows; 0: all), the
        state carried from the last call.
        Calls of at most the config's ``chunk_size`` tokens: genai keeps the logits of
        its last chunk only."""
        ids = input_ids(ids, self.vocab_size)
        if ids.shape[0] != 1:
            raise DiJiangError(f"the genai runner takes one sequence (batch 1), got a batch of {ids.shape[0]}")
        parts = []
        for i in range(0, ids.shape[1], self.chunk):
            gen = self._generator()
            gen.append_tokens(ids[0, i:i + self.chunk].astype(np.int32))
            parts.append(np.array(gen.get_output("logits"), np.float32))
        self.pos += ids.shape[1]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return out[:, -keep:] if keep else out
