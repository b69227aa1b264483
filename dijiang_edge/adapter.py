"""Adapters: what adaptation changed, as one small safetensors file.

An adapter holds, relative to a plain conversion of its source model, only the
parameters DiJiang added (every name ``adapt.objectives.is_new_param`` accepts) and
the low-rank factors ``A``, ``B`` of each adapted projection (not the merged
weights), plus JSON metadata: the DiJiang settings that rebuild the student exactly,
the source model's identity (a hash of its weights as converted, and the file's
sha256 where the source recorded one), the LoRA rank/alpha/targets, the command
that made it and its figures.  ``apply_adapter`` converts the source with those
settings, loads the new parameters and folds ``W + scale * B @ A`` into the weights.

A full finetune changes every weight, so it has no adapter: its merged model
folder is the output.  ``default`` means the shipped adapter (``SHIPPED``) applied
to the embedded source model, when the package holds that file (``choose``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import DiJiangError
from .model import DiJiangForCausalLM, ModelArgs
from .shipped import PACKAGE

FORMAT_VERSION = 1
META_KEY = "dijiang_edge_adapter"
SHIPPED = PACKAGE / "adapters" / "smollm2-135m-instruct.safetensors"   # the adapted `default`
MAX_SHIPPED_BYTES = 32_000_000          # the size a shipped adapter may have (issue 14: 32 MB)
AUTO = "auto"                           # ``choose``: the shipped adapter for `default`, else none
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_SUFFIXES = (".lora_A", ".lora_B")

# ModelArgs fields that describe the source architecture: conversion reads them from
# the source, and the adapter records them only to check it is applied to the same
# architecture.  ``source`` is the identity, stored apart.  Every other field is a
# DiJiang setting and is stored (tests/test_adapter.py checks this split against the
# ``# DiJiang settings`` marker of ModelArgs, so a new field cannot slip through).
SOURCE_FIELDS = ("arch", "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "intermediate_size", "norm", "norm_eps", "act", "qkv_bias", "o_bias", "mlp_bias",
                 "parallel_residual", "rotary_dim", "rope_scaling", "tie_embeddings", "bos_id", "eos_ids",
                 "pad_id", "source_max_positions")
IDENTITY_FIELDS = ("source",)


def dijiang_fields() -> tuple[str, ...]:
    """The DiJiang settings of ``ModelArgs``: every field neither source nor identity."""
    skip = set(SOURCE_FIELDS) | set(IDENTITY_FIELDS)
    return tuple(f.name for f in dataclasses.fields(ModelArgs) if f.name not in skip)


def _plain(v: Any) -> Any:
    """``v`` as JSON gives it back (tuples become lists), so stored and live values compare."""
    return json.loads(json.dumps(v))


def settings_of(args: ModelArgs) -> dict[str, Any]:
    return {k: _plain(getattr(args, k)) for k in dijiang_fields()}


def architecture_of(args: ModelArgs) -> dict[str, Any]:
    return {k: _plain(getattr(args, k)) for k in SOURCE_FIELDS}


# -- what an adapter holds ------------------------------------------------------

def _is_new(name: str) -> bool:
    from .adapt.objectives import is_new_param
    return is_new_param(name)


def _low_ranks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, its LowRank)`` for every projection with a low-rank update."""
    from torch.nn.utils import parametrize
    from .adapt.lora import LowRank
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            plist = mod.parametrizations.weight
            if len(plist) != 1 or not isinstance(plist[0], LowRank):
                raise DiJiangError(f"{name}.weight has a parametrization that is not one LoRA update; "
                                   "an adapter holds only LoRA factors")
            yield name, plist[0]


def _source_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The source model's weights as the conversion copied them (names as a plain
    conversion has them; the LoRA factors and DiJiang's own parameters left out)."""
    for name, p in model.named_parameters():
        if _is_new(name) or ".parametrizations.weight.0." in name:
            continue
        yield name.replace(".parametrizations.weight.original", ".weight"), p


def weights_sha256(model: nn.Module) -> str:
    """A hash of the source weights inside ``model``: the same for any conversion of
    one source (folder, .gguf or object), different after any change to them."""
    h = hashlib.sha256()
    for name, p in sorted(_source_params(model), key=lambda kv: kv[0]):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_nbytes(args: ModelArgs, lora_rank: int, dtype: str = "float32") -> int:
    """Bytes of tensor data in an adapter of a model of ``args`` whose every LoRA target
    has rank ``lora_rank`` (0: no finetune), stored as ``dtype``; the file adds a short
    JSON header.  Computed on a meta-device model: nothing is allocated."""
    from .adapt.lora import lora_targets
    with torch.device("meta"):
        model = DiJiangForCausalLM(args)
    new = sum(t.numel() for n, t in model.state_dict().items() if _is_new(n))
    lora = sum(lora_rank * (m.in_features + m.out_features) for _, m in lora_targets(model))
    return (new + lora) * torch.empty((), dtype=_dtype(dtype)).element_size()


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DiJiangError(f"adapter dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


# -- writing --------------------------------------------------------------------

def save_adapter(student: DiJiangForCausalLM, path: str | Path, *, command: str, figures: dict[str, Any],
                 dtype: str = "float32", finetune_mode: str = "lora", source_name: str | None = None) -> int:
    """Write the adapter of ``student`` (un-merged: its LoRA parametrizations still on)
    to ``path``; returns the file's size in bytes.

    ``finetune_mode="full"`` is refused (every weight changed: the merged model is the
    output).  ``source_name`` overrides the recorded source name (e.g. ``"default"``
    instead of the cache folder it resolves to).
    """
    if finetune_mode == "full":
        raise DiJiangError("a full finetune changes every weight, so it has no adapter; "
                           "the adapted model folder is the output (use --finetune lora for an adapter)")
    if student.args.source.get("adapter"):
        raise DiJiangError("this model already has an adapter applied; adapt the plain source model "
                           "(or its plain conversion) to make an adapter")
    store = _dtype(dtype)
    tensors = {n: t.detach() for n, t in student.state_dict().items() if _is_new(n)}
    lora, scales = [], set()
    for name, lr in _low_ranks(student):
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = lr.A.detach(), lr.B.detach()
        lora.append(name)
        scales.add(float(lr.scale))
    if len(scales) > 1:
        raise DiJiangError(f"the LoRA updates have different scales {sorted(scales)}; an adapter holds one")
    tensors = {k: v.to("cpu", store).contiguous() for k, v in tensors.items()}
    source = {k: v for k, v in student.args.source.items() if k != "adapter"}
    if source_name is not None:
        source["name"] = source_name
    rank = int(tensors[f"{lora[0]}.lora_A"].shape[0]) if lora else 0
    meta = {"version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings_of(student.args), "architecture": architecture_of(student.args),
            "source": source, "source_weights_sha256": weights_sha256(student), "dtype": dtype,
            "lora": _lora_meta(lora, rank, scales.pop()) if lora else None,
            "command": command, "figures": figures}
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    return path.stat().st_size


def _lora_meta(targets: list[str], rank: int, scale: float) -> dict[str, Any]:
    """``scale`` is stored as well as ``alpha``: ``alpha / rank`` may differ from it in the last bit."""
    return {"rank": rank, "alpha": scale * rank, "scale": scale, "targets": targets}


# -- reading --------------------------------------------------------------------

@dataclass
class Adapter:
    """One adapter file, read: its metadata, the DiJiang parameters and the LoRA factors."""

    path: Path
    meta: dict[str, Any]
    params: dict[str, torch.Tensor]                        # DiJiang's own parameters, by name
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]     # module name -> (A, B)
    sha256: str
    nbytes: int

    @property
    def settings(self) -> dict[str, Any]:
        return self.meta["settings"]

    @property
    def scale(self) -> float:
        lo = self.meta["lora"]
        return float(lo["scale"]) if lo else 0.0

    def record(self) -> dict[str, Any]:
        """What a manifest or config records of the adapter that was applied."""
        return {"applied": True, "file": self.path.name, "sha256": self.sha256, "path": str(self.path.resolve())}


NO_ADAPTER = {"applied": False}


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter file; a missing, damaged or foreign file is one ``DiJiangError``."""
    from safetensors import SafetensorError, safe_open
    from .manifest import sha256
    p = Path(path).expanduser()
    if not p.is_file():
        raise DiJiangError(f"no adapter file at {p}; give the adapter.safetensors an `adapt` run wrote")
    try:
        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DiJiangError(f"{p} is not a readable safetensors file ({str(e)[:120]}); "
                           "it is damaged or not an adapter: copy it again or rerun `adapt`") from None
    meta = _parse_meta(p, raw)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in (meta["lora"] or {}).get("targets", []):
        a, b = (tensors.pop(name + s, None) for s in LORA_SUFFIXES)
        if a is None or b is None:
            raise DiJiangError(f"{p} lacks the LoRA factors of {name}; the file is damaged: rerun `adapt`")
        lora[name] = (a.float(), b.float())
    stray = [k for k in tensors if k.endswith(LORA_SUFFIXES) or not _is_new(k)]
    if stray:
        raise DiJiangError(f"{p} holds tensors that are neither DiJiang parameters nor listed LoRA factors "
                           f"({', '.join(stray[:3])}); it is damaged: rerun `adapt`")
    return Adapter(p, meta, {k: v.float() for k, v in tensors.items()}, lora, sha256(p), p.stat().st_size)


def _parse_meta(p: Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise DiJiangError(f"{p} is a safetensors file but not a dijiang-edge adapter (no {META_KEY} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise DiJiangError(f"{p}: the adapter metadata is not valid JSON; the file is damaged: rerun `adapt`") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        got = meta.get("version") if isinstance(meta, dict) else None
        raise DiJiangError(f"{p} is adapter format version {got!r}; this dijiang-edge reads version "
                           f"{FORMAT_VERSION}: use the dijiang-edge release that made it, or rerun `adapt`")
    missing = [k for k in ("settings", "architecture", "source", "source_weights_sha256", "lora") if k not in meta]
    missing += [f"lora.{k}" for k in ("rank", "scale", "targets") if meta.get("lora") and k not in meta["lora"]]
    if missing:
        raise DiJiangError(f"{p}: the adapter metadata lacks {', '.join(missing)}; the file is damaged: rerun `adapt`")
    return meta


# -- applying -------------------------------------------------------------------

def apply_adapter(adapter: Adapter, source: Any, merge: bool = True, **options: Any) -> DiJiangForCausalLM:
    """The source model (``"default"``, a folder, a .gguf or a transformers model)
    converted with the adapter's settings, its DiJiang parameters loaded and its LoRA
    updates merged.  ``options`` given must agree with the adapter's settings.

    ``merge=False`` leaves the source weights plain (the LoRA factors unapplied): the
    start of an ``adapt`` run that continues this adapter (``load_lora_factors`` then
    puts its factors into the new run's LoRA parametrizations)."""
    import inspect
    from .conversion import apply_options, convert
    if isinstance(source, DiJiangForCausalLM):
        raise DiJiangError("an adapter applies to the source model, not to a converted one")
    want = adapter.settings
    clash = [f"{k}={v!r} (the adapter has {want[k]!r})" for k, v in options.items() if want.get(k) != v]
    if clash:
        raise DiJiangError(f"{adapter.path.name} fixes the DiJiang settings: {'; '.join(clash)}; drop those "
                           "options, or pass --no-adapter for a plain conversion")
    takes = set(inspect.signature(apply_options).parameters) - {"args"}
    model = convert(source, adapter=None, **{k: v for k, v in want.items() if k in takes})
    if model.args.source.get("adapter"):
        raise DiJiangError(f"{source} already has an adapter applied; give its source model")
    if settings_of(model.args) != want:
        model = _rebuilt(model, want)
    _check_source(adapter, model)
    _load_params(adapter, model)
    if not merge:
        return model.eval()
    merge_into(adapter, model)
    model.args.source = {**model.args.source, "adapter": adapter.record()}
    return model.eval()


def load_lora_factors(adapter: Adapter, model: nn.Module) -> None:
    """Copy the adapter's ``A``, ``B`` into ``model``'s LoRA parametrizations (``adapt.lora``),
    so training goes on from them and the new adapter is again relative to the source."""
    have = dict(_low_ranks(model))
    if set(have) != set(adapter.lora):
        raise DiJiangError(f"{adapter.path.name} has LoRA factors for {len(adapter.lora)} projections, the run "
                           f"adapts {len(have)}; continue it with the same --finetune lora targets")
    for name, (a, b) in adapter.lora.items():
        lr = have[name]
        if tuple(lr.A.shape) != tuple(a.shape) or abs(float(lr.scale) - adapter.scale) > 1e-6 * adapter.scale:
            raise DiJiangError(f"{adapter.path.name} has LoRA rank {a.shape[0]} and scale {adapter.scale:g}; "
                               f"continue it with --lora-rank {a.shape[0]}")
        with torch.no_grad():
            lr.A.copy_(a.to(lr.A.dtype))
            lr.B.copy_(b.to(lr.B.dtype))


def _rebuilt(model: DiJiangForCausalLM, settings: dict[str, Any]) -> DiJiangForCausalLM:
    """``model`` with DiJiang settings the conversion options cannot set (its source
    weights kept; DiJiang's parameters come from the adapter next)."""
    args = dataclasses.replace(model.args, **settings, source=dict(model.args.source))
    new = DiJiangForCausalLM(args, model.inv_freq)
    new.load_state_dict({k: v for k, v in model.state_dict().items() if not _is_new(k)}, strict=False)
    return new


def _check_source(adapter: Adapter, model: DiJiangForCausalLM) -> None:
    meta, made = adapter.meta, adapter.meta["source"].get("name", "?")
    have = architecture_of(model.args)
    diff = [f"{k} {have[k]!r} != {v!r}" for k, v in meta["architecture"].items() if have.get(k) != v]
    if diff:
        raise DiJiangError(f"{adapter.path.name} was made for {made}, a model of another shape "
                           f"({'; '.join(diff[:3])}); apply it to that model")
    rec, got = meta["source"].get("sha256"), model.args.source.get("sha256")
    if rec and got and rec != got:
        raise DiJiangError(f"{adapter.path.name} was made for a source file with sha256 {rec[:12]}..., "
                           f"this one has {got[:12]}...; apply it to the model it was made for")
    if weights_sha256(model) != meta["source_weights_sha256"]:
        raise DiJiangError(f"{adapter.path.name} was made for other weights ({made}); this model's weights "
                           "differ, so the adapter does not fit it: apply it to the model it was made for")


def _load_params(adapter: Adapter, model: DiJiangForCausalLM) -> None:
    sd = model.state_dict()
    need = {n for n in sd if _is_new(n)}
    if need != set(adapter.params):
        lacks, extra = sorted(need - set(adapter.params)), sorted(set(adapter.params) - need)
        raise DiJiangError(f"{adapter.path.name} does not match this version's DiJiang parameters "
                           f"(missing {lacks[:3]}, unknown {extra[:3]}); use the release that made it")
    bad = [n for n, t in adapter.params.items() if t.shape != sd[n].shape]
    if bad:
        raise DiJiangError(f"{adapter.path.name}: {bad[0]} has shape {tuple(adapter.params[bad[0]].shape)}, "
                           f"the model {tuple(sd[bad[0]].shape)}; the adapter does not fit this model")
    model.load_state_dict(adapter.params, strict=False)


def merge_into(adapter: Adapter, model: DiJiangForCausalLM) -> None:
    """``W + scale * B @ A`` into each target's weight, as ``lora.merge_lora`` computes it."""
    mods = dict(model.named_modules())
    for name, (a, b) in adapter.lora.items():
        mod = mods.get(name)
        if not isinstance(mod, nn.Linear) or tuple(mod.weight.shape) != (b.shape[0], a.shape[1]):
            raise DiJiangError(f"{adapter.path.name}: the LoRA target {name} is not a matching projection "
                               "of this model; the adapter does not fit it")
        with torch.no_grad():
            mod.weight.add_((b @ a).to(mod.weight.dtype) * adapter.scale)


# -- which adapter `MODEL` means -------------------------------------------------

def choose(model_src: Any, adapter: str | Path | None = AUTO) -> Path | None:
    """The adapter file to apply when converting ``model_src``: ``None`` = none; a path =
    that file; ``AUTO`` = the shipped adapter for ``"default"`` when the package holds
    it (else one stderr line: the default model is then the plain conversion)."""
    if adapter is None:
        return None
    if str(adapter) != AUTO:
        return Path(adapter).expanduser()
    if not isinstance(model_src, (str, Path)) or str(model_src) != "default":
        return None
    if SHIPPED.is_file():
        return SHIPPED
    print("dijiang-export: note: the default model is not adapted yet (no shipped adapter): "
          "this is the plain conversion", file=sys.stderr)
    return None


def applied(model: DiJiangForCausalLM) -> dict[str, Any]:
    """The adapter record of ``model`` (``NO_ADAPTER`` for a plain conversion)."""
    return model.args.source.get("adapter") or dict(NO_ADAPTER)
