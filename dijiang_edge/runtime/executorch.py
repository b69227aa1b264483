"""Run a ``.pte`` written by ``dijiang-export`` with ``executorch.runtime``.

The file keeps the recurrent state in its own mutable buffers; this runner only
keeps the position, exactly as the stock ExecuTorch LLM runner does: ``start_pos``
0 clears the state inside the graph, so ``reset()`` just sets the position to 0.
No model code is imported here: the program is all there is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiJiangError
from ..manifest import FileEntry, Manifest, verify_file

MARKER = "dijiang_recurrent_state"
RUNNER_METHODS = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers",
                  "use_kv_cache", "enable_dynamic_shape")


def _load_program(path: Path):
    from executorch.runtime import Runtime
    try:
        return Runtime.get().load_program(path)
    except Exception as e:
        raise DiJiangError(f"{path} is not a loadable ExecuTorch program ({type(e).__name__}: "
                           f"{str(e).strip()[:160] or 'load failed'}); the file is truncated or "
                           f"corrupt: re-export it with `dijiang-export export --formats pte`") from None


def _constant(program, name: str) -> Any:
    out = program.load_method(name).execute([])
    return [int(x) for x in out] if len(out) != 1 else int(out[0])


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU thread pool (XNNPACK runs on it); 0 keeps its default."""
    if threads > 0:
        from executorch.extension.pybindings import portable_lib
        portable_lib._unsafe_reset_threadpool(threads)


class PteRunner:
    """One sequence through a ``.pte``: ``forward(ids [1, T]) -> logits [1, T, V]``.

    Inputs longer than the file's ``get_max_seq_len`` go in several calls, as the
    stock runner does with long prompts.
    """

    def __init__(self, path: str | Path, entry: FileEntry | None = None, threads: int = 0,
                 marker: str = MARKER):
        path = Path(path)
        self.entry = entry or FileEntry(format="pte", quant="?", path=path.name, role="both")
        self._check_file(path)
        set_threads(threads)
        self.program = _load_program(path)
        names = self.program.method_names
        missing = [m for m in ("forward", marker) + RUNNER_METHODS if m not in names]
        if missing:
            raise DiJiangError(f"{path} was not written by dijiang-export (it lacks the methods "
                               f"{', '.join(missing)}; it has {', '.join(sorted(names))}); export the "
                               f"model with `dijiang-export export --formats pte`")
        self.meta = {m: _constant(self.program, m) for m in RUNNER_METHODS}
        self.max_seq_len = int(self.meta["get_max_seq_len"])
        self.vocab_size = int(self.meta["get_vocab_size"])
        self.method = self.program.load_method("forward")
        self.pos = 0

    def _check_file(self, path: Path) -> None:
        """Size and sha256 against the manifest: a truncated or replaced file is named."""
        verify_file(path, (self.entry.get("checksums") or {}).get(self.entry.get("path", "")))

    def reset(self) -> None:
        self.pos = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        import torch
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise DiJiangError(f"token ids must have shape [1, T] with T >= 1 (got {list(ids.shape)})")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DiJiangError(f"token ids must lie in [0, {self.vocab_size}) for this model "
                               f"(got {int(ids.min())}..{int(ids.max())})")
        outs = []
        for s in range(0, ids.shape[1], self.max_seq_len):
            chunk = torch.from_numpy(np.ascontiguousarray(ids[:, s:s + self.max_seq_len], dtype=np.int64))
            start = torch.tensor([self.pos], dtype=torch.long)
            logits = self.method.execute([chunk, start])[0]
            outs.append(logits.numpy().copy())
            self.pos += chunk.shape[1]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)


def open(folder: Path, entry: FileEntry, manifest: Manifest, threads: int = 0) -> PteRunner:  # noqa: A001
    """The ``Runner`` of ``dijiang_edge.runtime`` for a ``.pte`` manifest entry."""
    return PteRunner(Path(folder) / entry["path"], entry, threads)


def llm_runner_generate(pte: str | Path, tokenizer: str | Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy text from ExecuTorch's own C++ LLM runner (``TextLLMRunner``, what the
    Android ``LlmModule`` wraps), reading nothing but the ``.pte`` and ``tokenizer.json``."""
    try:
        from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    except (ImportError, RuntimeError) as e:
        raise DiJiangError(f"this executorch build has no LLM runner bindings ({e})") from None
    pieces: list[str] = []
    try:
        runner = TextLLMRunner(str(pte), str(tokenizer))
        cfg = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
        runner.generate(prompt, cfg, token_callback=pieces.append)
    except RuntimeError as e:
        raise DiJiangError(f"ExecuTorch's LLM runner failed on {pte}: {e}") from None
    return "".join(pieces)
