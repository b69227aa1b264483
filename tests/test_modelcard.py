"""Model cards: every `convert` folder gets a README.md whose license comes from the
base model (its card's front matter, a GGUF's metadata) or says to see the base model,
with the conversion settings; GGUF metadata is read from the header alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dijiang_edge.cli import main
from dijiang_edge.errors import DiJiangError
from dijiang_edge.gguf_meta import read_general
from dijiang_edge.modelcard import ADAPTER_META_KEY, base_facts, front_matter


def _convert(src, out, *opts):
    assert main(["convert", str(src), "--out", str(out), *opts]) == 0
    return (out / "README.md").read_text()


def test_the_card_inherits_the_base_models_license_and_lists_the_settings(tiny_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    (src / "README.md").write_text("---\nlicense: mit\ntags:\n- text\n---\n# a model\n")
    card = _convert(src, tmp_path / "conv", "--variant", "normalized", "--window", "4")
    head = card.split("---")[1]
    assert "license: mit" in head and "library_name: transformers" in head
    assert "mit (inherited from the base model; read from the base model's README.md)" in card
    settings = json.loads((tmp_path / "conv" / "config.json").read_text())["dijiang_edge"]
    assert f"| variant | {settings['variant']} |" in card
    assert "| softmax window | 4 tokens of exact softmax beside DiJiang (shared) |" in card
    assert "None recorded: a plain conversion" in card


def test_without_a_stated_license_the_card_says_to_see_the_base_model(tiny_src, tmp_path):
    card = _convert(tiny_src, tmp_path / "conv")
    assert "- License: see the base model" in card and "license:" not in card.split("---")[1]


def test_a_hub_snapshot_names_its_repository(tmp_path):
    snap = tmp_path / "hub" / "models--SomeOrg--Some-Model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    facts = base_facts({"name": str(snap)})
    assert facts["repo"] == "SomeOrg/Some-Model" and facts["license"] is None


def test_gguf_general_metadata_is_read_from_the_header_alone(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Tiny")
    w.add_license("apache-2.0")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(500)])     # skipped, not decoded
    w.add_array("general.languages", ["en", "fr"])
    w.add_uint32("general.file_type", 1)
    w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = read_general(path)
    fields = gguf.GGUFReader(str(path)).fields        # the package's own (slow) reader agrees
    assert got["license"] == fields["general.license"].contents() == "apache-2.0"
    assert got["name"] == "Tiny" and got["file_type"] == "1" and "languages" not in got
    assert base_facts({"name": str(path)})["license"] == "apache-2.0"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DiJiangError, match="could not read the GGUF metadata"):
        read_general(path)


def test_front_matter_reads_single_values_only(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: 'apache-2.0'\nbase_model:\n- a/b\n---\nlicense: no\n")
    assert front_matter(tmp_path / "README.md") == {"license": "apache-2.0"}
    assert front_matter(tmp_path / "missing.md") == {}


def test_the_adapter_metadata_key_is_the_adapters():
    from dijiang_edge.adapter import META_KEY
    assert ADAPTER_META_KEY == META_KEY
