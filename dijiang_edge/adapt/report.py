"""``report.json`` (every figure), ``report.md`` (the table a person reads) and
``loss_curve.png`` (one panel per stage) in the output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PPL_ROWS = (("original", "original model (softmax attention)"),
            ("converted", "converted, before adaptation"),
            ("after_transfer", "after attention transfer"),
            ("after_finetune", "after fine-tuning"))
PPL_COLUMNS = (("original", "original (softmax)"), ("converted", "converted"),
               ("after_transfer", "after transfer"), ("after_finetune", "after finetune"))


def ppl_table(rows: dict[str, dict[str, float]], tokens: dict[str, int],
              columns: tuple[tuple[str, str], ...], ratio: tuple[str, str] | None) -> list[str]:
    """A Markdown table of perplexities, one row per held-out text and one column per
    model (those measured), then ``ratio`` = (model, reference) as "x times"."""
    cols = [(k, label) for k, label in columns if any(k in r for r in rows.values())]
    ratio = ratio if ratio and all(k in dict(cols) for k in ratio) else None
    head = ["held-out text", "tokens"] + [label for _, label in cols] + (
        [f"{dict(cols)[ratio[0]]} / {dict(cols)[ratio[1]]}"] if ratio else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for text, r in rows.items():
        cells = [text, f"{tokens.get(text, 0):,}"] + [f"{r[k]:,.2f}" if k in r else "" for k, _ in cols]
        if ratio:
            cells.append(f"{r[ratio[0]] / r[ratio[1]]:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves(folder / "loss_curve.png", report["curves"], report["perplexity"])
    (folder / "report.md").write_text(markdown(report))


def by_text(ppl: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``perplexity[model][text]`` turned to ``[text][model]``, texts in their order."""
    out: dict[str, dict[str, float]] = {}
    for model, per_text in ppl.items():
        for text, v in per_text.items():
            out.setdefault(text, {})[model] = v
    return out


def markdown(r: dict[str, Any]) -> str:
    ppl, mse, held = r["perplexity"], r.get("layer_mse", {}), r["tokens"]["heldout"]
    last = next((k for k, _ in reversed(PPL_COLUMNS) if k in ppl), "converted")
    lines = [f"# Adaptation report: {r['model']}", "",
             f"Variant `{r['variant']}`, data {', '.join(r['data'])} ({r['tokens']['train']:,} training tokens), "
             f"{r['world_size']} process(es) on {r['device']}.", "",
             "Held-out perplexity" + (" (\"tail\": the end of the training text, never trained on)"
                                      if "tail" in held else "") + ":", ""]
    lines += ppl_table(by_text(ppl), held, PPL_COLUMNS, (last, "original"))
    if mse:
        lines += ["", f"Layer attention relative MSE (on {next(iter(held))}): " + ", ".join(
            f"{label} {mse[k]:.4f}" for k, label in PPL_ROWS if k in mse) + "."]
    lines += ["", "| stage | steps | tokens | seconds | tokens/s | first loss | last loss |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s['steps']} | {s['tokens']:,} | {s['seconds']:.0f} | {s['tokens_per_s']:,.0f} | "
                     f"{s['first_loss']:.4f} | {s['last_loss']:.4f} |")
    lines += ["", f"Evaluation took {r['eval_seconds']:.0f} s (not counted in the budget); "
              f"whole run {r['total_seconds']:.0f} s.", "", "![loss curve](loss_curve.png)", ""]
    lines += [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, curves: dict[str, list[dict]], ppl: dict[str, float]) -> None:
    """One panel per stage (training loss vs tokens), then held-out perplexity vs tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, c in curves.items() if c]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.5 * (len(names) + 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = curves[name]
        toks = [p["tokens"] for p in c]
        for key in ("loss", "ce", "kl"):
            if key in c[0]:
                ax.plot(toks, [p[key] for p in c], label=key, alpha=1.0 if key == "loss" else 0.6)
        ax.set(title=f"{name}: training loss", xlabel="tokens", yscale="log")
        ax.legend()
    ax = axes[0][-1]
    for text, r in by_text(ppl).items():
        xs, ys, at = [0], [r["converted"]], 0
        for name in names:
            at += curves[name][-1]["tokens"]
            if f"after_{name}" in r:
                xs.append(at)
                ys.append(r[f"after_{name}"])
        line, = ax.plot(xs, ys, "o-", label=f"DiJiang, {text}")
        ax.axhline(r["original"], ls="--", color=line.get_color(), alpha=0.6, label=f"original, {text}")
    ax.set(title="held-out perplexity", xlabel="training tokens", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
