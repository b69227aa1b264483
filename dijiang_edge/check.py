"""``dijiang-export check DIR``: every exported file of a folder against the PyTorch
model on real English text, on each platform tier, as one pass/fail table.

Tiers: the x86 Python runtime (onnxruntime / ``executorch.runtime``) always; the
native C++ runner on x86 and the aarch64 files under emulation where
``runtime.native`` finds its tools (else the row says SKIP and why).  The Python
tier measures what ``parity.py`` measures at export time (teacher-forced relative
error, top-1 agreement, perplexity; greedy tokens from a 32-token prompt).  A native
tier runs the text as its prompt (logits at every position: the same teacher-forced
figures) and then a greedy continuation, which PyTorch sees teacher-forced on the
runner's own tokens: the decode error at every step, and how many greedy tokens
equal PyTorch's choice.

Every tier's figures are ``parity.compare``'s, judged by ``parity.failures`` against
``bars.BARS`` (fp32: relative error and every greedy token identical; int8: top-1
agreement and perplexity change).  Where PyTorch's own float32 run is further than the
fp32 bar from a float64 run of the same model (the un-adapted official variant is
ill-conditioned, ~1e-3, see README *Measured*), the prefill bar is that
float32-vs-float64 error, and the table says so on the row.  The text is the one the
folder's parity was measured on (``manifest.texts.parity``).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .bars import BARS
from .errors import DiJiangError

DEFAULT_TOKENS = 512        # teacher-forced tokens per file: seconds on tiny models, ~minutes on 135M
PROMPT, DECODE, GREEDY = 32, 32, 32
TIERS = {"x86-python": "x86 python runtime", "x86-native": "x86 native C++ runner",
         "aarch64-emulated": "aarch64 emulated"}
TIERS_OF_ARCH = {"x86_64": ("x86-python", "x86-native"), "aarch64": ("x86-python", "aarch64-emulated")}
TIERS_OF_FORMAT = {"pte": tuple(TIERS), "onnx": ("x86-python", "aarch64-emulated")}   # onnxruntime is native on x86


@dataclass
class Row:
    file: str
    format: str
    quant: str
    tier: str
    fig: dict[str, Any] = field(default_factory=dict)
    verdict: str = "PASS"      # PASS | FAIL | SKIP
    note: str = ""


# -- what to check -------------------------------------------------------------------

def target_of(manifest: dict, target: str | None) -> dict | None:
    """The profile to check against: ``--target``, else the one the folder was exported for."""
    if target:
        from .profiles import load_profile
        return load_profile(target).to_manifest()
    return manifest.get("target")


def units(manifest: dict, prof: dict | None, files_glob: str | None = None) -> list[tuple[str, dict]]:
    """``(label, entry)`` per runner to check: each .pte, each ONNX prefill/decode pair
    once (as the exporter measures them), limited to the profile's formats and quants
    and to the paths matching ``files_glob`` (comma-separated shell patterns)."""
    from fnmatch import fnmatch
    from .runtime.onnx import companion
    files = [f for f in manifest.get("files", []) if f["format"] in ("onnx", "pte")]
    if files_glob:
        pats = [p.strip() for p in files_glob.split(",") if p.strip()]
        files = [f for f in files if any(fnmatch(f["path"], p) for p in pats)]
        if not files:
            have = ", ".join(f["path"] for f in manifest.get("files", []))
            raise DiJiangError(f"no exported file matches --files {files_glob!r} (the folder has: {have})")
    if prof:
        files = [f for f in files if f["format"] in prof["formats"] and f["quant"] in prof["quant"]]
        if not files:
            have = ", ".join(sorted({f"{f['format']}/{f['quant']}" for f in manifest.get("files", [])}))
            raise DiJiangError(f"the folder has no files for target {prof['name']} "
                               f"({'/'.join(prof['formats'])} x {'/'.join(prof['quant'])}; it has {have or 'none'})")
    if not files:
        raise DiJiangError("manifest.json lists no .onnx or .pte files; re-export the folder")
    out, seen = [], set()
    for f in files:
        if f["format"] == "onnx":
            pair = (companion(manifest, f, "prefill")["path"], companion(manifest, f, "decode")["path"])
            if pair in seen:
                continue
            seen.add(pair)
            label = pair[0] if pair[0] == pair[1] else f"{pair[0]}+{Path(pair[1]).name}"
            entry = companion(manifest, f, "prefill")
        else:
            label, entry = f["path"], f
        out.append((label, entry))
    return out


def reference_model(manifest: dict, model: str | None):
    """The PyTorch model the files came from: ``--model``, else the manifest's record."""
    from .conversion import convert
    src = model or manifest.get("exported_from") or manifest.get("source", {}).get("name")
    if not src:
        raise DiJiangError("manifest.json does not say which model was exported; pass --model MODEL")
    opts = {k: v for k, v in manifest.get("dijiang", {}).items() if k in ("variant", "chunk_size", "norm_groups", "window",
                                                                                "window_mode")}
    rec = manifest.get("adapter") or {}         # folders from before adapters: none was applied
    try:
        m = convert(src, adapter=rec.get("path") if rec.get("applied") else None, **opts).eval()
    except DiJiangError as e:
        raise DiJiangError(f"cannot load the reference model {src} ({e}); pass --model MODEL "
                           f"(the model the folder was exported from)") from None
    want = manifest.get("model", {})
    bad = [f"{k} {getattr(m.args, k)} != {v}" for k, v in want.items()
           if k in ("vocab_size", "hidden_size", "n_layers", "n_heads") and getattr(m.args, k) != v]
    if bad:
        raise DiJiangError(f"the reference model {src} is not the folder's model ({'; '.join(bad)}); "
                           f"pass --model with the model the folder was exported from")
    return m, str(src)


def parity_text(manifest) -> str:
    """The text the folder's parity figures were measured on (older folders: Shakespeare)."""
    from .exporters import PARITY_TEXT
    return manifest.texts.parity or PARITY_TEXT


# -- PyTorch's side ----------------------------------------------------------------

def fp32_floor(model, ids: np.ndarray) -> float:
    """How far float32 rounding alone moves this model's logits on ``ids``: PyTorch
    float32 vs float64, max relative error (~1e-3 for the un-adapted official form)."""
    import torch
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(ids)[None])
        f32 = model(x)[0].double()
        f64 = copy.deepcopy(model).double()(x)[0]
    return float((f32 - f64).abs().max() / f64.abs().max())


def path_logits(model, prompt: np.ndarray, tokens: list[int]) -> np.ndarray:
    """PyTorch's logits ``[len(tokens), V]`` on a runner's greedy path, computed as the
    runner does (prefill the prompt, then one recurrent step per token): row ``s`` is
    what PyTorch predicts for token ``s`` given the same history."""
    from .parity import BLOCK, torch_step
    state, rows = None, []
    for i in range(0, len(prompt), BLOCK):
        lg, state = torch_step(model, prompt[i:i + BLOCK], state)
    rows.append(lg[-1])
    for t in tokens[:-1]:
        lg, state = torch_step(model, np.array([t], np.int64), state)
        rows.append(lg[-1])
    return np.stack(rows)


# -- tiers ---------------------------------------------------------------------------

def python_tier(folder: Path, entry: dict, manifest: dict, model, ref, threads: int) -> dict:
    """onnxruntime / ``executorch.runtime`` on x86: the export-time figures, measured again."""
    from .parity import measure
    if entry["format"] == "onnx":
        from .runtime.onnx import OnnxRunner
        runner = OnnxRunner(folder, entry, manifest, threads, verify=True, spin=False)
    else:
        try:
            from .runtime.executorch import PteRunner
        except ImportError as e:
            raise _Skip(f"executorch is not installed ({e.name})") from None
        runner = PteRunner(folder / entry["path"], entry, threads)
    return measure(model, runner, ref.ids, ref=ref)


class _Skip(Exception):
    """A tier that cannot run here (tools missing); the row says why."""


def native_tier(tier: str, folder: Path, entry: dict, model, ref, threads: int) -> dict:
    """The C++ runner (x86) or the aarch64 build under emulation, in one run: the text
    as the prompt (its logits at every position: teacher-forced figures), then a greedy
    continuation whose every step PyTorch sees teacher-forced on the same tokens.

    The files are checked against the manifest's checksums first, as the Python tier's
    runners do: the C++ runner would run a modified or truncated ``.pte`` as it is, so a
    file that fails is a FAIL row, never run (even where the tier's tools are missing)."""
    from .manifest import verify_files
    verify_files(folder, entry)
    try:
        from .runtime import native
    except ImportError as e:
        raise _Skip(f"no native runner module in this install ({e})") from None
    arch = "x86_64" if tier == "x86-native" else "aarch64"
    reason = native.missing_tools(arch)
    if reason:
        raise _Skip(reason)
    ids, n = ref.ids, len(ref.greedy)
    steps = tuple(range(n))
    if entry["format"] == "pte":
        res = native.run_pte(folder / entry["path"], ids.tolist(), n, arch=arch, logits_steps=steps,
                             threads=threads, prefill_logits=True)
    else:
        res = native.run_onnx_arm64(folder, entry, ids.tolist(), n, logits_steps=steps, prefill_logits=True)
    return native_figures(model, ref, [int(t) for t in res.tokens][:n], res.logits, TIERS[tier])


def native_figures(model, ref, tokens: list[int], logits: dict[int, np.ndarray], who: str) -> dict:
    """Figures (``parity.compare``) of a native run of ``ref.ids`` + greedy ``tokens``
    (``logits[0]``: every prompt position; ``logits[s]``: the decode call that chose
    ``tokens[s]``), PyTorch seeing the runner's own tokens teacher-forced."""
    from .parity import compare
    ids = ref.ids
    pre = np.asarray(logits.get(0, np.zeros(0)), np.float32)
    if not tokens or pre.ndim != 2 or pre.shape[0] != len(ids):
        raise DiJiangError(f"the {who} returned {len(tokens)} tokens and prefill logits of shape "
                           f"{list(pre.shape)}; expected logits for all {len(ids)} prompt positions")
    path = path_logits(model, ids, tokens)              # PyTorch on the runner's own tokens
    steps = [s for s in sorted(logits) if 0 < s < len(tokens)]
    got_d = np.stack([np.asarray(logits[s], np.float32).reshape(-1) for s in steps]) if steps \
        else np.zeros((0, path.shape[1]), np.float32)
    fig = compare(pre, ref.logits, ids[1:], decode=(got_d, path[steps]),
                  greedy=(tokens, [int(t) for t in path.argmax(-1)]))
    return fig | {"greedy_tokens": len(ref.greedy)}


# -- verdicts ------------------------------------------------------------------------

def judge(row: Row, floor: float | None) -> None:
    """PASS/FAIL against ``BARS`` (``parity.failures``); ``floor``: PyTorch's float32-vs-float64 error."""
    from .parity import failures
    fails, note = failures(row.quant, row.fig, floor)
    row.verdict, row.note = ("FAIL", "; ".join(fails)) if fails else ("PASS", note)


def needs_floor(rows: list[Row]) -> bool:
    bar = BARS["fp32_max_rel_err"]
    return any(r.quant == "fp32" and r.verdict != "SKIP" and r.fig.get("max_rel_err", 0.0) > bar for r in rows)


# -- the command ---------------------------------------------------------------------

def check_folder(folder: str | Path, target: str | None = None, model: str | None = None,
                 tokens: int | None = None, threads: int = 1, files: str | None = None,
                 out: TextIO | None = None) -> bool:
    """Check every file (or the target's) of ``folder`` on each tier; print the table.
    Returns True when no row fails (skipped tiers do not fail)."""
    from .manifest import read as read_manifest
    from .parity import Reference, text_ids
    from .tokenizer import load_tokenizer
    out = out or sys.stdout
    folder = Path(folder)
    manifest = read_manifest(folder)
    prof = target_of(manifest, target)
    todo = units(manifest, prof, files)
    tiers = TIERS_OF_ARCH[prof["arch"]] if prof else tuple(TIERS)
    ref_model, src = reference_model(manifest, model)
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    tok = load_tokenizer(folder) if (folder / "tokenizer.json").exists() else None
    name = parity_text(manifest)
    ids, enc = text_ids(tok, ref_model.args.vocab_size, max(tokens or DEFAULT_TOKENS, PROMPT + DECODE + 1), name)
    text = f"{name}, {enc}"
    ref = Reference(ref_model, ids, prompt=PROMPT, decode=DECODE, greedy=GREEDY)
    print(f"checking {folder} against {src} on {len(ids)} tokens of English text ({text})"
          + (f", target {prof['name']} ({prof['arch']})" if prof else ""), file=out, flush=True)
    rows = run_rows(folder, manifest, todo, tiers, ref_model, ref, threads)
    floor = fp32_floor(ref_model, ids[:256]) if needs_floor(rows) else None
    for r in rows:
        if r.fig:
            judge(r, floor)
    print_table(rows, out)
    return summary(rows, src, out)


def run_rows(folder: Path, manifest: dict, todo: list[tuple[str, dict]], tiers: tuple[str, ...], model, ref,
             threads: int) -> list[Row]:
    """One row per file and tier; a file that cannot run is a FAIL row, not an abort."""
    rows = []
    for label, entry in todo:
        for tier in (t for t in tiers if t in TIERS_OF_FORMAT[entry["format"]]):
            row = Row(label, entry["format"], entry["quant"], tier)
            print(f"[check] {label} on the {TIERS[tier]} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                row.fig = (python_tier(folder, entry, manifest, model, ref, threads) if tier == "x86-python"
                           else native_tier(tier, folder, entry, model, ref, threads))
            except _Skip as e:
                row.verdict, row.note = "SKIP", str(e)
            except DiJiangError as e:
                row.verdict, row.note = "FAIL", str(e)
            rows.append(row)
            what = {"SKIP": "skipped", "FAIL": "failed to run"}.get(row.verdict, "measured")
            print(f"[check] {label} on the {TIERS[tier]}: {what} in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
    return rows


def summary(rows: list[Row], src: str, out: TextIO) -> bool:
    n = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "FAIL", "SKIP")}
    print(f"{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped (bars: fp32 rel err <= "
          f"{BARS['fp32_max_rel_err']:.0e} and greedy identical; int8 top-1 >= "
          f"{100 * BARS['int8_top1_agreement']:.0f}%, perplexity within {100 * BARS['int8_ppl_change']:.0f}%)",
          file=out)
    if any(r.quant == "fp32" and _max_err(r.fig) > 1e-2 for r in rows):
        print(f"note: fp32 files are far from {src}: if the folder was exported from another model "
              f"(an adapted checkpoint), pass it as --model", file=out)
    return n["FAIL"] == 0


def _max_err(fig: dict) -> float:
    """The table's error: the larger of prefill and decode."""
    return max(fig.get("max_rel_err", 0.0), fig.get("decode_max_rel_err", 0.0))


def _fmt(r: Row) -> list[str]:
    f = r.fig
    return [r.file, r.format, r.quant, TIERS[r.tier],
            f"{_max_err(f):.1e}" if "max_rel_err" in f else "-",
            f"{100 * f['top1_agreement']:.1f}%" if "top1_agreement" in f else "-",
            f"{100 * f['ppl_change']:+.2f}%" if "ppl_change" in f else "-",
            f"{f['greedy_identical']}/{f['greedy_tokens']}" if "greedy_tokens" in f else "-", r.verdict, r.note]


def print_table(rows: list[Row], out: TextIO) -> None:
    head = ["file", "format", "quant", "tier", "max rel err", "top-1", "ppl delta", "greedy", "result", "note"]
    cells = [head] + [_fmt(r) for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, width)) + "  " + c[-1], file=out)
