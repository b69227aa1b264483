"""Top-1 agreement and perplexity of int8 against fp32, in eager PyTorch, for plain
quantization and the outlier treatments of ``exporters/outliers.py``.

    python scripts/int8_outliers.py MODEL [--scheme pte|pte4|onnx] [--tokens 2048] [--alpha 0.5]

``pte``: torchao's 8da8w (XNNPACK's scheme: one int8 scale per token row, per-channel
weights) and the int8 embedding, plain and after each outlier treatment, the last one the
``.pte``'s (``executorch.PTE_OUTLIERS``); ``--recipes 0,6`` runs just those.  ``onnx``:
onnxruntime's ``MatMulNBits`` int8 compute simulated (symmetric int8 weights and inputs,
one scale per 32 values of a row), plain / the ``.pte`` recipe / every input rotated in
32 x 32 blocks (the ONNX recipe).  ``pte4``: the ``.pte``'s int4 (8da4w), round-to-nearest
after the outlier rewrite against the source's 4-bit grid kept with 0 / 16 / 32 / 64
outlier channels carried aside (``quantize``'s ``grid_channels``), then 32 everywhere but
one kind of linear (which of them need their channels aside).  No lowering: a
recipe is judged in minutes.
"""

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dijiang_edge.conversion import convert
from dijiang_edge.exporters.executorch import PTE_OUTLIERS, quantize
from dijiang_edge.exporters.onnx import OUTLIER_BLOCK
from dijiang_edge.exporters.outliers import ALPHA, calibration_ids, prepare_for_int8
from dijiang_edge.parity import perplexity, text_ids
from dijiang_edge.tokenizer import load_tokenizer, save_tokenizer


def _blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` rounded to symmetric int8 with one scale per ``block`` values of its last dim."""
    y = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    s = (y.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(y / s).clamp(-127, 127) * s).reshape(x.shape)


class NBitsInt8(nn.Module):
    """A linear as ``MatMulNBits`` (8 bits, block 32, ``accuracy_level=4``) computes it."""

    def __init__(self, lin: nn.Linear, block: int = 32):
        super().__init__()
        self.lin, self.block = copy.deepcopy(lin), block
        self.in_features, self.out_features = lin.in_features, lin.out_features    # RotatedLinear reads them
        with torch.no_grad():
            self.lin.weight.copy_(_blockwise(self.lin.weight, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(_blockwise(x, self.block))


def onnx_int8(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    if getattr(m.lm_head, "weight", None) is m.embed.weight:
        m.lm_head.weight = nn.Parameter(m.embed.weight.detach().clone())
    for parent in list(m.modules()):         # a RotatedLinear's rotation is a buffer: it stays fp32
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, NBitsInt8(child))
    return m


@torch.no_grad()
def logits(model, ref_model, ids: np.ndarray) -> np.ndarray:
    out, state = [], ref_model.init_state(1)
    for i in range(0, len(ids), 256):
        lg, state = model(torch.from_numpy(ids[None, i:i + 256]), state)
        out.append(lg[0].float().numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--scheme", default="pte", choices=["pte", "pte4", "onnx"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--alpha", type=float, default=ALPHA, help="SmoothQuant migration strength")
    ap.add_argument("--recipes", default="", help="comma list of recipe numbers to run (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = convert(a.model).eval()
    tok_dir = Path(tempfile.mkdtemp())
    save_tokenizer(a.model, tok_dir)
    ids, _ = text_ids(load_tokenizer(tok_dir), model.args.vocab_size, a.tokens, "shakespeare")
    calib = calibration_ids(model, tok_dir, "pydoc")
    ref = logits(model, model, ids)
    ppl = lambda lg: perplexity(lg[:-1], ids[1:])      # noqa: E731
    print(f"fp32 perplexity {ppl(ref):.2f}")
    if a.scheme == "pte":
        prep = lambda **kw: lambda: prepare_for_int8(model, calib, **{"alpha": a.alpha, **kw})   # noqa: E731
        recipes = [("plain", lambda: model),
                   ("smoothed, outputs rotated", prep()),
                   ("smoothed, outputs rotated + mixed", prep(mix=True)),
                   ("residual rotated", prep(residual=True)),
                   ("every input rotated", prep(every_input=True)),
                   ("every input rotated, alpha 0.65", prep(every_input=True, alpha=0.65)),
                   ("the .pte recipe (PTE_OUTLIERS)", prep(**PTE_OUTLIERS))]
        run = lambda m: quantize(m, "8da8w", "8w")     # noqa: E731
    elif a.scheme == "pte4":
        quant4 = lambda n: lambda: quantize(model, "8da4w", "8w", calib, grid_channels=n)   # noqa: E731
        recipes = [("round-to-nearest after the rewrite", quant4(None))]
        recipes += [(f"grid kept, {n} outlier channels", quant4(n)) for n in (0, 16, 32, 64)]
        kinds = ("in_proj", "o_proj", "gate_up", "down_proj", "lm_head")      # the linears after fusion
        recipes += [(f"32 channels, none at {k}", quant4({"*": 32, k: 0})) for k in kinds]
        run = lambda m: m      # noqa: E731  (already quantized)
    else:
        block = OUTLIER_BLOCK["int8"]
        recipes = [("plain", lambda: model),
                   ("smoothed+rotated (.pte recipe)", lambda: prepare_for_int8(model, calib, a.alpha)),
                   ("every input rotated (ONNX)", lambda: prepare_for_int8(model, calib, a.alpha, block,
                                                                          every_input=True)),
                   ("residual rotated, outputs in 32-blocks", lambda: prepare_for_int8(model, calib, a.alpha, block,
                                                                                      residual=True))]
        run = onnx_int8
    for i, (name, make) in enumerate(recipes):
        if a.recipes and str(i) not in a.recipes.split(","):
            continue
        got = logits(run(make()), model, ids)
        print(f"{name:<32} top-1 {np.mean(got.argmax(-1) == ref.argmax(-1)):.4f}  perplexity {ppl(got):.2f}",
              flush=True)


if __name__ == "__main__":
    main()
