"""The softmax baseline: the ORIGINAL Hugging Face model (same weights, softmax
attention) with a KV cache, exported for the same runtimes and precisions as the
DiJiang files, so ``dijiang-export bench`` compares like with like.

``KVCacheLM`` re-states the Llama-family forward (Llama, SmolLM2, Qwen2, Mistral)
around the HF model's own modules (embedding, norms, projections, MLP, head) with
the cache explicit, because the exporters need the cache as tensors: HF's cache
objects do not trace.  Grouped-query attention is computed per KV group (queries of
a group stacked), so the cache is never repeated per query head.  The tests check
its logits against the HF model's, prefill and decode.

The format modules: ``baseline_onnx`` (``past_key_values`` like optimum's decoder
export) and ``baseline_pte`` (ExecuTorch static cache with its LLM ``custom_sdpa``), and
the peers a user would run instead, built by their own tools from the same weights:
``baseline_genai`` (onnxruntime-genai's model builder) and ``baseline_gguf`` (llama.cpp's
converter and quantizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import manifest as M
from ..errors import DiJiangError

Tensor = torch.Tensor
FORMATS = {"onnx": "baseline_onnx", "pte": "baseline_pte", "genai": "baseline_genai", "gguf": "baseline_gguf"}
PEERS = ("genai", "gguf")        # other runtimes' own builds of the same source, timed beside ours
SCRATCH = ".source"              # in the staged folder while exporting: the HF weights the peers' tools read
ARCHS = ("llama", "qwen2", "mistral")
RANDOM_IDS = "random-ids"       # the baseline's parity text: seeded random token ids


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCacheLM(nn.Module):
    """A Llama-family HF causal LM as ``(ids, positions, past k/v) -> (logits, new k/v)``."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        cfg = hf.config
        if cfg.model_type not in ARCHS:
            raise DiJiangError(f"the softmax baseline supports {', '.join(ARCHS)} models, not "
                               f"{cfg.model_type!r}; benchmark this model without --baseline")
        self.hf = hf.eval()
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        rot = hf.model.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.scale = self.head_dim ** -0.5

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin ``[B, 1, T, d]`` at integer ``positions [B, T]``, as HF's rotary module."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def qkv(self, layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q ``[B, H, T, d]``, k and v ``[B, Hkv, T, d]``."""
        a = layer.self_attn
        b, t, _ = h.shape
        q = a.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Softmax attention of ``q [B, H, T, d]`` over ``k, v [B, Hkv, S, d]``;
        ``allowed [B, 1, T, S]``.  The queries of one KV group go as one matrix."""
        b, h, t, d = q.shape
        g, s = self.n_kv, k.shape[2]
        r = h // g
        scores = (q.reshape(b, g, r * t, d) @ k.transpose(-1, -2)) * self.scale
        scores = scores.view(b, g, r, t, s).masked_fill(~allowed[:, :, None], torch.finfo(q.dtype).min)
        p = torch.softmax(scores, dim=-1).view(b, g, r * t, s)
        return (p @ v).view(b, h, t, d)

    def block(self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, attend) -> Tensor:
        h = layer.input_layernorm(x)
        q, k, v = self.qkv(layer, h, cos, sin)
        o = attend(q, k, v)
        b, t, _ = x.shape
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def head(self, x: Tensor) -> Tensor:
        return self.hf.lm_head(self.hf.model.norm(x))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        """``past``: ``key_0, value_0, key_1, ...`` each ``[B, Hkv, P, d]``; returns
        ``(logits [B, T, V], present key_0, value_0, ...)`` with ``P + T`` positions."""
        t = input_ids.shape[1]
        s = past[0].shape[2] + t
        key_idx = torch.arange(s, device=input_ids.device)
        query_idx = torch.arange(t, device=input_ids.device) + (s - t)
        allowed = (key_idx[None, :] <= query_idx[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        cos, sin = self.rope(position_ids)
        x = self.hf.model.embed_tokens(input_ids)
        present: list[Tensor] = []
        for i, layer in enumerate(self.hf.model.layers):
            def attend(q, k, v, i=i):
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                present.extend((k, v))
                return self.attend(q, k, v, allowed)
            x = self.block(layer, x, cos, sin, attend)
        return (self.head(x), *present)


def load_hf(model_src: str) -> tuple[nn.Module, dict]:
    """The HF source model of ``model_src`` ("default" = the embedded SmolLM2)."""
    from ..conversion import load_source
    if str(model_src) == "default":
        from ..default_model import default_source_dir
        model_src = str(default_source_dir())
    p = Path(str(model_src)).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        if json.loads((p / "config.json").read_text()).get("model_type") == "dijiang":
            raise DiJiangError(f"{p} is a converted DiJiang model; the softmax baseline needs the original "
                               f"Hugging Face model it came from (its manifest's 'source')")
    return load_source(p)


def source_of(manifest: dict) -> str:
    """The HF model a DiJiang export folder was converted from (its manifest's ``source``)."""
    name = manifest.get("source", {}).get("name")
    if not name:
        raise DiJiangError("the export folder's manifest names no source model; give the baseline "
                           "model explicitly: `dijiang-export export-baseline MODEL --out DIR`")
    return name


def source_folder(lm: KVCacheLM, out: Path) -> Path:
    """The Hugging Face folder of ``lm``'s very weights (saved once per export, with the
    tokenizer files already in ``out``), which the peers' own tools read: whatever the
    source was (a folder, a GGUF, ``default``), every baseline file has the same weights."""
    src = Path(out) / SCRATCH / "hf"
    if not (src / "config.json").exists():
        lm.hf.save_pretrained(src)
        for p in Path(out).iterdir():
            if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens")) or p.suffix == ".jinja"):
                shutil.copy2(p, src / p.name)
    return src


def _check_quants(mods: dict, quants: list[str]) -> None:
    """Refuse a quantization a chosen format does not know, before the model is loaded."""
    for f, mod in mods.items():
        check = getattr(mod, "check_quant", None) or getattr(getattr(mod, "onnx_files", None), "check_quant", None)
        for q in quants:
            if check:
                check(q)


def export_baseline(model_src: str, out: str | Path, formats: list[str], quants: list[str],
                    force: bool = False, parity_tokens: int = 64, **opts: Any) -> M.Manifest:
    """Export the softmax KV-cache baseline of ``model_src`` into ``out`` (manifest with
    ``"attention": "softmax"`` files); each file checked against the HF model."""
    from importlib import import_module
    from . import check_out, route_options, staged_dir
    from ..tokenizer import save_tokenizer
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise DiJiangError(f"unknown baseline format(s) {bad}; choose from {', '.join(FORMATS)}")
    try:
        mods = {f: import_module(f".{FORMATS[f]}", __package__) for f in formats}
    except ImportError as e:
        raise DiJiangError(f"the baseline exporter needs {e.name}; `pip install 'dijiang-edge[onnx,executorch]'`") from None
    routed = route_options({f: m.export for f, m in mods.items()}, {**opts, "parity_tokens": parity_tokens})
    _check_quants(mods, quants)
    for f, mod in mods.items():          # a peer's missing tool: said before the model is loaded
        if hasattr(mod, "preflight"):
            mod.preflight(quants, **routed[f])
    check_out(out, force)
    hf, source = load_hf(model_src)
    lm = KVCacheLM(hf)
    with staged_dir(out, force) as tmp:
        try:
            save_tokenizer(model_src, tmp)
        except DiJiangError:
            pass                                   # the baseline runs on ids; a tokenizer is a convenience
        files: list[M.FileEntry] = []
        for f, mod in mods.items():
            for q in quants:
                files += mod.export(lm, tmp, quant=q, **routed[f])
        shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
        cfg = hf.config
        eos = cfg.eos_token_id
        manifest = M.Manifest(
            created=M.now(), source=source, files=files,
            model=M.ModelFacts(arch=cfg.model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                               n_layers=lm.n_layers, n_heads=lm.n_heads, n_kv_heads=lm.n_kv, head_dim=lm.head_dim,
                               bos_id=cfg.bos_token_id, eos_ids=[eos] if isinstance(eos, int) else list(eos or [])),
            texts=M.Texts(parity=RANDOM_IDS if any(f.parity for f in files) else None),
            extras={"attention": "softmax", "kv_shape_per_layer": [1, lm.n_kv, "context", lm.head_dim]})
        M.write(tmp, manifest)
    return manifest


def hf_logits(hf: nn.Module, ids: Tensor) -> Tensor:
    """The HF model's own logits over ``ids`` (the reference of the parity checks)."""
    with torch.no_grad():
        return hf(input_ids=ids, use_cache=False).logits


def parity(hf: nn.Module, runner, tokens: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """Prefill ``tokens`` then decode 4 through ``runner``: ``parity.compare`` against the
    HF model's logits (random ids: the baseline's contract is the model's function)."""
    import numpy as np
    from ..parity import compare
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, tokens + 4), generator=g)
    ref = hf_logits(hf, ids)[0].numpy()
    runner.reset()
    pre = runner.forward(ids[:, :tokens].numpy())[0]
    dec = np.concatenate([runner.forward(ids[:, tokens + i:tokens + i + 1].numpy())[0] for i in range(4)])
    return {"text": RANDOM_IDS, **compare(pre, ref[:tokens], decode=(dec, ref[tokens:]))}
