"""A non-editable install works: the wheel holds every module and the files found by
path (device profiles, the C++ runner's sources), and the installed ``dijiang-export``,
run from outside the repository, exports with ``--target`` and builds the native runner.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps
--no-build-isolation``) and installed into a fresh venv that sees this interpreter's
packages (torch, onnxruntime, ...) through a ``.pth`` line, not ``--system-site-packages``:
that would also run the site's ``.pth`` hooks, among them an editable install of this
package, which would shadow the wheel under test.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import WHEEL_PROBE as PROBE, word_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **kw.pop("env", {})}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def wheel(project_wheel) -> Path:
    """conftest's wheel of this checkout (built once per session)."""
    return project_wheel


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", env], env)
    py = env / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env).stdout.strip())
    (purelib / "_host_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "-q", wheel], env)
    return env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiniest model the exporters take: one layer, two heads of 16."""
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=True)
    src = tmp_path_factory.mktemp("model") / "tiny"
    T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    word_tokenizer(src)
    return src


def test_wheel_holds_every_module_and_the_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the Apache-2.0 text must travel"
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "dijiang_edge").rglob("*.py")}
    assert modules - names == set(), "pyproject.toml [tool.setuptools] packages misses these"
    adapters = {p.relative_to(REPO).as_posix() for p in (REPO / "dijiang_edge" / "adapters").glob("*.safetensors")}
    assert (adapters | {PROBE}) - names == set(), "pyproject.toml package-data misses the shipped adapter(s)"
    for folder in ("profiles", "runner"):
        shipped = {p.relative_to(REPO / "export").as_posix() for p in (REPO / "export" / folder).iterdir()}
        assert {f"dijiang_edge/_export/{s}" for s in shipped} <= names, folder


def test_installed_package_exports_for_a_target(venv, tiny_model, tmp_path):
    """``--target`` from the installed profiles, outside any checkout (ONNX only: fast)."""
    py = venv / "bin" / "python"
    where = _run([py, "-c", "import dijiang_edge.shipped as s; print(s.PACKAGE, s.in_checkout())"], tmp_path)
    assert where.stdout.split() == [str(next(venv.glob("lib/python*/site-packages/dijiang_edge"))), "False"]
    _run([venv / "bin" / "dijiang-export", "export", tiny_model, "--target", "x86-laptop", "--out", "out",
          "--parity-tokens", "64"], tmp_path)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["target"]["name"] == "x86-laptop" and {f["quant"] for f in m["files"]} == {"fp32", "int8"}


@pytest.mark.slow
def test_installed_package_exports_for_android_and_runs_the_native_runner(venv, tiny_model, tmp_path):
    """The whole ``--target android-arm64`` export (.pte lowering included, ~1 min), then
    the C++ runner built from the installed sources runs the .pte."""
    pytest.importorskip("executorch")
    _run([venv / "bin" / "dijiang-export", "export", tiny_model, "--target", "android-arm64", "--out", "out"],
         tmp_path)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["target"]["name"] == "android-arm64" and {f["format"] for f in m["files"]} == {"pte", "onnx"}
    pte = next(f["path"] for f in m["files"] if f["format"] == "pte")
    code = ("import sys; from dijiang_edge.runtime import native; why = native.missing_tools('x86_64'); "
            "print(why) if why else print(native.run_pte(sys.argv[1], [3, 4, 5], 4).tokens)")
    got = _run([venv / "bin" / "python", "-c", code, tmp_path / "out" / pte], tmp_path,
               env={"DIJIANG_RUNNER_BUILD": str(tmp_path / "runner")})
    if "[" not in got.stdout:
        pytest.skip(f"native runner: {got.stdout.strip()}")
    assert len(json.loads(got.stdout.strip().splitlines()[-1])) == 4
