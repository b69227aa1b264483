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
from . import clog

MARKER = "dijiang_recurrent_state"
RUNNER_METHODS = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers",
                  "use_kv_cache", "enable_dynamic_shape")


def check_header(path: Path) -> None:
    """Refuse a file that is no ExecuTorch program before the runtime reads it: the
    runtime logs a foreign file's identifier bytes, and bytes that are not UTF-8 there
    abort the whole process (pybind11 cannot decode the log line)."""
    with path.open("rb") as f:      # (this module's own `open` is the runner factory)
        head = f.read(8)
    ident = head[4:8]
    if len(head) < 8 or not ident.startswith(b"ET") or not ident.isascii():
        raise DiJiangError(f"{path} is not an ExecuTorch program (no ET identifier in its header); the file "
                           f"is corrupt or of another kind: re-export it with `dijiang-export export --formats pte`")


def _load_program(path: Path, threads: int, log: list[str]):
    """The loaded program, with the runtime's native log lines caught in ``log``."""
    from executorch.runtime import Runtime
    try:
        with clog.captured(log):
            set_threads(threads)
            return Runtime.get().load_program(path)
    except Exception as e:
        why = clog.last_line(log) or str(e).strip()[:160] or "load failed"
        raise DiJiangError(f"{path} is not a loadable ExecuTorch program ({type(e).__name__}: {why}); the "
                           f"file is truncated or corrupt: re-export it with `dijiang-export export --formats pte`") from None


def _constant(program, name: str) -> Any:
    out = program.load_method(name).execute([])
    return [int(x) for x in out] if len(out) != 1 else int(out[0])


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU thread pool (XNNPACK runs on it); 0 keeps its default."""
    if threads > 0:
        from executorch.extension.pybindings import portable_lib
        portable_lib._unsafe_reset_threadpool(threads)


class PteRunner:
    """One sequence through a ``.pte``: ``forward(ids [1, T], keep=0) -> logits [1, T or keep, V]``.

    Inputs longer than the file's ``get_max_seq_len`` go in several calls, as the
    stock runner does with long prompts.
    """

    def __init__(self, path: str | Path, entry: FileEntry | None = None, threads: int = 0,
                 marker: str = MARKER):
        path = Path(path)
        self.entry = entry or FileEntry(format="pte", quant="?", path=path.name, role="both")
        self._check_file(path)
        check_header(path)
        self.log: list[str] = []          # the runtime's native log of the load (cpuinfo, XNNPACK)
        self.program = _load_program(path, threads, self.log)
        try:
            with clog.captured(self.log):  # the XNNPACK delegate logs its CPU probing here
                self._load_methods(path, marker)
        except RuntimeError as e:
            raise DiJiangError(f"{path}: ExecuTorch cannot load its methods ({clog.last_line(self.log) or e}); "
                               "the file is damaged, or this executorch is older than the one that wrote it: "
                               "re-export it") from None
        self.pos = 0
        self._last_only: bool | None = None

    def _load_methods(self, path: Path, marker: str) -> None:
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

    def _check_file(self, path: Path) -> None:
        """Size and sha256 against the manifest: a truncated or replaced file is named."""
        verify_file(path, (self.entry.get("checksums") or {}).get(self.entry.get("path", "")))

    def reset(self) -> None:
        self.pos = 0

    @property
    def last_only(self) -> bool:
        """Whether the file returns the last position's logits only (``[1, 1, V]``, as
        ExecuTorch's own LLM exports do; files of this project since it has
        ``logits_to_keep``): the entry's logits shape says, else one probe call."""
        if self._last_only is None:
            shape = ((self.entry.get("outputs") or {}).get("logits") or {}).get("shape") or []
            if len(shape) == 3 and shape[1] in (1, "seq"):
                self._last_only = shape[1] == 1
            else:
                import torch
                ids = torch.zeros(1, min(2, self.max_seq_len), dtype=torch.long)
                out = self.method.execute([ids, torch.tensor([0], dtype=torch.long)])[0]
                self._last_only, self.pos = out.shape[1] == 1 < ids.shape[1], 0   # start_pos 0 resets
        return self._last_only

    def _call(self, ids: np.ndarray) -> np.ndarray:
        """One or more ``forward`` calls on ``ids`` (``max_seq_len`` at most each); the
        last call's logits."""
        import torch
        for s in range(0, ids.shape[1], self.max_seq_len):
            chunk = torch.from_numpy(np.ascontiguousarray(ids[:, s:s + self.max_seq_len], dtype=np.int64))
            logits = self.method.execute([chunk, torch.tensor([self.pos], dtype=torch.long)])[0]
            self.pos += chunk.shape[1]
        return logits.numpy().copy()

    def forward(self, ids: np.ndarray, keep: int = 0) -> np.ndarray:
        """Logits of the last ``keep`` positions of ``ids`` (0: all).  A file that returns
        the last position only gives the earlier rows one token per call: the same
        function (the recurrent and chunked forms agree), at decode speed."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise DiJiangError(f"token ids must have shape [1, T] with T >= 1 (got {list(ids.shape)})")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise DiJiangError(f"token ids must lie in [0, {self.vocab_size}) for this model "
                               f"(got {int(ids.min())}..{int(ids.max())})")
        if keep < 0:
            raise DiJiangError(f"keep must be >= 0 (0: every position), got {keep}")
        t = ids.shape[1]
        need = min(keep, t) or t
        if not self.last_only:          # a file that returns every row: the wanted ones, in max_seq_len calls
            if need < t:
                self._call(ids[:, :t - need])
            return self._all_rows(ids[:, t - need:])
        rows = [self._call(ids[:, :t - need + 1])[:, -1:]]
        rows += [self._call(ids[:, j:j + 1]) for j in range(t - need + 1, t)]
        return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)

    def _all_rows(self, ids: np.ndarray) -> np.ndarray:
        """Every row's logits from a file that returns them all, ``max_seq_len`` per call."""
        return np.concatenate([self._call(ids[:, s:s + self.max_seq_len])
                               for s in range(0, ids.shape[1], self.max_seq_len)], axis=1)


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
