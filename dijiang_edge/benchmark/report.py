"""The benchmark's Markdown report and PNG plots, written from its JSON alone
(``dijiang-export bench`` writes all three; ``write_report`` redraws from a JSON)."""

from __future__ import annotations

from pathlib import Path

from ..bars import BARS

MB = 1e6


def _key(r: dict) -> tuple:
    return (r["format"], r["quant"], r["threads"])


def pairs(data: dict) -> list[tuple[dict, dict | None]]:
    """Each DiJiang run with the softmax run of the same format, quant and threads."""
    soft = {_key(r): r for r in data["runs"] if r["attention"] == "softmax"}
    return [(r, soft.get(_key(r))) for r in data["runs"] if r["attention"] != "softmax"]


def is_peer(r: dict) -> bool:
    """A run of another runtime's own build of the source (onnxruntime-genai, llama.cpp)."""
    return bool(r.get("peer")) or r["format"] in ("genai", "gguf")


def measured(data: dict) -> list[dict]:
    """The runs that have figures (a peer whose runtime is missing has none)."""
    return [r for r in data["runs"] if not r.get("missing")]


def kind(r: dict) -> str:
    """``dijiang``, ``softmax`` (this tool's baseline) or the peer's name."""
    if not is_peer(r):
        return r["attention"]
    return "onnxruntime-genai builder" if r["format"] == "genai" else r.get("graph", "llama.cpp")


def peer_rivals(data: dict) -> list[tuple[dict, list[dict]]]:
    """Each peer run with the DiJiang runs of its quantization and thread count."""
    dj = [r for r in measured(data) if r["attention"] != "softmax"]
    return [(p, [d for d in dj if (d["quant"], d["threads"]) == (p["quant"], p["threads"])])
            for p in data["runs"] if is_peer(p)]


def _who(run: dict, data: dict) -> str:
    """The attention kind, and the file when ``--files`` chose several per quantization."""
    label = f"{run['attention']} `{run['path']}`" if data["settings"].get("files") else run["attention"]
    if len({r["folder"] for r in data["runs"] if r["attention"] != "softmax"}) > 1:
        label += f" ({Path(run['folder']).name})"      # several folders side by side: say which
    return label


def _ms(run: dict) -> dict[int, float]:
    return {p["context"]: p["decode_ms"] for p in run["points"]}


def _fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def decode_table(data: dict) -> list[str]:
    lengths = data["settings"]["lengths"]
    head = "| runtime | quant | threads | attention | " + " | ".join(f"@{n}" for n in lengths) + \
           f" | @{lengths[-1]} / @{lengths[0]} |"
    rows = [head, "|" + "---|" * (5 + len(lengths))]
    for d, s in pairs(data):
        for r in (d, s) if s else (d,):
            ms = _ms(r)
            rows.append(f"| {r['format']} | {r['quant']} | {r['threads']} | {_who(r, data)} | "
                        + " | ".join(_fmt(ms.get(n), ".2f") for n in lengths)
                        + f" | {_fmt(ms[lengths[-1]] / ms[lengths[0]] if lengths[-1] in ms else None, '.2f')} |")
        if s:
            dm, sm = _ms(d), _ms(s)
            rows.append(f"| | | | **speed-up** | " + " | ".join(
                f"**{sm[n] / dm[n]:.2f}x**" if n in sm and n in dm else "–" for n in lengths) + " | |")
    for p, rivals in peer_rivals(data):
        if p.get("missing"):
            rows.append(f"| {p['format']} | {p['quant']} | {p['threads']} | {kind(p)}: not measured, "
                        f"{p['missing']} | " + " | ".join("–" for _ in lengths) + " | – |")
            continue
        pm = _ms(p)
        rows.append(f"| {p['format']} | {p['quant']} | {p['threads']} | {kind(p)} | "
                    + " | ".join(_fmt(pm.get(n), ".2f") for n in lengths)
                    + f" | {_fmt(pm[lengths[-1]] / pm[lengths[0]] if lengths[-1] in pm else None, '.2f')} |")
        for d in rivals:
            dm = _ms(d)
            rows.append(f"| | | | **DiJiang {d['format']} speed-up** | " + " | ".join(
                f"**{pm[n] / dm[n]:.2f}x**" if n in pm and n in dm else "–" for n in lengths) + " | |")
    return rows


def prefill_table(data: dict) -> list[str]:
    lengths = data["settings"]["lengths"]
    rows = ["| runtime | quant | threads | attention | " + " | ".join(f"@{n}" for n in lengths) + " |",
            "|" + "---|" * (4 + len(lengths))]
    for r in measured(data):
        tps = {p["context"]: p["prefill_tok_s"] for p in r["points"]}
        rows.append(f"| {r['format']} | {r['quant']} | {r['threads']} | {kind(r)} | "
                    + " | ".join(_fmt(tps.get(n), ".0f") for n in lengths) + " |")
    return rows


def memory_table(data: dict) -> list[str]:
    lengths = data["settings"]["lengths"]
    rows = ["| runtime | quant | attention | file MB | weights read/token MB | state or KV cache MB "
            + " ".join(f"@{n}" for n in lengths) + " | peak RSS MB (1st thread count) "
            + " ".join(f"@{n}" for n in lengths) + " |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in measured(data):
        k = (r["format"], r["quant"], r["attention"])
        if k in seen:
            continue
        seen.add(k)
        cache = " / ".join(f"{r['cache_bytes'][str(n)] / MB:.1f}" for n in lengths)
        rss = " / ".join(f"{p['peak_rss_bytes'] / MB:.0f}" for p in r["points"])
        rows.append(f"| {r['format']} | {r['quant']} | {kind(r)} | {r['file_bytes'] / MB:.1f} | "
                    f"{r['weights_read']['bytes'] / MB:.1f} | {cache} | {rss} |")
    return rows


def floor_table(data: dict) -> list[str]:
    n0 = data["settings"]["lengths"][0]
    rows = [f"| runtime | quant | threads | attention | bandwidth GB/s | floor ms/token | decode ms @{n0} | "
            f"decode / floor | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in measured(data):
        ms = _ms(r)[n0]
        bw = r.get("bandwidth_bytes_per_s") or data["bandwidth_bytes_per_s"][str(r["threads"])]
        rows.append(f"| {r['format']} | {r['quant']} | {r['threads']} | {kind(r)} | {bw / 1e9:.2f} | "
                    f"{r['floor_ms']:.1f} | {ms:.2f} | {ms / r['floor_ms']:.2f} | {r['peak_rss_bytes'] / MB:.0f} |")
    return rows


def checks(data: dict) -> list[str]:
    """The issue's bars, each with the measured figure and whether it is met."""
    lengths = data["settings"]["lengths"]
    lo, hi = lengths[0], lengths[-1]
    mid = 8192 if 8192 in lengths else None
    out = []
    for d, s in pairs(data):
        ms = _ms(d)
        tag = f"{d['format']} {d['quant']} {d['threads']} thr"
        flat, up, fl = ms[hi] / ms[lo], BARS["speedup_vs_softmax"], BARS["floor_ratio"]
        out.append(f"- {tag}: DiJiang decode @{hi} / @{lo} = {flat:.2f} "
                   f"({'within' if abs(flat - 1) <= BARS['decode_flat'] else 'NOT within'} "
                   f"{100 * BARS['decode_flat']:.0f}%)")
        if s and mid:
            sm = _ms(s)
            out.append(f"- {tag}: speed-up vs softmax @{mid} = {sm[mid] / ms[mid]:.2f}x "
                       f"({'meets' if sm[mid] / ms[mid] >= up else 'misses'} {up:g}x); @{lo} = {sm[lo] / ms[lo]:.2f}x "
                       f"({'not slower' if sm[lo] >= ms[lo] else 'slower'} than softmax)")
        out.append(f"- {tag}: decode @{lo} = {ms[lo] / d['floor_ms']:.2f}x the bandwidth floor "
                   f"({'within' if ms[lo] <= fl * d['floor_ms'] else 'NOT within'} {fl:g}x)")
    for p, rivals in peer_rivals(data):
        if p.get("missing"):
            continue
        pm = _ms(p)
        for d in rivals:
            dm = _ms(d)
            slower = [n for n in lengths if n in dm and n in pm and dm[n] >= pm[n]]
            out.append(f"- {d['format']} {d['quant']} {d['threads']} thr vs {kind(p)}: DiJiang "
                       + ("faster at every context" if not slower else
                          "NOT faster at " + ", ".join(f"@{n}" for n in slower)))
    return out


def markdown(data: dict) -> str:
    st = data["settings"]
    m = data["machine"]
    seen = sorted({(r["threads"], r.get("bandwidth_bytes_per_s") or data["bandwidth_bytes_per_s"][str(r["threads"])])
                   for r in data["runs"]})
    bw = ", ".join(f"{t} thread(s) {b / 1e9:.2f} GB/s" for t, b in seen)
    parts = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; load average at "
        f"start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}. onnxruntime {m['onnxruntime']}"
        + "".join(f", {name} {m[k]}" for k, name in (("executorch", "executorch"), ("onnxruntime_genai",
                  "onnxruntime-genai"), ("llama_cpp_python", "llama-cpp-python")) if k in m)
        + f". Read bandwidth: {bw}.",
        f"Decode: median of {st['tokens']} single-token calls (after {st['warmup']} warm-up) at each context, "
        f"reached by a real prefill; one fresh process per file and thread count"
        + (f", {st['rounds']} rounds in turns (medians)." if st.get("rounds", 1) > 1 else "."),
        "", "**Decode ms/token** (lower is better; speed-up = softmax / DiJiang)", "", *decode_table(data),
        "", "**Prefill tokens/s** (cumulative over the prefill up to each context)", "", *prefill_table(data),
        "", "**Memory** (state or KV cache: computed from the shapes, fp32; peak RSS: measured, whole process "
        "incl. runtime)", "", *memory_table(data),
        "", "**The floor** (weights read per token / measured bandwidth)", "", *floor_table(data),
        "", "**The issue's bars**", "", *checks(data), ""]
    return "\n".join(parts)


def _plot_name(r: dict) -> str:
    return "DiJiang" if r["attention"] != "softmax" else (kind(r) if is_peer(r) else "softmax KV")


def plots(data: dict, out: Path) -> list[str]:
    """``decode_ms.png`` (per format/quant) and ``memory.png``; returns the names written
    (none without matplotlib: the JSON and the Markdown carry every figure)."""
    try:
        import matplotlib
    except ImportError:
        from .measure import progress
        progress("matplotlib is not installed (pip install 'dijiang-edge[bench]'): no PNG plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["format"], r["quant"]) for r in measured(data)})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (fmt, q) in zip(axes[0], groups):
        for r in measured(data):
            if (r["format"], r["quant"]) != (fmt, q):
                continue
            xs = [p["context"] for p in r["points"]]
            ax.plot(xs, [p["decode_ms"] for p in r["points"]], marker="o",
                    linestyle="-" if r["attention"] != "softmax" else "--",
                    label=f"{_plot_name(r)} {r['threads']} thr")
            if r["attention"] != "softmax":
                ax.axhline(r["floor_ms"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{fmt} {q} (dotted: floor)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode ms/token")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode_ms.png", dpi=90)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    lengths = data["settings"]["lengths"]
    seen = set()
    for r in measured(data):
        k = (r["format"], r["quant"], r["attention"])
        style = "-" if r["attention"] != "softmax" else "--"
        name = f"{_plot_name(r)} {r['format']} {r['quant']}"
        if k not in seen:
            seen.add(k)
            a1.plot(lengths, [r["cache_bytes"][str(n)] / MB for n in lengths], style, marker="o", label=name)
        a2.plot([p["context"] for p in r["points"]], [p["peak_rss_bytes"] / MB for p in r["points"]], style,
                marker="o", label=f"{name} {r['threads']} thr")
    for ax, title in ((a1, "state / KV cache (MB)"), (a2, "peak RSS of the process (MB)")):
        ax.set_xlabel("context length (tokens, linear axis)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=90)
    plt.close(fig)
    return ["decode_ms.png", "memory.png"]


def write_report(data: dict, out: Path) -> list[str]:
    """``report.md`` and the plots into ``out``; returns the file names."""
    (out / "report.md").write_text(markdown(data))
    return ["report.md", *plots(data, out)]


def merge(datas: list[dict]) -> dict:
    """One report from several ``bench.json`` of the same lengths (e.g. one per
    quantization or thread count, run separately to fit a time budget)."""
    lengths = {tuple(d["settings"]["lengths"]) for d in datas}
    if len(lengths) != 1:
        from ..errors import DiJiangError
        raise DiJiangError(f"can only merge reports of the same --lengths (got {sorted(lengths)})")
    runs = [{"bandwidth_bytes_per_s": d["bandwidth_bytes_per_s"][str(r["threads"])], **r}
            for d in datas for r in d["runs"]]           # each run keeps the bandwidth of its own session
    out = {**datas[0], "runs": runs, "merged_from": [d["created"] for d in datas]}
    out["machine"] = {**datas[0]["machine"], "load_average_at_start":
                      max((d["machine"]["load_average_at_start"] for d in datas), key=lambda x: x[0])}
    out["bandwidth_bytes_per_s"] = {k: v for d in datas for k, v in d["bandwidth_bytes_per_s"].items()}
    out["settings"] = {**datas[0]["settings"], "threads": sorted({t for d in datas for t in d["settings"]["threads"]})}
    return out
