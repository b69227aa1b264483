"""The local softmax window beside DiJiang: the ring-and-delay computation the layer runs
agrees with the hybrid's definition (``attention.windowed_reference``) below, at and far
above the window, in any split, in every form, with padding; a prompt inside the window
is the source model's softmax attention exactly; the state is the same size at any length."""

import pytest
import torch

import dijiang_edge
from dijiang_edge import attention as A
from dijiang_edge.errors import DiJiangError
from dijiang_edge.model import WINDOW_MODES
from conftest import ARCHS, fed_in_pieces, rel_err

W = 8
MODES = [("normalized", "shared"), ("normalized_gated", "shared"), ("official", "mix"), ("normalized", "mix")]


def _ids(n, seed=0, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _windowed(hf, variant="normalized", mode="shared", window=W, seed=0):
    """A converted model whose DiJiang parameters are random, so the linear part matters."""
    m = dijiang_edge.convert(hf, variant=variant, chunk_size=4, window=window, window_mode=mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.layers:
            at = layer.attn
            at.window_weight.copy_(torch.randn(at.window_weight.shape, generator=g))
            at.decay_logit.add_(torch.randn(at.decay_logit.shape, generator=g))
            for name in ("gate", "group_norm"):
                for p in getattr(at, name).parameters() if hasattr(at, name) else ():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _reference_layer(attn, x, ctx):
    """One fresh sequence through ``attn`` from the hybrid's definition (no ring, no delay)."""
    a = attn.a
    h, hkv, d = a.n_heads, a.n_kv_heads, a.head_dim
    b, t = x.shape[:2]
    qk, v, gate = attn.rotated(x, ctx)
    rep = h // hkv
    q = qk[:, :, :h].transpose(1, 2)
    k = qk[:, :, h:].repeat_interleave(rep, dim=2).transpose(1, 2)
    v = v.view(b, t, hkv, d).repeat_interleave(rep, dim=2).transpose(1, 2)
    vv = torch.cat((v, torch.ones_like(v[..., :1])), -1) if a.variant != "official" else v
    lg = attn.log_decay()[None, :, None].expand(b, h, t)
    num, den, mx, lin = A.windowed_reference(q, k, vv, A.feature_map(q, attn.proj), A.feature_map(k, attn.proj),
                                             lg, a.window, d ** -0.5)
    heads_last = (lambda z: z.transpose(1, 2).float())
    lin = heads_last(lin).reshape(b, t, -1)
    grouped = (lambda z: z.float().reshape(b, hkv, rep, t, z.shape[-1]))     # the window's layout
    return attn.finish(x, lin, gate, (grouped(torch.cat((num[..., :d], den), -1)), grouped(mx)))


def _reference_logits(model, ids):
    """The whole model with every layer's attention replaced by ``_reference_layer``."""
    saved = []
    for layer in model.layers:
        at = layer.attn
        saved.append(at.windowed)
        at.windowed = (lambda x, ctx, state, at=at: (_reference_layer(at, x, ctx), state))
    try:
        return model(ids)[0]
    finally:
        for layer, fn in zip(model.layers, saved):
            layer.attn.windowed = fn


@pytest.fixture(scope="module", params=MODES, ids=lambda p: f"{p[0]}-{p[1]}")
def windowed(request, hf_models):
    return _windowed(hf_models["llama"], *request.param)


@torch.no_grad()
@pytest.mark.parametrize("n", [5, W, W + 1, 45])
def test_layer_equals_the_definition(windowed, n):
    ids = _ids(n, seed=n)
    assert rel_err(windowed(ids)[0], _reference_logits(windowed, ids)) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_equals_the_definition(hf_models, arch):
    model = _windowed(hf_models[arch])
    ids = _ids(30, seed=3)
    assert rel_err(model(ids)[0], _reference_logits(model, ids)) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("splits", [[13, 27], [1] * 20 + [20], [3, 1, 7, 1, 1, 19, 8], [W, W, W, 16]])
def test_any_split_gives_the_same_logits(windowed, splits):
    ids = _ids(40, seed=1)
    full, s_full = windowed(ids)
    out, state = fed_in_pieces(windowed, ids, splits)
    assert rel_err(out, full) < 1e-4
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(state.layers, s_full.layers))


@torch.no_grad()
@pytest.mark.parametrize("form", ["parallel", "recurrent", "masked", "native"])
def test_forms_agree(windowed, form):
    ids = _ids(37, seed=2)
    ref, _ = windowed(ids, form="chunked")
    state, outs = None, []
    for i in range(0, 37, 9):          # a ring carried between calls, in every form
        lg, state = windowed(ids[:, i:i + 9], state, form=form)
        outs.append(lg)
    assert rel_err(torch.cat(outs, 1), ref) < 1e-4


@torch.no_grad()
def test_long_prompts_in_query_blocks_change_nothing(windowed):
    ids = _ids(50, seed=4)
    ref, s_ref = windowed(ids)
    for layer in windowed.layers:
        layer.attn.window_block = 7
    try:
        out, s = windowed(ids)
    finally:
        for layer in windowed.layers:
            layer.attn.window_block = 256
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(s.layers, s_ref.layers))


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_invisible(windowed, side):
    lens = [30, 11, 4]
    rows = [_ids(n, seed=10 + n)[0] for n in lens]
    t = max(lens)
    ids = torch.zeros(len(lens), t, dtype=torch.long)
    mask = torch.zeros(len(lens), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    out, state = windowed(ids, attention_mask=mask)
    more = _ids(3, seed=99, batch=len(lens))
    nxt, _ = windowed(more, state)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ref, s1 = windowed(r[None])
        assert rel_err(out[i:i + 1, sl], ref) < 1e-4
        assert rel_err(nxt[i:i + 1], windowed(more[i:i + 1], s1)[0]) < 1e-4     # the ring carried on


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2"])
def test_a_prompt_inside_the_window_is_the_source_model(hf_models, arch):
    """Shared normaliser: nothing has left the window yet, so the layer is softmax attention."""
    hf = hf_models[arch]
    model = _windowed(hf, window=16)
    ids = _ids(16, seed=5)
    assert rel_err(model(ids)[0], hf(ids).logits) < 1e-4
    assert rel_err(model(_ids(17, seed=5))[0], hf(_ids(17, seed=5)).logits) > 1e-3     # past it, DiJiang


@torch.no_grad()
def test_state_is_the_same_size_at_any_length(windowed):
    _, short = windowed(_ids(3))
    _, long = windowed(_ids(300, seed=7))
    assert [t.shape for t in short.layers] == [t.shape for t in long.layers]
    assert len(short.layers) == 3 * len(windowed.layers)
    ring = short.layers[1]
    assert ring.shape == (1, windowed.args.n_kv_heads, W, windowed.args.head_dim)


@torch.no_grad()
def test_window_only_switch(windowed):
    """``linear_on = False`` drops the DiJiang part (the long-range ablation)."""
    ids = _ids(30, seed=8)
    ref = windowed(ids)[0]
    for layer in windowed.layers:
        layer.attn.linear_on = False
    try:
        off = windowed(ids)[0]
    finally:
        for layer in windowed.layers:
            layer.attn.linear_on = True
    assert rel_err(off[:, W + 1:], ref[:, W + 1:]) > 1e-3
    if windowed.args.window_mode == "shared":     # nothing has left the window yet: no linear part to drop
        assert rel_err(off[:, :W], ref[:, :W]) < 1e-5


@pytest.mark.parametrize("opts, msg", [
    (dict(window=-1), "window must be"),
    (dict(window=8, window_mode="sum"), "unknown window mode"),
    (dict(window=8, window_mode="shared", variant="official"), "normalized"),
])
def test_bad_window_settings_are_refused(hf_models, opts, msg):
    with pytest.raises(DiJiangError, match=msg):
        dijiang_edge.convert(hf_models["llama"], **opts)


def test_modes_listed():
    assert set(WINDOW_MODES) == {m for _, m in MODES}
