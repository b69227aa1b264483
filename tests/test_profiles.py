"""Device profiles (``export/profiles/*.toml``): every shipped one loads and is
self-consistent; an unknown target or a malformed file is one clear error that names
the targets, or the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.profiles import ARCHES, available, load_profile

GOOD = """description = "a test board"
arch = "aarch64"
formats = ["onnx"]
quant = ["fp32"]
threads = 2
max_context = 1024
"""


def test_shipped_profiles_load():
    names = available()
    assert {"android-arm64", "linux-arm64", "x86-laptop"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.arch in ARCHES and p.description and p.max_context > 0
        assert p.quants() and set(p.formats) <= {"onnx", "pte"}
        m = p.to_manifest()
        assert m["name"] == n and m["path"] == f"{n}.toml" and m["arch"] == p.arch
        if "pte" in p.formats:   # the .pte's runner enforces the profile's context limit
            assert p.export_options(["pte"])["max_context_len"] == p.max_context
    assert load_profile("android-arm64").arch == "aarch64" and load_profile("x86-laptop").arch == "x86_64"
    assert "int8" in load_profile("android-arm64").quant


def test_unknown_target_lists_the_available_ones():
    with pytest.raises(DiJiangError) as e:
        load_profile("nokia-3310")
    for n in available():
        assert n in str(e.value)


def test_unknown_target_on_the_command_line(tmp_path, capsys):
    code = main(["export", "default", "--out", str(tmp_path / "o"), "--target", "nokia-3310"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nokia-3310" in err[0] and "android-arm64" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_profile_file_path_is_accepted(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(GOOD)
    p = load_profile(str(f))
    assert (p.name, p.arch, p.formats, p.quant, p.threads) == ("board", "aarch64", ("onnx",), ("fp32",), 2)


@pytest.mark.parametrize("text,field", [
    (GOOD.replace('arch = "aarch64"', 'arch = "riscv64"'), "arch"),
    (GOOD.replace("threads = 2\n", ""), "threads"),
    (GOOD.replace("threads = 2", 'threads = "four"'), "threads"),
    (GOOD.replace('formats = ["onnx"]', 'formats = ["tflite"]'), "formats"),
    (GOOD.replace('quant = ["fp32"]', "quant = []"), "quant"),
    (GOOD.replace('quant = ["fp32"]', 'quant = ["8da4w"]'), "quant"),         # a .pte recipe for an ONNX profile
    (GOOD.replace('formats = ["onnx"]', 'formats = ["pte"]').replace('["fp32"]', '["int3"]'), "quant"),
    (GOOD.replace("max_context = 1024", "max_context = 0"), "max_context"),
    (GOOD + "max_seq_len = 4096\n", "max_seq_len"),
    (GOOD + 'variant = "softmax"\n', "variant"),
    (GOOD + "thread = 4\n", "thread"),                                          # a typo is not ignored
])
def test_malformed_profile_names_file_and_field(tmp_path, text, field):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DiJiangError) as e:
        load_profile(str(f))
    assert str(f) in str(e.value) and f"'{field}'" in str(e.value), str(e.value)


def test_not_toml_is_a_clear_error(tmp_path):
    (tmp_path / "broken.toml").write_text("arch = [unclosed\n")
    with pytest.raises(DiJiangError, match="broken.toml is not valid TOML"):
        load_profile("broken", folder=tmp_path)


def test_outside_a_checkout_the_installed_copy_is_used(tmp_path, monkeypatch):
    """A wheel install has no export/ beside the package: ``--target`` then reads the copy
    the wheel carries (dijiang_edge/_export/profiles), and the runner's sources likewise."""
    from dijiang_edge import shipped
    from dijiang_edge.runtime.native import tools
    repo = shipped.CHECKOUT
    assert load_profile("android-arm64").path == str(repo / "export" / "profiles" / "android-arm64.toml")
    installed = tmp_path / "site" / "dijiang_edge"
    (installed / "_export" / "profiles").mkdir(parents=True)
    (installed / "_export" / "profiles" / "board.toml").write_text(GOOD)
    monkeypatch.setattr(shipped, "CHECKOUT", tmp_path / "site")          # no pyproject.toml, no export/
    monkeypatch.setattr(shipped, "files", lambda pkg: installed)
    assert available() == ["board"] and load_profile("board").arch == "aarch64"
    assert tools.runner_source() == installed / "_export" / "runner"
    assert "missing from this install" in tools.missing_tools("x86_64")
    monkeypatch.delenv("DIJIANG_RUNNER_BUILD", raising=False)
    assert tools.build_dir("x86_64") == Path.home() / ".cache" / "dijiang_edge" / "runner" / "x86_64"
