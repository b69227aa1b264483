"""Every bad input a user can give is one line on stderr and exit 2, before the
expensive work, and changes nothing on disk (issue 15).

One table: each case builds its bad input in its own folder, runs the command line as
a user would (a subprocess), and checks the exit code, that stderr is exactly one
non-empty line (no traceback, no progress bar, no library chatter) and that no file
anywhere under the test's folder appeared, vanished or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import tiny_gguf, tiny_hf, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
Setup = Callable[[Path, dict], list]     # (case folder, shared folders) -> argv (str or bytes items)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A tiny Hugging Face folder, its conversion, its ONNX export and a tiny GGUF file, built once."""
    from dijiang_edge.conversion import convert
    from dijiang_edge.exporters import export
    from dijiang_edge.tokenizer import save_tokenizer
    base = tmp_path_factory.mktemp("bad_inputs")
    src = base / "src"
    tiny_hf("llama").save_pretrained(src)
    word_tokenizer(src)
    conv = base / "conv"
    convert(str(src), adapter=None).save_pretrained(conv)
    save_tokenizer(src, conv)
    exp = base / "exp"
    export(str(src), exp, ["onnx"], ["fp32"], adapter=None, parity_tokens=0, kinds=("native",))
    tiny_gguf(base / "tiny.gguf")
    return {"base": base, "src": src, "conv": conv, "exp": exp, "gguf": base / "tiny.gguf"}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: size and mtime (what a write would change)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def _run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dijiang_edge.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, timeout=120)


# -- the bad inputs --------------------------------------------------------------

def _manifest(data: bytes) -> Setup:
    """A copy of the export folder whose manifest.json holds ``data``."""
    def setup(case: Path, s: dict) -> list:
        shutil.copytree(s["exp"], case / "exp")
        (case / "exp" / "manifest.json").write_bytes(data)
        return ["exp"]
    return setup


def _generate_manifest(data: bytes) -> Setup:
    return lambda case, s: ["generate", *_manifest(data)(case, s), "--prompt", "w1"]


def _check_manifest(data: bytes) -> Setup:
    return lambda case, s: ["check", *_manifest(data)(case, s)]


def _bench_manifest(data: bytes) -> Setup:
    return lambda case, s: ["bench", *_manifest(data)(case, s), "--no-baseline", "--out", "rep"]


def _manifest_without_keys(case: Path, s: dict) -> list:
    m = json.loads((s["exp"] / "manifest.json").read_text())
    del m["model"], m["files"][0]["path"]
    return ["generate", *_manifest(json.dumps(m).encode())(case, s), "--prompt", "w1"]


def _config(data: bytes) -> Setup:
    """The tiny Hugging Face folder with ``config.json`` replaced by ``data``."""
    def setup(case: Path, s: dict) -> list:
        shutil.copytree(s["src"], case / "m")
        (case / "m" / "config.json").write_bytes(data)
        return ["convert", "m", "--out", "o"]
    return setup


def _converted(weights: Callable[[Path], None]) -> Setup:
    """The converted folder with its ``model.safetensors`` damaged by ``weights``."""
    def setup(case: Path, s: dict) -> list:
        shutil.copytree(s["conv"], case / "c")
        weights(case / "c" / "model.safetensors")
        return ["generate", "c", "--prompt", "w1"]
    return setup


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _llama_default_config(case: Path, s: dict) -> list:
    """The issue's worst case: a config of only the model type (a 7B model by default)."""
    shutil.copytree(s["src"], case / "m")
    (case / "m" / "config.json").write_text('{"model_type": "llama"}')
    return ["convert", "m", "--out", "o"]


def _existing_out(case: Path, s: dict) -> list:
    (case / "o").mkdir()
    (case / "o" / "mine.txt").write_text("keep")
    return ["convert", str(s["src"]), "--out", "o"]


def _gen(*flags) -> Setup:
    return lambda case, s: ["generate", str(s["exp"]), "--prompt", "w1", *flags]


def _gen_torch(*flags) -> Setup:
    return lambda case, s: ["generate", str(s["src"]), "--no-adapter", "--prompt", "w1", *flags]


def _chat_template(text: str) -> Setup:
    def setup(case: Path, s: dict) -> list:
        (case / "t.jinja").write_text(text)
        return ["chat", str(s["exp"]), "--chat-template", "t.jinja"]
    return setup


def _bench(*flags) -> Setup:
    return lambda case, s: ["bench", str(s["exp"]), "--no-baseline", "--out", "rep", *flags]


def _export(*flags) -> Setup:
    return lambda case, s: ["export", str(s["src"]), "--no-adapter", "--out", "o", *flags]


def _prompt(value) -> Setup:
    def setup(case: Path, s: dict) -> list:
        return ["generate", str(s["exp"]), "--prompt", value]
    return setup


def _prompt_torch(value) -> Setup:
    return lambda case, s: ["generate", str(s["src"]), "--no-adapter", "--prompt", value]


CASES: dict[str, tuple[Setup, str]] = {     # name -> (setup, a word the one line must hold)
    # corrupt manifest.json in every reader
    "generate-manifest-random": (_generate_manifest(bytes(np.random.default_rng(0).integers(0, 256, 300,
                                                                                             np.uint8))), "UTF-8"),
    "generate-manifest-utf16": (_generate_manifest('{"created": "x"}'.encode("utf-16")), "UTF-8"),
    "generate-manifest-list": (_generate_manifest(b"[]"), "not a JSON object"),
    "generate-manifest-null": (_generate_manifest(b"null"), "not a JSON object"),
    "generate-manifest-missing-keys": (_manifest_without_keys, "lacks"),
    "check-manifest-random": (_check_manifest(b"\x80\x81garbage\xff"), "UTF-8"),
    "check-manifest-null": (_check_manifest(b"null"), "not a JSON object"),
    "bench-manifest-utf16": (_bench_manifest('{"files": []}'.encode("utf-16")), "UTF-8"),
    "bench-manifest-list": (_bench_manifest(b"[]"), "not a JSON object"),
    # config.json and weights
    "convert-config-invalid-json": (_config(b'{"model_type": "llama",'), "not valid JSON"),
    "convert-config-not-utf8": (_config(b'{"model_type": "ll\xff\xfeama"}'), "not UTF-8"),
    "convert-config-list": (_config(b"[1, 2]"), "not an object"),
    "generate-converted-truncated": (_converted(_truncate), "truncated"),
    "generate-converted-missing": (_converted(lambda p: p.unlink()), "missing"),
    "generate-converted-empty": (_converted(lambda p: p.write_bytes(b"")), "too short"),
    "convert-out-exists": (_existing_out, "already exists"),
    "export-out-exists": (lambda case, s: ["export", *_existing_out(case, s)[1:]], "already exists"),
    # prompts
    "generate-empty-prompt-torch": (_prompt_torch(""), "empty"),
    "generate-empty-prompt-export": (_prompt(""), "empty"),
    "generate-non-utf8-prompt-torch": (_prompt_torch(b"w1 \xff\xfe"), "UTF-8"),
    "generate-non-utf8-prompt-export": (_prompt(b"\xc3("), "UTF-8"),
    # sampling and runtime flags
    "generate-top-k-over-vocab-export": (_gen("--temperature", "1", "--top-k", "1000"), "--top-k"),
    "generate-top-k-over-vocab-torch": (_gen_torch("--temperature", "1", "--top-k", "98"), "--top-k"),
    "generate-top-k-over-vocab-gguf": (lambda case, s: ["generate", str(s["gguf"]), "--prompt", "abc",
                                                         "--temperature", "1", "--top-k", "98"], "--top-k"),
    "generate-top-k-negative": (_gen("--top-k", "-1"), "--top-k"),
    "generate-temperature-nan": (_gen("--temperature", "nan"), "--temperature"),
    "generate-temperature-negative": (_gen("--temperature", "-0.5"), "--temperature"),
    "generate-temperature-text": (_gen("--temperature", "hot"), "--temperature"),
    "generate-top-p-zero": (_gen("--top-p", "0"), "--top-p"),
    "generate-threads-negative": (_gen("--threads", "-1"), "--threads"),
    "generate-max-new-tokens-negative": (_gen("--max-new-tokens", "-3"), "--max-new-tokens"),
    "generate-repetition-penalty-zero": (_gen("--repetition-penalty", "0"), "--repetition-penalty"),
    "generate-stop-empty": (_gen("--stop", ""), "--stop"),
    # chat: the template is found (or not) before the model is loaded
    "chat-no-template-export": (lambda case, s: ["chat", str(s["exp"])], "no chat template"),
    "chat-no-template-torch": (lambda case, s: ["chat", str(s["src"]), "--no-adapter"], "no chat template"),
    "chat-template-file-missing": (lambda case, s: ["chat", str(s["exp"]), "--chat-template", "nope.jinja"],
                                   "--chat-template"),
    "chat-template-not-jinja": (_chat_template("{% for %}"), "not valid Jinja"),
    "chat-non-utf8-system": (lambda case, s: ["chat", str(s["exp"]), "--system", b"\xff"], "--system"),
    "chat-top-k-over-vocab": (lambda case, s: ["chat", str(s["exp"]), "--top-k", "1000"], "--top-k"),
    "check-threads-negative": (lambda case, s: ["check", str(s["exp"]), "--threads", "-1"], "--threads"),
    "check-tokens-zero": (lambda case, s: ["check", str(s["exp"]), "--tokens", "0"], "--tokens"),
    # bench flags
    "bench-tokens-text": (_bench("--tokens", "many"), "--tokens"),
    "bench-lengths-text": (_bench("--lengths", "128,lots"), "--lengths"),
    "bench-lengths-zero": (_bench("--lengths", "0"), "--lengths"),
    "bench-threads-text": (_bench("--threads", "two"), "--threads"),
    "bench-rounds-float": (_bench("--rounds", "1.5"), "--rounds"),
    "bench-bandwidth-text": (_bench("--bandwidth-mib", "1G"), "--bandwidth-mib"),
    "bench-count-tokens-negative": (_bench("--native", "x86_64", "--count-tokens", "-1"), "--count-tokens"),
    # export flags
    "export-parity-tokens-negative": (_export("--parity-tokens", "-5"), "--parity-tokens"),
    "export-parity-tokens-too-few": (_export("--parity-tokens", "16"), "--parity-tokens"),
    "export-max-context-zero": (_export("--formats", "pte", "--max-context", "0"), "--max-context"),
    "export-chunk-size-zero": (_export("--chunk-size", "0"), "--chunk-size"),
    "export-onnx-only-quant-for-pte": (_export("--formats", "onnx,pte", "--quant", "int8_dynamic"), "int8_dynamic"),
    "export-unknown-quant": (_export("--quant", "int3"), "int3"),
    # adapt / evaluate flags
    "adapt-batch-size-zero": (lambda case, s: ["adapt", str(s["src"]), "--out", "o", "--batch-size", "0"],
                              "--batch-size"),
    "adapt-kl-weight-nan": (lambda case, s: ["adapt", str(s["src"]), "--out", "o", "--kl-weight", "nan"],
                            "--kl-weight"),
    "evaluate-seq-len-text": (lambda case, s: ["evaluate", str(s["src"]), "--seq-len", "long"], "--seq-len"),
}


# -- bad inputs on a .pte path: the runtime's native log must not add lines -----------

def _pte_copy(case: Path, s: dict, damage: Callable[[Path], None], keep_checksums: bool = False) -> Path:
    """A copy of the .pte export with ``damage`` done to it (its checksums dropped, so the
    runtime itself reads the damaged file, unless ``keep_checksums``)."""
    d = case / "pte"
    shutil.copytree(s["pte"], d)
    damage(d)
    if not keep_checksums:
        m = json.loads((d / "manifest.json").read_text())
        for f in m["files"]:
            f.pop("checksums", None)
        (d / "manifest.json").write_text(json.dumps(m))
    return d


def _tokenizer_past_vocab(d: Path) -> None:
    """A tokenizer.json whose word "big" is id 500 of a 97-token model: refused at the
    first forward call, after the program (and the XNNPACK delegate) has loaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "big": 500}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def _pte_file(data: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        f = d / "model_fp32.pte"
        f.write_bytes(data(f.read_bytes()))
    return damage


def _pte_generate(damage: Callable[[Path], None], prompt: str = "w1", keep_checksums: bool = False) -> Setup:
    return lambda case, s: ["generate", str(_pte_copy(case, s, damage, keep_checksums)), "--prompt", prompt,
                            "--threads", "2"]


PTE_CASES: dict[str, tuple[Setup, str]] = {
    "generate-pte-tokenizer-past-vocab": (_pte_generate(_tokenizer_past_vocab, "big"), "[0, 97)"),
    "generate-pte-truncated-unchecked": (_pte_generate(_pte_file(lambda b: b[:len(b) // 2])), "truncated or corrupt"),
    "generate-pte-random-bytes": (_pte_generate(_pte_file(lambda b: bytes(np.random.default_rng(1).integers(
        0, 256, 3000, np.uint8))), "w1"), "not an ExecuTorch program"),
    "generate-pte-modified": (_pte_generate(_pte_file(lambda b: b[:-1] + bytes([b[-1] ^ 1])), keep_checksums=True),
                              "sha256"),
}


@pytest.fixture(scope="module")
def pte_shared(shared: dict) -> dict[str, Path]:
    """``shared`` plus a one-layer model's fp32 ``.pte`` export (tens of seconds: built only
    for the cases that need it)."""
    pytest.importorskip("executorch.runtime")
    from dijiang_edge.exporters import export
    src = shared["base"] / "src1"
    tiny_hf("llama", layers=1).save_pretrained(src)
    word_tokenizer(src)
    out = shared["base"] / "pte"
    export(str(src), out, ["pte"], ["fp32"], adapter=None, parity_tokens=0, convert_options={"chunk_size": 8},
           max_seq_len=16)
    return {**shared, "pte": out}


@pytest.mark.parametrize("name", list(PTE_CASES))
def test_bad_input_on_a_pte_path_is_one_line(name: str, pte_shared: dict) -> None:
    _check_case(name, *PTE_CASES[name], pte_shared)


def test_generate_on_a_pte_prints_only_its_summary_on_stderr(pte_shared: dict) -> None:
    """A normal .pte run: stdout the text, stderr the one summary line (no cpuinfo or
    threadpool lines of the runtime)."""
    r = _run(["generate", str(pte_shared["pte"]), "--prompt", "w1 w2", "--max-new-tokens", "4", "--threads", "2"],
             pte_shared["base"])
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert r.stdout.decode().startswith("w1 w2") and len(r.stdout.decode().split()) == 6
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[4 tokens;") and lines[0].endswith("pte fp32]"), err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name: str, shared: dict) -> None:
    _check_case(name, *CASES[name], shared)


def _check_case(name: str, setup: Setup, word: str, shared: dict) -> None:
    """Run one case in its own folder: exit 2, one non-empty stderr line holding ``word``,
    no traceback, nothing under the test's folder changed."""
    case = shared["base"] / "cases" / name
    case.mkdir(parents=True)
    argv = setup(case, shared)
    before = _snapshot(shared["base"])
    r = _run(argv, case)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (argv, r.returncode, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), (argv, err[-2000:])
    assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err
    assert _snapshot(shared["base"]) == before, f"{argv} changed files on disk"


def test_default_config_fails_fast_with_little_memory(shared: dict, tmp_path: Path) -> None:
    """The 7B-by-default config is refused from the headers, not after building the model:
    the child's peak RSS stays far under 1 GB (the issue saw 20 GB and the OOM killer)."""
    argv = _llama_default_config(tmp_path, shared)
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'dijiang_edge.cli', *sys.argv[1:]], stdout=subprocess.DEVNULL); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)   # no clock read here (test_timing): the timeout bounds it
    rc, peak_kib = r.stdout.split()
    lines = r.stderr.splitlines()
    assert int(rc) == 2 and len(lines) == 1 and "does not match" in lines[0], (rc, r.stderr[-2000:])
    assert int(peak_kib) < 1 << 20, f"peak RSS {int(peak_kib) >> 10} MiB"
    assert not (tmp_path / "o").exists()


def test_runners_refuse_token_ids_outside_the_vocabulary(shared: dict) -> None:
    """A graph's gather with id -1 or >= vocab reads another row (or out of bounds) silently."""
    from dijiang_edge.errors import DiJiangError
    from dijiang_edge.runtime import open_export
    r = open_export(shared["exp"], "onnx", "fp32", threads=1)
    assert r.forward(np.array([[0, 96]])).shape == (1, 2, 97)
    for bad in (-1, 97):
        r.reset()
        with pytest.raises(DiJiangError, match=r"\[0, 97\)"):
            r.forward(np.array([[3, bad]]))


def test_quant_names_of_every_format_checked_before_any_export() -> None:
    """The export API's up-front check: a name one format lacks fails before the other's files."""
    from dijiang_edge.errors import DiJiangError
    from dijiang_edge.validate import check_quant_names
    check_quant_names(["onnx", "pte"], ["fp32", "int8", "int4"])
    with pytest.raises(DiJiangError, match="int8_dynamic"):
        check_quant_names(["onnx", "pte"], ["fp32", "int8_dynamic"])
    with pytest.raises(DiJiangError, match="8da4w"):
        check_quant_names(["onnx"], ["8da4w"])


def test_native_log_lines_are_caught_on_both_paths(capfd) -> None:
    """ExecuTorch logs through ``sys.stderr``, the cpuinfo library writes to descriptor 2:
    both are caught while a program loads (and kept, for the error line), nothing after."""
    from dijiang_edge.runtime import clog
    lines: list[str] = []
    with clog.captured(lines):
        os.write(2, b"Error in cpuinfo: failed to parse the list of possible processors\n")
        print("[program.cpp:114] File size is too small.", file=sys.stderr)
    print("our own line", file=sys.stderr)
    assert capfd.readouterr().err == "our own line\n"
    assert lines == ["Error in cpuinfo: failed to parse the list of possible processors",
                     "[program.cpp:114] File size is too small."]
    assert clog.last_line(lines) == "File size is too small."
