"""Adaptation: make a converted model good again (attention transfer, then
fine-tuning with distillation from the original softmax model), on one CPU or
many GPUs through Hugging Face Accelerate.  See ``docs/adaptation.md``.

Names are imported lazily: the CLI builds the ``adapt`` parser on every run,
and ``dijiang-export generate`` on an ONNX folder must work without torch.
"""

from importlib import import_module

_LAZY = {"adapt": "api", "AdaptConfig": "config", "parse_count": "config", "parse_seconds": "config"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dijiang_edge.adapt' has no attribute {name!r}")


__all__ = list(_LAZY)
