"""dijiang-edge: DiJiang frequency-domain linear attention for on-device LLMs.

Public API::

    model = dijiang_edge.convert("default")            # or a HF model / folder / .gguf
    logits, state = model(input_ids)                    # state=None starts a sequence
    logits, state = model(next_ids, state)              # continue: O(1) per token
    ids, state = dijiang_edge.generate(model, input_ids, max_new_tokens=32)
    model.save_pretrained("out"); dijiang_edge.load("out")

    from transformers import AutoModelForCausalLM      # a converted folder, as transformers sees it
    hf = AutoModelForCausalLM.from_pretrained("out")    # DiJiangHFForCausalLM: generate(), pipeline()

Names are imported lazily so that ``dijiang_edge.runtime`` (onnxruntime + numpy)
works on a device without torch; the ``dijiang`` model type is registered with
transformers' Auto classes when transformers loads them (``hf_register.py``).
"""

from importlib import import_module

from . import hf_register as _hf_register
from .errors import DiJiangError

__version__ = "0.1.0"

_LAZY = {
    "convert": "conversion", "SUPPORTED": "conversion",
    "generate": "generation", "stream": "generation",
    "DiJiangForCausalLM": "model", "ModelArgs": "model", "RecurrentState": "model",
    "DiJiangConfig": "hf_config", "DiJiangHFForCausalLM": "hf_model",
}

_hf_register.install()


def load(path):
    """Load a model written by ``save_pretrained`` (or ``dijiang-export convert``)."""
    from pathlib import Path
    from .model import DiJiangForCausalLM
    p = Path(path)
    if not (p / "config.json").exists():
        raise DiJiangError(f"{p} is not a converted model folder (no config.json)")
    return DiJiangForCausalLM.from_pretrained(p)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dijiang_edge' has no attribute {name!r}")


__all__ = ["convert", "load", "generate", "stream", "DiJiangForCausalLM", "ModelArgs",
           "RecurrentState", "DiJiangConfig", "DiJiangHFForCausalLM", "DiJiangError", "SUPPORTED",
           "__version__"]
