"""Checks of user input made before any expensive work, each a one-line ``DiJiangError``.

A bad input must fail in seconds and with little memory: a ``config.json`` whose
shapes do not match the checkpoint beside it is found by comparing the config's
parameter shapes (a model built on the ``meta`` device: no memory) with the shapes in
the safetensors headers (read without loading a tensor), not by building the model
the config describes (a config of only ``{"model_type": "llama"}`` describes a 7B one).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import DiJiangError

HEADER_LIMIT = 100 << 20     # the safetensors format's own bound on its JSON header
PARITY_PROMPT = 32           # prompt tokens before the parity checks' decode and greedy figures
PARITY_MIN = PARITY_PROMPT + 1   # the fewest parity tokens those figures can be measured on (0: skip)


def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a JSON object, or one line saying what is wrong with it."""
    p = Path(folder) / "config.json"
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DiJiangError(f"{p} could not be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DiJiangError(f"{p} is not UTF-8 text (the file is damaged); restore the model's own "
                           "config.json") from None
    except json.JSONDecodeError as e:
        raise DiJiangError(f"{p} is not valid JSON ({e}); restore the model's own config.json") from None
    if not isinstance(data, dict):
        raise DiJiangError(f"{p} holds a JSON {type(data).__name__}, not an object; restore the model's "
                           "own config.json")
    return data


def safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header; a missing, truncated or
    damaged file is refused here, before any loader reads (and maps) it."""
    p = Path(path)
    if not p.is_file():
        raise DiJiangError(f"{p} is missing; the model folder is incomplete: convert or copy it again")
    size = p.stat().st_size
    redo = "the file is truncated or damaged; convert or copy the model again"
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DiJiangError(f"{p} is {size} bytes, too short for a safetensors file: {redo}")
        (n,) = struct.unpack("<Q", head)
        if n > min(HEADER_LIMIT, size - 8):
            raise DiJiangError(f"{p} has a header of {n} bytes in a {size}-byte file: {redo}")
        raw = f.read(n)
    try:
        meta = json.loads(raw.decode("utf-8"))
        tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: [int(d) for d in v["shape"]] for k, v in tensors.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
            IndexError):
        raise DiJiangError(f"{p} has no readable safetensors header: {redo}") from None
    if 8 + n + end > size:
        raise DiJiangError(f"{p} is {size} bytes but its header needs {8 + n + end}: {redo}")
    return shapes


def folder_shapes(folder: str | Path) -> dict[str, list[int]] | None:
    """Shapes of every tensor in ``folder``'s ``*.safetensors`` (None: it has none)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, list[int]] = {}
    for f in files:
        out.update(safetensors_shapes(f))
    return out


def check_config_against_weights(folder: str | Path, cfg: Any) -> None:
    """Refuse a ``config.json`` whose parameter shapes are not the checkpoint's, without
    allocating the model it describes (``meta`` device), so a wrong or default config
    fails in seconds instead of building billions of parameters first."""
    have = folder_shapes(folder)
    if have is None:                     # .bin checkpoints: transformers compares them itself
        return
    import torch
    from transformers import AutoModelForCausalLM
    from .conversion import canonical_names
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:               # an inconsistent config (e.g. heads not dividing hidden)
        raise DiJiangError(f"{folder}/config.json describes no valid model ({type(e).__name__}: "
                           f"{str(e)[:160]}); restore the model's own config.json") from None
    want = canonical_names({k: list(v.shape) for k, v in meta.state_dict().items()})
    have = canonical_names(have)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    where = f"{folder}/config.json does not match the weights beside it"
    for name, shape in have.items():
        if name in want and want[name] != shape:
            raise DiJiangError(f"{where}: {name} is {shape} in the checkpoint but {want[name]} by the config; "
                               "restore the model's own config.json")
    missing = [k for k in want if k not in have and not (tied and k == "lm_head.weight")]
    if missing:
        raise DiJiangError(f"{where}: the config has {len(missing)} weight(s) the checkpoint lacks "
                           f"(first {missing[0]}); restore the model's own config.json")


def check_quant_names(formats: list[str], quants: list[str]) -> None:
    """Every requested quantization must be known to every requested format: checked
    before the first file is written (an export runs format by format, so a name only one
    format knows would otherwise fail after the other format's files were built)."""
    if "onnx" in formats:
        from .exporters.onnx_files import check_quant
        for q in quants:
            check_quant(q)
    if "pte" in formats:
        from .exporters.executorch import parse_quant
        for q in quants:
            parse_quant(q)
