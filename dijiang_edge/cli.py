"""``dijiang-export``: a thin command line over the Python API.

Each subcommand parses its arguments and calls one public function; user errors
(``DiJiangError``) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .argtypes import OneLineParser, at_least, count_or_zero, int_list, number_in
from .errors import DiJiangError

ATTENTION_LENGTHS = [1024, 4096, 16384]
CONTEXT_TOKENS = 4       # prompt tokens the detokenizer of `generate` starts from (spaces, split bytes)
MODEL_HELP = ("a local Hugging Face model folder, a .gguf file, a converted or official DiJiang "
              "checkpoint folder, or 'default' (the embedded SmolLM2-135M-Instruct, with its shipped "
              "adapter where the package has one)")


def _quiet() -> None:
    """Keep third-party start-up chatter (torchao, transformers) off the user's terminal."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # transformers' "Loading weights" bars too
    os.environ.setdefault("TQDM_DISABLE", "1")         # plain tqdm bars (transformers' GGUF reader)
    logging.disable(logging.WARNING)     # torchao/torch import-time warnings; our output is print()


def _convert_options(a: argparse.Namespace) -> dict:
    """The conversion flags given (``None``: not given, so an adapter's settings or the defaults hold)."""
    opts = {"variant": a.variant, "chunk_size": a.chunk_size, "norm_groups": a.norm_groups,
            "window": a.window, "window_mode": a.window_mode}
    return {k: v for k, v in opts.items() if v is not None}


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    """``--adapter FILE`` / ``--no-adapter`` and conversion flags that default to "not given"."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--adapter", default=None, metavar="FILE",
                   help="apply this adapter (an adapter.safetensors from `adapt`) to the source MODEL")
    g.add_argument("--no-adapter", action="store_true",
                   help="the plain conversion: 'default' without its shipped adapter")
    p.set_defaults(variant=None, chunk_size=None, norm_groups=None, window=None, window_mode=None)


def _adapter(a: argparse.Namespace):
    """What ``convert`` gets as ``adapter``: a file, None (``--no-adapter``) or "auto"."""
    from .adapter import AUTO
    return None if a.no_adapter else (a.adapter or AUTO)


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="official", choices=["official", "normalized", "normalized_gated"],
                   help="DiJiang form: the paper's (GroupNorm + gate), normalized, or normalized with a gate")
    p.add_argument("--chunk-size", type=at_least(1), default=64, help="chunk length of the prefill form")
    p.add_argument("--norm-groups", type=at_least(0, "0 = one per head"), default=0,
                   help="GroupNorm groups (0 = one per head)")
    p.add_argument("--window", type=at_least(0, "0 = pure DiJiang"), default=0,
                   help="exact softmax over the last N tokens beside DiJiang (e.g. 64; 0 = pure DiJiang)")
    p.add_argument("--window-mode", default="shared", choices=["shared", "mix"],
                   help="window + DiJiang: one shared softmax normaliser (needs a normalized variant) "
                        "or a learned mix of the window's and the gated DiJiang output")


# -- subcommands ------------------------------------------------------------------

def cmd_convert(a: argparse.Namespace) -> None:
    from .exporters import check_out, staged_dir, tokenizer_source
    t0 = time.time()
    check_out(a.out, a.force)                # before torch loads: a refused --out costs no time
    from .adapter import applied
    from .conversion import convert
    from .modelcard import write_card
    from .tokenizer import save_tokenizer
    model = convert(a.model, adapter=_adapter(a), **_convert_options(a))
    st = model.init_state(1)
    with staged_dir(a.out, a.force) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer_source(a.model, model), tmp)
        write_card(tmp, params=model.num_params(), state_bytes=st.nbytes())
    ad = applied(model)
    print(f"converted {model.args.source.get('name', a.model)} -> {a.out} "
          f"({model.num_params() / 1e6:.1f}M params, variant {model.args.variant}, window {model.args.window}, "
          f"{'adapter ' + ad['file'] if ad['applied'] else 'no adapter'}, "
          f"state {st.nbytes() / 1e6:.2f} MB per sequence at any length, {time.time() - t0:.1f}s)")


def _echo_generation(tokens: Iterator[int], tok, prompt: str, prompt_ids: list[int], what: str,
                     stops: list[str] | None = None) -> None:
    """Print the prompt and each new token's text as it comes, up to a stop string, then
    the figures (``GenerationClock``: one definition of prefill time and tokens/s for
    every path)."""
    from .benchmark.timing import GenerationClock
    from .detokenize import IncrementalDecoder, StopStrings
    text = IncrementalDecoder(tok.decode, prompt_ids[-CONTEXT_TOKENS:])   # constant time per token
    stop = StopStrings(stops)
    print(prompt, end="", flush=True)
    clock = GenerationClock()
    for t in tokens:
        clock.token()
        piece, stopped = stop.push(text.push(t))
        print(piece, end="", flush=True)
        if stopped:
            break
    if not stop.stopped:
        print(stop.push(text.flush())[0] + stop.flush(), end="")
    print("\n" + clock.summary(len(prompt_ids), what), file=sys.stderr)


def _check_prompt(prompt: str) -> None:
    """An empty or non-UTF-8 ``--prompt``: refused before any model is loaded."""
    if not prompt:
        raise DiJiangError("--prompt is empty; give the text to continue")
    _check_utf8(prompt, "--prompt")


def _check_utf8(text: str, flag: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:           # bytes the locale could not decode reach argv as surrogates
        raise DiJiangError(f"{flag} is not UTF-8 text; pass it in UTF-8 (check the terminal's or "
                           "the script's encoding)") from None


def _check_top_k(top_k: int, vocab_size: int) -> None:
    if top_k > vocab_size:
        raise DiJiangError(f"--top-k {top_k} is more than the model's {vocab_size} tokens; give at most "
                           f"{vocab_size} (0 = all)")


def _prompt_ids(tok, prompt: str) -> list[int]:
    ids = tok.encode(prompt).ids
    if not ids:
        raise DiJiangError(f"--prompt {prompt!r} encodes to no tokens; give some text")
    return ids


def _sampling(a: argparse.Namespace):
    from .sampling import Sampling
    return Sampling(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)


@dataclass
class _Opened:
    """A model ready to decode (``decoding.LM``), its tokenizer and what to call it."""
    lm: Any
    tok: Any
    tokenizer_dir: Path
    eos_ids: list[int]
    what: str


def _open_export(a: argparse.Namespace, check: Callable[[Any, Path], None]) -> _Opened:
    """An export folder: onnxruntime or executorch, no torch."""
    from .decoding import RunnerLM
    from .exporters import read_manifest
    from .runtime import open_export
    from .tokenizer import load_tokenizer
    if a.adapter or a.no_adapter:
        raise DiJiangError(f"{a.model} is an export folder, converted already; --adapter and "
                           "--no-adapter apply when converting a source MODEL")
    manifest = read_manifest(a.model)
    vocab = manifest["model"]["vocab_size"]
    _check_top_k(a.top_k, vocab)
    tok = load_tokenizer(a.model)
    check(tok, Path(a.model))            # the prompt or the template: before the file is loaded
    runner = open_export(a.model, a.format, a.quant, a.threads)
    return _Opened(RunnerLM(runner, vocab), tok, Path(a.model), manifest["model"].get("eos_ids", []),
                   f"{runner.entry['format']} {runner.entry['quant']}")


def _scratch_tokenizer(src: Path) -> Path:
    """The tokenizer (and chat template) of a source without ``tokenizer.json`` (a ``.gguf``,
    a slow tokenizer), converted into a scratch folder of this process that goes at exit:
    ``generate`` and ``chat`` write nothing beside the model."""
    import atexit
    import shutil
    import tempfile
    from .tokenizer import save_tokenizer
    tmp = Path(tempfile.mkdtemp(prefix="dijiang-tokenizer-"))
    atexit.register(shutil.rmtree, tmp, True)
    save_tokenizer(src, tmp)
    return tmp


def _open_model(a: argparse.Namespace, check: Callable[[Any, Path], None]) -> _Opened:
    """``MODEL_OR_EXPORT_DIR`` as ``generate`` and ``chat`` take it; ``check(tokenizer,
    its folder)`` runs as soon as the tokenizer is there."""
    if (Path(a.model) / "manifest.json").exists():
        return _open_export(a, check)
    import torch
    from .conversion import convert
    from .exporters import tokenizer_source
    from .generation import TorchLM
    from .tokenizer import load_tokenizer, resolve_source
    beside = Path(a.model).expanduser()
    if (beside / "tokenizer.json").exists():     # the tokenizer is known before the model is built
        tok, folder = load_tokenizer(beside), beside
        check(tok, folder)
    model = convert(a.model, adapter=_adapter(a), **_convert_options(a))
    _check_top_k(a.top_k, model.args.vocab_size)
    if not (beside / "tokenizer.json").exists():
        src = resolve_source(tokenizer_source(a.model, model))
        has_json = src.is_dir() and (src / "tokenizer.json").exists()
        folder = src if has_json else _scratch_tokenizer(src)     # a .gguf's: converted, as convert does
        tok = load_tokenizer(folder)
        check(tok, folder)
    if a.threads:
        torch.set_num_threads(a.threads)
    return _Opened(TorchLM(model), tok, folder, list(model.args.eos_ids), "PyTorch")


def cmd_generate(a: argparse.Namespace) -> None:
    from .decoding import stream_tokens
    from .sampling import Sampler
    _check_prompt(a.prompt)
    prompt: list[int] = []
    m = _open_model(a, lambda tok, _: prompt.extend(_prompt_ids(tok, a.prompt)))
    tokens = stream_tokens(m.lm, prompt, a.max_new_tokens, m.eos_ids, Sampler(_sampling(a), m.lm.vocab_size))
    _echo_generation(tokens, m.tok, a.prompt, prompt, m.what, a.stop)


def cmd_chat(a: argparse.Namespace) -> None:
    from .chat import ChatSession, repl
    from .chat_template import load_chat_template
    if a.system is not None:
        _check_utf8(a.system, "--system")
    templates = []
    m = _open_model(a, lambda tok, folder: templates.append(load_chat_template(folder, a.chat_template)))
    template = templates[0]
    eos = set(m.eos_ids)
    end = m.tok.token_to_id(template.eos_token) if template.eos_token else None
    if end is not None:                  # the template's end of turn ends a reply too
        eos.add(end)
    session = ChatSession(m.lm, m.tok, template, _sampling(a), sorted(eos), a.max_new_tokens,
                          a.system, a.stop)
    repl(session, m.what)


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def cmd_export(a: argparse.Namespace) -> None:
    from .exporters import check_out, export
    check_out(a.out, a.force)                # before the exporters' imports and the profile
    prof = None
    if a.target:                         # a device profile: its values are the defaults of the flags
        from .profiles import load_profile
        prof = load_profile(a.target)
    formats = _split(a.formats) or (list(prof.formats) if prof else ["onnx"])
    quants = _split(a.quant) or (prof.quants() if prof else ["fp32"])
    if a.qlinear or a.qembedding:       # ExecuTorch's recipe names: one more .pte quantization
        from .exporters.executorch import quant_label
        quants = list(dict.fromkeys(quants + [quant_label(a.qlinear, a.qembedding)]))
    a.variant = a.variant or (prof.variant if prof else None)     # None: the adapter's, else official
    opts = prof.export_options(formats) if prof else {}
    if a.max_context is not None:
        opts["max_context_len"] = a.max_context
    if a.parity_tokens is not None:
        opts["parity_tokens"] = a.parity_tokens
    opts.update({k: v for k, v in (("parity_text", a.parity_text), ("calibration_text", a.calibration_text)) if v})
    from .validate import check_quant_names
    check_quant_names(formats, quants)   # every format's names before the first file is built
    target = None
    if prof:
        target = prof.to_manifest() | {"formats": formats, "quant": quants}
        if "max_context_len" in opts:
            target["max_context"] = opts["max_context_len"]
    m = export(a.model, a.out, formats, quants, force=a.force, convert_options=_convert_options(a),
               target=target, adapter=_adapter(a), **opts)
    for f in m["files"]:
        print(f"{f['path']:<32} {f['format']:<5} {f['quant']:<6} {f.get('role', ''):<8} {f.get('parity', {})}")
    for q, g in ((m.get("genai") or {}).get("graphs") or {}).items():
        print(f"{g['path']:<32} genai {q:<6} {'both':<8} {g.get('parity', m['genai'].get('parity_skipped', {}))}")
    if m.get("genai"):
        print(f"onnxruntime-genai folder: {a.out}/{m['genai']['folder']} (genai_config.json runs {m['genai']['quant']})")
    ad = m.get("adapter") or {}
    print(f"wrote {a.out}/manifest.json" + (f" (target {prof.name}: {prof.description})" if prof else "")
          + (f", adapter {ad['file']}" if ad.get("applied") else ", no adapter"))


def cmd_check(a: argparse.Namespace) -> int:
    from .check import check_folder
    ok = check_folder(a.folder, target=a.target, model=a.model, tokens=a.tokens, threads=a.threads,
                      files=a.files)
    return 0 if ok else 1                # a failing row: exit 1 (bad input stays exit 2)


def cmd_export_baseline(a: argparse.Namespace) -> None:
    from .exporters.baseline import export_baseline
    opts = {"llama_cpp_dir": a.llama_cpp} if a.llama_cpp else {}
    m = export_baseline(a.model, a.out, _split(a.formats) or None, _split(a.quant) or None, force=a.force,
                        parity_tokens=a.parity_tokens, **opts)
    for f in m["files"]:
        print(f"{f['path']:<32} {f['format']:<5} {f['quant']:<6} softmax KV cache  {f.get('parity', {})}")
    print(f"wrote {a.out}/manifest.json")


def _ints(s: str | None) -> list[int] | None:
    try:
        return [int(x) for x in _split(s)] or None
    except ValueError:
        raise DiJiangError(f"expected a comma list of integers, got {s!r}") from None


def _bench_mode(a: argparse.Namespace) -> str:
    """Which form of ``bench`` the flags ask for; mixing forms is refused."""
    modes = [m for m, on in (("report", a.report), ("attention-forms", a.attention_forms)) if on]
    if len(modes) > 1:
        raise DiJiangError("give one of --report and --attention-forms")
    if modes and a.folders:
        raise DiJiangError(f"--{modes[0]} takes no DIR (got {' '.join(a.folders)})")
    if not modes and not a.folders:
        raise DiJiangError("give export folder(s) DIR to time, --report JSON... to merge reports, "
                           "or --attention-forms")
    return modes[0] if modes else ("native" if a.native else "runtimes")


def _bench_report(a: argparse.Namespace) -> None:
    import json
    from .benchmark.report import merge, write_report
    from .exporters import staged_dir
    datas = []
    for p in a.report:
        try:
            datas.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise DiJiangError(f"{p} is not a bench.json ({e})") from None
    data = merge(datas)
    with staged_dir(a.out, a.force) as tmp:
        (tmp / "bench.json").write_text(json.dumps(data, indent=1))
        names = write_report(data, tmp)
    print(f"wrote {a.out}/bench.json, " + ", ".join(f"{a.out}/{n}" for n in names))


def _bench_runtimes(a: argparse.Namespace) -> None:
    from .benchmark import bench
    from .benchmark.report import decode_table
    if a.baseline is None and not a.no_baseline:
        raise DiJiangError("give --baseline DIR (a softmax baseline made with `dijiang-export export-baseline "
                           "MODEL --out DIR`) or --no-baseline to measure the DiJiang files alone")
    data = bench(a.folders, None if a.no_baseline else a.baseline, a.out, _ints(a.lengths), _ints(a.threads),
                 a.tokens, _split(a.formats) or None, _split(a.quant) or None, a.quick, a.force, a.bandwidth_mib,
                 files=_split(a.files) or None, rounds=a.rounds)
    print("\n".join(decode_table(data)))
    print(f"wrote {a.out}/bench.json, {a.out}/report.md and its plots")


def cmd_bench(a: argparse.Namespace) -> None:
    mode = _bench_mode(a)
    if mode == "report":
        _bench_report(a)
    elif mode == "attention-forms":
        from .benchmark.attention_forms import bench_prefill_forms
        bench_prefill_forms(_ints(a.lengths) or ATTENTION_LENGTHS, heads=a.heads, head_dim=a.head_dim,
                            chunk_size=a.chunk_size, threads=(_ints(a.threads) or [0])[0],
                            parallel_limit=a.parallel_limit)
    elif mode == "native":
        from .benchmark.native import bench_native
        for folder in a.folders:
            bench_native(folder, _split(a.native), _split(a.quant) or None, a.tokens or 32, a.count_tokens,
                         a.prompt_len, (_ints(a.threads) or [1])[0])
    else:
        _bench_runtimes(a)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="the benchmark: decode/prefill time, memory and the bandwidth floor of "
                       "DiJiang files vs the softmax KV-cache baseline (JSON, Markdown, PNG report); "
                       "--native, --attention-forms and --report for the other measurements")
    p.add_argument("folders", nargs="*", metavar="DIR", help="DiJiang export folder(s)")
    p.add_argument("--baseline", nargs="+", metavar="BASEDIR", default=None,
                   help="softmax baseline folder(s) from `dijiang-export export-baseline`")
    p.add_argument("--no-baseline", action="store_true", help="measure the DiJiang files alone")
    p.add_argument("--out", default="out/bench", help="report folder (bench.json, report.md, *.png)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--lengths", type=int_list(1), default=None, help="context lengths reached by a real prefill before decode is "
                   "timed (default 128,512,2048,8192,16384; --attention-forms: prompt lengths, default "
                   + ",".join(map(str, ATTENTION_LENGTHS)) + ")")
    p.add_argument("--threads", type=int_list(0), default=None, help="comma list of thread counts (default 1,2; --native: one, "
                   "default 1; --attention-forms: one, default the runtime's)")
    p.add_argument("--tokens", type=at_least(1), default=None, help="decode calls timed per context, median reported "
                   "(default 32; 16 with --quick)")
    p.add_argument("--formats", default=None, help="comma list of onnx, pte (default: all in DIR)")
    p.add_argument("--quant", default=None, help="comma list of quantizations (default: all in DIR)")
    p.add_argument("--files", default=None, help="time exactly the files whose paths match these comma-"
                   "separated patterns (e.g. 'onnx/*int8*'; decode-only graphs included) instead of each "
                   "format's and quantization's default file")
    p.add_argument("--rounds", type=at_least(1), default=1, help="measure every file this many times, in turns, and "
                   "report medians (side-by-side comparisons on a loaded machine)")
    p.add_argument("--quick", action="store_true", help="contexts 128,2048, 2 threads, 16 tokens: a few minutes")
    p.add_argument("--bandwidth-mib", type=at_least(1), default=None,
                   help="buffer of the bandwidth measurement (default 1024 MiB; 256 with --quick)")
    g = p.add_argument_group("the C++ .pte runner per CPU (--native)")
    g.add_argument("--native", nargs="?", const="x86_64,aarch64", default=None, metavar="ARCHES",
                   help="time the C++ runner on the .pte files of DIR instead: x86 ms/token beside "
                        "instructions per decoded token (x86_64 callgrind; aarch64 counted under qemu); "
                        "ARCHES: comma list of x86_64, aarch64 (default both)")
    g.add_argument("--count-tokens", type=at_least(1), default=4, help="decode calls whose instructions are counted")
    g.add_argument("--prompt-len", type=at_least(1), default=8, help="prompt tokens before decoding")
    g = p.add_argument_group("prefill of the chunked vs the parallel form (--attention-forms)")
    g.add_argument("--attention-forms", action="store_true",
                   help="time one layer's DiJiang attention prefill in both forms (no DIR)")
    g.add_argument("--heads", type=at_least(1), default=9)
    g.add_argument("--head-dim", type=at_least(1), default=64)
    g.add_argument("--chunk-size", type=at_least(1), default=64)
    g.add_argument("--parallel-limit", type=at_least(0), default=16384,
                   help="skip the parallel form above this length (it needs T^2 memory)")
    g = p.add_argument_group("one report from several runs (--report)")
    g.add_argument("--report", nargs="+", metavar="JSON", default=None,
                   help="merge these bench.json files (same --lengths) into one report in --out")
    p.set_defaults(fn=cmd_bench)


def _nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_decoding_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The sampling and runtime flags of ``generate`` and ``chat`` (one definition)."""
    p.add_argument("--max-new-tokens", type=at_least(0), default=max_new_tokens,
                   help=f"tokens per reply at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=number_in(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=at_least(0, "0 = all tokens"), default=0,
                   help="sample among the k likeliest tokens (0 = all; at most the vocabulary)")
    p.add_argument("--top-p", type=number_in(0.0, 1.0, low_open=True), default=1.0,
                   help="sample among the likeliest tokens whose probability reaches p (1 = all)")
    p.add_argument("--repetition-penalty", type=number_in(0.0, low_open=True), default=1.0,
                   help="push down tokens already seen (prompt and output): positive logits divided by "
                        "it, negative multiplied (Hugging Face's meaning; 1 = off, 1.1-1.3 usual)")
    p.add_argument("--stop", action="append", type=_nonempty, default=None, metavar="STRING",
                   help="stop when the text contains STRING (not printed); repeatable")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--threads", type=at_least(0, "0 = runtime default"), default=0,
                   help="CPU threads (0 = runtime default)")
    p.add_argument("--format", default=None, help="for export folders: onnx or pte (needed where it has both)")
    p.add_argument("--quant", default=None, help="for export folders: fp32, int8 or int4 (needed where it has several)")


# -- parser -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .exporters import PARITY_TOKENS
    from .validate import PARITY_MIN
    ap = OneLineParser(
        prog="dijiang-export",
        description="Convert a Hugging Face causal LM to DiJiang linear attention (recurrent form, "
                    "fixed-size state), export it to ONNX / ExecuTorch and check the files against PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a model and save it (safetensors + tokenizer)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_convert_options(p)
    _add_adapter_options(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a model or an exported folder")
    p.add_argument("model", help=MODEL_HELP + ", or an export folder (with manifest.json)")
    p.add_argument("--prompt", required=True)
    _add_decoding_options(p, max_new_tokens=48)
    _add_convert_options(p)
    _add_adapter_options(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model or an exported folder: its chat template, the state "
                       "kept between turns (each turn feeds only its new tokens); turns from stdin")
    p.add_argument("model", help=MODEL_HELP + ", or an export folder (with manifest.json)")
    p.add_argument("--system", default=None, help="a system prompt (default: the template's own, if any)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's")
    _add_decoding_options(p, max_new_tokens=256)
    _add_convert_options(p)
    _add_adapter_options(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("export", help="convert and export to ONNX and/or ExecuTorch, with parity checks")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (files, tokenizer.json, manifest.json)")
    p.add_argument("--target", default=None,
                   help="a device profile of export/profiles/ (android-arm64, linux-arm64, x86-laptop) "
                        "or a profile .toml file: its formats, quantizations and context limit become "
                        "the defaults, and the manifest records it")
    p.add_argument("--formats", default=None, help="comma list of: onnx, pte (default: the target's, else onnx)")
    p.add_argument("--quant", default=None, help="comma list of: fp32, int8 (default: the target's, else fp32)")
    p.add_argument("--max-context", type=at_least(1), default=None,
                   help="pte: tokens per sequence the runner allows (default: the target's, else 2^20)")
    p.add_argument("--parity-tokens", type=count_or_zero(PARITY_MIN, "skip"), default=None,
                   help=f"tokens of English text each file is checked on at export (0 = skip; "
                        f"default: {PARITY_TOKENS})")
    p.add_argument("--parity-text", default=None, help="English text of the parity checks: shakespeare "
                   "(default), pydoc, or a text file; recorded in manifest.json")
    p.add_argument("--calibration-text", default=None, help="English text the int8 files are calibrated on: "
                   "pydoc (default), shakespeare, or a text file; must differ from --parity-text")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--qlinear", choices=["8da8w", "8da4w"], default=None,
                   help="pte: also write a file with linears quantized so (8-bit dynamic activations + "
                        "8/4-bit weights); --quant int8 = --qlinear 8da8w --qembedding 8w, "
                        "--quant int4 = --qlinear 8da4w --qembedding 8w")
    p.add_argument("--qembedding", choices=["8w"], default=None, help="pte: 8-bit per-row embedding table")
    _add_convert_options(p)
    _add_adapter_options(p)                               # variant None: the target's, else the default
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("check", help="run every exported file of a folder against PyTorch on English "
                                     "text, on each platform tier; print a pass/fail table")
    p.add_argument("folder", help="an export folder (manifest.json)")
    p.add_argument("--target", default=None,
                   help="a device profile: check only the files it selects, on its CPU's tiers "
                        "(default: the folder's recorded target, else every file on every tier)")
    p.add_argument("--model", default=None,
                   help="the PyTorch reference (default: the model the folder was exported from, "
                        "from manifest.json)")
    p.add_argument("--tokens", type=at_least(1), default=None,
                   help="tokens of English text teacher-forced per file (default: 512)")
    p.add_argument("--files", default=None,
                   help="only the files whose path matches these comma-separated patterns (e.g. 'onnx/native*')")
    p.add_argument("--threads", type=at_least(0, "0 = the runtime's default"), default=1,
                   help="CPU threads of each runtime (0 = its default)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("export-baseline", help="export the original model with a softmax KV cache "
                       "(the baseline of `bench`), checked against Hugging Face")
    p.add_argument("model", help="the Hugging Face source model (folder, .gguf, or 'default')")
    p.add_argument("--out", required=True, help="output folder (manifest.json marks files attention: softmax)")
    p.add_argument("--formats", default="onnx", help="comma list of: onnx, pte (this tool's exports), genai "
                   "(onnxruntime-genai's builder), gguf (llama.cpp: converter + quantizer)")
    p.add_argument("--quant", default="fp32,int8", help="comma list of: fp32, int8, int4 (onnx, pte: the DiJiang "
                   "recipes; genai: the builder's precisions; gguf: F32, Q8_0, Q4_0)")
    p.add_argument("--parity-tokens", type=at_least(0, "0 = skip"), default=64,
                   help="prefill tokens checked against HF (0: skip)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR", help="gguf: a llama.cpp source tree holding "
                   "convert_hf_to_gguf.py (default $DIJIANG_LLAMA_CPP, else the one scripts/setup_llama_cpp.sh unpacks)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_export_baseline)

    _add_bench_parser(sub)

    from .adapt.command import add_evaluate_parser, add_parser as add_adapt_parser
    add_adapt_parser(sub, MODEL_HELP, _add_convert_options)
    add_evaluate_parser(sub, MODEL_HELP)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .exporters import Terminated
    _quiet()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # argparse has printed its one line (or --help): its code, returned
        return int(e.code or 0)
    args.command_line = shlex.join(["dijiang-export", *(sys.argv[1:] if argv is None else argv)])
    from .extras import check_command, import_error_line
    try:
        check_command(args)              # a missing optional library: one line, before any work
        code = args.fn(args)
    except DiJiangError as e:
        print(f"dijiang-export: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:     # an optional library imported on a path check_command missed
        line = import_error_line(e)
        if line is None:
            raise
        print(f"dijiang-export: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:        # Terminated (SIGTERM) is one; a command may add what to do next
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"dijiang-export: {what}" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except MemoryError:
        print("dijiang-export: error: out of memory; try a shorter input or fewer threads", file=sys.stderr)
        return 3
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
