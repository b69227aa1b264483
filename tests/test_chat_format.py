"""``chat_format.json`` (``dijiang_edge.chat_format``): a template's turn pieces, fed in
order, equal transformers' rendering of the whole conversation; templates that cannot be
fed turn by turn, or none, get a per-family format; every export writes the file; the
Android tests' fixtures are what the exporter derives today."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dijiang_edge import chat_format as C
from dijiang_edge.exporters import export, read_manifest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("android_chat_fixtures", ROOT / "scripts/android_chat_fixtures.py")
FIX = importlib.util.module_from_spec(spec)
spec.loader.exec_module(FIX)

CONTENTS = ["Hello", "two\nlines", "ünïcode ✓ and {{ braces }}", "Why?", "Fine.", "ok then"]


def _render(folder: Path, messages: list[dict], generation_prompt: bool = True) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _fed(fmt: dict, users: list[str], replies: list[str]) -> str:
    """What a stateful runner has been fed when the reply to the last user message starts."""
    text = fmt["first"] + users[0] + fmt["user_suffix"]
    for reply, user in zip(replies, users[1:]):
        text += reply + fmt["between"] + user + fmt["user_suffix"]
    return text


def _messages(users: list[str], replies: list[str]) -> list[dict]:
    msgs = []
    for i, u in enumerate(users):
        msgs.append({"role": "user", "content": u})
        if i < len(replies):
            msgs.append({"role": "assistant", "content": replies[i]})
    return msgs


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("templates")
    return {"SMOLLM2": FIX.smollm2_folder(where), "HEADERS": FIX.template_folder("HEADERS", where),
            "INST": FIX.template_folder("INST", where)}


def test_smollm2_pieces_are_its_template_cut_at_the_turns(folders):
    fmt = C.derive(folders["SMOLLM2"])
    assert fmt == {"version": 1, "source": "chat_template",
                   "first": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                            "Face<|im_end|>\n<|im_start|>user\n",
                   "user_suffix": "<|im_end|>\n<|im_start|>assistant\n", "between": "<|im_end|>\n<|im_start|>user\n"}


@pytest.mark.parametrize("name", ["SMOLLM2", "HEADERS", "INST"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_feeding_the_pieces_equals_the_rendering(folders, name, turns):
    fmt = C.derive(folders[name])
    users, replies = CONTENTS[0::2][:turns], CONTENTS[1::2][:turns - 1]
    assert _fed(fmt, users, replies) == _render(folders[name], _messages(users, replies))


def _with_template(folder: Path, template: str) -> Path:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": template}))
    return folder


def test_a_template_that_rewrites_history_gets_the_family_format(folders, tmp_path):
    import shutil
    folder = Path(shutil.copytree(folders["HEADERS"], tmp_path / "h"))
    _with_template(folder, "{% for m in messages %}{% if loop.last %}(last) {% endif %}"
                           "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    fmt = C.derive(folder)
    assert fmt["source"].startswith("family: Llama 3") and "a second turn changes" in fmt["note"]
    assert fmt["between"] == "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"


def test_a_template_that_raises_gets_the_family_format(folders, tmp_path):
    import shutil
    folder = Path(shutil.copytree(folders["INST"], tmp_path / "i"))
    _with_template(folder, "{{ raise_exception('system messages only') }}")
    fmt = C.derive(folder)
    assert fmt["source"].startswith("plain") and "failed to render" in fmt["note"], fmt


def test_family_formats_follow_the_vocabulary():
    chatml, src = C.family_format({"<|im_start|>", "<|im_end|>", "a"})
    assert src.startswith("family: ChatML") and chatml["between"] == "<|im_end|>\n<|im_start|>user\n"
    llama3, src = C.family_format({"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"})
    assert src.startswith("family: Llama 3") and llama3["first"].startswith("<|begin_of_text|>")
    plain, src = C.family_format({"a", "b"})
    assert src.startswith("plain") and plain == {"first": "User: ", "user_suffix": "\nAssistant:", "between": "\nUser: "}


def test_every_export_writes_the_chat_format(tiny_src, tmp_path):
    out = tmp_path / "e"
    export(str(tiny_src), out, ["onnx"], ["fp32"], convert_options={"chunk_size": 8}, parity_tokens=0)
    written = json.loads((out / C.NAME).read_text())
    assert written == C.derive(out) and written["source"].startswith("plain")    # word tokenizer: no template
    assert read_manifest(out)["chat_format"] == {"file": C.NAME, "source": written["source"]}


def test_the_android_fixtures_are_what_the_exporter_derives_today():
    assert FIX.KOTLIN.read_text() == FIX.kotlin(), "stale: run python scripts/android_chat_fixtures.py"
