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


def write_report(folder: Path, report: dict[str, Any]) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    plot_curves(folder / "loss_curve.png", report["curves"], report["perplexity"])
    (folder / "report.md").write_text(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    ppl, mse = r["perplexity"], r.get("layer_mse", {})
    lines = [f"# Adaptation report: {r['model']}", "",
             f"Variant `{r['variant']}`, data {', '.join(r['data'])} ({r['tokens']['train']:,} training / "
             f"{r['tokens']['heldout']:,} held-out tokens), {r['world_size']} process(es) on {r['device']}.", "",
             "| model | held-out perplexity | layer attention rel. MSE |", "|---|---:|---:|"]
    for key, label in PPL_ROWS:
        if key in ppl:
            m = mse.get(key)
            lines.append(f"| {label} | {ppl[key]:,.2f} | {'' if m is None else f'{m:.4f}'} |")
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
    ax, xs, ys, at = axes[0][-1], [0], [ppl["converted"]], 0
    for name in names:
        at += curves[name][-1]["tokens"]
        if f"after_{name}" in ppl:
            xs.append(at)
            ys.append(ppl[f"after_{name}"])
    ax.plot(xs, ys, "o-", label="DiJiang")
    ax.axhline(ppl["original"], ls="--", color="gray", label="original (softmax)")
    ax.set(title="held-out perplexity", xlabel="training tokens", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
