"""The pair adaptation trains: the softmax teacher (frozen transformers model)
and the DiJiang student (converted from it, or an already converted folder)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import DiJiangError
from ..model import DiJiangForCausalLM


def _is_converted_folder(p: Path) -> bool:
    cfg = p / "config.json"
    return p.is_dir() and cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "dijiang"


def _load_teacher(src: Any) -> nn.Module:
    from ..conversion import load_source
    from ..tokenizer import resolve_source
    if isinstance(src, nn.Module):
        return src
    if not src:
        raise DiJiangError("no teacher: this converted model does not record its softmax source; pass --teacher")
    p = resolve_source(src)
    if _is_converted_folder(p):
        raise DiJiangError(f"the teacher {p} is a DiJiang model; the teacher must be the softmax source model")
    return load_source(p)[0]


def load_pair(model: Any, teacher: Any = None, init: Any = None,
              **convert_options: Any) -> tuple[nn.Module, DiJiangForCausalLM]:
    """``(teacher, student)`` for ``model`` (a transformers model, "default", a folder or .gguf,
    or a converted folder whose recorded source, or ``teacher``, is the softmax model).
    ``init``: an ``adapter.Adapter`` of the source ``model`` whose settings and DiJiang
    parameters the student starts from (its LoRA factors are loaded by the finetune stage)."""
    from ..conversion import from_hf_model, load_source
    from ..tokenizer import resolve_source
    if init is not None:
        return _pair_from_adapter(model, teacher, init, convert_options)
    if isinstance(model, DiJiangForCausalLM):
        student = model
    elif isinstance(model, nn.Module):
        return (teacher if isinstance(teacher, nn.Module) else model), from_hf_model(model, **convert_options)
    else:
        p = resolve_source(model)
        if _is_converted_folder(p):
            student = DiJiangForCausalLM.from_pretrained(p)
        elif p.is_dir() and not (p / "config.json").exists():
            raise DiJiangError(f"{p} is not a model folder (no config.json)")
        else:
            src_model, source = load_source(p)
            t = src_model if teacher is None else _load_teacher(teacher)
            return t, from_hf_model(src_model, source=source, **convert_options)
    if student.args.source.get("format") == "official-dijiang" and teacher is None:
        raise DiJiangError("an official DiJiang checkpoint has no softmax source to learn from; pass --teacher")
    return _load_teacher(teacher if teacher is not None else student.args.source.get("name")), student


def _pair_from_adapter(model: Any, teacher: Any, init: Any, options: dict) -> tuple[nn.Module, DiJiangForCausalLM]:
    from ..adapter import apply_adapter
    from ..conversion import load_source
    from ..tokenizer import resolve_source
    if isinstance(model, nn.Module) or _is_converted_folder(resolve_source(model)):
        raise DiJiangError("an adapter to continue applies to the source model: give its source "
                           "(e.g. 'default'), not a converted model")
    student = apply_adapter(init, model, merge=False, **options)
    return (load_source(resolve_source(model))[0] if teacher is None else _load_teacher(teacher)), student


def tokenizer_folder(model: Any, student: DiJiangForCausalLM, tokenizer: Any, scratch: Path) -> Path:
    """A folder holding ``tokenizer.json`` (and friends) for ``model``, written into ``scratch``."""
    from ..exporters import tokenizer_source
    from ..tokenizer import save_tokenizer
    if tokenizer is None:
        if isinstance(model, nn.Module):
            raise DiJiangError("pass tokenizer= (a folder with tokenizer.json) when adapting a model object")
        tokenizer = tokenizer_source(model, student)
    save_tokenizer(tokenizer, scratch)
    return scratch


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dijiang-adapt-")
