"""Adapters: the file holds only what adaptation changed, applying it to the source
rebuilds the adapted model exactly, a wrong source or a damaged file is one clear
error, and ``default`` means the shipped adapter applied (or, without one, the plain
conversion, said on stderr)."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err, tiny_hf, word_tokenizer
from dijiang_edge import adapter as AD
from dijiang_edge.adapt import AdaptConfig
from dijiang_edge.adapt.lora import add_lora
from dijiang_edge.adapt.objectives import is_new_param
from dijiang_edge.cli import main as cli_main
from dijiang_edge.conversion import convert
from dijiang_edge.errors import DiJiangError
from dijiang_edge.model import DiJiangForCausalLM, ModelArgs

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def src(tmp_path_factory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    tiny_hf("smollm2").save_pretrained(root / "model")
    word_tokenizer(root / "model")
    (root / "train.txt").write_text(" ".join(f"w{(i * 7) % 97}" for i in range(12_000)))
    return root


ADAPT = ["adapt", "MODEL", "--data", "TEXT", "--out", "OUT", "--token-budget", "2560", "--seq-len", "32",
         "--eval-tokens", "256", "--lora-rank", "4", "--warmup-steps", "2", "--checkpoint-minutes", "0"]


@pytest.fixture(scope="module")
def adapted(src) -> Path:
    """A real ``dijiang-export adapt`` run (transfer, then LoRA finetune; alpha = 2 x rank)
    on the tiny model: its OUT folder."""
    where = {"MODEL": src / "model", "TEXT": src / "train.txt", "OUT": src / "out"}
    assert cli_main([str(where.get(a, a)) for a in ADAPT]) == 0
    return src / "out"


def _student(src: Path, rank: int = 3, **options) -> DiJiangForCausalLM:
    """A converted model with LoRA on and every adapted tensor moved off its initial value."""
    student = convert(str(src / "model"), adapter=None, **options)
    add_lora(student, rank, 2.0 * rank, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if is_new_param(n) or ".parametrizations.weight.0." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return student.eval()


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@torch.no_grad()
def test_adapter_applied_to_the_source_is_the_adapted_model(adapted, src):
    made = DiJiangForCausalLM.from_pretrained(adapted)              # what adapt wrote (merged)
    ad = AD.load_adapter(adapted / "adapter.safetensors")
    for source in (str(src / "model"), tiny_hf("smollm2")):         # a folder or a transformers model
        model = AD.apply_adapter(ad, source)
        assert rel_err(model(IDS)[0], made(IDS)[0]) < 1e-6
    via_convert = convert(str(src / "model"), adapter=adapted / "adapter.safetensors")
    assert torch.equal(via_convert(IDS)[0], model(IDS)[0])
    assert via_convert.args.source["adapter"] == ad.record() and ad.record()["applied"]
    plain = convert(str(src / "model"), adapter=None)
    assert rel_err(plain(IDS)[0], made(IDS)[0]) > 1e-3                # so the test can tell them apart


def test_adapter_holds_only_what_adaptation_changed(adapted, src):
    report = json.loads((adapted / "report.json").read_text())
    path = adapted / "adapter.safetensors"
    assert report["adapter"] == {"file": "adapter.safetensors", "bytes": path.stat().st_size, "dtype": "float32"}
    tensors = load_file(str(path))
    new = {n for n in DiJiangForCausalLM.from_pretrained(adapted).state_dict() if is_new_param(n)}
    lora = {k for k in tensors if k.endswith(AD.LORA_SUFFIXES)}
    assert set(tensors) - lora == new and lora                       # no source or merged weight in it
    ad = AD.load_adapter(path)
    meta = ad.meta
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0 and len(ad.lora) == len(lora) // 2
    assert {t.rsplit(".", 1)[-1] for t in meta["lora"]["targets"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert meta["command"].startswith("dijiang-export adapt ") and "--lora-rank 4" in meta["command"]
    assert meta["figures"]["perplexity"] == report["perplexity"]
    assert meta["settings"] == AD.settings_of(convert(str(src / "model"), adapter=None).args)
    assert meta["source"]["name"] == str(src / "model") and all(t.dtype == torch.float32 for t in tensors.values())


def test_settings_split_matches_the_model_args_marker():
    """Every ``ModelArgs`` field after ``# DiJiang settings`` is stored (``source`` apart),
    every field before it is a source field: a new field lands on one side or this fails."""
    text = (ROOT / "dijiang_edge" / "model.py").read_text()
    body = text.split("class ModelArgs", 1)[1].split("@property", 1)[0]
    before, after = body.split("# DiJiang settings", 1)
    field = re.compile(r"^    (\w+): ", re.M)
    assert field.findall(before) == list(AD.SOURCE_FIELDS)
    assert set(field.findall(after)) == set(AD.dijiang_fields()) | set(AD.IDENTITY_FIELDS)
    assert {f.name for f in dataclasses.fields(ModelArgs)} == \
        set(AD.SOURCE_FIELDS) | set(AD.dijiang_fields()) | set(AD.IDENTITY_FIELDS)


@torch.no_grad()
@pytest.mark.parametrize("dtype,bar", [("float32", 1e-6), ("float16", 2e-2), ("bfloat16", 5e-2)])
def test_size_formula_and_16_bit_storage(src, tmp_path, dtype, bar):
    student = _student(src)
    path = tmp_path / "a.safetensors"
    size = AD.save_adapter(student, path, command="test", figures={}, dtype=dtype)
    assert size == path.stat().st_size
    assert _data_bytes(path) == AD.adapter_nbytes(student.args, 3, dtype)
    assert all(t.dtype == AD.DTYPES[dtype] for t in load_file(str(path)).values())
    got = AD.apply_adapter(AD.load_adapter(path), str(src / "model"))
    assert rel_err(got(IDS)[0], student(IDS)[0]) < bar


@torch.no_grad()
def test_a_setting_no_conversion_option_sets_is_rebuilt(src, tmp_path):
    """``eps`` is no option of ``convert``: the stored value still rebuilds the model exactly."""
    student = _student(src, variant="normalized")
    student.args.eps = 1e-2                     # every layer reads this ModelArgs
    AD.save_adapter(student, tmp_path / "a.safetensors", command="test", figures={})
    got = AD.apply_adapter(AD.load_adapter(tmp_path / "a.safetensors"), str(src / "model"))
    assert got.args.eps == 1e-2 and got.args.variant == "normalized"
    assert rel_err(got(IDS)[0], student(IDS)[0]) < 1e-6
    student.args.eps = 1e-6
    assert rel_err(got(IDS)[0], student(IDS)[0]) > 1e-6        # eps mattered: the test can fail


def test_shipped_adapter_is_at_most_32_mb(src, tmp_path):
    """The shipped adapter's size when the package holds it; else the size formula it
    will be held to, on a tiny model's file (transfer only: no LoRA factors)."""
    if AD.SHIPPED.is_file():
        assert AD.SHIPPED.stat().st_size <= AD.MAX_SHIPPED_BYTES
        ad = AD.load_adapter(AD.SHIPPED)
        assert ad.meta["source"]["name"] == "default" and ad.meta["command"]
        return
    student = convert(str(src / "model"), adapter=None)
    path = tmp_path / "a.safetensors"
    AD.save_adapter(student, path, command="test", figures={})
    assert _data_bytes(path) == AD.adapter_nbytes(student.args, 0) > 0
    assert AD.load_adapter(path).lora == {} and AD.load_adapter(path).meta["lora"] is None


def test_wrong_source_and_clashing_options_are_refused(adapted, src, tmp_path):
    ad = AD.load_adapter(adapted / "adapter.safetensors")
    with pytest.raises(DiJiangError, match="made for other weights"):
        AD.apply_adapter(ad, tiny_hf("smollm2", seed=1))
    with pytest.raises(DiJiangError, match="another shape"):
        AD.apply_adapter(ad, tiny_hf("llama"))
    with pytest.raises(DiJiangError, match="fixes the DiJiang settings: variant='normalized'"):
        AD.apply_adapter(ad, str(src / "model"), variant="normalized")
    with pytest.raises(DiJiangError, match="not to a converted one"):
        AD.apply_adapter(ad, convert(str(src / "model"), adapter=None))
    merged = convert(str(src / "model"), adapter=adapted / "adapter.safetensors")
    merged.save_pretrained(tmp_path / "conv")
    again = convert(tmp_path / "conv", adapter=adapted / "adapter.safetensors")   # already in it: as is
    assert torch.equal(again(IDS)[0], merged(IDS)[0])
    with pytest.raises(DiJiangError, match="already converted"):
        convert(adapted, adapter=adapted / "adapter.safetensors")
    with pytest.raises(DiJiangError, match="already has an adapter"):
        AD.save_adapter(merged, tmp_path / "b.safetensors", command="", figures={})
    with pytest.raises(DiJiangError, match="full finetune"):
        AD.save_adapter(_student(src), tmp_path / "c.safetensors", command="", figures={}, finetune_mode="full")


def test_a_run_goes_on_from_an_adapter(adapted, src, tmp_path, capsys):
    """``adapt --init-adapter``: the run starts at the adapted model (its converted
    perplexity is the adapted one) and its adapter is again relative to the source."""
    first = AD.load_adapter(adapted / "adapter.safetensors")
    where = {"MODEL": src / "model", "TEXT": src / "train.txt", "OUT": tmp_path / "again"}
    argv = [str(where.get(a, a)) for a in ADAPT] + ["--stages", "finetune", "--init-adapter",
                                                     str(adapted / "adapter.safetensors")]
    argv[argv.index("--token-budget") + 1] = "640"
    assert cli_main(argv) == 0
    before = json.loads((adapted / "report.json").read_text())["perplexity"]["after_finetune"]
    after = json.loads((tmp_path / "again" / "report.json").read_text())["perplexity"]
    assert abs(after["converted"]["tail"] - before["tail"]) / before["tail"] < 1e-4     # same held-out blocks
    plain = json.loads((adapted / "report.json").read_text())["perplexity"]["converted"]["tail"]
    assert abs(after["converted"]["tail"] - plain) / plain > 0.05          # it did not start from the plain one
    second = AD.load_adapter(tmp_path / "again" / "adapter.safetensors")
    assert second.settings == first.settings and set(second.lora) == set(first.lora)
    moved = max(rel_err(second.lora[n][1], first.lora[n][1]) for n in first.lora)
    assert 0 < moved < 1.0                                   # went on from B, did not restart from zero
    made = DiJiangForCausalLM.from_pretrained(tmp_path / "again")
    assert rel_err(AD.apply_adapter(second, str(src / "model"))(IDS)[0], made(IDS)[0]) < 1e-6
    from dijiang_edge.adapt import adapt
    with pytest.raises(DiJiangError, match="continue it with --lora-rank 4"):
        adapt(str(src / "model"), [src / "train.txt"], tmp_path / "bad", AdaptConfig(
            token_budget=640, lora_rank=8, lora_alpha=16.0, stages="finetune"), init_adapter=first.path)
    capsys.readouterr()
    clash = argv[:argv.index("--out") + 1] + [str(tmp_path / "bad")] + argv[argv.index("--out") + 2:]
    assert cli_main(clash + ["--window", "4"]) != 0
    assert "fixes the DiJiang settings: window=4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_adapter_dtype_is_checked_before_any_work():
    with pytest.raises(DiJiangError, match="adapter dtype 'int4'"):
        AdaptConfig(token_budget=1000, adapter_dtype="int4")


def test_missing_damaged_and_foreign_files_are_one_line_errors(adapted, tmp_path):
    good = (adapted / "adapter.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    ad = AD.load_adapter(adapted / "adapter.safetensors")
    save_file({k: v.contiguous() for k, v in load_file(str(adapted / "adapter.safetensors")).items()},
              str(tmp_path / "v9.safetensors"), metadata={AD.META_KEY: json.dumps({**ad.meta, "version": 9})})
    cases = {"nope.safetensors": "no adapter file", "cut.safetensors": "not a readable safetensors",
             "junk.safetensors": "not a readable safetensors", "plain.safetensors": "not a dijiang-edge adapter",
             "v9.safetensors": "format version 9"}
    for name, msg in cases.items():
        with pytest.raises(DiJiangError, match=msg) as e:
            AD.load_adapter(tmp_path / name)
        assert "\n" not in str(e.value)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_default_means_the_shipped_adapter(adapted, src, tmp_path, capsys, monkeypatch):
    """``default`` stood in by the tiny model, the shipped adapter by the test's: convert,
    generate and export apply it; ``--no-adapter`` and a missing shipped file do not."""
    import dijiang_edge.default_model as DM
    monkeypatch.setattr(DM, "default_source_dir", lambda: src / "model")
    monkeypatch.setattr(AD, "SHIPPED", adapted / "adapter.safetensors")
    made = DiJiangForCausalLM.from_pretrained(adapted)
    assert _cli(capsys, "convert", "default", "--out", tmp_path / "a")[0] == 0
    got = DiJiangForCausalLM.from_pretrained(tmp_path / "a")
    assert rel_err(got(IDS)[0], made(IDS)[0]) < 1e-6 and got.args.source["adapter"]["file"] == "adapter.safetensors"
    assert _cli(capsys, "convert", "default", "--no-adapter", "--out", tmp_path / "p")[0] == 0
    assert "adapter" not in DiJiangForCausalLM.from_pretrained(tmp_path / "p").args.source
    code, err = _cli(capsys, "convert", "default", "--variant", "normalized", "--out", tmp_path / "n")
    assert code == 2 and "--no-adapter" in err and len(err.strip().splitlines()) == 1
    assert _cli(capsys, "generate", "default", "--prompt", "w1 w2", "--max-new-tokens", "2")[0] == 0
    monkeypatch.setattr(AD, "SHIPPED", tmp_path / "absent.safetensors")
    code, err = _cli(capsys, "export", "default", "--out", tmp_path / "e", "--parity-tokens", "64")
    assert code == 0 and "default model is not adapted" in err
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["adapter"] == {"applied": False}


def test_export_records_the_adapter_and_check_rebuilds_with_it(adapted, src, tmp_path, capsys):
    from dijiang_edge.check import reference_model
    from dijiang_edge.manifest import read
    path = adapted / "adapter.safetensors"
    code, _ = _cli(capsys, "export", src / "model", "--adapter", path, "--out", tmp_path / "e",
                   "--parity-tokens", "64")
    assert code == 0
    m = read(tmp_path / "e")
    assert m["adapter"] == AD.load_adapter(path).record()
    ref, _ = reference_model(m, None)
    assert rel_err(ref(IDS)[0], DiJiangForCausalLM.from_pretrained(adapted)(IDS)[0]) < 1e-6
    code, err = _cli(capsys, "generate", tmp_path / "e", "--prompt", "w1", "--adapter", path)
    assert code == 2 and "export folder" in err
