"""The ``dijiang-export adapt`` subcommand: flags in, ``adapt()`` called, one summary out.
Kept here so ``cli.py`` only registers it (and imports nothing heavy to build the parser)."""

from __future__ import annotations

import argparse
from typing import Callable

from ..argtypes import at_least, number_in


def add_parser(sub: argparse._SubParsersAction, model_help: str,
               add_convert_options: Callable[[argparse.ArgumentParser], None]) -> None:
    from .config import ADAPTER_DTYPES
    p = sub.add_parser("adapt", help="adapt a converted model: attention transfer, then fine-tuning with "
                                     "distillation (runs under `accelerate launch` for many processes)")
    p.add_argument("model", help=model_help + "; a converted folder learns from its recorded source model")
    p.add_argument("--data", nargs="+", required=True,
                   help="text files or folders of .txt files, or built-in texts: 'general' (a mix of "
                        "several domains), 'shakespeare', 'pydoc', ... (docs/adaptation.md)")
    p.add_argument("--heldout", nargs="+", default=[], metavar="TEXT",
                   help="texts scored apart, each on its own (names such as heldout-a heldout-b, or files); "
                        "default: the end of the training text")
    p.add_argument("--out", required=True, help="output folder: adapted model (export takes it as MODEL) + report")
    p.add_argument("--stages", default="transfer,finetune", help="comma list of: transfer, finetune")
    p.add_argument("--token-budget", default="0", help="training tokens over all stages, e.g. 200k (0 = no limit)")
    p.add_argument("--time-budget", default="0",
                   help="training time over all stages, e.g. 20m (evaluation not counted)")
    p.add_argument("--transfer-share", type=number_in(0.0, 1.0), default=0.3, help="share of the budgets for transfer (both stages)")
    p.add_argument("--seq-len", type=at_least(2), default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="sequences per step, all processes together")
    p.add_argument("--finetune", dest="finetune_mode", default="lora", choices=["lora", "full"],
                   help="low-rank updates of the source projections, or every weight")
    p.add_argument("--lora-rank", type=at_least(1), default=16)
    p.add_argument("--transfer-lr", type=number_in(0.0), default=1e-2)
    p.add_argument("--finetune-lr", type=number_in(0.0), default=0.0, help="0 = 1e-3 for lora, 1e-4 for full")
    p.add_argument("--kl-weight", type=number_in(0.0, 1.0), default=0.7, help="finetune loss = (1-w) CE + w KL(teacher||student)")
    p.add_argument("--warmup-steps", type=at_least(0), default=3)
    p.add_argument("--eval-tokens", type=at_least(1), default=8192, help="held-out tokens to score (at most, per text)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--teacher", default=None, help="the softmax source model, if MODEL does not record it")
    p.add_argument("--checkpoint-dir", default=None, help="default: OUT-checkpoint (removed after success)")
    p.add_argument("--checkpoint-minutes", type=number_in(0.0), default=5.0)      # 0: by steps only
    p.add_argument("--checkpoint-steps", type=at_least(0, "0 = by time only"), default=0, help="also checkpoint every N steps (0 = by time only)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run from its checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true")
    p.add_argument("--force", action="store_true", help="replace OUT and any old checkpoint")
    p.add_argument("--threads", type=at_least(0, "0 = torch default"), default=0, help="CPU threads per process (0 = torch default)")
    p.add_argument("--note", action="append", default=[], help="a line to add to the report (repeatable)")
    p.add_argument("--adapter-dtype", default="float32", choices=ADAPTER_DTYPES,
                   help="tensors of OUT/adapter.safetensors (16-bit: half the size)")
    p.add_argument("--init-adapter", default=None, metavar="FILE",
                   help="go on training from this adapter of MODEL (its settings, DiJiang parameters and LoRA "
                        "factors), e.g. on longer sequences; the new adapter is again relative to MODEL")
    add_convert_options(p)
    p.set_defaults(fn=run, variant="official")     # adapts best per token (docs/adaptation.md)
    p.set_defaults(convert_defaults={k: p.get_default(k) for k in CONVERT_OPTIONS})


CONVERT_OPTIONS = ("variant", "chunk_size", "norm_groups", "window", "window_mode")


def run(a: argparse.Namespace) -> None:
    import torch
    from . import AdaptConfig, adapt, parse_count, parse_seconds
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = AdaptConfig(stages=a.stages, token_budget=parse_count(a.token_budget),
                      time_budget=parse_seconds(a.time_budget), transfer_share=a.transfer_share,
                      seq_len=a.seq_len, batch_size=a.batch_size, finetune_mode=a.finetune_mode,
                      lora_rank=a.lora_rank, lora_alpha=2.0 * a.lora_rank, transfer_lr=a.transfer_lr,
                      finetune_lr=a.finetune_lr, kl_weight=a.kl_weight, warmup_steps=a.warmup_steps,
                      eval_tokens=a.eval_tokens, seed=a.seed,
                      checkpoint_minutes=a.checkpoint_minutes, checkpoint_steps=a.checkpoint_steps,
                      adapter_dtype=a.adapter_dtype)
    conv = {k: getattr(a, k) for k in CONVERT_OPTIONS}
    if a.init_adapter:            # the adapter fixes the settings: pass only those given on the command line
        conv = {k: v for k, v in conv.items() if v != a.convert_defaults[k]}
    from ..exporters import signals_raise
    try:
        with signals_raise():      # SIGTERM (timeout, docker stop, CI) as Ctrl-C: scratch files go, one line
            r = adapt(a.model, a.data, a.out, cfg, teacher=a.teacher, **conv, init_adapter=a.init_adapter,
                      checkpoint_dir=a.checkpoint_dir, resume=a.resume, force=a.force,
                      keep_checkpoint=a.keep_checkpoint, notes=a.note, heldout=a.heldout,
                      command=getattr(a, "command_line", None))
    except KeyboardInterrupt as e:
        e.args = (_resume_hint(a),)          # main prints it on its one "interrupted"/"terminated" line
        raise
    if r["world_size"] > 1:
        from accelerate import PartialState
        if not PartialState().is_main_process:
            return
    from .report import by_text
    for text, ppl in by_text(r["perplexity"]).items():
        print(f"held-out perplexity on {text}: " + ", ".join(f"{k} {v:,.2f}" for k, v in ppl.items()))
    ad = "adapter.safetensors, " if (r.get("adapter") or {}).get("file") else ""
    print(f"wrote {a.out} (model, {ad}tokenizer.json, report.json, report.md, loss_curve.png, README.md model card)")


def _resume_hint(a: argparse.Namespace) -> str:
    """What an interrupted run leaves to go on from: its checkpoint, or none yet."""
    from pathlib import Path
    from .checkpoint import FILE
    folder = Path(a.checkpoint_dir or f"{a.out}-checkpoint")
    if (folder / FILE).exists():
        return f"run the same command with --resume to continue from the checkpoint in {folder}"
    return "no checkpoint was written yet; run the command again to start over"


def add_evaluate_parser(sub: argparse._SubParsersAction, model_help: str) -> None:
    p = sub.add_parser("evaluate", help="perplexity of a converted or adapted model (and its softmax source) "
                                        "on held-out English texts, scored as `adapt --heldout` scores them")
    p.add_argument("model", help=model_help + "; typically a converted or adapted folder")
    p.add_argument("--text", nargs="+", required=True, metavar="TEXT",
                   help="texts to score, each on its own: built-in names (heldout-a, heldout-b, general, ...) "
                        "or text files")
    p.add_argument("--seq-len", type=at_least(2), default=256, help="tokens per scored block")
    p.add_argument("--eval-tokens", type=at_least(1), default=8192, help="tokens scored per text (at most; as adapt)")
    p.add_argument("--batch", type=at_least(1), default=4, help="blocks per forward pass")
    p.add_argument("--teacher", action="store_true", help="also score the softmax source model MODEL records")
    p.add_argument("--teacher-model", default=None, metavar="MODEL",
                   help="the softmax source model to score beside it, where MODEL does not record it")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=at_least(0, "0 = torch default"), default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--window-only", action="store_true",
                   help="also score the model with its DiJiang part off (the window alone) and, with a "
                        "teacher, the long-range recovery")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")
    p.set_defaults(fn=run_evaluate)


def run_evaluate(a: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    import torch
    from .evaluate import evaluate, table
    if a.threads:
        torch.set_num_threads(a.threads)
    r = evaluate(a.model, a.text, seq_len=a.seq_len, eval_tokens=a.eval_tokens,
                 teacher=a.teacher_model or a.teacher, batch=a.batch, device=a.device,
                 window_only=a.window_only)
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"wrote {a.json}")
