"""What one export call promises: each file is its own model's (nothing is cached
across calls), every option it is given is one it knows, and its manifest is a pure
function of its inputs (two exports differ only in ``created``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dijiang_edge
from conftest import tiny_hf
from dijiang_edge.bars import BARS
from dijiang_edge.errors import DiJiangError
from dijiang_edge.exporters import export
from dijiang_edge.exporters import onnx as onnx_exp
from dijiang_edge.parity import rel_err
from dijiang_edge.runtime.onnx import OnnxRunner

ROOT = Path(__file__).resolve().parents[1]
IDS = np.arange(3, 43, dtype=np.int64)[None]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int):
    return dijiang_edge.convert(tiny_hf("smollm2", seed=seed), chunk_size=8)


@torch.no_grad()
def _torch_logits(model) -> np.ndarray:
    return model(torch.from_numpy(IDS))[0][0].numpy()


def _file_logits(folder: Path, entries) -> np.ndarray:
    return OnnxRunner(folder, entries[0], {"files": entries}, threads=1).forward(IDS)[0]


def test_two_models_in_one_process_each_file_is_its_own(tmp_path):
    """Defect 1: traced graphs were cached under ``id(model)`` for the whole process, so a
    model living at a freed model's address got the old graph.  The last export puts a
    second model's weights into the first one's object: the same ``id``, as Python's reuse gives."""
    a, b = _tiny(0), _tiny(1)
    want = {"a": _torch_logits(a), "b": _torch_logits(b)}
    files = {name: onnx_exp.export(m, tmp_path / name, kinds=("native",), parity_tokens=0)
             for name, m in (("a", a), ("b", b))}
    a.load_state_dict(b.state_dict())
    files["b_in_a"] = onnx_exp.export(a, tmp_path / "b_in_a", kinds=("native",), parity_tokens=0)
    want["b_in_a"] = want["b"]
    assert rel_err(want["a"], want["b"]) > 0.1                       # the two models differ
    for name, entries in files.items():
        assert rel_err(_file_logits(tmp_path / name, entries), want[name]) <= BARS["fp32_max_rel_err"], name


def test_misspelled_option_is_an_error(tiny_src, tmp_path, capsys):
    """Defect 4: ``export(**opts)`` swallowed unknown options; now each is refused, named."""
    with pytest.raises(DiJiangError, match=r"unknown export option\(s\) kind for format\(s\) onnx.*kinds"):
        export(str(tiny_src), tmp_path / "o", ["onnx"], ["fp32"], kind=("native",))
    with pytest.raises(DiJiangError, match=r"max_context_len"):         # a .pte option, no .pte asked
        export(str(tiny_src), tmp_path / "o", ["onnx"], ["fp32"], max_context_len=64)
    assert not (tmp_path / "o").exists()
    from dijiang_edge.exporters.baseline import export_baseline
    with pytest.raises(DiJiangError, match=r"unknown export option\(s\) thread\b"):
        export_baseline(str(tiny_src), tmp_path / "b", ["onnx"], ["fp32"], thread=1)
    from dijiang_edge.cli import main
    assert main(["export", str(tiny_src), "--out", str(tmp_path / "c"), "--formats", "onnx",
                 "--max-context", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_context_len" in err[0], err


EXPORT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from dijiang_edge.exporters import export
    export(sys.argv[1], sys.argv[2], ["onnx", "pte"], ["fp32"], convert_options={"chunk_size": 8},
           kinds=("native",), threads=1, max_seq_len=16, max_context_len=64, parity_tokens=40)
""")


@pytest.mark.slow
def test_two_exports_write_the_same_manifest(tiny_src, tmp_path):
    """Two processes, one export each: the manifests differ in ``created`` only (the .pte
    entry once recorded the repr of a Python function, with its memory address)."""
    pytest.importorskip("executorch.runtime")
    run = lambda out: subprocess.Popen([sys.executable, "-c", EXPORT, str(tiny_src), str(out)], cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [(run(tmp_path / n), tmp_path / n) for n in ("one", "two")]
    manifests = []
    for p, out in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        m = json.loads((out / "manifest.json").read_text())
        assert m.pop("created")
        manifests.append(m)
    assert {f["format"] for f in manifests[0]["files"]} == {"onnx", "pte"}
    assert "0x" not in json.dumps(manifests[0])
    assert manifests[0] == manifests[1]
