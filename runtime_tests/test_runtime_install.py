"""``pip install 'dijiang-edge[runtime]'`` is the whole of what a device needs to run an
exported ONNX folder: in a fresh venv (no system site packages, so no torch), the
wheel of this checkout with its ``[runtime]`` extra, at the dependency floors
``pyproject.toml`` declares, generates and chats the same text as the full install; the commands
that build models say in one line which extra they need.

pip reaches PyPI for numpy, tokenizers and onnxruntime (cached after the first run);
the project itself comes from the locally built wheel (``conftest.project_wheel``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from dijiang_edge.cli import main
from dijiang_edge.exporters import export

REPO = Path(__file__).resolve().parents[1]
PROMPT = "w5 w6 w7"

pytestmark = pytest.mark.usefixtures("one_thread")


def _floors() -> list[str]:
    """``name==X`` for every ``name>=X`` of the base and ``[runtime]`` requirements."""
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = proj["dependencies"] + proj["optional-dependencies"]["runtime"]
    pins = [re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r.replace(" ", "")) for r in reqs]
    assert all(pins), f"every runtime requirement needs a floor: {reqs}"
    return [f"{m[1]}=={m[2]}" for m in pins]


def _run(cmd: list, cwd: Path, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``cmd`` outside the checkout, with no PYTHONPATH: only the venv's own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                       input=stdin)
    if check:
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def runtime_venv(project_wheel, tmp_path_factory) -> Path:
    """A venv of its own (no system site packages), filled by this interpreter's pip
    (``--python``: no pip of its own to bootstrap, which took longer than the install)."""
    env = tmp_path_factory.mktemp("runtime-venv")
    _run([sys.executable, "-m", "venv", "--without-pip", env], env)
    floors = env / "floors.txt"
    floors.write_text("\n".join(_floors()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q", "-c", floors,
          f"{project_wheel}[runtime]"], env)
    return env


@pytest.fixture(scope="module")
def folder(tiny_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "tiny"
    export(str(tiny_src), out, ["onnx"], ["fp32", "int8"], convert_options={"chunk_size": 8}, parity_tokens=0)
    return out


def test_runtime_extra_installs_no_torch_at_the_floors(runtime_venv, folder, tmp_path):
    """The API of the README's torch-free snippet runs; torch and transformers are absent."""
    code = ("import sys, importlib.metadata as md, numpy as np\n"
            "from dijiang_edge.runtime import open_export\n"
            "r = open_export(sys.argv[1], format='onnx', quant='fp32')\n"
            "logits = r.forward(np.array([[5, 6, 7]]))\n"
            "assert logits.shape == (1, 3, 97) and 'torch' not in sys.modules\n"
            "for m in ('torch', 'transformers'):\n"
            "    try:\n"
            "        __import__(m)\n"
            "        raise SystemExit(m + ' is importable')\n"
            "    except ModuleNotFoundError:\n"
            "        pass\n"
            "print(' '.join(f'{n}=={md.version(n)}' for n in sys.argv[2:]))\n")
    names = [x.split("==")[0] for x in _floors()]
    got = _run([runtime_venv / "bin" / "python", "-c", code, folder, *names], tmp_path)
    installed = dict(x.split("==") for x in got.stdout.split())
    assert {n: Version(v) for n, v in installed.items()} == \
        {n: Version(v) for n, v in (x.split("==") for x in _floors())}, got.stdout


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_generate_in_the_runtime_venv_matches_the_full_install(runtime_venv, folder, tmp_path, capsys, quant):
    args = ["generate", folder, "--format", "onnx", "--quant", quant, "--prompt", PROMPT,
            "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "1"]
    got = _run([runtime_venv / "bin" / "dijiang-export", *args], tmp_path)
    assert main([str(a) for a in args]) == 0
    want = capsys.readouterr().out
    assert got.stdout == want and len(want.split()) == 3 + 8, (got.stdout, want)
    assert f"onnx {quant}" in got.stderr


def test_chat_in_the_runtime_venv_matches_the_full_install(runtime_venv, chat_src, tmp_path, monkeypatch,
                                                           capsys):
    """``chat`` on an exported folder: its template rendered by jinja2 (a base dependency)."""
    import io
    folder = tmp_path / "chat"
    export(str(chat_src), folder, ["onnx"], ["fp32"], convert_options={"chunk_size": 8}, parity_tokens=0)
    turns = "w10 w11 w12\nw13 w14\n"
    args = ["chat", folder, "--max-new-tokens", "4"]
    got = _run([runtime_venv / "bin" / "dijiang-export", *args], tmp_path, stdin=turns)
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main([str(a) for a in args]) == 0
    want = capsys.readouterr().out
    assert got.stdout == want and len(want.splitlines()) == 2, (got.stdout, want, got.stderr[-2000:])


def test_a_command_that_needs_torch_names_its_extra(runtime_venv, tiny_src, tmp_path):
    got = _run([runtime_venv / "bin" / "dijiang-export", "convert", tiny_src, "--out", tmp_path / "c"], tmp_path,
               check=False)
    lines = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(lines) == 1, got.stderr
    assert "needs torch" in lines[0] and "pip install 'dijiang-edge[torch]'" in lines[0], lines
    assert not (tmp_path / "c").exists()
