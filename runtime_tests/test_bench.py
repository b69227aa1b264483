"""``dijiang-export export-baseline`` and ``bench`` on a tiny model: the softmax
baseline equals the Hugging Face model (prefill + decode through its KV cache), the
benchmark writes its JSON / Markdown / PNG with every figure, and bad input fails
with one clear line.  Timings are reported by ``bench``, never asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import rel_err, tiny_hf
from dijiang_edge.cli import main
from dijiang_edge.exporters import export, read_manifest
from dijiang_edge.exporters.baseline import KVCacheLM, export_baseline, hf_logits
from dijiang_edge.runtime import open_export

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def dijiang_dir(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "dj"
    export(str(tiny_src), out, ["onnx"], ["fp32", "int8"], convert_options={"chunk_size": 8},
           parity_tokens=0, threads=1, kinds=("native",))
    return out


@pytest.fixture(scope="module")
def baseline_dir(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "softmax"
    export_baseline(str(tiny_src), out, ["onnx"], ["fp32", "int8"], threads=1)
    return out


@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2"])
def test_kv_cache_model_equals_hf(arch):
    """The slow reference: the re-stated forward with an explicit cache, prefill then
    token by token, gives the HF model's logits."""
    hf = tiny_hf(arch)
    lm = KVCacheLM(hf)
    ids = torch.randint(3, 97, (1, 14), generator=torch.Generator().manual_seed(1))
    past = tuple(torch.zeros(1, lm.n_kv, 0, lm.head_dim) for _ in range(2 * lm.n_layers))
    outs = []
    with torch.no_grad():
        for a, b in ((0, 9), *((i, i + 1) for i in range(9, 14))):
            o = lm(ids[:, a:b], torch.ones(1, b, dtype=torch.long), torch.arange(a, b)[None], *past)
            outs.append(o[0])
            past = o[1:]
    assert rel_err(torch.cat(outs, 1), hf_logits(hf, ids)) < 1e-5


def test_onnx_baseline_equals_hf(tiny_src, baseline_dir):
    """The exported past_key_values graph, run by onnxruntime, against HF's logits:
    a prefill longer than one prefill block, then decode steps."""
    m = read_manifest(baseline_dir)
    assert m["attention"] == "softmax" and {f["attention"] for f in m["files"]} == {"softmax"}
    fp32 = next(f for f in m["files"] if f["quant"] == "fp32")
    names = [p["name"] for p in fp32["inputs"]["past_key_values"]]
    assert names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert fp32["parity"]["max_rel_err"] < 1e-4 and fp32["parity"]["top1_agreement"] == 1.0
    hf = tiny_hf("smollm2")
    ids = torch.randint(3, 97, (1, 600), generator=torch.Generator().manual_seed(2))
    r = open_export(baseline_dir, "onnx", "fp32", threads=1)
    got = [r.forward(ids[:, :590].numpy())] + [r.forward(ids[:, i:i + 1].numpy()) for i in range(590, 600)]
    assert r.pos == 600 and r.cache[0].shape == (1, 1, 600, 24)
    assert rel_err(torch.from_numpy(np.concatenate(got, 1)), hf_logits(hf, ids)) < 1e-4
    q8 = next(f for f in m["files"] if f["quant"] == "int8")
    assert q8["parity"]["max_rel_err"] < 0.1


def test_bench_writes_json_markdown_and_plots(dijiang_dir, baseline_dir, tmp_path, capfd):
    out = tmp_path / "report"
    assert main(["bench", str(dijiang_dir), "--baseline", str(baseline_dir), "--out", str(out),
                 "--lengths", "16,64", "--threads", "1", "--tokens", "4", "--bandwidth-mib", "64"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data) >= {"machine", "bandwidth_bytes_per_s", "settings", "runs"}
    assert data["bandwidth_bytes_per_s"]["1"] > 1e8
    runs = {(r["attention"], r["quant"]): r for r in data["runs"]}
    assert set(runs) == {(a, q) for a in ("dijiang", "softmax") for q in ("fp32", "int8")}
    for r in runs.values():
        assert [p["context"] for p in r["points"]] == [16, 64]
        assert all(p["decode_ms"] > 0 and p["prefill_tok_s"] > 0 and p["peak_rss_bytes"] > 0 for p in r["points"])
        assert r["floor_ms"] > 0 and 0 < r["weights_read"]["bytes"] < r["file_bytes"]
    dj, sm = runs[("dijiang", "fp32")], runs[("softmax", "fp32")]
    assert dj["cache_bytes"]["16"] == dj["cache_bytes"]["64"] == 2 * 3 * 24 * 24 * 4     # 2 layers, 3 heads, 24x24
    assert sm["cache_bytes"]["64"] == 4 * sm["cache_bytes"]["16"] == 2 * 2 * 1 * 24 * 64 * 4
    md = (out / "report.md").read_text()
    assert "Decode ms/token" in md and "speed-up" in md and "floor" in md and "@64" in md
    for png in ("decode_ms.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    merged = tmp_path / "merged"
    assert main(["bench", "--report", str(out / "bench.json"), str(out / "bench.json"), "--out", str(merged)]) == 0
    assert len(json.loads((merged / "bench.json").read_text())["runs"]) == 8 and (merged / "memory.png").exists()
    err = capfd.readouterr().err
    assert "[bench] dijiang onnx int8 thr=1 ctx=    64" in err          # the progress display
    assert all(p["peak_rss_bytes"] < 1 << 30 for r in runs.values() for p in r["points"])   # the child's own


def test_bench_bad_input_is_one_clear_line(dijiang_dir, baseline_dir, tmp_path, capsys):
    cases = [
        (["bench", str(tmp_path), "--baseline", str(baseline_dir)], "not an export folder"),
        (["bench", str(dijiang_dir)], "give --baseline DIR"),
        (["bench", str(dijiang_dir), "--baseline", str(dijiang_dir), "--out", str(tmp_path / "x")],
         "not a softmax baseline"),
        (["bench", str(dijiang_dir), "--baseline", str(baseline_dir), "--quant", "int4"], "no DiJiang file"),
        (["export-baseline", str(dijiang_dir), "--out", str(tmp_path / "b")], "not a model folder"),
        (["bench"], "give export folder(s) DIR"),
        (["bench", str(dijiang_dir), "--report", str(tmp_path / "a.json")], "--report takes no DIR"),
        (["bench", "--report", str(tmp_path / "a.json"), "--attention-forms"], "give one of --report"),
        (["bench", "--report", str(tmp_path / "none.json"), "--out", str(tmp_path / "m")], "is not a bench.json"),
        (["bench", str(dijiang_dir), "--no-baseline", "--lengths", "16,many"], "comma list of integers"),
        (["bench", str(dijiang_dir), "--no-baseline", "--rounds", "0", "--out", str(tmp_path / "r0")],
         "--rounds: must be an integer >= 1"),
        (["bench", str(dijiang_dir), "--no-baseline", "--files", "onnx/nothing*"], "files=onnx/nothing*"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_rounds_report_the_median_of_each_round(dijiang_dir, tmp_path):
    out = tmp_path / "rounds"
    assert main(["bench", str(dijiang_dir), "--no-baseline", "--files", "onnx/native.onnx", "--rounds", "3",
                 "--lengths", "8,24", "--threads", "1", "--tokens", "3", "--bandwidth-mib", "64",
                 "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    (run,) = data["runs"]
    assert run["path"] == "onnx/native.onnx" and run["rounds"] == 3 and data["settings"]["rounds"] == 3
    for p in run["points"]:
        assert len(p["decode_ms_rounds"]) == 3 and p["decode_ms"] == sorted(p["decode_ms_rounds"])[1]
    assert "3 rounds in turns" in (out / "report.md").read_text()


def test_combine_rounds_takes_medians_and_peaks():
    from dijiang_edge.benchmark.measure import combine_rounds

    def one(ms, tps, peak):
        return {"threads": 1, "rss_idle_bytes": 1, "rss_loaded_bytes": 2, "peak_rss_bytes": peak,
                "points": [{"context": 8, "position": 8, "decode_ms": ms, "prefill_tokens": 8, "prefill_s": 8 / tps,
                            "prefill_tok_s": tps, "rss_bytes": peak, "peak_rss_bytes": peak}]}
    got = combine_rounds([one(3.0, 10.0, 5), one(1.0, 30.0, 9), one(2.0, 20.0, 7)])
    (p,) = got["points"]
    assert (p["decode_ms"], p["prefill_tok_s"], p["peak_rss_bytes"], got["peak_rss_bytes"]) == (2.0, 20.0, 9, 9)
    assert p["decode_ms_rounds"] == [3.0, 1.0, 2.0] and got["rounds"] == 3
    assert combine_rounds([one(3.0, 10.0, 5)]) == one(3.0, 10.0, 5)


def test_attention_forms_print_both_forms(capsys):
    assert main(["bench", "--attention-forms", "--lengths", "16,64", "--heads", "2", "--head-dim", "8",
                 "--chunk-size", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("16", "64")]
    assert [r[0] for r in rows] == ["16", "64"] and all(len(r) >= 4 for r in rows), out   # chunked, parallel, ratio
    assert "64/16 tokens (x4)" in out, out


def test_bench_names_a_missing_baseline_quant(tiny_src, dijiang_dir, tmp_path, capsys):
    fp32_only = tmp_path / "softmax_fp32"
    export_baseline(str(tiny_src), fp32_only, ["onnx"], ["fp32"], parity_tokens=0)
    assert main(["bench", str(dijiang_dir), "--baseline", str(fp32_only), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no softmax file for onnx/int8" in err and "export-baseline" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_pte_baseline_equals_hf_and_benches(tiny_src, tmp_path, capfd):
    """The ExecuTorch static-cache baseline (``llama::custom_sdpa``) against HF over two
    prefill calls and decode steps, then ``bench`` over both .pte files (~3 min: lowering)."""
    pytest.importorskip("executorch")
    dj, sm = tmp_path / "dj", tmp_path / "sm"
    export(str(tiny_src), dj, ["pte"], ["fp32"], convert_options={"chunk_size": 8}, parity_tokens=0)
    export_baseline(str(tiny_src), sm, ["pte"], ["fp32"], parity_tokens=150, max_context_len=512)
    e = read_manifest(sm)["files"][0]
    assert e["attention"] == "softmax" and e["parity"]["max_rel_err"] < 1e-4
    assert e["parity"]["top1_agreement"] == 1.0 and e["parity"]["decode_top1_agreement"] == 1.0
    assert main(["bench", str(dj), "--baseline", str(sm), "--out", str(tmp_path / "r"), "--lengths", "16,200",
                 "--threads", "1", "--tokens", "4", "--bandwidth-mib", "64"]) == 0
    data = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert {(r["format"], r["attention"]) for r in data["runs"]} == {("pte", "dijiang"), ("pte", "softmax")}
