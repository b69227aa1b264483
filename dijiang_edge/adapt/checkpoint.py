"""Everything needed to continue after a kill: the parameters adaptation changed, the
optimizer, the RNG states, each stage's progress (its step is the data position), and
the figures measured so far.

No pickle (loading one runs whatever code it names): the tensors go to a safetensors
file, everything else to ``checkpoint.json``, where each tensor is a reference to its
safetensors key and tuples / non-string dict keys are spelled out so they come back as
they were.  Two tensor files take turns (``checkpoint.0.safetensors``, ``.1``): a save
writes the one the JSON does not name, then replaces the JSON (each by a temporary
name and a rename), so a kill at any point leaves the previous checkpoint whole.

Written by the main process (every process holds the same state under DDP).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiJiangError

FILE = "checkpoint.json"
TENSORS = ("checkpoint.0.safetensors", "checkpoint.1.safetensors")
LEGACY = "checkpoint.pt"          # what earlier versions wrote: a pickle, never loaded
FORMAT = 1


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                          "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "numpy" in st:
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# -- a nested state as JSON + named tensors ------------------------------------------

def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data; its tensors are moved into ``tensors`` (key: their
    number) and replaced by ``{"$tensor": key}``, tuples by ``{"$tuple": [...]}``, dicts
    whose keys are not all strings by ``{"$items": [[k, v], ...]}``, numpy arrays by
    ``{"$ndarray": [...], "dtype": ...}``."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"$items": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise DiJiangError(f"internal error: a checkpoint cannot hold a {type(obj).__name__}; please report it")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        return np.asarray(obj["$ndarray"], dtype=obj["dtype"])
    if "$tuple" in obj:
        return tuple(decode(v, tensors) for v in obj["$tuple"])
    if "$items" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["$items"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` then a rename: a reader sees the old file or the new one. A full disk
    or an unwritable folder is one line (the partial ``.tmp`` removed; the previous
    checkpoint, if any, stays whole)."""
    from ..exporters.write_errors import NO_SPACE, READ_ONLY, DENIED, error_number
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        code = error_number(e)
        if code not in NO_SPACE | READ_ONLY | DENIED:
            raise
        tmp.unlink(missing_ok=True)
        raise DiJiangError(f"could not write the checkpoint {path}: {os.strerror(code)}; free some space "
                           f"or choose another --checkpoint-dir (the previous checkpoint, if any, is whole)") from None


class Checkpointer:
    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.folder, self.fingerprint = Path(folder), fingerprint

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def exists(self) -> bool:
        return self.path.exists() or (self.folder / LEGACY).exists()

    def _current_tensors(self) -> str | None:
        try:
            return json.loads(self.path.read_text()).get("tensors")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, run: dict[str, Any], params: dict[str, torch.Tensor], optimizer: Any) -> None:
        """Write the checkpoint with SIGTERM/SIGINT held back until it is whole: a signal
        then stops the run right after a complete save (and leaves no ``.tmp`` file)."""
        from ..exporters import signals_deferred
        with signals_deferred():
            self._save(run, params, optimizer)

    def _save(self, run: dict[str, Any], params: dict[str, torch.Tensor], optimizer: Any) -> None:
        from safetensors.torch import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        blob = {"fingerprint": self.fingerprint, "run": run, "rng": rng_state(),
                "params": dict(params),
                "optimizer": optimizer.state_dict() if optimizer is not None else None}
        tensors: dict[str, torch.Tensor] = {}
        data = encode(blob, tensors)
        name = TENSORS[1] if self._current_tensors() == TENSORS[0] else TENSORS[0]
        _write_atomic(self.folder / name, lambda p: save_file(tensors, str(p)))
        text = json.dumps({"format": FORMAT, "tensors": name, "state": data})
        _write_atomic(self.path, lambda p: p.write_text(text))
        (self.folder / LEGACY).unlink(missing_ok=True)     # replaced by this run's own checkpoint

    def load(self) -> dict[str, Any]:
        from safetensors.torch import load_file
        if not self.path.exists():
            if (self.folder / LEGACY).exists():
                raise DiJiangError(f"{self.folder / LEGACY} is a pickle checkpoint of an older version, which "
                                   "this one does not load (a pickle can run code); pass --force to start over")
            raise DiJiangError(f"nothing to resume: no checkpoint at {self.path}")
        try:
            meta = json.loads(self.path.read_text())
            if meta.get("format") != FORMAT or meta.get("tensors") not in TENSORS:
                raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
            blob = decode(meta["state"], load_file(str(self.folder / meta["tensors"])))
            fingerprint = blob["fingerprint"]
        except Exception as e:
            raise DiJiangError(f"the checkpoint {self.path} cannot be read ({str(e)[:160]}); "
                               "pass --force to start over") from None
        diff = sorted(k for k in set(fingerprint) | set(self.fingerprint)
                      if fingerprint.get(k) != self.fingerprint.get(k))
        if diff:
            raise DiJiangError(f"the checkpoint at {self.path} is from a different run (differs in: "
                               f"{', '.join(diff)}); resume with the same model, data and settings, "
                               "or pass --force to start over")
        return blob

    def remove(self) -> None:
        """The files this class writes, and the folder once empty: a ``--checkpoint-dir``
        that also holds the user's own files keeps them."""
        for name in (FILE, *TENSORS, LEGACY):
            for f in (self.folder / name, self.folder / (name + ".tmp")):
                f.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass

