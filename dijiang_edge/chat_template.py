"""A tokenizer's chat template, read from the files every model folder and export carries
(``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``, as
``tokenizer.save_tokenizer`` copies them) and rendered with jinja2 alone: no torch and no
transformers, so an ONNX folder chats on a device that has neither.

The rendering follows the conventions the templates on the Hub are written for (those
of ``apply_chat_template``): a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, loop controls, ``raise_exception`` and ``strftime_now``, a ``tojson``
that keeps non-ASCII text as it is, ``{% generation %}`` blocks rendered as their body,
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import DiJiangError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class ChatTemplate:
    """A compiled chat template and the special tokens it may name."""
    source: str
    origin: str                                   # where it was read (for messages)
    tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._template = _environment().from_string(self.source) if self.source else None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation's text, ending with the assistant's header when asked."""
        from jinja2 import TemplateError
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.tokens)
        except (TemplateError, TypeError, ValueError, KeyError) as e:
            raise DiJiangError(f"the chat template of {self.origin} failed: {e}") from None

    @property
    def eos_token(self) -> str | None:
        return self.tokens.get("eos_token") or None


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DiJiangError("chat templates need jinja2: `pip install jinja2`") from None

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for
        training masks; rendering it is rendering its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    return env


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json spells it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def _config(folder: Path) -> dict:
    p = folder / CONFIG_FILE
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiJiangError(f"{p} is not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _from_config(value: Any) -> str | None:
    """``chat_template`` as a string, or the ``default`` one of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    return None


def load_chat_template(folder: str | Path, override: str | Path | None = None) -> ChatTemplate:
    """The chat template of the tokenizer in ``folder`` (``override``: a Jinja file to use
    instead).  A folder with none is refused with the way out."""
    folder = Path(folder)
    cfg = _config(folder)
    tokens = {k: _token_text(cfg.get(k)) for k in SPECIAL if cfg.get(k) is not None}
    if override is not None:
        p = Path(override)
        try:
            return _compiled(p.read_text(encoding="utf-8"), str(p), tokens)
        except (OSError, UnicodeDecodeError) as e:
            raise DiJiangError(f"--chat-template {p}: cannot read it ({e})") from None
    if (folder / TEMPLATE_FILE).exists():
        p = folder / TEMPLATE_FILE
        return _compiled(p.read_text(encoding="utf-8"), str(p), tokens)
    source = _from_config(cfg.get("chat_template"))
    if source:
        return _compiled(source, str(folder / CONFIG_FILE), tokens)
    raise DiJiangError(f"{folder} has no chat template (no {TEMPLATE_FILE}, no chat_template in "
                       f"{CONFIG_FILE}); give one with --chat-template FILE, or use `generate`")


def _compiled(source: str, origin: str, tokens: dict[str, str]) -> ChatTemplate:
    _environment()                        # without jinja2: its one-line error, here
    from jinja2 import TemplateSyntaxError
    try:
        return ChatTemplate(source, origin, tokens)
    except TemplateSyntaxError as e:
        raise DiJiangError(f"the chat template of {origin} is not valid Jinja (line {e.lineno}: {e.message})") from None
