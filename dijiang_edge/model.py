"""The converted model: a plain decoder-only transformer with DiJiang attention.

In the style of gpt-fast: a dataclass of arguments, then a few small modules.
The only state is a fixed-size ``RecurrentState`` (one ``[B, H, m, dv]`` tensor per
layer plus each sequence's position), so ``forward(input_ids, state)`` is the
whole runtime contract and a sequence fed in any split gives the same logits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as A
from .errors import DiJiangError

Tensor = torch.Tensor
VARIANTS = ("official", "normalized", "normalized_gated")


@dataclass
class ModelArgs:
    """Architecture of the source model (kept) plus the DiJiang settings (new)."""

    arch: str = "llama"                 # "llama" (Llama/SmolLM2/Qwen2/Mistral) or "gpt_neox"
    vocab_size: int = 32000
    hidden_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1376
    norm: str = "rms"                   # "rms" or "layer"
    norm_eps: float = 1e-5
    act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False     # GPT-NeoX
    rotary_dim: int = 64                # partial rotary when < head_dim
    rope_scaling: float = 1.0           # HF's attention_scaling on cos/sin
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    source_max_positions: int = 2048
    # DiJiang settings
    variant: str = "official"           # see VARIANTS
    norm_groups: int = 0                # GroupNorm groups; 0 = one per head
    chunk_size: int = 64
    pos_table_len: int = 0              # >0: per-position gates imported from D1/D2
    eps: float = 1e-6                   # denominator floor of the normalized variants
    source: dict = field(default_factory=dict)

    @property
    def v_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RecurrentState:
    """Per-layer recurrent state ``[B, H, m, dv]`` (dv + 1 for normalized variants)
    and the position each sequence has reached ``[B]``: all a sequence carries."""

    layers: list[Tensor]
    pos: Tensor

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.layers)

    def clone(self) -> "RecurrentState":
        return RecurrentState([s.clone() for s in self.layers], self.pos.clone())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(groups, channels)`` applied to each token's channels, written
    with plain ops so it exports and works on ``[B, T, C]`` without reshapes to 2-D."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        g = x.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        mean = g.mean(-1, keepdim=True)
        var = (g - mean).pow(2).mean(-1, keepdim=True)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(shape) * self.weight + self.bias


def _act(name: str):
    acts = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}
    if name not in acts:
        raise DiJiangError(f"activation {name!r} is not supported (supported: {', '.join(acts)})")
    return acts[name]


class FeedForward(nn.Module):
    """Gated MLP (Llama family) or plain MLP (GPT-NeoX), keeping the source's names."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.arch, self.act = a.arch, _act(a.act)
        if a.arch == "gpt_neox":
            self.dense_h_to_4h = nn.Linear(a.hidden_size, a.intermediate_size, bias=True)
            self.dense_4h_to_h = nn.Linear(a.intermediate_size, a.hidden_size, bias=True)
        else:
            self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
            self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.arch == "gpt_neox":
            return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """RoPE on the first ``rotary_dim`` channels (all of them unless partial). x: [B, T, H, d]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot * cos + rotate_half(rot) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class DiJiangAttention(nn.Module):
    """Source q/k/v/o projections (kept) around DiJiang attention (new).

    ``forward`` picks the form: chunked for several tokens, one recurrent step for one.
    """

    def __init__(self, a: ModelArgs, layer_idx: int):
        super().__init__()
        self.a, self.layer_idx = a, layer_idx
        d, h, hkv = a.head_dim, a.n_heads, a.n_kv_heads
        if a.arch == "gpt_neox":
            self.query_key_value = nn.Linear(a.hidden_size, 3 * h * d, bias=True)
            self.dense = nn.Linear(h * d, a.hidden_size, bias=True)
        else:
            self.q_proj = nn.Linear(a.hidden_size, h * d, bias=a.qkv_bias)
            self.k_proj = nn.Linear(a.hidden_size, hkv * d, bias=a.qkv_bias)
            self.v_proj = nn.Linear(a.hidden_size, hkv * d, bias=a.qkv_bias)
            self.o_proj = nn.Linear(h * d, a.hidden_size, bias=a.o_bias)
        self.register_buffer("proj", A.projection_matrix(d))          # frozen P = C @ T
        self.decay_logit = nn.Parameter(_logit_of_log(A.default_log_decay(h)))
        if a.pos_table_len:   # imported per-position gates; the extra last column serves all later positions
            self.register_buffer("pos_log_gate", torch.zeros(h, a.pos_table_len + 1))
            self.register_buffer("pos_beta", torch.ones(h, a.pos_table_len + 1))
        if a.variant in ("official", "normalized_gated"):
            self.gate = nn.Linear(a.hidden_size, a.v_dim, bias=False)
        if a.variant == "official":
            self.group_norm = GroupNorm(a.norm_groups or h, a.v_dim)

    # -- pieces ---------------------------------------------------------------
    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        d = self.a.head_dim
        if self.a.arch == "gpt_neox":
            qkv = self.query_key_value(x).view(b, t, self.a.n_heads, 3 * d)
            return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q = self.q_proj(x).view(b, t, self.a.n_heads, d)
        k = self.k_proj(x).view(b, t, self.a.n_kv_heads, d)
        v = self.v_proj(x).view(b, t, self.a.n_kv_heads, d)
        return q, k, v

    def out_proj(self, o: Tensor) -> Tensor:
        return self.dense(o) if self.a.arch == "gpt_neox" else self.o_proj(o)

    def log_decay(self) -> Tensor:
        """Per-head ``ln gamma`` (learnable through ``decay_logit``)."""
        return F.logsigmoid(self.decay_logit)

    def gates(self, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token ``log_gate, beta`` ``[B, H, T]``; invisible (0, 0) where not ``valid``."""
        if self.a.pos_table_len:
            idx = positions.clamp(0, self.a.pos_table_len)
            lg = self.pos_log_gate[:, idx].permute(1, 0, 2)
            beta = self.pos_beta[:, idx].permute(1, 0, 2)
        else:
            lg = self.log_decay()[None, :, None].expand(positions.shape[0], -1, positions.shape[1])
            beta = torch.ones_like(lg)
        valid = valid[:, None, :].to(lg.dtype)
        return lg * valid, beta * valid

    def features(self, x: Tensor, cos: Tensor, sin: Tensor):
        """q, k, v ``[B, H, T, *]`` in float32: RoPE first, then ``phi``; k/v repeated for GQA."""
        q, k, v = self._qkv(x)
        q = apply_rope(q, cos, sin, self.a.rotary_dim)
        k = apply_rope(k, cos, sin, self.a.rotary_dim)
        q = A.feature_map(q, self.proj).transpose(1, 2)
        k = A.feature_map(k, self.proj).transpose(1, 2)
        v = v.to(q.dtype).transpose(1, 2)
        rep = self.a.n_heads // self.a.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.a.variant != "official":
            v = torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)   # last column carries z
        return q, k, v

    def finish(self, x: Tensor, o: Tensor) -> Tensor:
        """Per-token output: heads merged, normaliser or GroupNorm, gate, projection."""
        b, h, t, _ = o.shape
        if self.a.variant != "official":
            o = o[..., :-1] / (o[..., -1:] + self.a.eps)
        o = o.transpose(1, 2).reshape(b, t, h * self.a.head_dim).to(x.dtype)
        if self.a.variant == "official":
            o = F.silu(self.gate(x)) * self.group_norm(o)
        elif self.a.variant == "normalized_gated":
            o = o * 2 * torch.sigmoid(self.gate(x))    # zero-initialised gate == identity
        return self.out_proj(o)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, valid: Tensor,
                state: Tensor, form: str | None = None) -> tuple[Tensor, Tensor]:
        q, k, v = self.features(x, cos, sin)
        lg, beta = self.gates(positions, valid)
        form = form or ("recurrent" if x.shape[1] == 1 else "chunked")
        if form == "recurrent" and x.shape[1] == 1:
            o, s = A.recurrent_step(q, k, v, lg, beta, state)
        elif form == "chunked":
            o, s = A.chunked_attention(q, k, v, lg, beta, state, self.a.chunk_size)
        else:
            o, s = A.FORMS[form](q, k, v, lg, beta, state)
        return self.finish(x, o), s


def _logit_of_log(log_gamma: Tensor) -> Tensor:
    """``decay_logit`` with ``logsigmoid(decay_logit) == log_gamma``."""
    return log_gamma - torch.log(-torch.expm1(log_gamma))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.parallel = a.parallel_residual
        norm = (lambda: RMSNorm(a.hidden_size, a.norm_eps)) if a.norm == "rms" else \
            (lambda: nn.LayerNorm(a.hidden_size, eps=a.norm_eps))
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.attn = DiJiangAttention(a, i)
        self.mlp = FeedForward(a)

    def forward(self, x, cos, sin, positions, valid, state, form=None):
        a, s = self.attn(self.input_layernorm(x), cos, sin, positions, valid, state, form)
        if self.parallel:
            return x + a + self.mlp(self.post_attention_layernorm(x)), s
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), s


class DiJiangForCausalLM(nn.Module):
    """Decoder-only LM with DiJiang attention; ``forward(input_ids, state) -> (logits, state)``."""

    def __init__(self, a: ModelArgs, inv_freq: Tensor | None = None):
        super().__init__()
        if a.variant not in VARIANTS:
            raise DiJiangError(f"unknown DiJiang variant {a.variant!r}; choose one of {', '.join(VARIANTS)}")
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = RMSNorm(a.hidden_size, a.norm_eps) if a.norm == "rms" else \
            nn.LayerNorm(a.hidden_size, eps=a.norm_eps)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if inv_freq is None:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, a.rotary_dim, 2).float() / a.rotary_dim))
        self.register_buffer("inv_freq", inv_freq.float())

    # -- state ---------------------------------------------------------------
    @property
    def state_dv(self) -> int:
        return self.args.head_dim + (self.args.variant != "official")

    def state_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.args.n_heads, self.args.head_dim, self.state_dv)

    def init_state(self, batch: int = 1) -> RecurrentState:
        dev, dt = self.embed.weight.device, self.layers[0].attn.proj.dtype   # float32 unless .double()
        layers = [torch.zeros(self.state_shape(batch), device=dev, dtype=dt) for _ in self.layers]
        return RecurrentState(layers, torch.zeros(batch, dtype=torch.long, device=dev))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin ``[B, T, 1, rotary_dim]`` computed from positions (no table, no length cap)."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos() * self.args.rope_scaling, emb.sin() * self.args.rope_scaling

    # -- forward -------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: RecurrentState | None = None,
                attention_mask: Tensor | None = None, form: str | None = None,
                return_hidden: bool = False):
        """Logits ``[B, T, V]`` and the state after these tokens.

        ``attention_mask`` (1 = token, 0 = padding) makes padded tokens invisible:
        they neither change the state nor advance the position, so left- or
        right-padded batches give each sequence its unpadded logits.
        """
        b, t = input_ids.shape
        state = state if state is not None else self.init_state(b)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
            else attention_mask.bool()
        steps = valid.long().cumsum(-1)
        positions = state.pos[:, None] + (steps - 1).clamp(min=0)
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)
        new = []
        for layer, s in zip(self.layers, state.layers):
            x, s = layer(x, cos, sin, positions, valid, s, form)
            new.append(s)
        h = self.norm(x)
        out = self.lm_head(h)
        new_state = RecurrentState(new, state.pos + steps[:, -1])
        return (out, new_state, h) if return_hidden else (out, new_state)

    # -- persistence ---------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the tied head stored once)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.args.tie_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = {"model_type": "dijiang", "dijiang_edge": self.args.to_dict()}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DiJiangForCausalLM":
        from safetensors.torch import load_file
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "dijiang":
            raise DiJiangError(f"{path} is not a converted DiJiang model (config.json model_type "
                               f"is {cfg.get('model_type')!r}); convert it first with `dijiang-export convert`")
        args = ModelArgs.from_dict(cfg["dijiang_edge"])
        with torch.device("meta"):
            model = cls(args)
        model = model.to_empty(device="cpu")
        sd = load_file(str(path / "model.safetensors"))
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise DiJiangError(f"{path}/model.safetensors does not match its config.json "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if args.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        return model.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["ModelArgs", "RecurrentState", "DiJiangForCausalLM", "DiJiangAttention", "VARIANTS"]
