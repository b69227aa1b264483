"""``adapt()``: evaluate, run the stages, write the adapted model and its report.

Under ``accelerate launch`` every process runs this same function; Accelerate
sets up the process group and wraps each stage's objective (DDP or FSDP, as the
launch config says), and the main process alone writes files.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import DiJiangError
from ..modelcard import write_card
from .checkpoint import Checkpointer, set_rng_state
from .config import AdaptConfig
from .data import TAIL, BatchOrder, Blocks, heldout_sets, load_corpus, load_heldout, split_blocks, tokenize
from .evaluate import layer_mse, perplexity
from .lora import add_lora, has_lora, merge_lora
from .models import load_pair, scratch_dir, tokenizer_folder
from .objectives import FinetuneObjective, TransferObjective, is_new_param
from .report import write_report
from .teacher import AttentionTap, teacher_logits
from .train import Budget, Loop, StageProgress

ADAPTER_FILE = "adapter.safetensors"
CONVERT_DEFAULTS = dict(variant="official", chunk_size=64, norm_groups=0, window=0, window_mode="shared")
FINGERPRINT_FIELDS = ("stages", "transfer_share", "seq_len", "batch_size", "transfer_lr", "finetune_lr",
                      "finetune_mode", "lora_rank", "lora_alpha", "kl_weight", "warmup_steps", "grad_clip",
                      "heldout_fraction", "eval_tokens", "seed")


def adapt(model: Any, data: Sequence[str | Path], out: str | Path, config: AdaptConfig | None = None, *,
          tokenizer: Any = None, teacher: Any = None, variant: str | None = None, chunk_size: int | None = None,
          norm_groups: int | None = None, window: int | None = None, window_mode: str | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False,
          force: bool = False, keep_checkpoint: bool = False, notes: Sequence[str] = (),
          on_step: Callable[[StageProgress], None] | None = None, cpu: bool = False,
          heldout: Sequence[str | Path] = (), command: str | None = None,
          init_adapter: str | Path | None = None) -> dict[str, Any]:
    """Adapt ``model`` to DiJiang attention on the text of ``data``; write it to ``out``.

    ``model``: as for ``convert`` ("default", a folder, a .gguf, a transformers model,
    or an already converted folder whose source model is the teacher).  ``heldout``:
    texts (names or files) scored apart, each on its own; without them, the tail of
    the training stream is.  Returns the report (also in ``out/report.json``).
    ``on_step`` is called after every step.  ``command``: the command line recorded in
    ``out/adapter.safetensors``.  ``init_adapter``: an adapter file of ``model`` (a
    source model) to go on training from: its settings, DiJiang parameters and LoRA
    factors are the start, and the new adapter is again relative to the source (a
    second run, e.g. on longer sequences, after a first).
    """
    given = dict(variant=variant, chunk_size=chunk_size, norm_groups=norm_groups, window=window,
                 window_mode=window_mode)
    # unset options: the conversion defaults, or (continuing an adapter) the adapter's settings
    options = {k: v for k, v in given.items() if v is not None} if init_adapter is not None else \
        {k: CONVERT_DEFAULTS[k] if v is None else v for k, v in given.items()}
    return Adaptation(model, data, out, config or AdaptConfig(token_budget=100_000), tokenizer=tokenizer,
                      teacher=teacher, convert_options=options,
                      checkpoint_dir=checkpoint_dir, resume=resume, force=force, keep_checkpoint=keep_checkpoint,
                      notes=list(notes), on_step=on_step, cpu=cpu, heldout=heldout, command=command,
                      init_adapter=init_adapter).run()


class Adaptation:
    def __init__(self, model, data, out, cfg: AdaptConfig, *, tokenizer, teacher, convert_options,
                 checkpoint_dir, resume, force, keep_checkpoint, notes, on_step, cpu, heldout=(), command=None,
                 init_adapter=None):
        self.t0 = time.time()
        self.source_name = "default" if str(model) == "default" else None     # not its cache folder
        self.command = command or f"adapt({model!r}, {[str(d) for d in data]!r}, AdaptConfig(**{cfg.to_dict()!r}))"
        self.cfg, self.out, self.force, self.resume = cfg, Path(out), force, resume
        self.keep_checkpoint, self.notes, self.on_step = keep_checkpoint, notes, on_step
        self.data = [str(d) for d in data]
        from ..exporters import check_out
        check_out(self.out, force)
        text = load_corpus(data, cfg.max_chars)          # bad text fails before any model loads
        heldout_texts = load_heldout(heldout, cfg.max_chars)
        from accelerate import Accelerator
        # without a GPU, cpu=True is what lets `accelerate launch` form a gloo process group
        self.acc = Accelerator(cpu=cpu or not torch.cuda.is_available())
        self.init = None
        if init_adapter is not None:
            from ..adapter import load_adapter
            self.init = load_adapter(init_adapter)
            self._check_init(cfg)
        self.teacher, self.student = load_pair(model, teacher, init=self.init, **convert_options)
        if self.init is not None:
            self._start_from_init()
        self.teacher.eval().requires_grad_(False).to(self.acc.device)
        self.student.eval().to(self.acc.device)
        self.scratch = scratch_dir()
        self.tok_dir = tokenizer_folder(model, self.student, tokenizer, Path(self.scratch.name))
        from ..tokenizer import load_tokenizer
        tok = load_tokenizer(self.tok_dir)
        self.blocks = self._blocks(tokenize(text, tok), hold_tail=not heldout_texts)
        # what each held-out figure is measured on: the texts by name, else the training tail
        self.heldout = {n: self._checked(b) for n, b in
                        heldout_sets(heldout_texts, tok, cfg.seq_len, cfg.eval_tokens).items()} \
            or {TAIL: self.blocks.heldout}
        self.tap = AttentionTap(self.teacher)
        self.ckpt = Checkpointer(Path(checkpoint_dir) if checkpoint_dir else Path(f"{self.out}-checkpoint"),
                                 self._fingerprint())
        self.evals: dict[str, dict[str, Any]] = {"perplexity": {}, "layer_mse": {}}
        self.progress = {s: StageProgress(s) for s in cfg.stages}
        self.eval_seconds = 0.0

    # -- setup ------------------------------------------------------------------
    def _check_init(self, cfg: AdaptConfig) -> None:
        """An adapter to continue fits this run's LoRA before any model loads."""
        lo = self.init.meta["lora"]
        if "finetune" in cfg.stages and cfg.finetune_mode == "lora" and lo and lo["rank"] != cfg.lora_rank:
            raise DiJiangError(f"{self.init.path.name} has LoRA rank {lo['rank']}; continue it with "
                               f"--lora-rank {lo['rank']}")

    def _start_from_init(self) -> None:
        """The adapter's LoRA updates on from the start (so "converted" is the adapted
        model): as LoRA factors that train on, or merged for a full finetune."""
        from ..adapter import load_lora_factors, merge_into
        if not self.init.lora:
            return
        if self.cfg.finetune_mode == "lora":
            add_lora(self.student, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.seed)
            load_lora_factors(self.init, self.student)
        else:
            merge_into(self.init, self.student)

    def _checked(self, ids: torch.Tensor) -> torch.Tensor:
        if int(ids.max()) >= self.student.args.vocab_size:
            raise DiJiangError(f"the tokenizer gives ids up to {int(ids.max())} but the model has "
                               f"{self.student.args.vocab_size} embeddings; use the model's own tokenizer")
        return ids

    def _blocks(self, ids: torch.Tensor, hold_tail: bool) -> Blocks:
        return split_blocks(self._checked(ids), self.cfg.seq_len, self.cfg.heldout_fraction, self.cfg.eval_tokens,
                            hold_tail)

    def _fingerprint(self) -> dict[str, Any]:
        fp = {k: getattr(self.cfg, k) for k in FINGERPRINT_FIELDS}
        fp["stages"] = list(self.cfg.stages)
        fp["model"] = self.student.args.source.get("name", "")
        fp["variant"] = self.student.args.variant
        fp["window"] = [self.student.args.window, self.student.args.window_mode]
        fp["data_sha256"] = _sha(self.blocks.train)
        if self.init is not None:
            fp["init_adapter"] = self.init.sha256
        if TAIL not in self.heldout:          # only then: checkpoints of runs without --heldout still resume
            fp["heldout"] = {n: _sha(b) for n, b in self.heldout.items()}
        return fp

    # -- the run ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        blob = self._checkpoint_to_resume()
        if blob:
            self.evals = _per_text(blob["run"]["evals"])
            for s, d in blob["run"]["stages"].items():
                self.progress[s] = StageProgress(**d)
        self._measure_ppl("original", self._teacher_logits)
        self._measure_ppl("converted", self._student_logits)
        if "transfer" in self.cfg.stages:
            self._measure("layer_mse", "converted", self._layer_mse)
        current = blob["run"]["current"] if blob else None
        for stage in self.cfg.stages:
            if current and self.cfg.stages.index(stage) < self.cfg.stages.index(current):
                continue                                  # finished before the checkpoint
            self._stage(stage, blob if stage == current else None)
        return self._finish()

    def _checkpoint_to_resume(self) -> dict | None:
        if self.resume:
            return self.ckpt.load()
        if self.ckpt.exists() and not self.force:
            raise DiJiangError(f"{self.ckpt.folder} holds an interrupted run's checkpoint; pass --resume to "
                               "continue it, or --force to start over")
        return None

    def _measure(self, kind: str, key: str, fn: Callable[[], float]) -> None:
        if key not in self.evals[kind]:
            t = time.time()
            self.evals[kind][key] = fn()
            self.eval_seconds += time.time() - t
            if self.acc.is_main_process:
                print(f"[eval] {key}: held-out {kind.replace('_', ' ')} {self.evals[kind][key]:,.4g} "
                      f"({time.time() - t:.0f}s)", file=sys.stderr, flush=True)

    def _measure_ppl(self, key: str, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Held-out perplexity of one model on each held-out text (``evals["perplexity"][key][text]``)."""
        done = self.evals["perplexity"].setdefault(key, {})
        for name, blocks in self.heldout.items():
            if name not in done:
                t = time.time()
                done[name] = perplexity(logits_of, blocks, self.cfg.eval_batch, self.acc,
                                        f"{key}: perplexity on {name}")
                self.eval_seconds += time.time() - t
                if self.acc.is_main_process:
                    print(f"[eval] {key}: held-out perplexity {done[name]:,.4g} on {name} ({time.time() - t:.0f}s)",
                          file=sys.stderr, flush=True)

    def _layer_mse(self) -> float:
        """On the first held-out text: a diagnostic of the transfer stage, not a headline figure."""
        blocks = next(iter(self.heldout.values()))
        return layer_mse(self.student, self.tap, blocks, self.cfg.eval_batch, self.acc)

    def _teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return teacher_logits(self.teacher, ids)

    def _student_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.student(ids)[0]

    # -- one stage --------------------------------------------------------------
    def _stage(self, stage: str, blob: dict | None) -> None:
        cfg, student, p = self.cfg, self.student, self.progress[stage]
        objective, lr = self._objective(stage)
        opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=lr,
                                betas=(0.9, 0.95), weight_decay=0.0)
        if blob:
            self._restore(blob, opt)
        model, opt = self.acc.prepare(objective, opt)
        save = lambda: self._save(stage, opt)        # noqa: E731
        if not p.done:
            share = cfg.share(stage)
            budget = Budget(int(cfg.token_budget * share) or None, cfg.time_budget * share or None)
            loop = Loop(self.acc, self.blocks.train, BatchOrder(len(self.blocks.train), cfg.batch_size, cfg.seed),
                        cfg.batch_size, budget, lr, cfg.warmup_steps, cfg.grad_clip,
                        ("loss",) if stage == "transfer" else ("loss", "ce", "kl"), save,
                        cfg.checkpoint_steps, cfg.checkpoint_minutes * 60, cfg.log_seconds, self.on_step)
            if stage == "transfer":
                with self.tap.hooked():
                    loop.run(p, model, opt, lambda ids: model(*self.tap.run(ids))[None])
            else:
                loop.run(p, model, opt, lambda ids: model(ids, self._teacher_logits(ids)))
            save()
        self._measure_ppl(f"after_{stage}", self._student_logits)
        if stage == "transfer":
            self._measure("layer_mse", "after_transfer", self._layer_mse)
        if stage != cfg.stages[-1]:
            save()
        del model, opt, objective
        self.acc.free_memory()

    def _objective(self, stage: str) -> tuple[torch.nn.Module, float]:
        """The stage's loss module, with exactly its parameters trainable."""
        cfg, student = self.cfg, self.student
        if stage == "transfer":
            train = is_new_param
            objective, lr = TransferObjective(student), cfg.transfer_lr
        else:
            if cfg.finetune_mode == "lora" and not has_lora(student):
                add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
            train = (lambda n: True) if cfg.finetune_mode == "full" else \
                (lambda n: is_new_param(n) or ".parametrizations.weight.0." in n)
            objective, lr = FinetuneObjective(student, cfg.kl_weight), cfg.finetune_lr
        for n, q in student.named_parameters():
            q.requires_grad_(bool(train(n)))
        return objective, lr

    # -- checkpoints --------------------------------------------------------------
    def _changed_params(self) -> dict[str, torch.Tensor]:
        return {n: q for n, q in self.student.named_parameters() if q.requires_grad or is_new_param(n)}

    def _save(self, stage: str, opt: Any) -> None:
        if self.acc.is_main_process:
            run = {"evals": self.evals, "current": stage,
                   "stages": {s: p.to_dict() for s, p in self.progress.items()}}
            self.ckpt.save(run, self._changed_params(), opt)
        self.acc.wait_for_everyone()

    def _restore(self, blob: dict, opt: torch.optim.Optimizer) -> None:
        params = {k: v.to(self.acc.device) for k, v in blob["params"].items()}
        missing = set(params) - set(dict(self.student.named_parameters()))
        if missing:
            raise DiJiangError(f"the checkpoint has parameters this model lacks ({sorted(missing)[:3]})")
        self.student.load_state_dict(params, strict=False)
        if blob["optimizer"] is not None:
            opt.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])

    # -- output -------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        from ..exporters import staged_dir
        report = self._report()
        if self.acc.is_main_process:
            with staged_dir(self.out, self.force) as tmp:
                report["adapter"] = self._write_adapter(tmp, report)
                merge_lora(self.student)
                self.student.cpu().save_pretrained(tmp)
                for f in Path(self.tok_dir).iterdir():
                    shutil.copy2(f, tmp / f.name)
                write_report(tmp, report)
                write_card(tmp, params=self.student.num_params(), state_bytes=self.student.init_state(1).nbytes())
            if not self.keep_checkpoint:
                self.ckpt.remove()
        self.acc.wait_for_everyone()
        self.scratch.cleanup()
        return report

    def _write_adapter(self, folder: Path, report: dict[str, Any]) -> dict[str, Any]:
        """``adapter.safetensors`` (before LoRA is merged): what adaptation changed, small;
        a full finetune changed every weight and has none (the merged model is the output)."""
        from ..adapter import save_adapter
        cfg = self.cfg
        figures = {k: report[k] for k in ("perplexity", "layer_mse", "tokens", "data") if k in report}
        full = "finetune" in cfg.stages and cfg.finetune_mode == "full"
        try:
            size = save_adapter(self.student, folder / ADAPTER_FILE, command=self.command, figures=figures,
                                dtype=cfg.adapter_dtype, finetune_mode="full" if full else "lora",
                                source_name=self.source_name)
        except DiJiangError as e:        # no adapter is possible: the merged model is still written
            report["notes"].append(f"no {ADAPTER_FILE}: {e}")
            return {"file": None, "why": str(e)}
        report["notes"].append(f"{ADAPTER_FILE}: {size / 1e6:.2f} MB ({cfg.adapter_dtype}; the DiJiang "
                               "parameters and LoRA factors, for `--adapter`)")
        return {"file": ADAPTER_FILE, "bytes": size, "dtype": cfg.adapter_dtype}

    def _device_name(self) -> str:
        if self.acc.device.type == "cuda":
            return f"{self.acc.num_processes} x {torch.cuda.get_device_name(self.acc.device)}"
        return str(self.acc.device)

    def _report(self) -> dict[str, Any]:
        dev = str(self.acc.device)
        notes = ([f"no GPU: ran on the CPU ({torch.get_num_threads()} thread(s) per process)"]
                 if self.acc.device.type == "cpu" else [f"ran on {self._device_name()}"]) + self.notes
        stages = {}
        for s, p in self.progress.items():
            c = p.curve
            stages[s] = {"steps": p.step, "tokens": p.tokens, "seconds": round(p.seconds, 2),
                         "tokens_per_s": p.tokens / max(p.seconds, 1e-9),
                         "first_loss": c[0]["loss"] if c else float("nan"),
                         "last_loss": c[-1]["loss"] if c else float("nan")}
        return {"model": self.student.args.source.get("name", ""), "variant": self.student.args.variant,
                "data": self.data,
                "tokens": {"train": self.blocks.train.numel(),
                           "heldout": {n: b.numel() for n, b in self.heldout.items()}},
                "config": self.cfg.to_dict(), "world_size": self.acc.num_processes, "device": dev,
                "resumed": self.resume, **self.evals, "stages": stages,
                "curves": {s: p.curve for s, p in self.progress.items()},
                "eval_seconds": round(self.eval_seconds, 2), "total_seconds": round(time.time() - self.t0, 2),
                "notes": notes}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _per_text(evals: dict[str, Any]) -> dict[str, Any]:
    """Figures of a checkpoint written before perplexities were per text (one float each,
    on the training tail) in today's shape, so such a run still resumes."""
    ppl = {k: v if isinstance(v, dict) else {TAIL: v} for k, v in evals.get("perplexity", {}).items()}
    return {**evals, "perplexity": ppl}
