"""Checkpoints trained with the official DiJiang GPT-NeoX code import exactly.

The reference below writes the official attention the way its code computes it
(parallel, with per-position ``D1``/``D2`` tables, ``GroupNorm(head_size, hidden)``,
the ``x @ W_G`` swish gate) inside an otherwise stock transformers GPT-NeoX, and the
imported model, which runs it as a recurrence, must give the same logits.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dijiang_edge
from dijiang_edge import attention as A
from conftest import rel_err, tiny_hf

L = 48   # trained positions in the tables


def _official_extras(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, hid = cfg.num_attention_heads, cfg.hidden_size
    d = hid // h
    extras = []
    gamma = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), h))
    for _ in range(cfg.num_hidden_layers):
        u = torch.rand(d, generator=g).clamp(1e-3, 1 - 1e-3)         # the official random draw
        proj = (A.dct_matrix(d) * (math.sqrt(2) * torch.erfinv(2 * u.double() - 1))).float()
        n = torch.arange(L)
        # "trained" tables: the gamma^n / gamma^-n init, perturbed per position
        d1 = (gamma[:, None] ** n) * (1 + 0.05 * torch.rand(h, L, generator=g))
        d2 = (gamma[:, None] ** -n.float()) * (1 + 0.05 * torch.rand(h, L, generator=g))
        extras.append({
            "proj_matrix": proj,
            "D1": d1[None, :, :, None].float(), "D2": d2[None, :, :, None].float(),
            "W_G": torch.randn(hid, hid, generator=g) * 0.1,
            "group_norm.weight": 1 + 0.1 * torch.randn(hid, generator=g),
            "group_norm.bias": 0.1 * torch.randn(hid, generator=g),
        })
    return extras


def _official_attention_forward(extras):
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    def forward(self, hidden_states, attention_mask=None, layer_past=None, position_embeddings=None, **kw):
        b, t, hid = hidden_states.shape
        ex = extras[self.layer_idx]
        d = self.head_size
        qkv = self.query_key_value(hidden_states).view(b, t, -1, 3 * d).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        q = F.softmax(q @ ex["proj_matrix"], dim=-1) * ex["D1"][:, :, :t]
        k = F.softmax(k @ ex["proj_matrix"], dim=-1) * ex["D2"][:, :, :t]
        scores = (q @ k.transpose(2, 3)) * torch.ones(t, t).tril()
        o = (scores @ v).transpose(1, 2).reshape(b, t, hid)
        gn = torch.nn.GroupNorm(d, hid)
        gn.weight.data, gn.bias.data = ex["group_norm.weight"], ex["group_norm.bias"]
        o = gn(o.reshape(-1, hid)).reshape(b, t, hid)
        return self.dense(F.silu(hidden_states @ ex["W_G"]) * o), None
    return forward


@pytest.fixture
def official_checkpoint(tmp_path):
    hf = tiny_hf("gpt_neox", seed=3)
    folder = tmp_path / "pythia-dijiang"
    hf.save_pretrained(folder)
    extras = _official_extras(hf.config)
    sd = load_file(str(folder / "model.safetensors"))
    for i, ex in enumerate(extras):
        for k, v in ex.items():
            sd[f"gpt_neox.layers.{i}.attention.{k}"] = v.contiguous()
    if "lm_head.weight" in sd:                                    # official files use the old name
        sd["embed_out.weight"] = sd.pop("lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(rotary_pct=0.25, rotary_emb_base=10000)            # the official configs' legacy keys
    (folder / "config.json").write_text(json.dumps(cfg))
    return hf, extras, folder


@torch.no_grad()
def test_official_checkpoint_imports_exactly(official_checkpoint, monkeypatch):
    hf, extras, folder = official_checkpoint
    from transformers.models.gpt_neox import modeling_gpt_neox
    monkeypatch.setattr(modeling_gpt_neox.GPTNeoXAttention, "forward", _official_attention_forward(extras))
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits

    model = dijiang_edge.convert(str(folder))
    assert model.args.pos_table_len == L and model.args.norm_groups == hf.config.hidden_size // 4
    out, _ = model(ids)
    assert rel_err(out, ref) < 1e-4
    state, steps = None, []                      # and token by token, through the recurrence
    for i in range(ids.shape[1]):
        lg, state = model(ids[:, i:i + 1], state)
        steps.append(lg)
    assert rel_err(torch.cat(steps, 1), ref) < 1e-4


@torch.no_grad()
def test_official_import_runs_past_its_tables_and_overflow_length(official_checkpoint):
    _, _, folder = official_checkpoint
    model = dijiang_edge.convert(str(folder))
    ids = torch.randint(3, 97, (1, 6000), generator=torch.Generator().manual_seed(1))
    logits, state = model(ids)             # official gamma^-n tables give NaN past ~5k
    assert torch.isfinite(logits).all() and all(torch.isfinite(s).all() for s in state.layers)


def test_int8_onnx_keeps_every_layers_projection_in_float(official_checkpoint, tmp_path):
    """Defect 2: only layer 0's projection P was kept out of int8; an imported official
    checkpoint has one per layer, and each must stay an fp32 MatMul weight."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from dijiang_edge.exporters import onnx as onnx_exp
    _, _, folder = official_checkpoint
    model = dijiang_edge.convert(str(folder))
    projs = [layer.attn.proj.numpy() for layer in model.layers]
    assert not np.array_equal(projs[0], projs[1])                       # one P per layer
    onnx_exp.export(model, tmp_path, "int8", kinds=("step",), parity_tokens=0)
    g = onnx.load(tmp_path / "onnx" / "decode_int8.onnx")
    weights = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path / "onnx")) for t in g.graph.initializer}
    float_matmul = [weights[n.input[1]] for n in g.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    for i, p in enumerate(projs):
        assert any(w.dtype == np.float32 and np.array_equal(w, p) for w in float_matmul), f"layer {i}"
