"""ExecuTorch export: one ``.pte`` per quantization, lowered to XNNPACK, that the
stock ExecuTorch LLM runner (``TextLLMRunner``, Android ``LlmModule``) drives as is.

The program's contract (DESIGN.md section 3)::

    forward(tokens int64 [1, T], start_pos int64 [1]) -> logits float32 [1, T, V]

``T`` is dynamic (1 .. ``max_seq_len``). The recurrent state lives in mutable
buffers ``state_{i}`` (initialised to zeros in the file), is carried from call to
call and is cleared inside the graph when ``start_pos == 0``: the stock runner's
reset only sets its position back to 0. Everything the runner reads is a constant
method (``get_max_seq_len`` ... ``enable_dynamic_shape``), not a side file.

One graph serves prefill and decode: the masked (parallel) form of the attention
over the ``T`` tokens of the call plus the carried state. It is exact, quadratic
only in ``T`` (which ``max_seq_len`` bounds; the runner splits longer prompts), and
for ``T == 1`` it is the recurrent step.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DiJiangError
from ..progress import elapsed, stage
from ..transforms import for_pte, fuse_projections

Tensor = torch.Tensor
MAX_SEQ_LEN = 128                 # tokens per forward call (the runner chunks longer prompts)
MAX_CONTEXT_LEN = 1 << 20         # the state is fixed-size; fp32 positions stay exact far beyond
QLINEAR = ("8da8w", "8da4w")      # XNNPACK here has no weight-only (8w) linear: torchao's
                                   # dequantize_affine has no ExecuTorch kernel, lowering fails
QEMBEDDING = ("8w",)
# the names --quant takes for every target: int4 = ExecuTorch's own LLM recipe (8da4w, group 32)
ALIASES = {"fp32": (None, None), "int8": ("8da8w", "8w"), "int4": ("8da4w", "8w")}
DIJIANG_MARKER = "dijiang_recurrent_state"   # a constant method: tells our .pte files apart


# ----------------------------------------------------------------------------
# Quantization names: "fp32", "int8" (= 8da8w linears + 8w embedding), or a recipe
# "<qlinear>", "emb<qembedding>", "<qlinear>+emb<qembedding>" (ExecuTorch's names).
# ----------------------------------------------------------------------------

def parse_quant(label: str) -> tuple[str | None, str | None]:
    """``(qlinear, qembedding)`` of a quant label; a clear error for an unknown one."""
    if label in ALIASES:
        return ALIASES[label]
    qlinear = qembedding = None
    for part in label.split("+"):
        if part.startswith("emb") and part[3:] in QEMBEDDING:
            qembedding = part[3:]
        elif part in QLINEAR:
            qlinear = part
        else:
            raise DiJiangError(
                f"unknown .pte quantization {label!r}: use fp32, int8 (= 8da8w linears + 8-bit "
                f"embedding), int4 (= 8da4w linears + 8-bit embedding), or --qlinear {'|'.join(QLINEAR)} / --qembedding {'|'.join(QEMBEDDING)}")
    return qlinear, qembedding


def quant_label(qlinear: str | None, qembedding: str | None) -> str:
    """The label ``parse_quant`` reads back (``"int8"`` for the 8da8w + 8w recipe)."""
    for name, pair in ALIASES.items():
        if pair == (qlinear, qembedding):
            return name
    parts = ([qlinear] if qlinear else []) + ([f"emb{qembedding}"] if qembedding else [])
    return "+".join(parts)


class Int8Embedding(nn.Module):
    """Symmetric int8 embedding with one scale per ``group`` values of a row, built from
    plain ops (gather, then scale).

    ExecuTorch's Python runtime registers no quantized embedding kernel and XNNPACK
    has no gather, so the table stays int8 and only the looked-up rows are
    dequantized: any ExecuTorch runtime with the portable kernels runs it. Groups, not
    one scale per row: a row's few large channels would otherwise set the step of all
    the others (per-row scales cost the adapted SmolLM2 0.7 points of top-1 agreement,
    ``docs/int8.md``); the scales add 1/8 of the int8 table at ``group=32``.
    """

    def __init__(self, weight: Tensor, group: int = 32):
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        self.group = group if k % group == 0 else k
        wg = w.reshape(n, k // self.group, self.group)
        scale = wg.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        self.register_buffer("qweight", torch.round(wg / scale).clamp(-127, 127).to(torch.int8).reshape(n, k))
        self.register_buffer("scale", scale.reshape(n, k // self.group))

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).float()
        rows = rows.reshape(*rows.shape[:-1], -1, self.group) * F.embedding(ids, self.scale)[..., None]
        return rows.reshape(*rows.shape[:-2], -1)


def _linear_config(qlinear: str, exact_grid: bool = False):
    """torchao's config for ``qlinear``; ``exact_grid``: 4-bit scales from a group's ends
    (``max(-min / 8, max / 7)``), which recover a symmetric grid's step exactly where
    round-to-nearest's ``absmax / 7.5`` would round every code again."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.quant_primitives import MappingType
    dtype, gran = (torch.int8, PerAxis(0)) if qlinear == "8da8w" else (torch.int4, PerGroup(32))
    mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if exact_grid else MappingType.SYMMETRIC
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=gran,
                                                 weight_mapping_type=mapping)


# The .pte's outlier treatment, chosen by measurement in eager PyTorch on the adapted default
# (``scripts/int8_outliers.py default``, docs/int8.md): every linear's input rotated in
# 64-blocks and across them (XNNPACK quantizes a whole row with one scale), SmoothQuant at 0.65.
PTE_OUTLIERS = {"alpha": 0.65, "every_input": True, "mix": True}
PTE_OUTLIERS_LABEL = ("smoothed (alpha 0.65) + rotated, every linear input, 64x64 Hadamard blocks "
                      "mixed across blocks (outliers.py)")
GRID_LABEL = ("4-bit grids of the source kept (grid.py, symmetric codes), {n} outlier input channels "
              "per linear carried in fp32 (outliers.SplitOutliers){but}")


def outlier_label(model: nn.Module) -> str | None:
    """The manifest's words for the outlier treatment ``quantize`` gave ``model``."""
    from .outliers import RotatedLinear, SplitOutliers
    split = [m for m in model.modules() if isinstance(m, SplitOutliers)]
    if split:
        from ..grid import GridApart       # a grid projection outside SplitOutliers: no channels aside
        bare = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                       if isinstance(m, GridApart) and not n.endswith(".inner")})
        return GRID_LABEL.format(n=max(m.pick.out_features for m in split),
                                 but=f", none for {', '.join(bare)}" if bare else "")
    return PTE_OUTLIERS_LABEL if any(isinstance(m, RotatedLinear) for m in model.modules()) else None


# 8da4w over a source already on 4-bit grids (the default's Q4_1): the grid kept exactly
# (``grid.split`` with the symmetric zero point), the outlier channels taken out instead of
# rotated away (a rotation would move every weight off its grid) and carried in fp32, which
# 8 bits measured worse than. Chosen in eager PyTorch on the adapted default
# (``scripts/int8_outliers.py default --scheme pte4``, docs/int8.md): 32 per linear, none
# for the attention's output projection (the one linear whose channels aside gained nothing
# measurable: 96.0% against 96.1% top-1, for 4 operators and 148 KB of fp32 per layer).
GRID_OUTLIER_CHANNELS = {"*": 32, "o_proj": 0, "dense": 0}


def quantize(model: nn.Module, qlinear: str | None, qembedding: str | None,
             calibration_ids: np.ndarray | None = None, label: str = "pte",
             grid_channels: int | dict[str, int] | None = GRID_OUTLIER_CHANNELS) -> nn.Module:
    """A quantized copy of ``model`` (the original is left as it is).

    Before dynamically quantized linears, activation outliers are smoothed and
    rotated away (``outliers.prepare_for_int8``, calibrated on ``calibration_ids``):
    the same function in fp32, much closer to it in int8.  ``label``: of the progress lines.
    Projections of one input are fused first (``transforms.fuse_projections``).
    8da4w of projections on 4-bit grids keeps the grids, ``grid_channels`` outlier channels
    per linear carried aside (``_grid_recipe``; a dict: per kind, ``outliers.channels_for``); None rounds them to nearest after the
    rewrite instead (the comparison ``scripts/int8_outliers.py --scheme pte4`` makes)."""
    if qlinear == "8da4w":                    # refused before any work
        bad = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % 32]
        if bad:
            raise DiJiangError(f"8da4w quantizes in groups of 32 input channels; {bad[0]} has "
                               f"{model.get_submodule(bad[0]).in_features}: use --qlinear 8da8w")
    if qlinear == "8da4w" and calibration_ids is not None and grid_channels is not None:
        grid_model = _grid_recipe(model, qembedding, calibration_ids, label, grid_channels)
        if grid_model is not None:
            return grid_model
    if qlinear and calibration_ids is not None:
        from .outliers import prepare_for_int8
        with stage(label, f"smoothing and rotating activation outliers ({len(calibration_ids)} tokens)"):
            model = prepare_for_int8(model, calibration_ids, **PTE_OUTLIERS)      # already a copy
    else:
        model = copy.deepcopy(model)
    # q, k, v (and gate), gate and up as one linear each, as for ONNX: fewer nodes per layer,
    # and the same numbers (one input, so one dynamic activation scale; weights per row)
    fuse_projections(model, drop_parts=True)
    if not (qlinear or qembedding):
        return model
    with stage(label, "quantizing " + " + ".join(x for x in (qlinear and f"linears {qlinear}",
                                                             qembedding and f"embedding {qembedding}") if x)):
        return _quantize_copy(model, qlinear, qembedding)


def _grid_recipe(model: nn.Module, qembedding: str | None, calibration_ids: np.ndarray,
                 label: str, channels: int | dict[str, int]) -> nn.Module | None:
    """``quantize``'s 8da4w for a model whose projections lie on 4-bit grids, or None when
    none does: the grid parts (``grid.GridApart``'s two matmuls) at 4 bits with their own
    steps, the side paths, the head and any projection off a grid at 8 (``8da8w``), the
    embedding as ``qembedding`` says."""
    from .. import grid
    from .outliers import SplitOutliers, fused_input_absmax, input_absmax, split_outliers
    source, model = model, copy.deepcopy(model).eval()
    if model.lm_head.weight is model.embed.weight:
        model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    with stage(label, f"finding the 4-bit grids and the outlier channels ({len(calibration_ids)} tokens)"):
        if not grid.split(model, zero=grid.LEVELS // 2):
            return None
        # q, k, v and gate, up as one projection each: a third of the graph's nodes fewer
        fuse_projections(model, drop_parts=True)
        # calibrated on the untouched source: the same inputs, under its plain linears' names
        split_outliers(model, fused_input_absmax(input_absmax(source, calibration_ids)), channels)
        grid.apart(model)            # two 4-bit matmuls per projection, no split between delegate calls
    with stage(label, "quantizing the grids 8da4w, the rest 8da8w" + (f", the embedding {qembedding}" if qembedding else "")):
        from torchao.quantization.quant_api import quantize_
        if qembedding:
            model.embed = Int8Embedding(model.embed.weight)
        four = {id(lin) for m in model.modules() if isinstance(m, grid.GridApart) for lin in (m.main, m.down)}
        fp32 = {id(p) for m in model.modules() if isinstance(m, SplitOutliers) for p in (m.pick, m.cols)}
        quantize_(model, _linear_config("8da4w", exact_grid=True), filter_fn=lambda m, _: id(m) in four)
        quantize_(model, _linear_config("8da8w"),
                  filter_fn=lambda m, _: type(m) is nn.Linear and id(m) not in four | fp32)
    return model


def _quantize_copy(model: nn.Module, qlinear: str | None, qembedding: str | None) -> nn.Module:
    """``quantize``'s second half, in place on a copy already made."""
    tied = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed.weight
    if qembedding:
        model.embed = Int8Embedding(model.embed.weight)
    if qlinear:
        from torchao.quantization.quant_api import quantize_
        if tied:             # the head gets its own (quantized) copy; the embedding keeps its own
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        quantize_(model, _linear_config(qlinear), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return model


# ----------------------------------------------------------------------------
# The exported module
# ----------------------------------------------------------------------------

def buffer_names(model: nn.Module) -> list[str]:
    """The ``.pte``'s state buffers: ``state_{i}`` (the DiJiang state), ``window_key_{i}``,
    ``window_value_{i}`` (the ring, with a window)."""
    return [n.replace("recurrent.", "state_").replace(".", "_") for n in model.state_names()]


class RecurrentLM(nn.Module):
    """``forward(tokens [1, T], start_pos [1]) -> logits [1, 1, V]`` over
    ``transforms.for_pte(model)``, the state held in buffers ``state_{i}``: the module
    ``torch.export`` sees.  The buffers are the state holder; the layers are the model's.

    The last position's logits only, as ExecuTorch's own LLM exports return by default
    (the stock runner reads the last row of whatever it gets): a prompt call neither
    runs the head over rows nobody reads (a fifth of SmolLM2-135M's work per position)
    nor returns them (100 MB per 512-token call with a 49k vocabulary)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = for_pte(model)
        self.n_layers = len(model.layers)
        self.names = buffer_names(model)
        for n, s in zip(self.names, model.state_shapes(1)):
            self.register_buffer(n, torch.zeros(s))

    def forward(self, tokens: Tensor, start_pos: Tensor) -> Tensor:
        m = self.model
        positions = start_pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        keep = (start_pos != 0).to(torch.float32)                 # in-graph reset: 0 at position 0
        bufs = [getattr(self, n) for n in self.names]
        h, new = m.hidden(tokens, m.context(positions, like=tokens, keep=keep), bufs)
        for buf, s in zip(bufs, new):
            buf.copy_(s)
        return m.lm_head(h[:, -1:]).float()


# ----------------------------------------------------------------------------
# torch.export with errors that name the layer and the op
# ----------------------------------------------------------------------------

class _ModuleTrail:
    """Records which submodule is running while ``torch.export`` traces (non-strict
    tracing runs the Python code), so a failure can name the layer."""

    def __init__(self, root: nn.Module):
        self.stack: list[str] = []
        self.handles = []
        for name, mod in root.named_modules():
            if name:
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        return lambda *_: self.stack.append(name)

    def _leave(self, name):
        def hook(*_):
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch: the line of model code that failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename and "torchao" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()}`"


def export_graph(wrapper: RecurrentLM, max_seq_len: int, label: str = "pte") -> torch.export.ExportedProgram:
    """``torch.export`` with ``T`` dynamic; a failure names the layer and the op."""
    with stage(label, "torch.export of the graph"):
        return _export_graph(wrapper, max_seq_len)


def _export_graph(wrapper: RecurrentLM, max_seq_len: int) -> torch.export.ExportedProgram:
    from torch.export import Dim
    t = min(max_seq_len, 3) if max_seq_len > 1 else 1
    example = (torch.zeros(1, t, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    dyn = ({1: Dim("seq", min=1, max=max_seq_len)}, None) if max_seq_len > 1 else None
    trail = _ModuleTrail(wrapper)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, example, dynamic_shapes=dyn, strict=False)
            return ep.run_decompositions({})
    except Exception as e:
        layer = trail.stack[-1].removeprefix("model.") if trail.stack else "the model's top level"
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DiJiangError(f"torch.export failed in layer {layer} at {_user_frame(e)}: "
                           f"{type(e).__name__}: {msg}; that op cannot be exported with a dynamic "
                           f"sequence length (rewrite it without data-dependent control flow)") from e
    finally:
        trail.close()


# ----------------------------------------------------------------------------
# Lowering and writing the .pte
# ----------------------------------------------------------------------------

from . import PARITY_TOKENS  # noqa: E402  (the export-time parity length every format shares)

def runner_metadata(model: nn.Module, max_seq_len: int, max_context_len: int) -> dict[str, Any]:
    """The constant methods the ExecuTorch LLM runner reads (``llm_runner_helper``)."""
    a = model.args
    meta: dict[str, Any] = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_context_len,
        "get_vocab_size": a.vocab_size,
        "get_n_layers": a.n_layers,
        "use_kv_cache": True,            # the runner then feeds start_pos and one token per step
        "enable_dynamic_shape": True,    # the prompt is prefilled in one call
        DIJIANG_MARKER: 1,
    }
    if a.bos_id is not None:
        meta["get_bos_id"] = a.bos_id
    if a.eos_ids:
        meta["get_eos_ids"] = list(a.eos_ids)
    return meta


XNNPACK_CONFIGS = ("LinearConfig", "BMMConfig", "QuantizeAffineConfig", "DeQuantizeAffineConfig",
                   "ChooseQParamsAffineConfig",
                   # elementwise and layout ops: ExecuTorch's portable kernels are generic loops
                   # (sigmoid, pow and softmax took 50-100 ns per element), XNNPACK's are vectorised
                   "SigmoidConfig", "SoftmaxConfig", "MulConfig", "AddConfig", "SubConfig", "DivConfig",
                   "PowConfig", "ExpConfig", "NegConfig", "MeanDimConfig", "ReciprocalSquareRootConfig",
                   "SquareRootConfig", "CatConfig", "PermuteConfig", "SliceCopyConfig", "ViewCopyConfig",
                   "UnsqueezeCopyConfig", "CloneDimOrderConfig", "CloneConfig", "SinConfig", "CosConfig",
                   "ClampConfig", "ConstantPadConfig", "MaxDimConfig")


def xnnpack_partitioner():
    """XNNPACK for the linear layers (fp32 and dynamically quantized), the attention's
    batched matmuls and the elementwise ops around them; what XNNPACK cannot take
    (cumsum, where, gathers) stays portable.

    Measured on 4 layers of the adapted SmolLM2 (int8, ``scripts/pte_partition.py``):
    decode 9.7 ms/token with only the linear/bmm configs, 3.2 ms with these; lowering
    108 s -> 115 s. The 2-D ``mm`` config stays out: with it some graphs fail with
    "Invalid partition, found dependency cycles".  The model writes its layout ops in
    the forms these configs accept under ``torch.export`` (``ops.view``; docs/performance.md).
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c.__name__ in XNNPACK_CONFIGS])


def lower(ep: torch.export.ExportedProgram, metadata: dict[str, Any], label: str = "pte"):
    """XNNPACK partitioning and ``to_executorch``; the state buffers keep their zeros.
    The two halves are the long part of a ``.pte`` export (minutes each on a 135M model):
    each is a progress stage."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    try:
        with stage(label, "lowering to XNNPACK"):
            edge = to_edge_transform_and_lower(
                ep, partitioner=[xnnpack_partitioner()], constant_methods=metadata,
                compile_config=EdgeCompileConfig(_check_ir_validity=False))
        with stage(label, "memory planning and serializing (to_executorch)"):
            return edge.to_executorch(ExecutorchBackendConfig(
                extract_delegate_segments=True,
                passes=[InitializedMutableBufferPass(["state_", "window_"])],
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=True),
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            ))
    except Exception as e:
        raise DiJiangError(f"lowering to ExecuTorch/XNNPACK failed at {_user_frame(e)}: "
                           f"{type(e).__name__}: {str(e).strip()[:300]}") from e


def op_name(target: Any) -> str:
    """An op's bare name (``cumsum``, ``view``), never its repr: the repr of a Python
    function carries its memory address, which would make two exports' manifests differ."""
    schema = getattr(target, "_schema", None)
    name = schema.name if schema is not None else (getattr(target, "__name__", None)
                                                    or getattr(target, "_name", None) or type(target).__name__)
    return str(name).split("::")[-1].split(".")[0]


def delegated_fraction(program) -> dict[str, Any]:
    """How many XNNPACK subgraphs the final graph has, and which ops stay portable."""
    gm = program.exported_program().graph_module
    names = [op_name(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ignore = {"getitem", "alloc", "sym_size", "executorch_call_delegate", "copy_"}
    return {"xnnpack_subgraphs": names.count("executorch_call_delegate"),
            "portable_ops": sorted(set(names) - ignore)}


def initialized_states(program, shape: list[int]) -> int:
    """How many state-shaped buffers of ``forward`` are planned *and* carry serialized
    initial data (zeros): the guarantee ``InitializedMutableBufferPass`` is there for."""
    plan = next(p for p in program.executorch_program.execution_plan if p.name == "forward")
    return sum(1 for v in plan.values if type(v.val).__name__ == "Tensor" and list(v.val.sizes) == shape
               and v.val.data_buffer_idx > 0 and v.val.allocation_info is not None)


def check_options(max_seq_len: int = MAX_SEQ_LEN, max_context_len: int = MAX_CONTEXT_LEN, **_: Any) -> None:
    """The export options that need no model, refused before the model is converted."""
    if max_seq_len < 1 or max_context_len <= max_seq_len:
        raise DiJiangError(f"need 1 <= max_seq_len < max_context_len (got {max_seq_len}, {max_context_len}): "
                           f"give --max-context above {max_seq_len}, the tokens a .pte takes per call")


def build_pte(model: nn.Module, path: Path, quant: str = "fp32", max_seq_len: int = MAX_SEQ_LEN,
              max_context_len: int = MAX_CONTEXT_LEN, calibration_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Quantize, export, lower and write ``path``; returns facts for the manifest.

    ``calibration_ids``: text for the int8 outlier treatment (none: plain quantization)."""
    check_options(max_seq_len, max_context_len)
    qlinear, qembedding = parse_quant(quant)
    label = f"pte {quant}"
    t0 = time.time()
    model = quantize(model.eval(), qlinear, qembedding, calibration_ids, label)
    wrapper = RecurrentLM(model).eval()
    program = lower(export_graph(wrapper, max_seq_len, label), runner_metadata(model, max_seq_len, max_context_len),
                    label)
    shapes = model.state_shapes(1)
    n = sum(initialized_states(program, list(s)) for s in {tuple(s) for s in shapes})
    if n != len(shapes):
        raise DiJiangError(f"only {n} of {len(shapes)} state buffers got serialized zeros; this "
                           f"executorch version changed InitializedMutableBufferPass: please report it")
    path.write_bytes(program.buffer)
    return {"qlinear": qlinear, "qembedding": qembedding, "seconds": round(time.time() - t0, 1),
            "graph": delegated_fraction(program), "outliers": outlier_label(model)}


# ----------------------------------------------------------------------------
# The manifest entry, with parity measured through the written file
# ----------------------------------------------------------------------------

from .outliers import calibration_ids  # noqa: E402,F401  (scripts import it from here)


def _tokenizer(out_dir: Path):
    from ..tokenizer import load_tokenizer
    return load_tokenizer(out_dir) if (out_dir / "tokenizer.json").exists() else None


def check(model: nn.Module, out_dir: Path, entry, tokens: int, text: str, memo=None) -> None:
    """Run the file with ``executorch.runtime`` against PyTorch on the English ``text``
    (``parity.measure``, as for every format) into ``entry.parity``; the PyTorch side
    is computed once per export call (``memo``)."""
    from ..parity import Reference, measure, text_ids
    from ..runtime.executorch import PteRunner
    from . import memo_for
    ids, encoding = text_ids(_tokenizer(out_dir), model.args.vocab_size, tokens, text)
    with stage(f"pte {entry.quant}", f"parity of {entry.path} vs PyTorch on {len(ids)} tokens of {text}"):
        ref = memo_for(model, memo).get(("reference", text, len(ids)), lambda: Reference(model, ids))
        runner = PteRunner(out_dir / entry.path, entry)
        entry.parity = {"text": text, "encoding": encoding, **measure(model, runner, ids, ref=ref)}


def export(model: nn.Module, out_dir: str | Path, quant: str = "fp32", max_seq_len: int = MAX_SEQ_LEN,
           max_context_len: int = MAX_CONTEXT_LEN, parity_tokens: int = PARITY_TOKENS, parity_text: str = "shakespeare",
           calibration_text: str = "pydoc", memo=None) -> list:
    """Write ``model_<quant>.pte`` into ``out_dir``; returns its manifest entry.

    ``parity_tokens`` tokens of ``parity_text`` go through the written file and through
    PyTorch (0 skips it); the figures land in the entry's ``parity``.  Quantized linears
    are calibrated on ``calibration_text`` (which must differ from ``parity_text``).
    """
    from .. import manifest as M
    from . import check_texts
    out_dir = Path(out_dir)
    name = f"model_{quant.replace('+', '_')}.pte"
    calibrated = parse_quant(quant)[0] is not None
    if calibrated:
        check_texts(parity_text, calibration_text)
    if calibrated:
        with stage(f"pte {quant}", f"reading the calibration text ({calibration_text})"):
            calib = calibration_ids(model, out_dir, calibration_text)
    else:
        calib = None
    facts = build_pte(model, out_dir / name, quant, max_seq_len, max_context_len, calib)
    entry = M.FileEntry(
        format="pte", quant=quant, path=name, role="both", attention="plain", default=True,
        inputs={"tokens": {"dtype": "int64", "shape": [1, "seq"]}, "start_pos": {"dtype": "int64", "shape": [1]}},
        outputs={"logits": {"dtype": "float32", "shape": [1, 1, model.args.vocab_size]}},
        state=[{"name": n, "dtype": "float32", "shape": list(s), "in": "mutable buffer"}
               for n, s in zip(buffer_names(model), model.state_shapes(1))],
        checksums=M.checksums(out_dir, [name]),
        extras={"qlinear": facts["qlinear"], "qembedding": facts["qembedding"],
                "int8_outliers": facts["outliers"],
                "max_seq_len": max_seq_len, "max_context_len": max_context_len, "graph": facts["graph"]})
    if parity_tokens > 0:
        check(model, out_dir, entry, parity_tokens, parity_text, memo)
    print(f"[pte {quant}] wrote {name} ({entry.checksums[name]['bytes'] / 1e6:.1f} MB) in "
          f"{elapsed(facts['seconds'])}", file=sys.stderr, flush=True)
    return [entry]
