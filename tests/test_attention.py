"""The three forms of DiJiang attention, and the export forms beside them, compute one
function (DESIGN.md section 2)."""

import itertools
import math

import pytest
import torch

from dijiang_edge import attention as A
from conftest import rel_err


def _inputs(b, h, t, m, dv, seed, gates="constant"):
    g = torch.Generator().manual_seed(seed)
    proj = A.projection_matrix(m)
    q = A.feature_map(torch.randn(b, h, t, m, generator=g), proj)
    k = A.feature_map(torch.randn(b, h, t, m, generator=g), proj)
    v = torch.randn(b, h, t, dv, generator=g)
    if gates == "constant":
        lg = A.default_log_decay(h)[None, :, None].expand(b, h, t).contiguous()
        beta = None
    else:  # per-position gates and input scales, as imported official checkpoints have
        lg = -torch.rand(b, h, t, generator=g) * 0.2
        beta = torch.rand(b, h, t, generator=g) + 0.5
    return q, k, v, lg, beta


@pytest.mark.parametrize("t", [1, 7, 64, 1000])
@pytest.mark.parametrize("chunk", [1, 16, 64, 100])
@pytest.mark.parametrize("gates", ["constant", "per_position"])
def test_forms_agree(t, chunk, gates):
    q, k, v, lg, beta = _inputs(2, 3, t, 16, 8, seed=t * 31 + chunk, gates=gates)
    s0 = torch.randn(2, 3, 16, 8)
    o_p, s_p = A.parallel_attention(q, k, v, lg, beta, s0)
    o_c, s_c = A.chunked_attention(q, k, v, lg, beta, s0, chunk_size=chunk)
    assert rel_err(o_c, o_p) < 1e-5 and rel_err(s_c, s_p) < 1e-5
    if t <= 64 or chunk == 64:   # the Python-loop recurrence is slow; one long case is enough
        o_r, s_r = A.recurrent_attention(q, k, v, lg, beta, s0)
        assert rel_err(o_r, o_p) < 1e-5 and rel_err(s_r, s_p) < 1e-5


@pytest.mark.parametrize("t", [1, 5, 37])
@pytest.mark.parametrize("form", ["masked", "native"])
@pytest.mark.parametrize("gates", ["constant", "per_position"])
def test_export_forms_equal_the_reference(t, form, gates):
    """The forms the exported files run (same signature) against the parallel reference."""
    q, k, v, lg, beta = _inputs(1, 3, t, 8, 9, seed=t, gates=gates)
    s0 = torch.randn(1, 3, 8, 9)
    o_ref, s_ref = A.parallel_attention(q, k, v, lg, beta, s0)
    o, s = A.FORMS[form](q, k, v, lg, beta, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("t", [1, 6])
def test_keep_zero_starts_a_fresh_sequence(t):
    """``decayed_attention``'s ``keep`` (the ``.pte`` in-graph reset): 1 carries the state, 0 drops it."""
    q, k, v, lg, beta = _inputs(1, 2, t, 8, 8, seed=7, gates="per_position")
    s0 = torch.randn(1, 2, 8, 8)
    cum, mask = lg.cumsum(-1), A.causal_mask(t)
    for keep, init in ((1.0, s0), (0.0, torch.zeros_like(s0))):
        o, s = A.decayed_attention(q, k, v, cum, beta, s0, mask, torch.tensor([keep]))
        o_ref, s_ref = A.parallel_attention(q, k, v, lg, beta, init)
        assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5, keep


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("gates", ["constant", "per_position"])
def test_batched_matmul_form_equals_decayed_attention(t, gates):
    """The ``.pte``'s 3-D form (``torch.export`` traces it) against the eager 4-D one,
    with and without the reset and the caller's ``last``."""
    q, k, v, lg, beta = _inputs(2, 3, t, 8, 5, seed=11 + t, gates=gates)
    s0 = torch.randn(2, 3, 8, 5)
    mask = A.causal_mask(t)
    # gates and scales broadcast over the batch or the heads, as the model passes them
    shapes = [(2, 3), (1, 3), (1, 1)] if gates == "constant" else [(2, 3), (2, 1)]
    for (gb, gh), keep in itertools.product(shapes, (None, torch.tensor([0.0]), torch.tensor([1.0]))):
        cum = lg[:gb, :gh].cumsum(-1)
        beta_ = None if beta is None else beta[:gb, :gh]
        for last in (None, cum[..., -1:].clone()):
            o_ref, s_ref = A.decayed_attention(q, k, v, cum, beta_, s0, mask, keep)
            o, s = A._decayed_attention_bmm(q, k, v, cum, beta_, s0, mask, keep, last)
            assert o.shape == o_ref.shape and s.shape == s_ref.shape
            assert rel_err(o, o_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6


@pytest.mark.parametrize("t", [1, 5])
def test_window_softmax_batched_form_equals_the_grouped_one(t):
    """``window_softmax`` with the ``rep``-row mask (the ``.pte``'s batched matmuls) gives
    the grouped 5-D form's ``(num, mx)``, the ring empty, partly and wholly full."""
    g = torch.Generator().manual_seed(t)
    hkv, rep, d, w = 2, 3, 8, 4
    q = torch.randn(1, hkv, rep, t, d, generator=g)
    k, v = torch.randn(1, hkv, t + w, d, generator=g), torch.randn(1, hkv, t + w, d + 1, generator=g)
    for start in (0, 2, 9):
        pos = torch.tensor([start])
        ref = A.window_softmax(q, k[:, :, None], v[:, :, None], A.window_mask(pos, t, w), 0.3)
        got = A.window_softmax(q, k, v, A.window_mask(pos, t, w, rep=rep), 0.3)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and rel_err(a, b) < 1e-6, start


@pytest.mark.parametrize("split", [1, 5, 33])
def test_continuing_from_saved_state(split):
    q, k, v, lg, beta = _inputs(1, 2, 64, 8, 8, seed=split)
    o_full, s_full = A.chunked_attention(q, k, v, lg, chunk_size=16)
    o1, s1 = A.chunked_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], lg[..., :split], chunk_size=16)
    o2, s2 = A.parallel_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], lg[..., split:], None, s1)
    assert rel_err(torch.cat([o1, o2], 2), o_full) < 1e-5
    assert rel_err(s2, s_full) < 1e-5
    steps = [A.recurrent_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], lg[..., i:i + 1],
                              torch.ones_like(lg[..., i:i + 1]), s1)[0] for i in range(split, split + 1)]
    assert rel_err(steps[0], o_full[:, :, split:split + 1]) < 1e-5


def test_recurrent_step_equals_recurrent_form():
    q, k, v, lg, beta = _inputs(2, 3, 1, 16, 8, seed=3, gates="per_position")
    s0 = torch.randn(2, 3, 16, 8)
    o1, s1 = A.recurrent_step(q, k, v, lg, beta, s0)
    o2, s2 = A.recurrent_attention(q, k, v, lg, beta, s0)
    assert rel_err(o1, o2) < 1e-6 and rel_err(s1, s2) < 1e-6


def test_invisible_tokens_leave_state_unchanged():
    q, k, v, lg, beta = _inputs(1, 2, 10, 8, 4, seed=5)
    s0 = torch.randn(1, 2, 8, 4)
    _, s = A.chunked_attention(q, k, v, torch.zeros_like(lg), torch.zeros_like(lg), s0, chunk_size=4)
    assert torch.equal(s, s0)


def test_dct_is_orthonormal_dct_ii():
    d = 64
    c = A.dct_matrix(d)
    assert torch.allclose(c @ c.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    # spot-check the closed form C[k, j] = s_k cos(pi (2j+1) k / 2d)
    k, j = 5, 11
    assert math.isclose(c[k, j].item(), math.sqrt(2 / d) * math.cos(math.pi * (2 * j + 1) * k / (2 * d)))
    assert math.isclose(c[0, 3].item(), math.sqrt(1 / d))


def test_dct_matches_scipy():
    fft = pytest.importorskip("scipy.fft")
    import numpy as np
    for d in (8, 24, 64):
        ref = torch.from_numpy(fft.dct(np.eye(d), axis=0, norm="ortho"))
        assert torch.allclose(A.dct_matrix(d), ref, atol=1e-12)


def test_qmc_is_deterministic_stratified_normal():
    t = A.qmc_normal(64)
    assert torch.equal(t, A.qmc_normal(64))
    u = torch.sort(A.qmc_uniform(64)).values
    assert torch.allclose(u, (torch.arange(64, dtype=torch.float64) + 0.5) / 64)
    assert abs(t.mean().item()) < 1e-9 and 0.9 < t.std().item() < 1.05   # symmetric normal quantiles
    p = A.projection_matrix(64)
    assert torch.allclose(p.double(), A.dct_matrix(64) * t[None, :], atol=1e-6)


def test_feature_map_is_softmax_of_projection():
    x = torch.randn(3, 16)
    p = A.projection_matrix(16)
    phi = A.feature_map(x, p)
    assert torch.allclose(phi.sum(-1), torch.ones(3))
    assert torch.allclose(phi, torch.softmax(x @ p, -1))


def test_default_decay_range():
    g = A.default_log_decay(9).exp()
    assert math.isclose(g[0].item(), 1 - 1 / 32, rel_tol=1e-6)
    assert math.isclose(g[-1].item(), 1 - 1 / 512, rel_tol=1e-6)


def test_twenty_thousand_tokens_stay_finite():
    """The official gamma^-n tables overflow past ~2.8k positions; cumulative log gates do not."""
    q, k, v, lg, _ = _inputs(1, 2, 20_000, 8, 4, seed=7)
    o, s = A.chunked_attention(q, k, v, lg, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    o_tail, _ = A.parallel_attention(q[:, :, -200:], k[:, :, -200:], v[:, :, -200:], lg[..., -200:],
                                     None, A.chunked_attention(q[:, :, :-200], k[:, :, :-200],
                                                               v[:, :, :-200], lg[..., :-200])[1])
    assert rel_err(o[:, :, -200:], o_tail) < 1e-5
