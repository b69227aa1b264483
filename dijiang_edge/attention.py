"""DiJiang attention math: the frequency-domain feature map and its three forms.

Everything the paper defines lives here, so one file can be checked against
DESIGN.md section 2:

* ``dct_matrix``, ``qmc_normal``, ``projection_matrix``: the frozen ``P = C @ T``.
* ``feature_map``: ``phi(x) = softmax(x @ P)`` over the ``m`` features.
* ``parallel_attention`` (quadratic reference), ``chunked_attention`` (prefill,
  linear in length) and ``recurrent_attention`` (decode, O(1) per token): the same
  function of ``(q, k, v, log_gate, beta, initial_state)``, after
  flash-linear-attention's ``naive_*`` references;
* beside them, with the same signature, the forms the exported files run:
  ``masked_attention`` (one call's tokens as one masked chunk: ``.pte`` and ONNX
  prefill) and ``native_attention`` (the custom op ``gated_linear_attention`` that
  becomes onnxruntime's ``LinearAttention``); ``recurrent_step`` is ONNX decode.

Decay is given as a per-token log gate ``log_gate[b, h, n] = ln gamma_n <= 0``
and an input scale ``beta[b, h, n]``, so one signature covers the constant
per-head decay of new conversions, the per-position ``D1/D2`` of imported
official checkpoints, and padding (``log_gate = 0, beta = 0`` makes a token
invisible in both directions).  The recurrence is

    S_n = exp(log_gate_n) S_(n-1) + beta_n phi(k_n)^T v_n,     o_n = phi(q_n) S_n

No table of ``gamma^n`` or ``gamma^-n`` is ever built: decays are differences of
cumulative log gates inside a chunk (or in float64 for the parallel reference),
so nothing overflows at any length (the official code gives NaN past ~5k tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops

Tensor = torch.Tensor


# ----------------------------------------------------------------------------
# The frozen projection P = C @ T
# ----------------------------------------------------------------------------

def dct_matrix(d: int) -> Tensor:
    """Orthonormal DCT-II matrix, ``C[k, j] = s_k cos(pi (2j+1) k / 2d)`` (float64).

    Equals ``scipy.fft.dct(numpy.eye(d), axis=0, norm="ortho")``.
    """
    k = torch.arange(d, dtype=torch.float64)[:, None]
    j = torch.arange(d, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * d))
    scale = torch.full((d, 1), math.sqrt(2.0 / d), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / d)
    return c * scale


def _van_der_corput(i: int) -> float:
    """Base-2 radical inverse of ``i``: a one-dimensional low-discrepancy sequence."""
    out, f = 0.0, 0.5
    while i:
        out += f * (i & 1)
        i >>= 1
        f *= 0.5
    return out


def qmc_uniform(d: int) -> Tensor:
    """``d`` deterministic quasi-Monte Carlo points in (0, 1) (float64).

    Stratified midpoints ``(j + 0.5) / N`` (``N`` = next power of two >= d) taken in
    van der Corput (bit-reversed) order: for a power-of-two ``d`` (every supported
    model) this is exactly the midpoint grid ``{(j + 0.5)/d}``, and the order keeps
    the normal quantiles from lining up with the DCT frequencies.
    """
    n = 1 << max(0, (d - 1).bit_length())
    u = [(math.floor(_van_der_corput(i) * n) + 0.5) / n for i in range(d)]
    return torch.tensor(u, dtype=torch.float64)


def qmc_normal(d: int) -> Tensor:
    """``t_i = Phi^-1(u_i)``: the diagonal of ``T`` for the QMC choice (float64)."""
    u = qmc_uniform(d)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def projection_matrix(d: int, t: Tensor | None = None) -> Tensor:
    """``P = C @ diag(t)`` as float32, computed once per layer and then frozen."""
    t = qmc_normal(d) if t is None else t.to(torch.float64)
    return (dct_matrix(d) * t[None, :]).to(torch.float32)


def feature_map(x: Tensor, proj: Tensor) -> Tensor:
    """``phi(x) = softmax(x @ P)`` over the last (feature) axis, in float32 (or wider)."""
    dt = torch.promote_types(torch.promote_types(x.dtype, proj.dtype), torch.float32)
    x, proj = x.to(dt), proj.to(dt)
    if ops._onnx():
        return torch.softmax(x @ proj, dim=-1)
    # one bmm (XNNPACK takes it; a 2-D mm splits the .pte's delegated graph)
    xp = ops.view(torch.bmm(ops.view(x, 1, math.prod(x.shape[:-1]), x.shape[-1]), proj[None]), *x.shape[:-1], proj.shape[-1])
    return torch.softmax(xp, dim=-1)


# ----------------------------------------------------------------------------
# The three forms.  Shapes: q, k [B, H, T, m]; v [B, H, T, dv];
# log_gate, beta [B, H, T]; state [B, H, m, dv].  All float32.
# ----------------------------------------------------------------------------

def _defaults(q: Tensor, v: Tensor, beta: Tensor | None, state: Tensor | None):
    b, h, _, m = q.shape
    if beta is None:
        beta = q.new_ones(q.shape[:-1])
    if state is None:
        state = q.new_zeros(b, h, m, v.shape[-1])
    return beta, state


def recurrent_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                        beta: Tensor | None = None,
                        initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token at a time: ``S = g S + beta k^T v``, ``o = q S``. Returns (o, final state)."""
    beta, s = _defaults(q, v, beta, initial_state)
    gate = log_gate.exp()
    outs = []
    for n in range(q.shape[2]):
        kv = k[:, :, n, :, None] * v[:, :, n, None, :]
        s = gate[:, :, n, None, None] * s + beta[:, :, n, None, None] * kv
        outs.append(torch.einsum("bhm,bhmd->bhd", q[:, :, n], s))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o, s


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, beta: Tensor,
                   state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrent form for exactly one token, written without a Python loop.

    Same shapes as ``recurrent_attention`` with ``T == 1``; this is what decode and
    the exported decode graphs run.
    """
    g = log_gate.exp()[..., None]                       # [B, H, 1, 1]
    kv = k.transpose(-1, -2) @ v                        # [B, H, m, dv]
    s = g * state + beta[..., None] * kv
    return q @ s, s


def parallel_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                       beta: Tensor | None = None,
                       initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quadratic masked form, the reference: ``o_n = sum_j exp(L_n - L_j) beta_j (q_n.k_j) v_j``.

    ``L`` is the cumulative log gate, kept in float64 so that long sequences lose no
    precision; the mask is applied before ``exp`` so nothing overflows.
    """
    beta, s0 = _defaults(q, v, beta, initial_state)
    t = q.shape[2]
    cum = log_gate.double().cumsum(-1)                               # [B, H, T]
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    dt = q.dtype
    decay = diff.masked_fill(~causal, float("-inf")).exp().to(dt)
    scores = (q @ k.transpose(-1, -2)) * decay * beta[..., None, :]
    o = scores @ v + cum.exp().to(dt)[..., None] * (q @ s0)
    w_end = ((cum[..., -1:] - cum).exp().to(dt) * beta)[..., None]   # [B, H, T, 1]
    s = cum[..., -1].exp().to(dt)[..., None, None] * s0 + (k * w_end).transpose(-1, -2) @ v
    return o, s


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                      beta: Tensor | None = None, initial_state: Tensor | None = None,
                      chunk_size: int = 64, segment_chunks: int = 16) -> tuple[Tensor, Tensor]:
    """Chunked form over segments of ``segment_chunks`` chunks, the state carried between.

    Segmenting keeps each step's intermediates cache-sized, so time grows linearly
    with length instead of degrading once the per-chunk tensors outgrow the cache.
    """
    seg = max(1, chunk_size * segment_chunks)
    if q.shape[2] <= seg:
        return _chunked(q, k, v, log_gate, beta, initial_state, chunk_size)
    s, outs = initial_state, []
    for i in range(0, q.shape[2], seg):
        sl = slice(i, i + seg)
        o, s = _chunked(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_gate[..., sl],
                        None if beta is None else beta[..., sl], s, chunk_size)
        outs.append(o)
    return torch.cat(outs, dim=2), s


def _chunked(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, beta: Tensor | None,
             initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Chunkwise form, linear in length: quadratic inside a chunk, recurrent across.

    For a chunk with in-chunk cumulative log gate ``c_i``:
    ``O = ((Q K^T) * exp(c_i - c_l) * beta_l) V + exp(c_i) Q S`` and
    ``S <- exp(c_last) S + sum_l exp(c_last - c_l) beta_l K_l^T V_l``.
    A length that ``chunk_size`` does not divide is padded with invisible tokens
    (``log_gate = 0``, ``beta = 0``), which leave the state unchanged.
    """
    beta, s = _defaults(q, v, beta, initial_state)
    b, h, t, m = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    pad = (-t) % c
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_gate, beta = F.pad(log_gate, (0, pad)), F.pad(beta, (0, pad))
    n = (t + pad) // c
    q, k = q.view(b, h, n, c, m), k.view(b, h, n, c, m)
    v = v.view(b, h, n, c, dv)
    cum = log_gate.view(b, h, n, c).cumsum(-1)                       # in-chunk, small
    beta = beta.view(b, h, n, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    intra = ((q @ k.transpose(-1, -2)) * decay * beta[..., None, :]) @ v
    k_end = k * ((cum[..., -1:] - cum).exp() * beta)[..., None]      # decayed to chunk end
    chunk_kv = k_end.transpose(-1, -2) @ v                           # [B, H, N, m, dv]
    chunk_gate = cum[..., -1].exp()                                  # [B, H, N]
    q_in = q * cum.exp()[..., None]
    outs = []
    for i in range(n):
        outs.append(intra[:, :, i] + q_in[:, :, i] @ s)
        s = chunk_gate[:, :, i, None, None] * s + chunk_kv[:, :, i]
    o = torch.stack(outs, dim=2).view(b, h, n * c, dv)[:, :, :t]
    return o, s


# ----------------------------------------------------------------------------
# The export form: the parallel form over one call's tokens in float32, written so
# that torch.export / torch.onnx trace it with a dynamic ``T`` and every op is one
# XNNPACK and onnxruntime run fast.  For ``T == 1`` it is ``recurrent_step``.
# ----------------------------------------------------------------------------

def causal_mask(t: int, device=None) -> Tensor:
    """Additive ``[T, T]`` mask: 0 on and below the diagonal, ``-inf`` above."""
    idx = torch.arange(t, device=device)
    return torch.where(idx[:, None] >= idx[None, :], 0.0, float("-inf"))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                     beta: Tensor | None = None,
                     initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The export form with the references' signature (``decayed_attention`` with the
    cumulative log gate and the mask computed here)."""
    beta, s0 = _defaults(q, v, beta, initial_state)
    return decayed_attention(q, k, v, log_gate.cumsum(-1), beta, s0, causal_mask(q.shape[2], q.device))


def decayed_attention(q: Tensor, k: Tensor, v: Tensor, cum: Tensor, beta: Tensor | None, state: Tensor,
                      mask: Tensor, keep: Tensor | None = None, last: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``o = ((q k^T) * exp(cum_i - cum_l + mask) * beta_l) v + exp(cum_i) q S`` and the
    state after the call, from the in-call cumulative log gate ``cum [B, H, T]`` and the
    additive ``causal_mask`` (computed once per call by the caller, as is ``cum`` for a
    constant decay).  Decays are masked before ``exp``, so nothing overflows; ``beta``
    None means 1.  ``keep`` (``[1]``, 0 or 1) scales the carried state's decay factors:
    0 starts a fresh sequence without touching the state tensor (the ``.pte`` reset).
    ``last``: ``cum[..., -1:]`` when the caller has it without slicing.  Under
    ``torch.export`` the same sums as 3-D batched matmuls (``_decayed_attention_bmm``)."""
    if torch.compiler.is_exporting():
        return _decayed_attention_bmm(q, k, v, cum, beta, state, mask, keep, last)
    decay = (cum[..., :, None] - cum[..., None, :] + mask).exp()     # exp(-inf) = 0 above the diagonal
    scores = (q @ k.transpose(-1, -2)) * decay
    from_state, last = cum.exp(), cum[..., -1:]                      # [B, H, T], [B, H, 1]
    carry, to_end = last.exp(), (last - cum).exp()
    if beta is not None:
        scores, to_end = scores * beta[..., None, :], to_end * beta
    if keep is not None:
        from_state, carry = from_state * keep, carry * keep
    o = scores @ v + from_state[..., None] * (q @ state)
    s = carry[..., None] * state + (k * to_end[..., None]).transpose(-1, -2) @ v
    return o, s


def _decayed_attention_bmm(q: Tensor, k: Tensor, v: Tensor, cum: Tensor, beta: Tensor | None, state: Tensor,
                           mask: Tensor, keep: Tensor | None, last: Tensor | None) -> tuple[Tensor, Tensor]:
    """``decayed_attention`` over ``B * H`` flattened into one batch axis: every reshape
    has one dynamic size and every unsqueeze is trailing, the ops XNNPACK takes, so the
    ``.pte``'s attention is one delegated graph (4-D broadcasts and a slice of a dynamic
    length would be portable ops between graphs)."""
    b, h, t, m = q.shape
    n, dv = b * h, v.shape[-1]
    q3, k3, v3, s3 = ops.view(q, n, t, m), ops.view(k, n, t, m), ops.view(v, n, t, dv), state.reshape(n, m, dv)

    def rows(x: Tensor) -> Tensor:          # [B or 1, H or 1, L] -> [B*H or 1, L], broadcasting kept
        if x.shape[0] != b and b > 1 or x.shape[1] != h and x.shape[0] > 1:
            x = x.expand(b, h, x.shape[-1])
        return ops.view(x, x.shape[0] * x.shape[1], x.shape[-1])
    c = rows(cum)
    decay = (ops.view(c, c.shape[0], t, 1) - ops.view(c, c.shape[0], 1, t) + mask).exp()
    scores = torch.bmm(q3, k3.transpose(1, 2)) * decay
    last = c[:, -1:] if last is None else rows(last)
    from_state, carry, to_end = c.exp(), last.exp(), (last - c).exp()
    if beta is not None:
        beta = rows(beta)
        scores, to_end = scores * ops.view(beta, beta.shape[0], 1, t), to_end * beta
    if keep is not None:
        from_state, carry = from_state * keep, carry * keep
    o = torch.bmm(scores, v3) + ops.view(from_state, from_state.shape[0], t, 1) * torch.bmm(q3, s3)
    s = carry[..., None] * s3 + torch.bmm((k3 * ops.view(to_end, to_end.shape[0], t, 1)).transpose(1, 2), v3)
    return ops.view(o, b, h, t, dv), s.reshape(b, h, m, dv)


# ----------------------------------------------------------------------------
# onnxruntime's native recurrence, as a torch custom op that the ONNX exporter maps to
# ``com.microsoft::LinearAttention(update_rule="gated", scale=1)`` (exporters/onnx_graph.py)
# ----------------------------------------------------------------------------

@torch.library.custom_op("dijiang_edge::gated_linear_attention", mutates_args=())
def gated_linear_attention(q: Tensor, k: Tensor, v: Tensor, state: Tensor,
                           log_gate: Tensor) -> tuple[Tensor, Tensor]:
    """``LinearAttention`` semantics on packed ``[B, T, heads*d]`` q/k/v, ``log_gate
    [B, T, H]``, ``state [B, H, m, dv]``; its body is the recurrent reference.  ``k`` may
    hold fewer heads than ``H`` (a divisor): each serves ``H / heads`` states in turn, as
    the operator does for grouped keys.  No ``beta``: fold it into ``k`` first."""
    b, t, _ = q.shape
    h, m, dv = state.shape[1:]
    qh = q.view(b, t, h, m).transpose(1, 2)
    kh = k.view(b, t, -1, m).transpose(1, 2)
    kh = kh.repeat_interleave(h // kh.shape[1], dim=1)
    vh = v.view(b, t, h, dv).transpose(1, 2)
    o, s = recurrent_attention(qh, kh, vh, log_gate.transpose(1, 2), None, state)
    return o.transpose(1, 2).reshape(b, t, h * dv).contiguous(), s.contiguous()


@gated_linear_attention.register_fake
def _(q, k, v, state, log_gate):
    b, t, _ = q.shape
    return q.new_empty(b, t, state.shape[1] * state.shape[3]), state.new_empty(state.shape)


def native_attention(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor,
                     beta: Tensor | None = None,
                     initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``gated_linear_attention`` with the references' signature and layout."""
    beta, s0 = _defaults(q, v, beta, initial_state)
    b, h, t, m = q.shape
    dv = v.shape[-1]
    pack = (lambda x, d: x.transpose(1, 2).reshape(b, t, h * d))
    k = k * beta[..., None]                    # beta_n phi(k_n)^T v_n == (beta_n phi(k_n))^T v_n
    o, s = gated_linear_attention(pack(q, m), pack(k, m), pack(v, dv), s0, log_gate.transpose(1, 2))
    return o.view(b, t, h, dv).transpose(1, 2), s


FORMS = {
    "parallel": parallel_attention,
    "chunked": chunked_attention,
    "recurrent": recurrent_attention,
    "masked": masked_attention,
    "native": native_attention,
}


def default_log_decay(num_heads: int) -> Tensor:
    """Per-head ``ln gamma_h`` with ``gamma_h = 1 - exp(linspace(ln 1/32, ln 1/512, H))_h``."""
    one_minus = torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads,
                                         dtype=torch.float64))
    return torch.log1p(-one_minus).to(torch.float32)


# ----------------------------------------------------------------------------
# The local softmax window beside DiJiang (``ModelArgs.window = W > 0``).  Query ``n``
# attends exactly, with softmax, to the last W tokens (``n - W < j <= n``), and through
# DiJiang to every older one; a token enters the DiJiang state when it leaves the
# window, so the linear part is the forms above run on the key/value stream delayed
# by W steps: at step ``n`` token ``n - W`` enters, with its decay counted from there:
#
#     S_n = exp(g_n) S_(n-1) + phi(k_(n-W))^T v_(n-W),      lin_n = phi(q_n) S_n
#
# A call's keys are laid out as ``(ring of the W keys before the call, the call's own)``,
# ``W + T`` of them: query n (all-index ``W + n``) sees all-index ``n < j <= n + W``,
# token all-index ``n`` leaves the window at step n, and the new ring is the last W.
# ----------------------------------------------------------------------------

def window_mask(start: Tensor, t: int, window: int, offset: int = 0, rep: int = 0) -> Tensor:
    """Additive ``[B or 1, 1, 1, t, t + W]`` mask of queries ``offset .. offset + t`` against
    keys all-index ``offset .. offset + t + W``: 0 where the key is in the query's window
    and holds a real token (position ``start - W + j >= 0``: the ring is empty at first),
    ``-inf`` elsewhere.  ``start [B or 1]`` is each sequence's position before the call.
    ``rep > 0``: the rows repeated ``rep`` times, ``[1, rep * t, t + W]`` (one sequence), the
    mask of ``window_softmax``'s batched-matmul form."""
    n = torch.arange(t, device=start.device)[:, None]
    j = torch.arange(t + window, device=start.device)[None, :]
    band = (j > n) & (j <= n + window)                                   # [t, t + W]
    real = (start[:, None] - window + offset + j) >= 0                   # [B, t + W]
    ok = band[None] & real[:, None, :]
    mask = torch.where(ok, 0.0, float("-inf"))
    return torch.cat([mask] * rep, dim=1) if rep else mask[:, None, None]


def window_softmax(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The window's unnormalised softmax sums ``(num, mx)``: ``num = sum_j exp(s_j - mx) v_j``
    and ``mx = max_j s_j``, ``s = scale q.k + mask``.

    ``q [B, Hkv, rep, T, d]`` (query heads grouped by the key head they share),
    ``k, v [B, Hkv, 1, T + W, *]`` (``[B, Hkv, T + W, *]`` with a 3-D ``mask``).  ``v`` carries a ones column last, so the last column
    of ``num`` is the normaliser ``den = sum_j exp(s_j - mx)``, from the same matmul; each
    query's own key is always in its window, so ``mx`` is finite and ``den >= 1``.  Kept
    unnormalised so that the shared-normaliser combination can add the linear part's
    sums to them."""
    if mask.dim() == 3:
        return _window_softmax_bmm(q, k, v, mask, scale)
    s = (q @ k.transpose(-1, -2)) * scale + mask
    mx = s.amax(-1, keepdim=True)
    return (s - mx).exp() @ v, mx


def _window_softmax_bmm(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``window_softmax`` of one sequence as batched matmuls over ``[H_kv, rep * T, *]``
    rows, with ``mask`` from ``window_mask(..., rep=rep)``: the ``.pte``'s form, whose ops
    XNNPACK takes (the 5-D broadcast traces to expand copies and reshapes of two dynamic
    sizes, portable ops that cut its graph)."""
    _, hkv, rep, t, d = q.shape
    s = torch.bmm(ops.view(q, hkv, rep * t, d), ops.view(k, hkv, k.shape[-2], d).transpose(1, 2)) * scale + mask
    mx = s.amax(-1, keepdim=True)
    num = torch.bmm((s - mx).exp(), ops.view(v, hkv, v.shape[-2], v.shape[-1]))
    return ops.view(num, 1, hkv, rep, t, num.shape[-1]), ops.view(mx, 1, hkv, rep, t, 1)


def windowed_softmax(q: Tensor, k: Tensor, v: Tensor, start: Tensor, window: int, scale: float,
                     block: int = 0) -> tuple[Tensor, Tensor]:
    """``window_softmax`` over a call's queries in blocks of ``block`` (0 = one block), so a
    long prompt costs ``T (block + W)`` scores, not ``T (T + W)``."""
    t = q.shape[-2]
    if not block or t <= block:
        return window_softmax(q, k, v, window_mask(start, t, window), scale)
    parts = []
    for n0 in range(0, t, block):
        tb = min(block, t - n0)
        parts.append(window_softmax(q[..., n0:n0 + tb, :], k[..., n0:n0 + tb + window, :],
                                    v[..., n0:n0 + tb + window, :], window_mask(start, tb, window, n0), scale))
    return tuple(torch.cat(p, dim=-2) for p in zip(*parts))


def windowed_reference(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, log_gate: Tensor,
                       window: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hybrid from its definition over a whole sequence (quadratic, float64), the
    reference for the ring-and-delay computation of the layer.

    ``q, k [B, H, T, d]`` after RoPE, ``v [B, H, T, dv]``, ``fq, fk`` their features,
    ``log_gate [B, H, T]``.  Returns the window's ``(num, den, mx)`` (``window_softmax``)
    and the linear part ``lin_n = sum_(j <= n - W) exp(G_n - G_(j+W)) (fq_n . fk_j) v_j``,
    ``G`` the cumulative log gate."""
    t = q.shape[2]
    q, k, v, fq, fk = (x.double() for x in (q, k, v, fq, fk))
    n, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~((j <= n) & (j > n - window)), float("-inf"))
    mx = s.amax(-1, keepdim=True)
    p = (s - mx).exp()
    g = log_gate.double().cumsum(-1)
    g_enter = F.pad(g, (0, window), value=0.0)[..., window:]            # G_(j + W); j + W >= T never used
    decay = (g[..., :, None] - g_enter[..., None, :]).masked_fill(~(j <= n - window), float("-inf")).exp()
    lin = ((fq @ fk.transpose(-1, -2)) * decay) @ v
    return p @ v, p.sum(-1, keepdim=True), mx, lin
