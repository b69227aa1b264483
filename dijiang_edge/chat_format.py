"""``chat_format.json``: the model's chat template cut into the pieces a stateful chat
feeds one turn at a time, for runners that keep the recurrent state between turns and
cannot run Jinja (the Android app).

A conversation is fed as::

    first + user_1 + user_suffix + reply_1 + between + user_2 + user_suffix + reply_2 + ...

``first`` holds what the template puts before the first user message (a default system
block, a BOS). ``user_suffix`` closes a user message and opens the assistant's reply (the
generation prompt). ``between`` closes a reply that ended at its EOS token and opens the
next user message. A runner never feeds back the token it sampled last, so ``between``
begins with the EOS text. The pieces come from rendering the tokenizer's own template
(``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``, read and rendered
by ``chat_template``, as ``dijiang-export chat`` does) over sentinel
conversations of one, two and three turns. They are kept only if those renderings are
exactly the concatenation above. A template that rewrites earlier turns fails that test.
So does a folder with no template. Either gets a per-family format chosen by the
vocabulary's special tokens (ChatML, Llama 3's headers), or plain ``User:`` /
``Assistant:`` lines. ``source`` in the file says which one was used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

NAME = "chat_format.json"
VERSION = 1
USERS = ("dijianguser1x", "dijianguser2x", "dijianguser3x")      # sentinels no template alters
REPLIES = ("dijiangreply1x", "dijiangreply2x")

Render = Callable[[list[dict[str, str]], bool], str]


class NotIncremental(ValueError):
    """The template's renderings are not first + user + suffix + reply + between + ..."""


def _conversation(turns: int) -> list[dict[str, str]]:
    msgs = []
    for i in range(turns):
        msgs.append({"role": "user", "content": USERS[i]})
        if i + 1 < turns:
            msgs.append({"role": "assistant", "content": REPLIES[i]})
    return msgs


def pieces(render: Render) -> dict[str, str]:
    """``first``, ``user_suffix``, ``between`` of the template behind ``render(messages,
    add_generation_prompt)``; ``NotIncremental`` when turn-by-turn feeding cannot equal it."""
    r1, r2, r3 = (render(_conversation(n), True) for n in (1, 2, 3))
    u1, u2, u3 = USERS
    a1, a2 = REPLIES
    if r1.count(u1) != 1:
        raise NotIncremental("the user's message does not appear once in the rendering")
    first, suffix = r1.split(u1)
    if not r2.startswith(r1 + a1):
        raise NotIncremental("a second turn changes how the first one renders")
    between, _, tail = r2[len(r1) + len(a1):].partition(u2)
    if tail != suffix:
        raise NotIncremental("the second user message closes differently from the first")
    if r3 != r2 + a2 + between + u3 + suffix:
        raise NotIncremental("the third turn is not fed like the second")
    if not between:
        raise NotIncremental("nothing separates a reply from the next user message")
    return {"first": first, "user_suffix": suffix, "between": between}


def family_format(vocab: set[str]) -> tuple[dict[str, str], str]:
    """A format for a tokenizer without a (usable) template, by its special tokens."""
    if {"<|im_start|>", "<|im_end|>"} <= vocab:
        return ({"first": "<|im_start|>user\n", "user_suffix": "<|im_end|>\n<|im_start|>assistant\n",
                 "between": "<|im_end|>\n<|im_start|>user\n"}, "family: ChatML (<|im_start|>, <|im_end|>)")
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= vocab:
        bos = "<|begin_of_text|>" if "<|begin_of_text|>" in vocab else ""
        head = "<|start_header_id|>{}<|end_header_id|>\n\n"
        return ({"first": bos + head.format("user"), "user_suffix": "<|eot_id|>" + head.format("assistant"),
                 "between": "<|eot_id|>" + head.format("user")}, "family: Llama 3 headers (<|start_header_id|>)")
    return ({"first": "User: ", "user_suffix": "\nAssistant:", "between": "\nUser: "},
            "plain: User:/Assistant: lines (no chat template; replies end at the EOS or the token limit)")


def _has_template(folder: Path) -> bool:
    from .chat_template import CONFIG_FILE, TEMPLATE_FILE, _from_config
    if (folder / TEMPLATE_FILE).exists():
        return True
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(_from_config(cfg.get("chat_template")))


def _vocab(folder: Path) -> set[str]:
    from tokenizers import Tokenizer
    return set(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True))


def derive(folder: str | Path) -> dict[str, Any]:
    """The chat format of the tokenizer files in ``folder`` (an export or model folder).
    The template is read and rendered as ``dijiang-export chat`` does (``chat_template``:
    jinja2 alone), so the pieces are those of the chat command too."""
    from .chat_template import load_chat_template
    from .errors import DiJiangError
    folder = Path(folder)
    template, why = None, "no chat template"
    if _has_template(folder):
        try:
            template = load_chat_template(folder)
        except DiJiangError as e:                    # not valid Jinja, no jinja2
            why = str(e).replace(str(folder), folder.name)
    if template is not None:
        try:
            return {"version": VERSION, **pieces(template.render), "source": "chat_template"}
        except NotIncremental as e:
            why = f"chat template not usable turn by turn: {e}"
        except DiJiangError as e:                    # a template that raises on our conversations
            why = f"chat template failed to render ({str(e)[:160]})"
    fmt, source = family_format(_vocab(folder))
    return {"version": VERSION, **fmt, "source": source, "note": why}


def write(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/chat_format.json`` (from the tokenizer files already there)."""
    fmt = derive(folder)
    (Path(folder) / NAME).write_text(json.dumps(fmt, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return fmt
