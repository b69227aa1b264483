"""The converted model as a transformers model: the Auto classes load a `convert` folder
of each architecture, `generate()` (greedy, sampling, beam search) runs on the state in
transformers' cache classes and gives what `dijiang_edge.generate` gives, `pipeline`
works, a folder saved either way loads the other way, and each folder has its card."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dijiang_edge
from conftest import ARCHS, rel_err, word_tokenizer
from dijiang_edge.cli import main
from dijiang_edge.hf_model import DiJiangHFForCausalLM
from dijiang_edge.runtime import PREFILL_PIECE

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

WINDOW = ["--variant", "normalized", "--window", "4"]        # shared normaliser, ring of 4
CASES = [(a, []) for a in ARCHS] + [("smollm2", WINDOW), ("llama", ["--window", "4", "--window-mode", "mix"])]


def _ids(*shape, seed=0):
    return torch.randint(3, 97, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(hf_models, tmp_path_factory, one_thread):
    """``dijiang-export convert`` of each tiny source (word-level tokenizer beside it)."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for arch, opts in CASES:
        src = root / f"src-{arch}"
        if not src.exists():
            hf_models[arch].save_pretrained(src)
            word_tokenizer(src)
        dst = root / f"conv-{arch}{'-w' + opts[-1] if opts else ''}"
        assert main(["convert", str(src), "--out", str(dst), *opts]) == 0
        out[(arch, tuple(opts))] = dst
    return out


@pytest.mark.parametrize("arch,opts", CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_auto_classes_load_a_converted_folder_and_generate_as_dijiang_edge_does(folders, arch, opts):
    folder = folders[(arch, tuple(opts))]
    hf = AutoModelForCausalLM.from_pretrained(folder)
    eager = dijiang_edge.load(folder)
    assert isinstance(hf, DiJiangHFForCausalLM) and type(AutoConfig.from_pretrained(folder)).__name__ == "DiJiangConfig"
    ids = _ids(1, 11)
    assert torch.equal(hf(ids).logits, eager(ids)[0])
    out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True,
                      return_dict_in_generate=True)
    ref, _ = dijiang_edge.generate(eager, ids, max_new_tokens=12, eos_ids=[])
    assert out.sequences.tolist() == ref.tolist()
    # each step's logits (from the cached state) are the eager model's on the whole sequence
    assert rel_err(torch.stack(out.logits, 1), eager(out.sequences)[0][:, ids.shape[1] - 1:-1]) < 1e-5
    # the config's EOS ends generation where dijiang_edge's does (the third new token made EOS)
    assert hf.generation_config.eos_token_id == eager.args.eos_ids[0]
    eos = int(ref[0, ids.shape[1] + 2])
    stop = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert stop.tolist() == dijiang_edge.generate(eager, ids, max_new_tokens=12, eos_ids=[eos])[0].tolist()
    assert stop.shape[1] <= ids.shape[1] + 3
    layers = {type(x).__name__ for x in hf(ids, use_cache=True).cache.layers}
    assert layers == {"LinearAttentionAndSlidingWindowAttentionLayer" if "--window" in opts else "LinearAttentionLayer"}


@pytest.mark.parametrize("opts", [[], WINDOW])
def test_fed_in_pieces_through_the_cache_the_logits_are_the_eager_models(folders, opts):
    """A long prompt (past the prefill piece and the window) in calls of 3, 1, 1 and the
    rest, the state carried by a DynamicCache, vs the eager model in one call."""
    folder = folders[("smollm2", tuple(opts))]
    hf, eager = AutoModelForCausalLM.from_pretrained(folder), dijiang_edge.load(folder)
    ids = _ids(2, PREFILL_PIECE + 40, seed=1)
    want = eager(ids)[0]
    cache, outs, at = DynamicCache(config=hf.config), [], 0
    for n in (3, 1, 1, ids.shape[1] - 5):
        outs.append(hf(ids[:, at:at + n], cache=cache).logits)
        at += n
    assert rel_err(torch.cat(outs, 1), want) < 1e-5
    last = hf(ids, cache=DynamicCache(config=hf.config), logits_to_keep=1).logits     # piecewise prefill
    assert last.shape[1] == 1 and rel_err(last, want[:, -1:]) < 1e-5
    if "--window" in opts:
        assert cache.get_seq_length() == ids.shape[1]      # a sliding layer's count, as transformers reads it
    cache.reset()                                          # transformers' reset: a new sequence
    assert rel_err(hf(ids[:, :7], cache=cache).logits, want[:, :7]) < 1e-5


@pytest.mark.parametrize("opts", [[], WINDOW])
def test_a_left_padded_batch_generates_what_each_prompt_does_alone(folders, opts):
    folder = folders[("smollm2", tuple(opts))]
    hf, eager = AutoModelForCausalLM.from_pretrained(folder), dijiang_edge.load(folder)
    long, short = _ids(1, 9, seed=2), _ids(1, 3, seed=3)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 6), torch.ones(1, 3)], 1)]).long()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for row, prompt in ((0, long), (1, short)):
        ref, _ = dijiang_edge.generate(eager, prompt, max_new_tokens=8, eos_ids=[])
        assert out[row, 9:].tolist() == ref[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("opts", [[], WINDOW])
def test_sampling_and_beam_search_on_the_cache_equal_recomputing_without_it(folders, opts):
    """Without a cache, transformers feeds the whole sequence each step: the same tokens
    mean the cached state (and its reordering between beams) is right."""
    hf = AutoModelForCausalLM.from_pretrained(folders[("smollm2", tuple(opts))])
    ids = _ids(1, 6, seed=4)
    for kw in (dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8), dict(num_beams=3, do_sample=False)):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(0)
            runs.append(hf.generate(ids, max_new_tokens=10, use_cache=use_cache, eos_token_id=None,
                                    output_logits=True, return_dict_in_generate=True, **kw))
        assert runs[0].sequences.tolist() == runs[1].sequences.tolist(), kw
        assert rel_err(torch.stack(runs[0].logits), torch.stack(runs[1].logits)) < 1e-5, kw


def test_pipeline_generates_the_tokens_of_dijiang_edge(folders):
    folder = folders[("smollm2", tuple(WINDOW))]
    pipe = transformers.pipeline("text-generation", model=str(folder))
    got = pipe("w5 w6 w7 w8 w9", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ref, _ = dijiang_edge.generate(dijiang_edge.load(folder), torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=6)
    assert list(got) == ref[0].tolist()


@pytest.mark.parametrize("opts", [[], WINDOW])
def test_saved_by_transformers_loads_with_dijiang_edge_and_back(folders, tmp_path, opts):
    hf = AutoModelForCausalLM.from_pretrained(folders[("smollm2", tuple(opts))])
    hf.save_pretrained(tmp_path / "saved")
    ids = _ids(1, 20, seed=5)
    back = dijiang_edge.load(tmp_path / "saved")
    assert torch.equal(back(ids)[0], hf(ids).logits)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(again(ids).logits, hf(ids).logits)
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "library_name: transformers" in card and f"| variant | {hf.config.dijiang_edge['variant']} |" in card


def test_a_cache_of_the_wrong_kind_is_refused_in_one_line(folders):
    hf = AutoModelForCausalLM.from_pretrained(folders[("smollm2", tuple(WINDOW))])
    pure = AutoModelForCausalLM.from_pretrained(folders[("smollm2", ())])
    with pytest.raises(ValueError, match="LinearAttentionAndSlidingWindowAttentionLayer"):
        hf(_ids(1, 4), cache=DynamicCache(config=pure.config))


def test_import_is_torch_free_and_registers_when_transformers_loads():
    code = ("import sys, dijiang_edge\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M\n"
            "c = CONFIG_MAPPING['dijiang']\n"
            "print(c.__name__, M[c].__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["DiJiangConfig", "DiJiangHFForCausalLM"]


def test_without_torch_nothing_is_hooked():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dijiang_edge\n"
            "print(sum(type(f).__name__ == 'AfterImport' for f in sys.meta_path))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr[-2000:]


def test_the_config_keeps_the_dijiang_settings_whole(folders):
    folder = folders[("llama", ())]
    cfg = AutoConfig.from_pretrained(folder)
    on_disk = json.loads((folder / "config.json").read_text())["dijiang_edge"]
    assert cfg.dijiang_edge == on_disk
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == \
        (on_disk["n_layers"], on_disk["n_heads"], on_disk["vocab_size"])
