"""Does `generate` keep constant time and memory per token? (issue 15)

On a tiny random Llama with an 8k vocabulary (no EOS, so it never stops early), through
`dijiang-export generate` itself (its detokenizer and runner included), for the PyTorch
path (a Hugging Face folder) and an ONNX export folder:

* tokens/s over the last 2,000 of 20,000 generated tokens vs the first 2,000 (each
  token's text is timestamped as `generate` writes it): the window's mean rate, and the
  rate from its median token time (robust to other work on a shared machine);
* peak RSS (``ru_maxrss``) of a fresh process prefilling a 20,000-token prompt vs a
  2,000-token one, each generating 16 tokens.

Run from the repository root:  PYTHONPATH=$PWD python scripts/generate_scaling.py
(``--tokens``/``--prompts`` for other sizes; about two minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 8192


def make_models(root: Path) -> dict[str, Path]:
    """A tiny Llama folder with a word-level tokenizer (words ``w0 .. w8191``) and its ONNX export."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    from dijiang_edge.exporters import export
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    src = root / "src"
    T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    export(str(src), root / "onnx", ["onnx"], ["fp32"], adapter=None, parity_tokens=0, kinds=("native",))
    return {"pytorch": src, "onnx": root / "onnx"}


class Stamps:
    """A stdout that records when each piece of text is written (one per token)."""

    def __init__(self):
        self.times: list[float] = []

    def write(self, s: str) -> int:
        if s:
            self.times.append(time.perf_counter())
        return len(s)

    def flush(self) -> None:
        pass


def child(argv: list[str], prompt_words: int, report: str) -> None:
    """One `generate` run in this fresh process; write its timestamps and peak RSS to ``report``."""
    from dijiang_edge.cli import main
    prompt = " ".join(f"w{(7 * i) % VOCAB}" for i in range(prompt_words))
    out, sys.stdout = sys.stdout, Stamps()
    try:
        code = main([*argv, "--prompt", prompt])
    finally:
        stamps, sys.stdout = sys.stdout, out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(report).write_text(json.dumps({"code": code, "times": stamps.times[1:], "max_rss_kib": peak}))


def run(model: Path, new_tokens: int, prompt_words: int, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = ["generate", str(model), "--max-new-tokens", str(new_tokens), "--temperature", "1",
                "--seed", "0", "--threads", str(threads)] + (["--no-adapter"] if (model / "config.json").exists() else [])
        subprocess.run([sys.executable, __file__, "--child", json.dumps([argv, prompt_words, f.name])],
                       check=True, stderr=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=20000, help="tokens generated for the speed figure")
    ap.add_argument("--window", type=int, default=2000, help="tokens per speed window (first / last)")
    ap.add_argument("--prompts", default="2000,20000", help="the two prompt lengths of the memory figure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*json.loads(a.child))
        return
    if a.make:
        make_models(Path(a.make))
        return
    short, long = (int(x) for x in a.prompts.split(","))
    with tempfile.TemporaryDirectory() as d:
        # the models are made in another process: a child's ru_maxrss starts from the RSS
        # of the process it was forked from, so this one stays small (no torch imported)
        subprocess.run([sys.executable, __file__, "--make", d], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        paths = {"pytorch": Path(d) / "src", "onnx": Path(d) / "onnx"}
        for name, path in paths.items():
            r = run(path, a.tokens, 8, a.threads)
            t, w = r["times"], a.window
            assert r["code"] == 0 and len(t) == a.tokens, (r["code"], len(t))
            first, last = t[:w + 1], t[-1 - w:]
            mean = [w / (x[-1] - x[0]) for x in (first, last)]
            median = [1 / statistics.median(b - a for a, b in zip(x, x[1:])) for x in (first, last)]
            mem = {n: run(path, 16, n, a.threads)["max_rss_kib"] / 1024 for n in (short, long)}
            print(f"{name:8s} tokens/s first {w} / last {w} of {a.tokens}: {mean[0]:6.0f} / {mean[1]:6.0f} "
                  f"(ratio {mean[1] / mean[0]:.2f}; from the median token time {median[0]:6.0f} / "
                  f"{median[1]:6.0f}, ratio {median[1] / median[0]:.2f}) | peak RSS prompt {short}: "
                  f"{mem[short]:4.0f} MiB, {long}: {mem[long]:4.0f} MiB (ratio {mem[long] / mem[short]:.2f})",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
