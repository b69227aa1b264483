"""dijiang-edge: DiJiang frequency-domain linear attention for on-device LLMs.

Public API::

    model = dijiang_edge.convert("default")            # or a HF model / folder / .gguf
    logits, state = model(input_ids)                    # state=None starts a sequence
    logits, state = model(next_ids, state)              # continue: O(1) per token
    ids, state = dijiang_edge.generate(model, input_ids, max_new_tokens=32)
    model.save_pretrained("out"); dijiang_edge.load("out")
"""

from .convert import SUPPORTED, convert
from .errors import DiJiangError
from .generation import generate, stream
from .model import DiJiangForCausalLM, ModelArgs, RecurrentState

__version__ = "0.1.0"


def load(path) -> DiJiangForCausalLM:
    """Load a model written by ``save_pretrained`` (or ``dijiang-export convert``)."""
    from pathlib import Path
    p = Path(path)
    if not (p / "config.json").exists():
        raise DiJiangError(f"{p} is not a converted model folder (no config.json)")
    return DiJiangForCausalLM.from_pretrained(p)


__all__ = ["convert", "load", "generate", "stream", "DiJiangForCausalLM", "ModelArgs",
           "RecurrentState", "DiJiangError", "SUPPORTED", "__version__"]
