"""Fused mixture-of-experts tensors as SparseLinear modules, one per expert and projection.

transformers 5 stores the experts of most MoE models as 3-D parameters (``gate_up_proj`` or ``up_proj``, and
``down_proj``: [experts, out, in], or [experts, in, out] where the module says ``is_transposed``) in a module
built for its experts interface (``use_experts_implementation``), which dispatches the forward by the name in
``config._experts_implementation``. Packing replaces each 3-D parameter by an nn.ModuleList of SparseLinear
(expert e's matrix as [out, in]) and registers `sparse_experts_forward` under IMPLEMENTATION, which the model is
then switched to. Expert biases and the gate (``_apply_gate``: concatenated or interleaved, clamped or not) stay
the module's own. Experts modules without that interface (Llama 4's, a bmm on the fused tensor) stay dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import SparseLinear

IMPLEMENTATION = "atp_sparse"
LAYOUT = ("has_gate", "has_bias", "is_transposed")  # what the interface's experts modules declare


def has_interface(module: nn.Module) -> bool:
    """Whether `module` is an experts module of transformers' experts interface (its layout declared)."""
    return all(isinstance(getattr(module, a, None), bool) for a in LAYOUT) and hasattr(module, "down_proj")


def projections(module: nn.Module) -> tuple[str, str]:
    """The names of its two fused projections, in the order the forward applies them."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def is_packed(module: nn.Module) -> bool:
    return has_interface(module) and isinstance(module.down_proj, nn.ModuleList)


def expert_matrix(module: nn.Module, name: str, expert: int) -> torch.Tensor:
    """Expert `expert`'s matrix of projection `name` as [out, in] (a view of the fused parameter)."""
    weight = getattr(module, name)[expert]
    return weight.t() if module.is_transposed else weight


def pack(module: nn.Module) -> None:
    """Replace both fused projections of an interface experts module by lists of SparseLinear (in place)."""
    for name in projections(module):
        fused = getattr(module, name)
        packed = nn.ModuleList(SparseLinear.from_weight(expert_matrix(module, name, e).detach())
                               for e in range(fused.shape[0]))
        delattr(module, name)
        setattr(module, name, packed)


def unpack(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """The inverse of `pack`: the fused dense parameters back, in the module's own layout."""
    for name in projections(module):
        weights = [linear.dense_weight() for linear in getattr(module, name)]
        fused = torch.stack([w.t() if module.is_transposed else w for w in weights])
        delattr(module, name)
        setattr(module, name, nn.Parameter(fused.to(dtype or fused.dtype).contiguous(), requires_grad=False))


def _project(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    weights = getattr(module, name)
    if isinstance(weights, nn.ModuleList):
        y = weights[expert](x)
    else:  # an experts module of the same model left dense (too little sparsity)
        y = F.linear(x, weights[expert].t() if module.is_transposed else weights[expert])
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[expert]
    return y


def sparse_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's forward on packed experts: each routed expert runs on its own tokens (the decode
    kernel for the few tokens an expert gets while generating); the weighted outputs are summed in fp32.

    The (token, expert) pairs are sorted by expert once, so each expert costs a slice, its two projections and
    the gate: at batch-1 decode these few tensor operations per expert are what the kernels' time is set against.
    """
    first, second = projections(self)
    experts = len(getattr(self, first))
    flat = top_k_index.reshape(-1).clamp(max=experts)  # an expert-parallel sentinel sorts last, into bucket E
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts + 1).tolist()
    tokens = order // top_k_index.shape[-1]
    weights = top_k_weights.reshape(-1)[order].float().unsqueeze(-1)
    outputs, start = [], 0
    for expert, count in enumerate(counts[:experts]):
        if not count:
            continue
        rows = slice(start, start + count)
        start += count
        h = _project(self, first, expert, hidden_states.index_select(0, tokens[rows]))
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _project(self, second, expert, h)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        outputs.append(y.float() * weights[rows])
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    if outputs:
        out.index_add_(0, tokens[:start], torch.cat(outputs))
    return out.to(hidden_states.dtype)


def register() -> None:
    """Make IMPLEMENTATION a name transformers' experts interface dispatches to (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(IMPLEMENTATION, sparse_experts_forward)


def use_packed_experts(model: nn.Module) -> None:
    """Switch `model` (and every sub-model holding experts) to IMPLEMENTATION."""
    register()
    model.set_experts_implementation(IMPLEMENTATION)


def packed_experts_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_packed(module)]
