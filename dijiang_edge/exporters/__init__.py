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
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import manifest as M
from ..errors import DiJiangError
from ..manifest import read as read_manifest  # noqa: F401  (the exporters' readers: one function)

MANIFEST = M.NAME
PARITY_TEXT, CALIBRATION_TEXT = "shakespeare", "pydoc"
PARITY_TOKENS = 2048     # tokens of real text each exported file is checked on at export (every format)
FORMATS = {"onnx": "onnx", "pte": "executorch"}     # --formats name -> module
MADE_BY = ".dijiang-export"   # in every folder this tool makes: what --force may replace


def check_out(out: str | Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and even then unless it is a folder
    this tool made (it holds ``MADE_BY``, which every folder made here gets): ``--force``
    never deletes a user's own files.  Commands call it before their expensive work;
    ``staged_dir`` calls it again at the end."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise DiJiangError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.is_symlink() or not (out / MADE_BY).is_file():
        raise DiJiangError(f"{out} was not made by dijiang-export (no {MADE_BY} in it), so --force will "
                           f"not delete it; choose another --out or remove it yourself")


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``out`` only if the block succeeds.

    ``out`` is checked by ``check_out``; a failure half-way leaves no half-written
    ``out`` behind (the scratch folder is removed).
    """
    out = Path(out)
    check_out(out, force)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / MADE_BY).write_text("made by dijiang-export; `--force` may replace this folder\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


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
    if fmt not in FORMATS:
        raise DiJiangError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    try:
        mod = import_module(f".{FORMATS[fmt]}", __name__)
    except ImportError as e:
        raise DiJiangError(f"the {fmt} exporter needs a package that is missing ({e.name}); "
                           f"install it with `pip install 'dijiang-edge[{FORMATS[fmt]}]'`") from None
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
    from ..adapter import applied
    from ..conversion import convert
    from ..tokenizer import save_tokenizer
    exporters = {f: exporter(f) for f in formats}          # fail fast on a missing runtime
    if any(q != "fp32" for q in quants):
        check_texts(parity_text, calibration_text)         # int8 files calibrate: before any work
    routed = route_options(exporters, {**opts, "parity_text": parity_text, "calibration_text": calibration_text})
    check_out(out, force)
    model = convert(model_src, adapter=adapter, **(convert_options or {}))
    memo = Memo(model)
    with staged_dir(out, force) as tmp:
        save_tokenizer(tokenizer_source(model_src, model), tmp)
        files: list[M.FileEntry] = []
        for fmt, fn in exporters.items():
            for q in quants:
                files += fn(model, tmp, quant=q, memo=memo, **routed[fmt])
        calibrated = any(f.get("int8_outliers") for f in files)
        manifest = M.Manifest(
            created=M.now(), source=model.args.source, model=M.ModelFacts.of(model.args), files=files,
            exported_from=_model_path(model_src),
            dijiang={k: getattr(model.args, k) for k in M.DIJIANG_SETTINGS},
            state_shape=list(model.state_shape(1)), tokenizer="tokenizer.json", target=target or None,
            adapter=applied(model),
            texts=M.Texts(parity=parity_text if any(f.parity for f in files) else None,
                          calibration=calibration_text if calibrated else None))
        M.write(tmp, manifest)
    return manifest
