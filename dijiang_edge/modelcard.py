"""The model card (``README.md``) every converted, adapted or transformers-saved folder carries.

Everything on it is read from the folder itself: ``config.json`` (the DiJiang
settings, the source model, the adapter applied), ``report.json`` when ``adapt``
wrote the folder, else the applied adapter's own recorded figures.  The base model's
license is read from the source where it says one (a ``README.md`` front matter, a
GGUF's ``general.license``); where nothing says, the card says to see the base model
rather than guess.  Torch-free.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import DiJiangError

CARD = "README.md"
UNKNOWN_LICENSE = "see the base model"
ADAPTER_META_KEY = "dijiang_edge_adapter"    # adapter.META_KEY (adapter.py imports torch)
HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


# -- facts about the base model ---------------------------------------------------

def base_facts(source: dict[str, Any]) -> dict[str, str | None]:
    """``{"name", "repo", "license", "license_from"}`` of the source model a conversion
    recorded (``repo`` is a Hub id where one is known: it goes in the card's metadata)."""
    name = str(source.get("name") or "unknown")
    facts: dict[str, str | None] = {"name": name, "repo": None, "license": None, "license_from": None}
    if _is_default(name):
        from .default_model import NAME, gguf_path
        try:
            g = _gguf_facts(gguf_path())
        except DiJiangError:
            g = {}
        org = g.get("organization") or "HuggingFaceTB"
        facts.update(name=f"{org}/{NAME}", repo=f"{org}/{NAME}", license=g.get("license"),
                     license_from="the GGUF file's metadata" if g.get("license") else None)
        return facts
    p = Path(name).expanduser()
    hub = HUB_CACHE.search(str(p.resolve()) + "/") if p.exists() else None
    if hub:
        facts["repo"] = f"{hub.group(1)}/{hub.group(2)}"
    if p.is_file() and p.suffix == ".gguf":
        lic = _gguf_facts(p).get("license")
        facts.update(license=lic, license_from="the GGUF file's metadata" if lic else None)
    elif p.is_dir():
        lic = front_matter(p / CARD).get("license")
        facts.update(license=lic, license_from=f"the base model's {CARD}" if lic else None)
    return facts


def _is_default(name: str) -> bool:
    if name == "default":
        return True
    from .default_model import cache_root
    try:
        return Path(name).expanduser().resolve() == (cache_root() / "smollm2-135m-instruct-f32").resolve()
    except OSError:
        return False


def _gguf_facts(path: Path) -> dict[str, str]:
    """``general.license`` and the rest of a GGUF file's ``general.*`` metadata."""
    from .gguf_meta import read_general
    return read_general(path)


def front_matter(readme: Path) -> dict[str, str]:
    """The simple ``key: value`` lines of a model card's YAML front matter (lists and
    nested values are skipped: only single values are read from it)."""
    if not readme.is_file():
        return {}
    lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        m = re.match(r"^([A-Za-z_][\w-]*):\s*(\S.*?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2).strip("'\"")
    return out


# -- the card -----------------------------------------------------------------------

def write_card(folder: str | Path, params: int | None = None, state_bytes: int | None = None) -> Path:
    """Write ``folder/README.md`` from the folder's files; ``params`` and ``state_bytes``
    (per sequence) come from the model the caller saved."""
    folder = Path(folder)
    args = (_json(folder / "config.json") or {}).get("dijiang_edge")
    if not isinstance(args, dict):
        raise DiJiangError(f"{folder}/config.json has no DiJiang settings; not a converted model folder")
    adapter = (args.get("source") or {}).get("adapter") or {}
    report = _json(folder / "report.json")
    if report is None and adapter.get("applied"):
        report = _adapter_figures(adapter)
    base = base_facts(args.get("source") or {})
    lines = (_metadata(base) + _intro(base, adapted=report is not None or bool(adapter.get("applied")))
             + _settings(args, params, state_bytes) + _adaptation(adapter, report) + _usage())
    path = folder / CARD
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metadata(base: dict[str, str | None]) -> list[str]:
    lines = ["---"]
    if base["repo"]:
        lines.append(f"base_model: {base['repo']}")
    if base["license"]:
        lines.append(f"license: {base['license']}")
    return lines + ["library_name: transformers", "pipeline_tag: text-generation",
                    "tags:", "- dijiang", "- linear-attention", "- dijiang-edge", "---", ""]


def _intro(base: dict[str, str | None], adapted: bool) -> list[str]:
    lic = (f"{base['license']} (inherited from the base model; read from {base['license_from']})"
           if base["license"] else UNKNOWN_LICENSE)
    rest = ("then adapted (below)" if adapted else "every other weight is the base model's")
    return [f"# {Path(base['name']).name} with DiJiang attention", "",
            f"`{base['name']}` with its softmax attention replaced by DiJiang frequency-domain kernelized "
            "attention ([arXiv 2403.19928](https://arxiv.org/abs/2403.19928)) in its recurrent form, made by "
            f"dijiang-edge: a fixed-size state per layer instead of a KV cache; {rest}.", "",
            f"- Base model: `{base['name']}`", f"- License: {lic}", ""]


def _settings(args: dict[str, Any], params: int | None, state_bytes: int | None) -> list[str]:
    src = args.get("source") or {}
    window = (f"{args['window']} tokens of exact softmax beside DiJiang ({args.get('window_mode')})"
              if args.get("window") else "none (pure DiJiang)")
    rows = [("architecture", f"{args.get('arch')}, {args.get('n_layers')} layers, {args.get('n_heads')} heads "
                             f"({args.get('n_kv_heads')} key/value), head size {args.get('head_dim')}"),
            ("variant", args.get("variant")), ("softmax window", window),
            ("prefill chunk", f"{args.get('chunk_size')} tokens"),
            ("source format", src.get("format", "Hugging Face folder"))]
    if args.get("variant") == "official":
        rows.insert(3, ("GroupNorm groups", args.get("norm_groups") or "one per head"))
    if src.get("sha256"):
        rows.append(("source file sha256", f"`{src['sha256']}`"))
    if params:
        rows.append(("parameters", f"{params / 1e6:.1f}M"))
    if state_bytes:
        rows.append(("state per sequence", f"{state_bytes:,} bytes (float32), the same at any length"))
    return ["## Conversion", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _adaptation(ad: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """The adapter applied (if any) and what the run that made it measured."""
    if report is None and not ad.get("applied"):
        return ["## Adaptation", "", "None recorded: a plain conversion, whose text is far from the base "
                "model's until adapted (`dijiang-export adapt`).", ""]
    lines, report = ["## Adaptation", ""], report or {}
    if ad.get("applied"):
        lines.append(f"- Adapter `{ad.get('file')}` applied and merged (sha256 `{ad.get('sha256')}`).")
    if report.get("command"):
        lines.append(f"- Made by `{report['command']}`.")
    lines += _run_lines(report)
    if report.get("perplexity"):
        from .adapt.report import PPL_COLUMNS, by_text, ppl_table
        ppl = report["perplexity"]
        last = next((k for k, _ in reversed(PPL_COLUMNS) if k in ppl), "converted")
        start = (" (\"converted\" is where this run started: the previous adapter's model)"
                 if "--init-adapter" in str(report.get("command") or "") else "")
        lines += ["", f"Held-out perplexity, measured by the adaptation run{start}:", "",
                  *ppl_table(by_text(ppl), (report.get("tokens") or {}).get("heldout") or {}, PPL_COLUMNS,
                             (last, "original"))]
    return lines + [""]


ADAPT_SETTINGS = ("stages", "finetune_mode", "lora_rank", "lora_alpha", "seq_len", "batch_size",
                  "token_budget", "time_budget", "kl_weight")


def _run_lines(report: dict[str, Any]) -> list[str]:
    """What the run trained: its stages' tokens and time, its data and settings."""
    stages = report.get("stages") or {}
    trained = ", ".join(f"{name} {s.get('tokens', 0):,} tokens in {s.get('seconds', 0):.0f} s"
                        for name, s in stages.items())
    lines = []
    if trained:
        lines.append(f"- Trained: {trained}" + (f", on {report['device']}" if report.get("device") else "")
                     + (f"; data: {', '.join(report['data'])}" if report.get("data") else "") + ".")
    cfg = report.get("config") or {}
    settings = ", ".join(f"{k} {_plain(cfg[k])}" for k in ADAPT_SETTINGS if cfg.get(k) not in (None, 0, 0.0))
    if settings:
        lines.append(f"- Settings: {settings}.")
    return lines


def _plain(value: Any) -> str:
    return " + ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _adapter_figures(ad: dict[str, Any]) -> dict[str, Any] | None:
    """The figures and command an applied adapter file recorded, read from its
    safetensors header without loading a tensor (None: the file is gone or foreign)."""
    import struct
    try:
        with open(ad.get("path", ""), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100 << 20)))
        meta = json.loads(header["__metadata__"][ADAPTER_META_KEY])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return {**(meta.get("figures") or {}), "command": meta.get("command")}


def _usage() -> list[str]:
    return ["## Use", "", "With transformers (dijiang-edge installed: `import dijiang_edge` registers the "
            "`dijiang` model type; no remote code):", "", "```python", "import dijiang_edge",
            "from transformers import pipeline", "",
            'pipe = pipeline("text-generation", model="path/to/this/folder")',
            'print(pipe("The capital of France is", max_new_tokens=20)[0]["generated_text"])', "```", "",
            "With dijiang-edge: `dijiang-export generate FOLDER --prompt \"...\"`; to ONNX / ExecuTorch: "
            "`dijiang-export export FOLDER --out OUT --formats onnx,pte`.", ""]
