"""Conversion of pretrained Hugging Face causal LMs into ``DiJiangForCausalLM``.

Every source weight is copied unchanged (the tests check bit-for-bit); only the
attention kernel changes.  Supported: the Llama family (Llama, SmolLM2, Qwen2
with its QKV bias, Mistral; grouped-query attention) and GPT-NeoX (Pythia,
partial rotary), plus checkpoints trained with the official DiJiang GPT-NeoX code.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .adapter import AUTO, choose
from .errors import DiJiangError
from .model import VARIANTS, DiJiangForCausalLM, ModelArgs, check_args
from .validate import check_config_against_weights, folder_shapes, read_config, safetensors_shapes

log = logging.getLogger(__name__)

LLAMA_FAMILY = ("llama", "qwen2", "mistral")
SUPPORTED = LLAMA_FAMILY + ("gpt_neox",)
OFFICIAL_KEYS = ("proj_matrix", "D1", "D2", "W_G", "group_norm")


# ----------------------------------------------------------------------------
# Architecture description: HF config -> ModelArgs, HF names -> our names
# ----------------------------------------------------------------------------

def check_supported(model_type: str | None) -> None:
    if model_type not in SUPPORTED:
        raise DiJiangError(f"architecture {model_type!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED)} (and official DiJiang GPT-NeoX checkpoints)")


def args_from_config(cfg: Any, **options: Any) -> ModelArgs:
    """``ModelArgs`` for a transformers config plus DiJiang ``options``."""
    mt = getattr(cfg, "model_type", None)
    check_supported(mt)
    h = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    eos = cfg.eos_token_id
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        n_heads=h, head_dim=d, intermediate_size=cfg.intermediate_size, act=cfg.hidden_act,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_id=cfg.bos_token_id, eos_ids=list(eos) if isinstance(eos, (list, tuple)) else
        ([eos] if eos is not None else []), pad_id=getattr(cfg, "pad_token_id", None),
        source_max_positions=getattr(cfg, "max_position_embeddings", 2048) or 2048,
    )
    if mt == "gpt_neox":
        pct = getattr(cfg, "rotary_pct", None)
        if pct is None:
            pct = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        args = ModelArgs(arch="gpt_neox", n_kv_heads=h, norm="layer", norm_eps=cfg.layer_norm_eps,
                         parallel_residual=bool(cfg.use_parallel_residual),
                         rotary_dim=int(d * pct), **common)
    else:
        bias = bool(getattr(cfg, "attention_bias", False))
        args = ModelArgs(arch="llama", n_kv_heads=getattr(cfg, "num_key_value_heads", None) or h,
                         norm="rms", norm_eps=cfg.rms_norm_eps,
                         qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                         mlp_bias=bool(getattr(cfg, "mlp_bias", False)), rotary_dim=d, **common)
    return apply_options(args, **options)


def apply_options(args: ModelArgs, variant: str = "official", chunk_size: int = 64,
                  norm_groups: int = 0, window: int = 0, window_mode: str = "shared") -> ModelArgs:
    if variant not in VARIANTS:
        raise DiJiangError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if chunk_size < 1:
        raise DiJiangError("chunk_size must be a positive integer")
    if norm_groups and args.v_dim % norm_groups:
        raise DiJiangError(f"norm_groups={norm_groups} does not divide {args.v_dim} channels")
    args.variant, args.chunk_size, args.norm_groups = variant, chunk_size, norm_groups
    args.window, args.window_mode = window, window_mode
    check_args(args)
    return args


def weight_map(args: ModelArgs) -> dict[str, str]:
    """Source state-dict name -> converted name, for every pretrained weight."""
    m: dict[str, str] = {}
    if args.arch == "gpt_neox":
        m["gpt_neox.embed_in.weight"] = "embed.weight"
        m["lm_head.weight"] = "lm_head.weight"      # "embed_out" before transformers 5
        for p in ("weight", "bias"):
            m[f"gpt_neox.final_layer_norm.{p}"] = f"norm.{p}"
        for i in range(args.n_layers):
            s, t = f"gpt_neox.layers.{i}.", f"layers.{i}."
            for p in ("weight", "bias"):
                for n in ("input_layernorm", "post_attention_layernorm"):
                    m[f"{s}{n}.{p}"] = f"{t}{n}.{p}"
                for n in ("query_key_value", "dense"):
                    m[f"{s}attention.{n}.{p}"] = f"{t}attn.{n}.{p}"
                for n in ("dense_h_to_4h", "dense_4h_to_h"):
                    m[f"{s}mlp.{n}.{p}"] = f"{t}mlp.{n}.{p}"
        return m
    m["model.embed_tokens.weight"] = "embed.weight"
    m["model.norm.weight"] = "norm.weight"
    if not args.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    for i in range(args.n_layers):
        s, t = f"model.layers.{i}.", f"layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            m[f"{s}{n}.weight"] = f"{t}{n}.weight"
        for n, bias in (("q_proj", args.qkv_bias), ("k_proj", args.qkv_bias),
                        ("v_proj", args.qkv_bias), ("o_proj", args.o_bias)):
            m[f"{s}self_attn.{n}.weight"] = f"{t}attn.{n}.weight"
            if bias:
                m[f"{s}self_attn.{n}.bias"] = f"{t}attn.{n}.bias"
        for n in ("gate_proj", "up_proj", "down_proj"):
            m[f"{s}mlp.{n}.weight"] = f"{t}mlp.{n}.weight"
            if args.mlp_bias:
                m[f"{s}mlp.{n}.bias"] = f"{t}mlp.{n}.bias"
    return m


def canonical_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source names as transformers 5 writes them (GPT-NeoX's head was ``embed_out``)."""
    if "embed_out.weight" in sd and "lm_head.weight" not in sd:
        sd = dict(sd)
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    return sd


def rotary_of(hf_model: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """``inv_freq`` and ``attention_scaling`` of the source's rotary embedding."""
    for name, mod in hf_model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "inv_freq"):
            return mod.inv_freq.detach().float().clone(), float(getattr(mod, "attention_scaling", 1.0))
    raise DiJiangError("the source model has no rotary embedding; only RoPE models can be converted")


def init_new_params(model: DiJiangForCausalLM) -> None:
    """Deterministic init of the parameters DiJiang adds (same model in, same model out)."""
    a = model.args
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        with torch.no_grad():
            if hasattr(attn, "group_norm"):
                attn.group_norm.weight.fill_(1.0)
                attn.group_norm.bias.zero_()
            if a.variant == "official":
                gen = torch.Generator().manual_seed(1000 + i)
                w = attn.gate.weight
                bound = 2 ** -2.5 * math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)
            elif a.variant == "normalized_gated":
                attn.gate.weight.zero_()


def from_hf_model(hf_model: torch.nn.Module, source: dict | None = None, **options: Any) -> DiJiangForCausalLM:
    """Convert a loaded transformers model, copying its weights unchanged."""
    args = args_from_config(hf_model.config, **options)
    args.source = dict(source or {"name": getattr(hf_model.config, "_name_or_path", "") or "in-memory"})
    inv_freq, scaling = rotary_of(hf_model)
    args.rope_scaling = scaling
    model = DiJiangForCausalLM(args, inv_freq)
    init_new_params(model)
    src = canonical_names(hf_model.state_dict())
    dst = model.state_dict()
    with torch.no_grad():
        for s, t in weight_map(args).items():
            if s not in src:
                raise DiJiangError(f"source weight {s} is missing; is this a complete {args.arch} checkpoint?")
            dst[t].copy_(src[s].to(torch.float32))
    return model.eval()


# ----------------------------------------------------------------------------
# Official DiJiang GPT-NeoX checkpoints (proj_matrix, D1, D2, W_G, group_norm)
# ----------------------------------------------------------------------------

def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (safetensors, sharded or not, or .bin)."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise DiJiangError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")


def has_official_keys(folder: Path) -> bool:
    """Whether the checkpoint in ``folder`` was trained with the official DiJiang code."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open
        for name in files:
            with safe_open(str(name), "pt") as f:
                if any(k.endswith("attention.proj_matrix") for k in f.keys()):
                    return True
        return False
    bins = sorted(folder.glob("pytorch_model*.bin"))
    return bool(bins) and any(k.endswith("attention.proj_matrix") for k in read_state_dict(folder))


def from_official(folder: Path, cfg: Any, sd: dict[str, torch.Tensor]) -> DiJiangForCausalLM:
    """Import an official DiJiang checkpoint exactly.

    Its attention is ``o_n = sum_j (D1[n] phi(q_n)) . (D2[j] phi(k_j)) v_j``; with
    ``S'_n = D1[n] sum_j D2[j] k_j^T v_j`` that is the recurrence with per-position
    gate ``D1[n]/D1[n-1]`` and input scale ``D1[n] D2[n]`` (positions past the
    trained table use the table's mean decay, capped at 1 so the state cannot grow
    without bound, and its mean input scale).  GroupNorm keeps the official grouping.
    """
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    args = args_from_config(cfg)
    args.norm_groups = args.head_dim          # nn.GroupNorm(head_size, hidden_size)
    args.variant = "official"
    d1 = sd["gpt_neox.layers.0.attention.D1"]
    args.pos_table_len = d1.shape[2]
    args.source = {"name": str(folder), "format": "official-dijiang"}
    rot = GPTNeoXRotaryEmbedding(cfg)
    args.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
    model = DiJiangForCausalLM(args, rot.inv_freq.float())
    dst = model.state_dict()
    with torch.no_grad():
        for s, t in weight_map(args).items():
            if s not in sd:
                raise DiJiangError(f"{folder}: weight {s} is missing from the official checkpoint")
            dst[t].copy_(sd[s].float())
        for i, layer in enumerate(model.layers):
            p = f"gpt_neox.layers.{i}.attention."
            attn = layer.attn
            attn.proj.copy_(sd[p + "proj_matrix"].float())
            attn.gate.weight.copy_(sd[p + "W_G"].float().t())
            attn.group_norm.weight.copy_(sd[p + "group_norm.weight"].float())
            attn.group_norm.bias.copy_(sd[p + "group_norm.bias"].float())
            lg, beta = official_gates(sd[p + "D1"], sd[p + "D2"])
            attn.pos_log_gate.copy_(lg)
            attn.pos_beta.copy_(beta)
            attn.decay_logit.copy_(torch.logit(lg[:, 1].double().exp().clamp(1e-6, 1 - 1e-6)).float())
    return model.eval()


def official_gates(d1: torch.Tensor, d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log(D1[n]/D1[n-1]), D1[n] D2[n])`` as ``[H, L + 1]`` float32, computed in float64;
    column ``L`` holds the values used past the table."""
    d1, d2 = d1.double().reshape(d1.shape[1], -1), d2.double().reshape(d2.shape[1], -1)
    if (d1 <= 0).any():
        raise DiJiangError("official checkpoint has non-positive D1 entries; cannot form the recurrent gate")
    ld1 = d1.log()
    h, n = ld1.shape
    lg = torch.zeros(h, n + 1, dtype=torch.float64)
    lg[:, 1:n] = ld1[:, 1:] - ld1[:, :-1]
    lg[:, n] = lg[:, 1:n].mean(-1).clamp(max=0.0) if n > 1 else 0.0
    beta = torch.ones(h, n + 1, dtype=torch.float64)
    beta[:, :n] = d1 * d2
    beta[:, n] = beta[:, :n].mean(-1)
    return lg.float(), beta.float()


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

def load_source(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Load a local HF folder or GGUF file as a float32 transformers model, offline."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DiJiangError(f"no model at {str(path)!r}: give a local model folder (with config.json), "
                           "a .gguf file, or 'default' for the embedded SmolLM2-135M (nothing is downloaded)")
    from transformers import AutoConfig, AutoModelForCausalLM
    source = {"name": str(p)}
    if p.is_file():
        if p.suffix != ".gguf":
            raise DiJiangError(f"{p} is a file but not a .gguf; give a model folder or a .gguf file")
        from .manifest import sha256
        source.update(format="gguf", sha256=sha256(p))
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                         dtype=torch.float32, local_files_only=True)
        except Exception as e:  # gguf reader errors vary by corruption
            raise DiJiangError(f"could not read GGUF file {p} ({type(e).__name__}: {str(e)[:200]}); "
                               "is it complete and a supported architecture?") from None
        model.hf_quantizer = None
        return model, source
    if not (p / "config.json").exists():
        raise DiJiangError(f"{p} is not a model folder (no config.json); give a Hugging Face model "
                           "folder saved with save_pretrained, or a .gguf file")
    read_config(p)                       # not JSON / not UTF-8: one line, before transformers reads it
    try:
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise DiJiangError(f"{p}/config.json could not be read ({str(e)[:200]})") from None
    check_supported(getattr(cfg, "model_type", None))
    check_config_against_weights(p, cfg)  # before building it: a default config is a 7B model
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise DiJiangError(f"could not load the model in {p} ({type(e).__name__}: {str(e)[:200]})") from None
    return model, source


def convert(model_or_path: Any, adapter: str | os.PathLike | None = AUTO, **options: Any) -> DiJiangForCausalLM:
    """Return ``model_or_path`` with DiJiang attention (a ``DiJiangForCausalLM``).

    ``model_or_path``: a transformers model object; a local folder (a Hugging Face
    model, an official DiJiang checkpoint, or an already converted model, which is
    loaded as is); a ``.gguf`` file; or ``"default"`` (the embedded SmolLM2-135M).
    ``options``: ``variant`` ("official", "normalized", "normalized_gated"),
    ``chunk_size``, ``norm_groups`` (0 = one GroupNorm group per head), ``window``
    (exact softmax over the last ``window`` tokens beside DiJiang; 0 = none) and
    ``window_mode`` ("shared" or "mix", ``DiJiangAttention.finish``).
    ``adapter``: an adapter file to apply (``adapter.py``; its settings are then the
    options), ``None`` for none, or ``"auto"``: the shipped adapter for ``"default"``.
    """
    path = choose(model_or_path, adapter)
    if path is None:
        return _convert(model_or_path, **options)
    from .adapter import apply_adapter, load_adapter
    ad = load_adapter(path)
    if _is_converted(model_or_path):
        model = _convert(model_or_path)
        if (model.args.source.get("adapter") or {}).get("sha256") != ad.sha256:
            raise DiJiangError(f"{model_or_path} is already converted; an adapter applies to the source "
                               f"model: give that (the converted model records {model.args.source.get('name')})")
        return model                      # this adapter is in it already
    return apply_adapter(ad, model_or_path, **options)


def _is_converted(model_or_path: Any) -> bool:
    if isinstance(model_or_path, torch.nn.Module):
        return isinstance(model_or_path, DiJiangForCausalLM)
    cfg = Path(str(model_or_path)).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    return read_config(cfg.parent).get("model_type") == "dijiang"


def _convert(model_or_path: Any, **options: Any) -> DiJiangForCausalLM:
    """``convert`` without an adapter."""
    if isinstance(model_or_path, DiJiangForCausalLM):
        return model_or_path
    if isinstance(model_or_path, torch.nn.Module):
        return from_hf_model(model_or_path, **options)
    if str(model_or_path) == "default":
        from .default_model import default_source_dir
        model_or_path = default_source_dir()
    p = Path(model_or_path).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        cfg_json = read_config(p)
        folder_shapes(p)                 # a missing or truncated weights file: one line, not a loader's error
        if cfg_json.get("model_type") == "dijiang":
            if not isinstance(cfg_json.get("dijiang_edge"), dict):
                raise DiJiangError(f"{p}/config.json lacks its 'dijiang_edge' settings; convert the model again")
            safetensors_shapes(p / "model.safetensors")
            return DiJiangForCausalLM.from_pretrained(p)
        if cfg_json.get("model_type") == "gpt_neox" and has_official_keys(p):
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
            return from_official(p, cfg, canonical_names(read_state_dict(p)))
    hf_model, source = load_source(p)
    return from_hf_model(hf_model, source=source, **options)
