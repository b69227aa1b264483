"""Export targets, one module each (``onnx.py``, ``executorch.py``), and what they
share: the output folder that appears only when complete, the tokenizer, the texts,
the results several quantizations of one model reuse (``Memo``).

An exporter is ``export(model, out_dir, quant, **opts) -> list[manifest.FileEntry]``:
it writes its files into ``out_dir`` and returns one entry per file (``format``,
``quant``, ``path``, ``role``, state names/shapes, ``parity`` figures measured at
export time).  An option it does not know is an error, not silently dropped.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import signal
import sys
import threading
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:                  # Windows: no flock; the commit is then a plain rename
    fcntl = None

from .. import manifest as M
from ..errors import DiJiangError
from ..progress import stage
from ..manifest import read as read_manifest  # noqa: F401  (the exporters' readers: one function)
from .write_errors import check_writable, write_failure

MANIFEST = M.NAME
PARITY_TEXT, CALIBRATION_TEXT = "shakespeare", "pydoc"
PARITY_TOKENS = 2048     # tokens of real text each exported file is checked on at export (every format)
FORMATS = {"onnx": "onnx", "pte": "executorch"}     # --formats name -> module
MADE_BY = ".dijiang-export"   # in every folder this tool makes: what --force may replace


class OutputExists(DiJiangError):
    """``--out`` exists and ``--force`` was not given (a caller that makes a shared
    cache folder treats it as "someone else made it first")."""


def check_out(out: str | Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and even then unless it is a folder
    this tool made (it holds ``MADE_BY``, which every folder made here gets): ``--force``
    never deletes a user's own files.  Commands call it before their expensive work;
    ``staged_dir`` calls it again at entry and under the lock at commit."""
    out = Path(out)
    if not Path(os.path.abspath(out)).name:
        raise DiJiangError(f"--out {out} names no folder of its own; give a new folder's name")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExists(f"{out} already exists; choose another --out or pass --force to replace it")
        if out.is_symlink():
            raise DiJiangError(f"{out} is a symlink, so --force will not replace it; choose another --out "
                               "or remove it yourself")
        if not (out / MADE_BY).is_file():
            raise DiJiangError(f"{out} was not made by dijiang-export (no {MADE_BY} in it), so --force will "
                               f"not delete it; choose another --out or remove it yourself")
    check_writable(out)


_ACTIVE: set[Path] = set()     # scratch folders this process is writing now


def _partial_name(out: Path, pid: int) -> Path:
    return out.with_name(f".{out.name}.partial-{pid}")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive: not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def clean_stale_partials(out: str | Path) -> list[Path]:
    """Remove the scratch folders of earlier runs to ``out`` whose process is gone.

    Only folders named ``.OUT.partial-PID`` that hold ``MADE_BY`` (or are empty: a run
    killed between mkdir and the marker) and whose PID no longer runs; a live run's
    folder is left alone.  Each removal is said on stderr in one line, so a user who
    wonders where disk space went sees it.  Returns the folders removed."""
    out = Path(os.path.abspath(out))
    removed = []
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        prefix = next((x for x in prefixes if p.name.startswith(x)), None)
        pid = p.name[len(prefix):] if prefix else ""
        if not pid.isdigit() or p.is_symlink() or not p.is_dir():
            continue
        if int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if (p / MADE_BY).is_file():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.rmdir()                 # only when empty; anything else is not provably ours
            except OSError:
                continue
        if not p.exists():
            removed.append(p)
            print(f"dijiang-export: removed {p}, left by an export that did not finish (process {pid} is gone)",
                  file=sys.stderr, flush=True)
    return removed


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, ``docker stop`` and CI cancellation send) turned into an
    exception, so the ``finally``/``except`` blocks that remove scratch folders run."""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt``,
    each once: a second signal during the cleanup is ignored so the cleanup finishes.
    The old handlers are restored after.  Outside the main thread (where Python allows no
    handlers) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)   # None: a handler set from C


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.OUT.lock`` beside ``out``, made here and removed here.

    The file is unlinked while still locked; a waiter that then gets the lock on the
    unlinked file sees that the path no longer names its file and takes the lock again,
    so two holders never hold locks on two different files."""
    if fcntl is None:
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise DiJiangError(f"cannot create the lock file {lock} ({e.strerror}); check that "
                               f"{lock.parent} is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT held back until the block ends: between renaming the old
    ``out`` aside and the new one in, an interruption would leave neither."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    sigs = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Make ``tmp`` into ``out`` under the lock, after checking ``out`` again: another run
    may have made it since the check at the start (then this one is refused, and the
    other's folder stays).  A replaced folder is first renamed aside, so ``out`` is
    always either the old or the new complete folder."""
    with _out_lock(out), signals_deferred():
        check_out(out, force)
        if not (out.exists() or out.is_symlink()):
            tmp.rename(out)
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``out`` only if the block succeeds.

    ``out`` is checked by ``check_out`` before the scratch folder exists (a file or a
    symlink named with ``--force`` leaves nothing behind), and again under a lock at the
    commit, which is one rename.  Scratch folders of dead earlier runs to ``out`` are
    removed first.  A failure, Ctrl-C or SIGTERM half-way removes the scratch folder; a
    full disk or a read-only folder is then one ``DiJiangError`` line (``write_errors``).
    """
    check_out(out, force)
    out = Path(os.path.abspath(out))         # `..` or `.` has no name to put scratch names beside
    clean_stale_partials(out)
    tmp = _partial_name(out, os.getpid())
    if tmp in _ACTIVE:
        raise DiJiangError(f"{out} is being written by another export in this process; choose another --out")
    if tmp.exists() or tmp.is_symlink():    # a dead run's of this PID (reused): ours only if marked
        if tmp.is_symlink() or not (tmp / MADE_BY).is_file():
            raise DiJiangError(f"{tmp} is in the way of the scratch folder; remove it and run again")
        shutil.rmtree(tmp)
    _ACTIVE.add(tmp)
    with signals_raise():
        try:
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                raise DiJiangError(f"cannot create {tmp} ({e.strerror}); check that {out.parent} "
                                   "is writable") from None
            (tmp / MADE_BY).write_text("made by dijiang-export; `--force` may replace this folder\n")
            yield tmp
            _commit(tmp, out, force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            full = write_failure(e, out, tmp) if isinstance(e, Exception) else None
            if full is not None:             # a full disk or read-only folder: one line, not a traceback
                raise full from None
            raise
        finally:
            _ACTIVE.discard(tmp)


class Memo:
    """Results the calls of one export share for one model (traced graphs, the PyTorch
    reference): computed once per key.  Made per ``export`` call, never process-wide,
    so no later model can be handed an earlier model's results."""

    def __init__(self, model: Any):
        self.model, self._values = model, {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]


def memo_for(model: Any, memo: Memo | None) -> Memo:
    """``memo`` when it is ``model``'s, else a fresh one (a direct exporter call)."""
    if memo is not None and memo.model is not model:
        raise DiJiangError("internal error: an export memo was passed with another model; please report it")
    return memo or Memo(model)


def check_texts(parity_text: str, calibration_text: str | None) -> None:
    """Calibration and parity on one text would flatter the file: refused."""
    if calibration_text is not None and calibration_text == parity_text:
        raise DiJiangError(f"the parity text and the calibration text are both {parity_text!r}; choose "
                           f"two different texts (--parity-text, --calibration-text)")


def route_options(exporters: dict[str, Callable], opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each exporter's share of ``opts`` (the keyword options its ``export`` declares);
    an option no chosen exporter declares is refused, so a misspelling is not dropped."""
    takes = {f: set(inspect.signature(fn).parameters) - {"model", "lm", "out_dir", "quant"}
             for f, fn in exporters.items()}
    unknown = sorted(set(opts) - set().union(*takes.values()))
    if unknown:
        have = "; ".join(f"{f}: {', '.join(sorted(t))}" for f, t in takes.items())
        raise DiJiangError(f"unknown export option(s) {', '.join(unknown)} for format(s) "
                           f"{', '.join(exporters)} (options: {have})")
    return {f: {k: v for k, v in opts.items() if k in takes[f]} for f in exporters}


def exporter(fmt: str) -> Callable[..., list[M.FileEntry]]:
    from ..extras import EXPORTER_NEEDS, install_hint, require
    if fmt not in FORMATS:
        raise DiJiangError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    require(EXPORTER_NEEDS[fmt], f"the {fmt} exporter")     # its parity check's runtime included
    try:
        mod = import_module(f".{FORMATS[fmt]}", __name__)
    except ImportError as e:
        raise DiJiangError(f"the {fmt} exporter needs a package that is missing ({e.name}); "
                           f"install it with `{install_hint([(e.name or '').split('.')[0]])}`") from None
    return mod.export


def tokenizer_source(model_src: str | Path, model) -> str | Path:
    """Where the tokenizer of ``model_src`` lives: beside it, or beside its source."""
    p = Path(str(model_src)).expanduser()
    if str(model_src) == "default" or (p / "tokenizer.json").exists() or p.suffix == ".gguf":
        return model_src
    return model.args.source.get("name", model_src)


def _model_path(model_src: str | Path) -> str:
    """``model_src`` as given to ``convert``: an absolute path when it is one."""
    p = Path(str(model_src)).expanduser()
    return str(p.resolve()) if p.exists() else str(model_src)


def _genai(model, out: Path, files: list[M.FileEntry], target: dict | None, onnx_opts: dict[str, Any],
           memo: Memo) -> dict | None:
    """The onnxruntime-genai layout of the ONNX files (``genai.py``), checked at export as
    they were (same text and token count; skipped, and said so, without onnxruntime-genai)."""
    from . import genai
    record = genai.export(out, model.args, files, target)
    tokens = onnx_opts.get("parity_tokens", PARITY_TOKENS)
    if record and tokens:
        genai.check(model, out, record, tokens, onnx_opts.get("threads", 0), onnx_opts["parity_text"], memo)
    return record


def export(model_src: str, out: str | Path, formats: list[str], quants: list[str],
           force: bool = False, convert_options: dict | None = None, target: dict | None = None,
           parity_text: str = PARITY_TEXT, calibration_text: str = CALIBRATION_TEXT,
           adapter: str | Path | None = "auto", **opts: Any) -> M.Manifest:
    """Convert ``model_src`` and export it in each format and quantization into ``out``.

    ``target``: the device profile the files are for (``profiles.Profile.to_manifest``);
    ``parity_text``/``calibration_text``: the English texts of the parity figures and of
    the int8 calibration (names of ``text.CORPORA`` or text files), both recorded in the
    manifest; ``adapter``: as for ``conversion.convert`` (the manifest records which one
    was applied, or none).  Returns the manifest (also written to ``out/manifest.json``).
    """
    from .. import chat_format
    from ..adapter import applied
    from ..conversion import convert
    from ..tokenizer import save_tokenizer
    from ..validate import check_quant_names
    exporters = {f: exporter(f) for f in formats}          # fail fast on a missing runtime
    check_quant_names(formats, quants)                     # a name one format lacks: before any file
    if any(q != "fp32" for q in quants):
        check_texts(parity_text, calibration_text)         # int8 files calibrate: before any work
    routed = route_options(exporters, {**opts, "parity_text": parity_text, "calibration_text": calibration_text})
    for fmt in exporters:                                  # option values no model is needed to judge
        check = getattr(import_module(f".{FORMATS[fmt]}", __name__), "check_options", None)
        if check:
            check(**routed[fmt])
    check_out(out, force)
    model = convert(model_src, adapter=adapter, **(convert_options or {}))
    memo = Memo(model)
    with staged_dir(out, force) as tmp:
        save_tokenizer(tokenizer_source(model_src, model), tmp)
        chat = chat_format.write(tmp)                      # the Android app's turn pieces
        print(f"[export] {chat_format.NAME}: {chat['source']}", file=sys.stderr, flush=True)
        files: list[M.FileEntry] = []
        jobs = [(fmt, q) for fmt in exporters for q in quants]
        for i, (fmt, q) in enumerate(jobs, 1):
            with stage("export", f"{fmt} {q} ({i} of {len(jobs)})", heartbeat=False):   # inner steps say more
                files += exporters[fmt](model, tmp, quant=q, memo=memo, **routed[fmt])
        genai_record = _genai(model, tmp, files, target, routed["onnx"], memo) if "onnx" in exporters else None
        calibrated = any(f.get("int8_outliers") for f in files)
        manifest = M.Manifest(
            created=M.now(), source=model.args.source, model=M.ModelFacts.of(model.args), files=files,
            exported_from=_model_path(model_src),
            dijiang={k: getattr(model.args, k) for k in M.DIJIANG_SETTINGS},
            state_shape=list(model.state_shape(1)), tokenizer="tokenizer.json", target=target or None,
            adapter=applied(model),
            texts=M.Texts(parity=parity_text if any(f.parity for f in files) else None,
                          calibration=calibration_text if calibrated else None),
            extras={"chat_format": {"file": chat_format.NAME, "source": chat["source"]}}
            | ({"genai": genai_record} if genai_record else {}))
        M.write(tmp, manifest)
    return manifest
