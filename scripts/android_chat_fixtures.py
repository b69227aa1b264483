"""Write the Android app's chat fixtures (``ChatFormatFixtures.kt`` in its JVM tests): for
three chat templates, the ``chat_format.json`` the exporter derives and one whole
conversation as transformers renders it. The Kotlin tests feed the conversation turn by
turn through ``ChatSession`` and compare with the rendering, which checks the app against
real templates without a Jinja engine in Kotlin. ``tests/test_chat_format.py`` fails when
this file is stale.

    python scripts/android_chat_fixtures.py            # rewrites the Kotlin file

The templates: SmolLM2-135M-Instruct's own (the default model's tokenizer), and two
written here in the styles of other families (header tokens, as Llama 3; ``[INST]``
blocks, as Mistral).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KOTLIN = ROOT / "android_demo/app/src/test/java/org/dijiang/demo/core/ChatFormatFixtures.kt"

HEADERS = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
SPECIAL = {"HEADERS": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "INST": ["<s>", "</s>", "[INST]", "[/INST]"]}
BOS_EOS = {"HEADERS": ("<|begin_of_text|>", "<|eot_id|>"), "INST": ("<s>", "</s>")}
CONVERSATION = [("user", "Hello there"), ("assistant", "Hi! How can I help?"),
                ("user", "Name three long rivers."), ("assistant", "The Nile, the Amazon and the Yangtze."),
                ("user", "Which one is the longest?")]


def template_folder(name: str, where: Path) -> Path:
    """A tokenizer folder holding template ``name`` (its tokenizer: words + special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = where / name.lower()
    folder.mkdir(parents=True)
    words = {w: i for i, w in enumerate(["[UNK]", *SPECIAL[name]])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.add_special_tokens(SPECIAL[name])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = BOS_EOS[name]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "chat_template": {"HEADERS": HEADERS, "INST": INST}[name]}))
    return folder


def smollm2_folder(where: Path) -> Path:
    """The default model's tokenizer files (the template the app is first used with)."""
    from dijiang_edge.default_model import default_source_dir
    from dijiang_edge.tokenizer import FILES
    src, folder = default_source_dir(), where / "smollm2"
    folder.mkdir(parents=True)
    for f in FILES:
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    return folder


def fixture(folder: Path) -> dict:
    """The derived format, the conversation's rendering and the EOS text of ``folder``."""
    from transformers import AutoTokenizer
    from dijiang_edge.chat_format import derive
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in CONVERSATION], tokenize=False,
                                       add_generation_prompt=True)
    return {"format": derive(folder), "rendered": rendered, "eos": tok.eos_token}


def _raw(text: str) -> str:
    """``text`` (JSON) as a Kotlin raw string literal."""
    text = text.replace("$", "\\u0024")              # a Kotlin template sign; JSON reads the escape back
    assert '"""' not in text
    return '"""' + text + '"""'


def kotlin() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        folders = {"SMOLLM2": smollm2_folder(where), "HEADERS": template_folder("HEADERS", where),
                   "INST": template_folder("INST", where)}
        fixtures = {name: fixture(f) for name, f in folders.items()}
    lines = ["package org.dijiang.demo.core", "",
             "// Written by scripts/android_chat_fixtures.py (do not edit): chat_format.json as the exporter",
             "// derives it, and the conversation as transformers' apply_chat_template renders it.",
             "", "class ChatFixture(val formatJson: String, val renderedJson: String, val eos: String) {",
             "    val format: ChatFormat get() = ChatFormat.fromJson(formatJson)",
             "    val rendered: String get() = Json.parse(renderedJson) as String",
             "}", "", "object ChatFormatFixtures {",
             f"    val CONVERSATION_JSON = {_raw(json.dumps([list(t) for t in CONVERSATION]))}", ""]
    for name, fx in fixtures.items():
        assert "$" not in fx["eos"]
        lines += [f"    val {name} = ChatFixture(",
                  f"        {_raw(json.dumps(fx['format'], ensure_ascii=True))},",
                  f"        {_raw(json.dumps(fx['rendered'], ensure_ascii=True))},",
                  f"        {json.dumps(fx['eos'])}",              # a JSON string is a Kotlin string literal
                  "    )", ""]
    lines += ["    val ALL = listOf(" + ", ".join(f'"{n}" to {n}' for n in fixtures) + ")", "}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    KOTLIN.write_text(kotlin())
    print(f"wrote {KOTLIN.relative_to(ROOT)}")
