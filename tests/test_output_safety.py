"""Never lose a user's data (issue 15): ``--out`` and ``--force`` touch only what this
tool made, output folders appear by one locked rename (two runs to one new ``--out``:
one wins, one is refused), SIGTERM leaves nothing, dead runs' scratch folders are
cleaned, checkpoints are no pickle and go file by file, ``.pte`` manifests are the same
across two exports apart from ``created``.

CLI cases run ``python -m dijiang_edge.cli`` as a subprocess and check the exit code,
that stderr is one line, and that nothing outside ``--out`` changed."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dijiang_edge.exporters import MADE_BY, OutputExists, Terminated, staged_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dijiang_edge.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dijiang_edge.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listing(folder: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under ``folder`` (not following links, leaving out ``skip``) with its kind,
    size, mtime and link target: equal before and after means nothing there changed."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()
            is_dir = p.is_dir() and not p.is_symlink()      # a folder's own mtime moves with its entries
            out[str(p.relative_to(folder))] = (st.st_mode, None if is_dir else st.st_size,
                                               None if is_dir else st.st_mtime_ns,
                                               os.readlink(p) if p.is_symlink() else None)
    return out


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def work(tmp_path, tiny_src):
    """``tmp_path/work`` holding a user's files, a folder this tool made (``made``), a
    symlink to it, a file, and a subfolder ``sub`` to run from."""
    w = tmp_path / "work"
    (w / "sub").mkdir(parents=True)
    (w / "notes.txt").write_text("the user's own file")
    (w / "mine").mkdir()
    (w / "mine" / "data.bin").write_bytes(b"\x00" * 10)
    (w / "made").mkdir()
    (w / "made" / MADE_BY).write_text("")
    (w / "link").symlink_to("made")
    (w / "afile").write_text("not a folder")
    return w


# -- refusals: exit 2, one line, nothing outside --out changed ---------------------

REFUSALS = [
    # (run from, --out, extra flags, what the line says, the folder whose whole tree must stay)
    ("sub", "..", ["--force"], "not made by dijiang-export", "."),
    (".", ".", ["--force"], "not made by dijiang-export", "."),
    (".", "afile", ["--force"], "not made by dijiang-export", "."),
    (".", "link", ["--force"], "is a symlink", "."),
    (".", "mine", ["--force"], "not made by dijiang-export", "."),
    (".", "mine", [], "already exists", "."),
    (".", "made", [], "already exists", "."),
]


@pytest.mark.parametrize("cwd,out,flags,says,keep", REFUSALS,
                         ids=[f"{c}:{o}{''.join(f)}" for c, o, f, _, _ in REFUSALS])
def test_convert_refuses_out_it_may_not_replace(work, tiny_src, cwd, out, flags, says, keep):
    before = listing(work / keep)
    r = cli("convert", str(tiny_src), "--out", out, *flags, cwd=work / cwd)
    assert r.returncode == 2, r.stderr
    assert says in one_line(r.stderr)
    assert listing(work / keep) == before                 # no partial folder, no lock file, nothing gone


# -- a read-only parent, a full disk: one line, nothing kept --------------------------

def test_read_only_parent_is_refused_before_any_work(work, tiny_src):
    """A folder without write permission (chmod 0555): refused up front. Root may write
    there anyway (os.access says so), then the case cannot be made and is skipped."""
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod 0555 does not stop writes")
        before = listing(work)
        r = cli("convert", str(tiny_src), "--out", "ro/o", cwd=work)
        assert r.returncode == 2, r.stderr
        assert "is not writable" in one_line(r.stderr)
        assert listing(work) == before
    finally:
        ro.chmod(0o755)


def test_read_only_mount_is_refused_before_the_model_loads(work, tiny_src, monkeypatch, capsys):
    """In process, as root too: ``os.access`` says what a read-only mount says (EROFS);
    the refusal comes from ``check_out``, before any conversion."""
    import dijiang_edge.conversion
    from dijiang_edge.cli import main
    from dijiang_edge.exporters import write_errors
    ro, real = work / "mine", os.access
    monkeypatch.setattr(write_errors.os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    monkeypatch.setattr(dijiang_edge.conversion, "convert", lambda *a, **k: pytest.fail("converted first"))
    before = listing(work)
    assert main(["convert", str(tiny_src), "--out", str(ro / "o")]) == 2
    assert "mine is not writable" in one_line(capsys.readouterr().err)
    assert listing(work) == before


@pytest.fixture
def no_bars():
    """In process, transformers was imported before the CLI could set its environment
    switch for progress bars (a subprocess gets it): turned off here, on again after."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def _safetensors_disk_full() -> Exception:
    """What safetensors really raises on a full disk (seen on a 64 KiB tmpfs)."""
    from safetensors import SafetensorError
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


WRITE_FAILURES = [
    # (name, the error the writer raises given the file it writes, the words of the line)
    ("enospc", lambda f: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f)), "no space left"),
    ("enospc-safetensors", lambda f: _safetensors_disk_full(), "no space left"),
    ("erofs", lambda f: OSError(errno.EROFS, os.strerror(errno.EROFS), str(f)), "is not writable"),
    ("eacces-in-out", lambda f: OSError(errno.EACCES, os.strerror(errno.EACCES), str(f)), "is not writable"),
]


@pytest.mark.parametrize("make_error,says", [w[1:] for w in WRITE_FAILURES], ids=[w[0] for w in WRITE_FAILURES])
def test_a_write_that_fails_half_way_is_one_line_and_leaves_nothing(work, tiny_src, monkeypatch, capsys, no_bars,
                                                                      make_error, says):
    """In process, the model writer writes half its file and fails as a full disk or a
    read-only folder does: exit 2, one line, no scratch folder, no lock, no ``--out``."""
    from dijiang_edge.cli import main
    from dijiang_edge.model import DiJiangForCausalLM

    def failing_save(self, folder):
        f = Path(folder) / "model.safetensors"
        f.write_bytes(b"\x00" * 1000)
        raise make_error(f)
    monkeypatch.setattr(DiJiangForCausalLM, "save_pretrained", failing_save)
    before = listing(work)
    assert main(["convert", str(tiny_src), "--out", str(work / "new")]) == 2
    assert says in one_line(capsys.readouterr().err)
    assert listing(work) == before


def test_other_errors_of_a_writer_are_not_disguised(work, tiny_src, monkeypatch):
    """A failure that is not the disk's (a bug, a missing input) keeps its own exception,
    and the scratch folder still goes."""
    from dijiang_edge.cli import main
    from dijiang_edge.model import DiJiangForCausalLM

    def failing_save(self, folder):
        raise OSError(errno.ENOENT, "No such file or directory", "/elsewhere/input.bin")
    monkeypatch.setattr(DiJiangForCausalLM, "save_pretrained", failing_save)
    before = listing(work)
    with pytest.raises(FileNotFoundError):
        main(["convert", str(tiny_src), "--out", str(work / "new")])
    assert listing(work) == before


# -- two runs, one new --out -------------------------------------------------------

def test_two_concurrent_converts_to_one_new_out_one_wins_one_is_refused(work, tiny_src):
    before = listing(work, skip=work / "new")
    procs = [start("convert", str(tiny_src), "--out", "new", cwd=work) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    assert "new already exists" in one_line(loser)
    assert (work / "new" / "model.safetensors").is_file() and (work / "new" / "config.json").is_file()
    assert listing(work, skip=work / "new") == before        # no .new.partial-*, no .new.lock


_WINNER = """
import sys
from dijiang_edge.exporters import staged_dir
with staged_dir(sys.argv[1]) as tmp:
    (tmp / "winner").write_text("first")
"""


def test_the_commit_rechecks_out_under_the_lock(tmp_path):
    """The second run to finish is refused at its commit (not only at its start), and the
    first's folder stays as it was."""
    out = tmp_path / "out"
    with pytest.raises(OutputExists, match="already exists"):
        with staged_dir(out) as tmp:
            (tmp / "loser").write_text("second")
            subprocess.run([sys.executable, "-c", _WINNER, str(out)], env=ENV, check=True, timeout=60)
    assert sorted(p.name for p in out.iterdir()) == sorted([MADE_BY, "winner"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- signals and dead runs ----------------------------------------------------------

def test_sigterm_mid_export_leaves_no_partial_and_no_out(work, tiny_src):
    before = listing(work)
    p = start("export", str(tiny_src), "--out", "ex", "--formats", "onnx", "--parity-tokens", "0", cwd=work)
    polls = 0                  # about 90 s of 5 ms polls (a count, not a clock: tests/test_timing.py)
    while not list(work.glob(".ex.partial-*")):
        polls += 1
        assert p.poll() is None and polls < 18_000, p.communicate()
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    err = p.communicate()[1]
    assert rc == 143, err
    assert err.strip().splitlines()[-1] == "dijiang-export: terminated"
    assert listing(work) == before                          # no .ex.partial-*, no ex, no lock


def _adapt(work: Path, src: Path, budget: str, *flags: str) -> list[str]:
    return ["adapt", str(src), "--data", "train.txt", "--out", "ad", "--stages", "finetune", "--finetune", "full",
            "--token-budget", budget, "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "128",
            "--checkpoint-steps", "1", "--checkpoint-minutes", "0", "--threads", "1", *flags]


def test_sigterm_mid_adapt_stops_cleanly_and_resumes(work, tiny_src, monkeypatch, one_thread):
    """SIGTERM after the first checkpoint: exit 143 with one line that says how to go on,
    no output folder, a whole checkpoint (no .tmp), nothing else touched; ``--resume``
    then finishes the run from it."""
    (work / "train.txt").write_text(" ".join(f"w{(i * 7) % 97}" for i in range(3000)))
    before = listing(work)
    ck = work / "ad-checkpoint"
    p = start(*_adapt(work, tiny_src, "10M"), cwd=work)       # a budget it never reaches: only the signal stops it
    polls = 0                                                  # a count, not a clock (tests/test_timing.py)
    while not (ck / "checkpoint.json").exists():
        polls += 1
        assert p.poll() is None and polls < 18_000, p.communicate()
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    lines = p.communicate()[1].strip().splitlines()
    assert rc == 143, lines
    assert lines[-1] == f"dijiang-export: terminated; run the same command with --resume to continue from the " \
                        f"checkpoint in ad-checkpoint", lines
    assert all(line.startswith("[") for line in lines[:-1]), lines     # the rest: progress lines only
    assert "checkpoint.json" in {f.name for f in ck.iterdir()}
    assert {f.name for f in ck.iterdir()} <= {"checkpoint.json", "checkpoint.0.safetensors", "checkpoint.1.safetensors"}
    assert listing(work, skip=ck) == before                   # no ad, no .ad.partial-*, no lock
    from dijiang_edge.cli import main                          # the resume in process: one interpreter start less
    monkeypatch.chdir(work)
    assert main(_adapt(work, tiny_src, "384", "--resume")) == 0
    assert json.loads((work / "ad" / "report.json").read_text())["resumed"] is True
    assert not ck.exists() and (work / "ad" / "model.safetensors").is_file()
    assert listing(work, skip=work / "ad") == before


@pytest.mark.parametrize("signum,raised", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_in_the_staged_block_removes_the_scratch_folder(tmp_path, signum, raised):
    """In process: the signal becomes an exception there, the scratch folder goes, no
    ``out`` appears, and the handlers from before are back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(KeyboardInterrupt) as e:
        with staged_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"\x00" * 100)
            os.kill(os.getpid(), signum)
            time.sleep(5)                                    # the handler raises long before this ends
    assert e.type is raised
    assert list(tmp_path.iterdir()) == []
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_force_replaces_its_own_folder_and_cleans_a_dead_runs_partial(work, tiny_src):
    """``--force`` on a folder this tool made replaces it; a dead run's marked scratch
    folder to the same ``--out`` is removed (one stderr line), a live run's and an unmarked
    one are left alone, and nothing else changes."""
    dead = work / f".made.partial-{dead_pid()}"
    live = work / f".made.partial-{os.getpid()}"             # this test's own process: alive
    foreign = work / f".made.partial-{dead_pid()}"           # dead, but not marked: not provably ours
    for d in (dead, live):
        d.mkdir()
        (d / MADE_BY).write_text("")
        (d / "model.safetensors").write_bytes(b"\x00" * 100)
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not made by the tool")
    before = listing(work, skip=work / "made")
    r = cli("convert", str(tiny_src), "--out", "made", "--force", cwd=work)
    assert r.returncode == 0, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("dijiang-export: removed ") and dead.name in line and "is gone" in line
    assert (work / "made" / "model.safetensors").is_file() and (work / "made" / MADE_BY).is_file()
    after = listing(work, skip=work / "made")
    assert set(before) - set(after) == {dead.name, f"{dead.name}/{MADE_BY}", f"{dead.name}/model.safetensors"}
    assert {k: v for k, v in before.items() if not k.startswith(dead.name)} == after


# -- checkpoints --------------------------------------------------------------------

def test_a_finished_adapt_run_keeps_a_checkpoint_folders_foreign_files(tmp_path, tiny_src, one_thread):
    """In process (the CLI adds nothing here; test_adapt.py runs the command): after a
    finished run only the checkpoint's own files are gone from ``--checkpoint-dir``."""
    from dijiang_edge.adapt import AdaptConfig, adapt
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "notes.txt").write_text("mine")
    (ck / "checkpoint.json.bak").write_text("also mine")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"w{(i * 7) % 97}" for i in range(3000)))
    before = listing(tmp_path, skip=tmp_path / "adapted")
    cfg = AdaptConfig(stages=("finetune",), token_budget=256, seq_len=32, batch_size=4, eval_tokens=128,
                      eval_batch=4, log_seconds=1e9, warmup_steps=1, checkpoint_steps=1, checkpoint_minutes=0,
                      finetune_mode="full")
    seen = []                                            # the checkpoint really was in ck mid-run
    adapt(str(tiny_src), [str(text)], tmp_path / "adapted", cfg, checkpoint_dir=ck,
          on_step=lambda _: seen.append((ck / "checkpoint.json").exists()))
    assert any(seen)
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.json.bak", "notes.txt"]
    assert listing(tmp_path, skip=tmp_path / "adapted") == before
    assert (tmp_path / "adapted" / "model.safetensors").is_file()


def test_checkpoints_round_trip_without_pickle(tmp_path):
    """Optimizer state (int keys, tuples, 0-d tensors) and every RNG state come back equal;
    a pickle ``checkpoint.pt`` of an older version is refused, never loaded."""
    import random

    import numpy as np
    import torch

    from dijiang_edge.adapt.checkpoint import Checkpointer, set_rng_state
    from dijiang_edge.errors import DiJiangError
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path / "ck", {"seed": 0, "window": [0, "shared"]})
    run = {"current": "finetune", "evals": {"perplexity": {"converted": {"tail": 9.5}}}, "stages": {}}
    for _ in range(3):                                   # both tensor files take a turn
        ck.save(run, dict(m.named_parameters()), opt)
    want = (torch.rand(3), random.random(), np.random.rand())
    blob = ck.load()
    assert blob["run"] == run and blob["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(st[n], blob["optimizer"]["state"][k][n]) for n in st)
    set_rng_state(blob["rng"])                           # the state at the last save, when `want` was drawn
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    names = sorted(p.name for p in ck.folder.iterdir())
    assert names == ["checkpoint.0.safetensors", "checkpoint.1.safetensors", "checkpoint.json"]
    assert b"pickle" not in (ck.folder / "checkpoint.json").read_bytes()
    ck.remove()
    assert not ck.folder.exists()
    ck.folder.mkdir()
    torch.save({"x": 1}, ck.folder / "checkpoint.pt")
    with pytest.raises(DiJiangError, match="pickle checkpoint of an older version"):
        ck.load()


# -- deterministic manifests --------------------------------------------------------

def test_op_names_carry_no_address():
    from dijiang_edge.exporters.executorch import op_name

    def some_python_function(x):
        return x
    assert "0x" in repr(some_python_function)
    assert op_name(some_python_function) == "some_python_function"


def _export_twice(tmp_path: Path, src: Path) -> list[dict]:
    from dijiang_edge.exporters import export
    for i in (1, 2):
        export(str(src), tmp_path / f"e{i}", ["onnx"], ["fp32"], parity_tokens=0)
    return [json.loads((tmp_path / f"e{i}" / "manifest.json").read_text()) for i in (1, 2)]


def _same_apart_from_created(a: dict, b: dict) -> None:
    assert a.pop("created") and b.pop("created")
    assert a == b
    assert not re.search(r"0x[0-9a-f]{6,}", json.dumps(a))        # no memory address anywhere


def test_two_onnx_exports_have_equal_manifests_apart_from_created(tmp_path, tiny_src, one_thread):
    """Fast; the two .pte exports are runtime_tests/test_export_contract.py's (slow) test."""
    _same_apart_from_created(*_export_twice(tmp_path, tiny_src))



@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_checkpoint_write_failure_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, code):
    """A disk that fills (or a folder that turns read-only) while adapt writes a checkpoint:
    one line naming the file, no ``.tmp`` left, the previous checkpoint still loads."""
    import safetensors.torch
    import torch

    from dijiang_edge.adapt.checkpoint import Checkpointer
    from dijiang_edge.errors import DiJiangError
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    ck = Checkpointer(tmp_path / "ck", {"seed": 0})
    ck.save({"step": 1}, dict(m.named_parameters()), opt)

    def full(tensors, path, *a, **k):
        Path(path).write_bytes(b"half")                  # a partial file, as a full disk leaves
        raise OSError(code, os.strerror(code), path)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiJiangError) as e:
        ck.save({"step": 2}, dict(m.named_parameters()), opt)
    assert "\n" not in str(e.value) and "checkpoint" in str(e.value) and os.strerror(code) in str(e.value)
    assert not [p for p in ck.folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert ck.load()["run"] == {"step": 1}
