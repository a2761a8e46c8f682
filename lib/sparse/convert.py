"""Converting the pruned nn.Linear modules of a loaded transformers model into SparseLinear, in place.

Only Linears and fused mixture-of-experts tensors inside the decoder blocks are candidates; the embeddings and
lm_head stay dense. Fused experts are packed one matrix per expert when their module uses transformers' experts
interface (experts.py); others (Llama 4's bmm experts) stay dense, and the summary lists them. A Linear
stays dense, with its reason in the summary, when its sparsity is below `min_sparsity` (there the packed form
saves too few bytes to pay for the unpacking work), when its dtype has no kernel, or when its class overrides
nn.Linear's forward (a SparseLinear would compute something else). `model.generate()` works unchanged
afterwards, and a converted transformers model gets this format's quantizer, so its save_pretrained writes the
compressed format (hf_quantizer.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..models.matrices import classify_block
from ..models.structure import find_decoder_blocks
from . import format as fmt
from . import experts
from . import kernels
from . import linear as sparse_linear
from . import semi_structured
from .linear import SparseLinear, own_forward_reason, replaces_exactly
from .semi_structured import SemiStructuredLinear

DEFAULT_MIN_SPARSITY = 0.3


@dataclass
class ConversionSummary:
    converted: list[dict] = field(default_factory=list)
    kept_dense: list[dict] = field(default_factory=list)
    kernel: str = ""

    @property
    def dense_bytes(self) -> int:
        return sum(c["dense_bytes"] for c in self.converted)

    @property
    def sparse_bytes(self) -> int:
        return sum(c["sparse_bytes"] for c in self.converted)

    def as_dict(self) -> dict:
        return {"converted": self.converted, "kept_dense": self.kept_dense, "kernel": self.kernel,
                "converted_dense_bytes": self.dense_bytes, "converted_sparse_bytes": self.sparse_bytes}

    def text(self) -> str:
        lines = [f"sparse conversion: {len(self.converted)} Linear(s) converted, {len(self.kept_dense)} kept dense; "
                 f"kernel: {self.kernel}"]
        if self.converted:
            ratio = self.sparse_bytes / max(1, self.dense_bytes)
            mean = sum(c["sparsity"] for c in self.converted) / len(self.converted)
            lines.append(f"  converted weights: {self.dense_bytes / 2**20:.1f} MiB dense -> "
                         f"{self.sparse_bytes / 2**20:.1f} MiB packed ({ratio:.3f}x), mean sparsity {mean:.1%}")
        reasons: dict[str, list[str]] = {}
        for k in self.kept_dense:
            reasons.setdefault(k["reason"], []).append(k["name"])
        for reason, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"  dense ({reason}): {shown}")
        on_cpu = [c for c in self.converted if c.get("format") != semi_structured.FORMAT]
        on_gpu = len(self.converted) - len(on_cpu)
        if on_gpu:
            lines.append(f"  {on_gpu} CUDA Linear(s) as torch {semi_structured.FORMAT} tensors (half the values + "
                         "2-bit indices, sparse tensor cores); other sparsity patterns stay dense on the GPU")
        if on_cpu and self.kernel.startswith("C++"):
            dtypes = sorted({c["dtype"] for c in on_cpu})
            for d in dtypes:
                lines.append(f"  {d}: {sparse_linear.path_summary()}")
        elif on_cpu:
            lines.append("  no C++ kernel: every call unpacks the weight (correct but slower than dense)")
        return "\n".join(lines)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the model's decoder blocks (lib.models.structure's finder, which also
    counts SparseLinear modules as layers), or None when none is found."""
    try:
        blocks = find_decoder_blocks(model, layer_types=(nn.Linear, SparseLinear, SemiStructuredLinear))
    except UserError:
        return None
    return next((name, m) for name, m in model.named_modules() if m is blocks)


def fused_expert_tensors(model: nn.Module) -> list[str]:
    """Qualified names of the fused 3-D expert parameters inside the decoder blocks (kept dense: the kernel
    handles 2-D Linears only)."""
    found = decoder_blocks(model)
    if found is None:
        return []
    prefix, blocks = found
    return [f"{prefix}.{i}.{fused.name}" for i, block in enumerate(blocks) for fused in classify_block(block).fused]


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for every nn.Linear or SparseLinear inside the decoder blocks."""
    found = decoder_blocks(model)
    if found is None:
        return []
    prefix, blocks = found
    return [(f"{prefix}.{name}", m) for name, m in blocks.named_modules()
            if isinstance(m, (nn.Linear, SparseLinear))]


def fused_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each module holding fused expert tensors inside the decoder blocks."""
    names = dict.fromkeys(name.rpartition(".")[0] for name in fused_expert_tensors(model))
    return [(name, model.get_submodule(name)) for name in names]


def experts_problem(module: nn.Module, min_sparsity: float) -> tuple[str | None, float]:
    """(why a fused experts module stays dense or None, the lowest zero fraction of its two fused projections)."""
    if not experts.has_interface(module):
        return (f"{type(module).__name__} does not use transformers' experts interface (the sparse kernel runs "
                "Linears and interface experts only)"), 0.0
    fused = [getattr(module, name) for name in experts.projections(module)]
    if any(t.device.type != "cpu" for t in fused):
        return f"on {fused[0].device.type}, kernel is CPU-only", 0.0
    if any(t.dtype not in fmt.SUPPORTED_DTYPES for t in fused):
        return f"dtype {fused[0].dtype} unsupported", 0.0
    # each projection must qualify: a dense one packed beside a sparse one would be bigger and slower than dense
    sparsity = min(weight_sparsity(t) for t in fused)
    return (f"sparsity below min_sparsity={min_sparsity:g}" if sparsity < min_sparsity else None), sparsity


def _convert_experts(model: nn.Module, min_sparsity: float, summary: ConversionSummary) -> bool:
    """Pack every fused experts module that qualifies (experts.py), recording each in `summary`; whether any was."""
    packed_any = False
    for name, module in fused_experts_modules(model):
        problem, sparsity = experts_problem(module, min_sparsity)
        if problem is not None:
            summary.kept_dense += [{"name": f"{name}.{param}", "reason": problem, "sparsity": sparsity}
                                   for param, t in module.named_parameters(recurse=False) if t.dim() == 3]
            continue
        fused = {proj: getattr(module, proj) for proj in experts.projections(module)}
        experts.pack(module)
        packed_any = True
        for proj, tensor in fused.items():
            linears = getattr(module, proj)
            summary.converted.append({"name": f"{name}.{proj}", "shape": list(tensor.shape),
                                      "sparsity": 1.0 - sum(m.nnz for m in linears) / max(1, tensor.numel()),
                                      "dtype": str(tensor.dtype).replace("torch.", ""),
                                      "dense_bytes": tensor.numel() * tensor.element_size(),
                                      "sparse_bytes": sum(m.packed_nbytes() for m in linears),
                                      "experts": len(linears)})
    return packed_any


def _save_as_compressed(model: nn.Module) -> None:
    """Give a converted transformers model this format's quantizer, as `from_pretrained` does for a compressed
    checkpoint: its `save_pretrained` then writes the compressed format (hf_quantizer.py), which plain
    transformers refuses, instead of packed tensors under names it would skip and Linears it would initialise at
    random; `dequantize()` works too."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        return
    from . import hf_quantizer as hfq
    hfq.register()
    config = hfq.AtpSparseConfig()  # the module lists are filled in at save time (get_state_dict_and_metadata)
    model.config.quantization_config = config
    model.hf_quantizer = hfq.AtpSparseHfQuantizer(config, pre_quantized=True)
    # the format keeps the model's own names: no renaming into a hub layout (a vision-language model's
    # `language_model.model.*`) or splitting of fused experts on the way out
    model._weight_conversions = []


def weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def sparsify_model(model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY,
                   verbose: bool = True) -> ConversionSummary:
    """Replace every decoder-block nn.Linear with at least `min_sparsity` zeros by a SparseLinear (in place).

    Returns the summary (what was converted, what stayed dense and why) and prints it when `verbose`.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be within [0, 1], got {min_sparsity}")
    linears = [(name, m) for name, m in block_linears(model) if not isinstance(m, SparseLinear)]
    on_cuda = [m.weight.device.type == "cuda" for _, m in linears]
    kern = None if linears and all(on_cuda) else kernels.get()  # a CUDA model never builds the CPU kernel
    summary = ConversionSummary(kernel=kernels.describe() if kern is not None else
                                f"none, pure-PyTorch fallback ({kernels.reason()})")
    if any(on_cuda):
        summary.kernel = semi_structured.kernel_label() if all(on_cuda) else \
            f"{summary.kernel}; {semi_structured.kernel_label()}"
    for name, module in linears:
        weight = module.weight
        if not replaces_exactly(module):
            summary.kept_dense.append({"name": name, "reason": own_forward_reason(module)})
            continue
        if weight.device.type == "cuda":  # torch's 2:4 semi-structured sparsity, or dense with the reason
            new, record = semi_structured.convert_for_sparsify(module, min_sparsity)
            if new is None:
                summary.kept_dense.append({"name": name, **record})
            else:
                _set_module(model, name, new)
                summary.converted.append({"name": name, **record})
            continue
        if weight.device.type != "cpu":
            summary.kept_dense.append({"name": name, "reason": f"on {weight.device.type}, kernel is CPU-only"})
            continue
        if weight.dtype not in fmt.SUPPORTED_DTYPES:
            summary.kept_dense.append({"name": name, "reason": f"dtype {weight.dtype} unsupported"})
            continue
        sparsity = weight_sparsity(weight)
        if sparsity < min_sparsity:
            summary.kept_dense.append({"name": name, "reason": f"sparsity below min_sparsity={min_sparsity:g}",
                                       "sparsity": sparsity})
            continue
        new = SparseLinear.from_linear(module)
        _set_module(model, name, new)
        summary.converted.append({"name": name, "shape": [module.out_features, module.in_features],
                                  "sparsity": sparsity, "dtype": str(weight.dtype).replace("torch.", ""),
                                  "dense_bytes": weight.numel() * weight.element_size(),
                                  "sparse_bytes": new.packed_nbytes()})
    packed_experts = _convert_experts(model, min_sparsity, summary)
    if packed_experts:
        experts.use_packed_experts(model)
    if any(isinstance(m, SparseLinear) for _, m in block_linears(model)):
        _save_as_compressed(model)
    if verbose:
        print(summary.text(), file=sys.stderr)
    return summary
