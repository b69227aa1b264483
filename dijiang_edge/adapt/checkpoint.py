"""One file per run holding everything needed to continue after a kill: the
parameters adaptation changed, the optimizer, the RNG states, each stage's
progress (its step is the data position), and the figures measured so far.

Written by the main process (every process holds the same state under DDP) to a
temporary name and renamed, so a kill while writing leaves the previous one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import DiJiangError

FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.folder, self.fingerprint = Path(folder), fingerprint

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, run: dict[str, Any], params: dict[str, torch.Tensor], optimizer: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        blob = {"fingerprint": self.fingerprint, "run": run, "rng": rng_state(),
                "params": {k: v.detach().cpu().clone() for k, v in params.items()},
                "optimizer": optimizer.state_dict() if optimizer is not None else None}
        tmp = self.path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any]:
        if not self.exists():
            raise DiJiangError(f"nothing to resume: no checkpoint at {self.path}")
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise DiJiangError(f"the checkpoint {self.path} cannot be read ({str(e)[:160]}); "
                               "delete it and start again") from None
        diff = sorted(k for k in set(blob["fingerprint"]) | set(self.fingerprint)
                      if blob["fingerprint"].get(k) != self.fingerprint.get(k))
        if diff:
            raise DiJiangError(f"the checkpoint at {self.path} is from a different run (differs in: "
                               f"{', '.join(diff)}); resume with the same model, data and settings, "
                               "or pass --force to start over")
        return blob

    def remove(self) -> None:
        """The checkpoint file, and its folder once empty: a ``--checkpoint-dir`` that also
        holds the user's own files keeps them."""
        for f in (self.path, self.path.with_suffix(".tmp")):
            f.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass
