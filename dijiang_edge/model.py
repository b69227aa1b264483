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
from . import ops
from .cores import EagerCore
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


@dataclass
class Context:
    """What every layer of one call shares, computed once per call by the caller.

    ``valid`` None means every token is real (the exported graphs); ``like`` is any
    ``[B, T]`` tensor of the call (the exported native graph's shape source); ``keep``
    (``[1]``, 0 or 1) is the ``.pte`` program's in-graph reset at ``start_pos == 0``;
    ``form`` forces an attention form in the eager core (tests, references)."""

    positions: Tensor                   # [B or 1, T]
    cos: Tensor                         # [B or 1, T, 1, head_dim]
    sin: Tensor                         # same, RoPE's sign folded in
    valid: Tensor | None = None         # [B, T] bool
    like: Tensor | None = None
    keep: Tensor | None = None
    form: str | None = None
    _memo: dict = field(default_factory=dict)

    def once(self, name: str, make):
        """``make()`` computed for the first layer that asks, shared by the others."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]


class RMSNorm(nn.Module):
    """``forward(x, residual) -> (RMSNorm(x + residual), x + residual)``: each residual
    add is joined to the norm after it (one ONNX node, ``ops.add_rms_norm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with ``RMSNorm``'s ``(x, residual)`` signature (GPT-NeoX)."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = x if residual is None else x + residual
        return super().forward(x), x


def make_norm(a: "ModelArgs") -> nn.Module:
    return RMSNorm(a.hidden_size, a.norm_eps) if a.norm == "rms" else LayerNorm(a.hidden_size, eps=a.norm_eps)


class GroupNorm(nn.Module):
    """``nn.GroupNorm(groups, channels)`` applied to each token's channels of ``[B, T, C]``."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.weight, self.bias, self.groups, self.eps)


def _act(name: str):
    acts = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}
    if name not in acts:
        raise DiJiangError(f"activation {name!r} is not supported (supported: {', '.join(acts)})")
    return acts[name]


class FeedForward(nn.Module):
    """Gated MLP (Llama family) or plain MLP (GPT-NeoX), keeping the source's names.
    ``gate_up`` (None unless ``transforms.fuse_projections`` set it) is the gate and up
    projections as one matrix."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.arch, self.act, self.inner = a.arch, _act(a.act), a.intermediate_size
        self.gate_up: nn.Linear | None = None
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
        if self.gate_up is not None:
            g, u = self.gate_up(x).split(self.inner, dim=-1)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(g) * u)


def rope_tables(positions: Tensor, inv_freq: Tensor, head_dim: int, scaling: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin ``[B, T, 1, head_dim]`` from positions (no table, no length cap):
    ``apply_rope(x) = x * cos + rotate_half(x) * sin`` with RoPE's minus sign in ``sin``
    and partial rotary as ``cos = 1, sin = 0`` on the channels it leaves alone."""
    rd = 2 * inv_freq.shape[0]
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    sign = torch.cat((-torch.ones_like(inv_freq), torch.ones_like(inv_freq))) * scaling
    cos, sin = emb.cos() * scaling, emb.sin() * sign
    if head_dim > rd:
        cos = F.pad(cos, (0, head_dim - rd), value=1.0)
        sin = F.pad(sin, (0, head_dim - rd), value=0.0)
    return cos, sin


def apply_rope(x: Tensor, ctx: Context, perm: Tensor, rotary_dim: int) -> Tensor:
    """RoPE on ``x [B, T, heads, head_dim]`` (q and k heads together)."""
    return x * ctx.cos + ops.rotate_half(x, perm, rotary_dim) * ctx.sin


class DiJiangAttention(nn.Module):
    """Source q/k/v/o projections (kept) around DiJiang attention (new).

    The recurrence itself is ``self.core`` (``cores.py``): the eager chunked/recurrent
    core by default; export transforms swap in the masked, one-step or native core.
    ``in_proj`` (None unless ``transforms.fuse_projections`` set it) is q, k, v and the
    gate as one matrix."""

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
        self.register_buffer("frozen_log_decay", None, persistent=False)   # set by export transforms
        if a.pos_table_len:   # imported per-position gates; the extra last column serves all later positions
            self.register_buffer("pos_log_gate", torch.zeros(h, a.pos_table_len + 1))
            self.register_buffer("pos_beta", torch.ones(h, a.pos_table_len + 1))
        if a.variant in ("official", "normalized_gated"):
            self.gate = nn.Linear(a.hidden_size, a.v_dim, bias=False)
        if a.variant == "official":
            self.group_norm = GroupNorm(a.norm_groups or h, a.v_dim)
        rd, half = a.rotary_dim, a.rotary_dim // 2
        perm = list(range(half, rd)) + list(range(half)) + list(range(rd, d))
        self.register_buffer("rope_perm", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.in_proj: nn.Linear | None = None
        self.core: nn.Module = EagerCore(a)

    # -- pieces ---------------------------------------------------------------
    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``qk [B, T, (H + H_kv) * d]``, ``v [B, T, H_kv * d]`` and the gate (or None)."""
        a = self.a
        d, h, hkv = a.head_dim, a.n_heads, a.n_kv_heads
        if self.in_proj is not None:
            sizes = [(h + hkv) * d, hkv * d] + ([a.v_dim] if hasattr(self, "gate") else [])
            qk, v, *g = self.in_proj(x).split(sizes, dim=-1)
            return qk, v, (g[0] if g else None)
        gate = self.gate(x) if hasattr(self, "gate") else None
        if a.arch == "gpt_neox":       # rows are [head, (q|k|v), d]
            q, k, v = ops.reshape_bt(self.query_key_value(x), [h, 3 * d]).split(d, dim=-1)
            return ops.reshape_bt(torch.cat((q, k), dim=2), [-1]), ops.reshape_bt(v, [-1]), gate
        return torch.cat((self.q_proj(x), self.k_proj(x)), dim=-1), self.v_proj(x), gate

    def out_proj(self, o: Tensor) -> Tensor:
        return self.dense(o) if self.a.arch == "gpt_neox" else self.o_proj(o)

    def log_decay(self) -> Tensor:
        """Per-head ``ln gamma`` (learnable through ``decay_logit``; a constant once frozen)."""
        if self.frozen_log_decay is not None:
            return self.frozen_log_decay
        return F.logsigmoid(self.decay_logit)

    def gates(self, ctx: Context) -> tuple[Tensor, Tensor | None]:
        """Log gate ``[B, H, T]`` (``[1, H, 1]`` for a constant decay) and beta (None = 1);
        invisible (0, 0) where a token is not ``valid``."""
        if self.a.pos_table_len:
            idx = ctx.positions.clamp(0, self.a.pos_table_len)
            lg = self.pos_log_gate[:, idx].permute(1, 0, 2)
            beta = self.pos_beta[:, idx].permute(1, 0, 2)
        else:
            lg, beta = self.log_decay()[None, :, None], None
        if ctx.valid is None:
            return lg, beta
        valid = ctx.valid[:, None, :].to(lg.dtype)
        return lg * valid, valid if beta is None else beta * valid

    def features(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Packed ``phi(q) [B, T, H*m]``, ``phi(k) [B, T, H_kv*m]`` (RoPE first), ``v``
        (with a ones column per head that carries ``z`` in the normalized variants) and the gate."""
        a = self.a
        qk, v, gate = self.project(x)
        qk = apply_rope(ops.reshape_bt(qk, [a.n_heads + a.n_kv_heads, a.head_dim]), ctx,
                        self.rope_perm, a.rotary_dim)
        qk = ops.reshape_bt(A.feature_map(qk, self.proj), [-1])
        q, k = qk.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
        v = v if v.dtype == q.dtype else v.to(q.dtype)      # (a no-op cast is still a graph node)
        if a.variant != "official":
            v = ops.reshape_bt(ops.append_ones(ops.reshape_bt(v, [a.n_kv_heads, a.head_dim])), [-1])
        return q, k, v, gate

    def finish(self, x: Tensor, o: Tensor, gate: Tensor | None) -> Tensor:
        """Per-token output from the core's packed ``o``: normaliser or GroupNorm, gate, projection."""
        a = self.a
        if a.variant != "official":
            o, z = ops.reshape_bt(o, [a.n_heads, a.head_dim + 1]).split([a.head_dim, 1], dim=-1)
            o = ops.reshape_bt(o / (z + a.eps), [-1])
        o = o if o.dtype == x.dtype else o.to(x.dtype)
        if a.variant == "official":
            o = F.silu(gate) * self.group_norm(o)
        elif a.variant == "normalized_gated":
            o = o * 2 * torch.sigmoid(gate)    # zero-initialised gate == identity
        return self.out_proj(o)

    def forward(self, x: Tensor, ctx: Context, state: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v, gate = self.features(x, ctx)
        lg, beta = self.gates(ctx)
        o, s = self.core(q, k, v, lg, beta, state, ctx)
        return self.finish(x, o, gate), s


def _logit_of_log(log_gamma: Tensor) -> Tensor:
    """``decay_logit`` with ``logsigmoid(decay_logit) == log_gamma``."""
    return log_gamma - torch.log(-torch.expm1(log_gamma))


class Block(nn.Module):
    """``forward(x, pending, ctx, state) -> (x, pending, state)``: the residual stream is
    ``x + pending``; each add is left to the norm that follows it."""

    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.parallel = a.parallel_residual
        self.input_layernorm, self.post_attention_layernorm = make_norm(a), make_norm(a)
        self.attn = DiJiangAttention(a, i)
        self.mlp = FeedForward(a)

    def forward(self, x: Tensor, pending: Tensor | None, ctx: Context, state: Tensor):
        h, x = self.input_layernorm(x, pending)
        a, s = self.attn(h, ctx, state)
        if self.parallel:
            return x, a + self.mlp(self.post_attention_layernorm(x)[0]), s
        h, x = self.post_attention_layernorm(a, x)
        return x, self.mlp(h), s


class DiJiangForCausalLM(nn.Module):
    """Decoder-only LM with DiJiang attention; ``forward(input_ids, state) -> (logits, state)``."""

    def __init__(self, a: ModelArgs, inv_freq: Tensor | None = None):
        super().__init__()
        if a.variant not in VARIANTS:
            raise DiJiangError(f"unknown DiJiang variant {a.variant!r}; choose one of {', '.join(VARIANTS)}")
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = make_norm(a)
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
        """cos and signed sin ``[B, T, 1, head_dim]`` for ``positions [B, T]`` (``rope_tables``)."""
        return rope_tables(positions, self.inv_freq, self.args.head_dim, self.args.rope_scaling)

    def context(self, positions: Tensor, valid: Tensor | None = None, like: Tensor | None = None,
                keep: Tensor | None = None, form: str | None = None) -> Context:
        return Context(positions, *self.rope(positions), valid=valid, like=like, keep=keep, form=form)

    def hidden(self, input_ids: Tensor, ctx: Context, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The final-normed hidden states ``[B, T, hidden]`` and each layer's new state:
        the whole network below the head, shared by eager, ONNX and ``.pte``."""
        x, pending, new = self.embed(input_ids), None, []
        for layer, s in zip(self.layers, states):
            x, pending, s = layer(x, pending, ctx, s)
            new.append(s)
        return self.norm(x, pending)[0], new

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
        if attention_mask is None:
            valid = None
            steps = torch.arange(1, t + 1, device=input_ids.device).expand(b, t)
        else:
            valid = attention_mask.bool()
            steps = valid.long().cumsum(-1)
        positions = state.pos[:, None] + (steps - 1).clamp(min=0)
        h, new = self.hidden(input_ids, self.context(positions, valid, like=input_ids, form=form), state.layers)
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


__all__ = ["ModelArgs", "RecurrentState", "Context", "DiJiangForCausalLM", "DiJiangAttention", "VARIANTS"]
