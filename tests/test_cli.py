"""The command line: help text, one-line errors with a non-zero exit on bad input,
and convert -> generate on a tiny model."""

import subprocess
import sys

import pytest
import torch

from dijiang_edge.cli import main
from conftest import tiny_hf, word_tokenizer


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dijiang_edge.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("convert", "generate", "export", "check", "bench"):
        assert cmd in out.stdout


def test_missing_path_is_one_line_error(capsys, tmp_path):
    code, err = _run(capsys, "convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no model at" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    code, err = _run(capsys, "convert", str(tmp_path / "junk"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a model folder" in err


def test_unsupported_architecture_names_supported_ones(capsys, tmp_path):
    import transformers as T
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    code, err = _run(capsys, "convert", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert code == 2 and "'gpt2' is not supported" in err and "llama" in err and "gpt_neox" in err


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    code, err = _run(capsys, "convert", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "could not read GGUF file" in err and len(err.splitlines()) == 1


def test_generate_runs_a_gguf_file(tmp_path):
    """``.gguf`` is a MODEL for ``generate`` too: converted in memory, its tokenizer as
    well (nothing written beside it), the text PyTorch's greedy continuation."""
    import os
    from dijiang_edge.conversion import convert
    from dijiang_edge.generation import stream
    from dijiang_edge.tokenizer import source_tokenizer
    from conftest import tiny_gguf
    g = tmp_path / "tiny.gguf"
    tiny_gguf(g)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dijiang_edge.cli", "generate", str(g), "--prompt", "abc",
                        "--max-new-tokens", "6"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "PyTorch" in r.stderr, r.stderr
    tok = source_tokenizer(g)
    ids = torch.tensor([tok.encode("abc").ids])
    want = [int(t[0]) for t, _ in stream(convert(str(g)), ids, 6)]
    assert r.stdout == "abc" + tok.decode(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_convert_then_generate_and_refuse_existing_out(capsys, tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "src")
    word_tokenizer(tmp_path / "src")
    out = tmp_path / "conv"
    code, _ = _run(capsys, "convert", str(tmp_path / "src"), "--out", str(out), "--variant", "normalized")
    assert code == 0 and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    code, err = _run(capsys, "convert", str(tmp_path / "src"), "--out", str(out))
    assert code == 2 and "--force" in err
    code = main(["generate", str(out), "--prompt", "w5 w6 w7", "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert code == 0 and "5 tokens" in captured.err and captured.out.startswith("w5 w6 w7")


def test_parity_tokens_help_states_the_exporters_default():
    """``export --help`` names the parity length each exporter really uses (it once said
    512 for .pte while the code used 2048)."""
    import inspect
    import re
    from dijiang_edge.cli import build_parser
    from dijiang_edge.exporters import executorch, onnx
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices["export"]
    text = next(a for a in sub._actions if a.dest == "parity_tokens").help
    said = {int(n) for n in re.findall(r"\d+", text.split("default:", 1)[1])}
    used = {inspect.signature(m.export).parameters["parity_tokens"].default for m in (onnx, executorch)}
    assert said == used, (text, used)
