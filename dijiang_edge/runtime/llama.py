"""A llama.cpp GGUF file (the llama.cpp peer of the softmax baseline,
``exporters/baseline_gguf.py``) as a ``runtime.Runner``, through ``llama-cpp-python``.

llama-cpp-python is optional (it builds llama.cpp from source, about 15 minutes): this
module imports it only when a runner is made, and ``available()`` says why it cannot be
where it is missing, so ``bench`` can print that instead of a row.  The context is made
with llama-cpp-python's defaults (what its users get) but for the thread counts and the
context size: ``n_threads`` and ``n_threads_batch`` are the row's threads, and
``reserve`` sizes the KV cache, which llama.cpp allocates whole when the context is made.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import DiJiangError
from . import input_ids

PACKAGE = "llama-cpp-python"
PIN = "0.3.36"            # the version the peer rows were measured with
INSTALL = f"pip install {PACKAGE}=={PIN}"
DEFAULT_CONTEXT = 4096
BATCH = 512               # tokens per llama_decode in a prefill (llama-cpp-python's default)


def available() -> str | None:
    """None when llama-cpp-python can be imported, else the reason it cannot, one line."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed (optional; `{INSTALL}` builds llama.cpp, about 15 min)"
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:             # a broken build: its shared library does not load
        return f"llama-cpp-python does not load ({type(e).__name__}: {str(e)[:160]})"
    return None


class LlamaRunner:
    """One sequence of batch 1 through ``llama_cpp.Llama``: ``forward(ids, keep)`` evaluates
    the tokens on top of the KV cache and returns the logits of the last ``keep`` rows.

    llama.cpp computes the last row's logits only (``logits_all=False``, its default, as
    in a generation); ``keep=0`` over several tokens (the parity checks) feeds them one
    at a time, the same function row by row."""

    def __init__(self, path: str | Path, threads: int = 0, entry: dict | None = None,
                 n_ctx: int = DEFAULT_CONTEXT):
        why = available()
        if why:
            raise DiJiangError(f"running {Path(path).name} needs llama-cpp-python: {why}")
        self.path, self.threads, self.entry = Path(path), threads, entry or {}
        if not self.path.is_file():
            raise DiJiangError(f"{self.path} is missing; re-export the baseline folder")
        self.llm = None
        self.reserve(n_ctx)

    def reserve(self, n_ctx: int) -> None:
        """A new context of ``n_ctx`` positions (and an empty sequence)."""
        import llama_cpp
        self.llm = None                              # free the last context's KV cache first
        threads = self.threads or None
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=BATCH,
                                       n_threads=threads, n_threads_batch=threads, logits_all=False,
                                       verbose=False)
        except Exception as e:
            raise DiJiangError(f"llama.cpp could not load {self.path} ({str(e)[:200]}); re-export it") from None
        self.vocab_size = self.llm.n_vocab()
        self.n_ctx = n_ctx

    @property
    def pos(self) -> int:
        return self.llm.n_tokens

    def reset(self) -> None:
        self.llm.reset()

    def _eval(self, ids: list[int]) -> np.ndarray:
        if self.pos + len(ids) > self.n_ctx:
            raise DiJiangError(f"the llama.cpp context holds {self.n_ctx} tokens; {self.pos + len(ids)} asked")
        self.llm.eval(ids)
        row = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab_size,))
        return row.astype(np.float32, copy=True)[None, None]

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits ``[1, keep or T, V]`` of ``ids [1, T]``, the KV cache carried."""
        ids = input_ids(ids, self.vocab_size)
        if ids.shape[0] != 1:
            raise DiJiangError(f"the llama.cpp runner takes one sequence (batch 1), got {ids.shape[0]}")
        toks = ids[0].tolist()
        want = keep or len(toks)
        if want == 1:
            return self._eval(toks)
        if len(toks) > want:
            self.llm.eval(toks[:len(toks) - want])
        return np.concatenate([self._eval([t]) for t in toks[-want:]], axis=1)
