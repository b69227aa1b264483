"""Top-1 agreement and perplexity of 8da8w (torchao, eager PyTorch) against fp32 for
plain quantization, smoothing only, and smoothing + rotation (``exporters/outliers.py``).

    python scripts/int8_outliers.py MODEL_DIR [--tokens 2048] [--alpha 0.5]

No lowering: the quantized model runs in PyTorch, so a recipe is judged in a minute.
"""

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from dijiang_edge.conversion import convert
from dijiang_edge.exporters.executorch import calibration_ids, quantize
from dijiang_edge.exporters.outliers import ALPHA, input_absmax, prepare_for_int8, smooth
from dijiang_edge.parity import perplexity, text_ids
from dijiang_edge.tokenizer import load_tokenizer


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
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--alpha", type=float, default=ALPHA, help="SmoothQuant migration strength")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = convert(a.model).eval()
    ids, _ = text_ids(load_tokenizer(a.model), model.args.vocab_size, a.tokens, "shakespeare")
    calib = calibration_ids(model, Path(a.model), "pydoc")
    ref = logits(model, model, ids)
    smoothed = copy.deepcopy(model)
    if smoothed.args.tie_embeddings:
        smoothed.lm_head.weight = torch.nn.Parameter(smoothed.embed.weight.detach().clone())
    smooth(smoothed, input_absmax(smoothed, calib), a.alpha)
    ppl = lambda lg: perplexity(lg[:-1], ids[1:])
    print(f"fp32 perplexity {ppl(ref):.2f}")
    for name, m in [("plain", model), ("smoothed", smoothed), ("smoothed+rotated", prepare_for_int8(model, calib, a.alpha))]:
        got = logits(quantize(m, "8da8w", "8w"), model, ids)
        print(f"{name:<17} top-1 {np.mean(got.argmax(-1) == ref.argmax(-1)):.4f}  perplexity {ppl(got):.2f}",
              flush=True)


if __name__ == "__main__":
    main()
