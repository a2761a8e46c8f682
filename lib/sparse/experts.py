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

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
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
        setattr(module, name, nn.Parameter(fused.to(dtype or fused.dtype).contiguous()))  # trainable, as before


def _starts(counts: list[int]) -> list[int]:
    """Where each group of rows starts when the groups lie one after the other."""
    return list(accumulate(counts[:-1], initial=0))


def _project(module: nn.Module, name: str, chosen: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
    """Projection `name` of every chosen expert on its rows of `x` (the experts' rows one after the other, in the
    order of `chosen`), bias added, in x's dtype. Experts whose SparseLinear takes the decode kernel for their
    token count run in one kernel call (`_grouped`: one call per expert streamed their 2-4 MB matrices at about
    15 GB/s, one call over all at about 21); the others run their own SparseLinear, which measures its path per
    token count on first use. (In bf16 with biases the two round differently: the grouped rows add the bias in
    fp32 and round once, the others round their product and then the sum, as transformers' forward does.)"""
    weights = getattr(module, name)
    bias = getattr(module, f"{name}_bias") if module.has_bias else None
    packed = isinstance(weights, nn.ModuleList)
    kern = kernels.get() if packed and x.device.type == "cpu" else None
    by_expert = list(weights._modules.values()) if packed else None  # a dict read: ModuleList indexing is slower
    # an expert joins the grouped call where its own SparseLinear would take the decode kernel for its token count
    # (up to 4 tokens always; 5-16 where measured fastest: with AMX, bf16 takes the tile unit there instead). The
    # experts of one projection share shape and dtype, so one answer per token count.
    joins: dict[int, bool] = {}
    grouped, alone = [], []
    for i, count in enumerate(counts):
        if count not in joins:
            joins[count] = kern is not None and by_expert[chosen[i]].path_for(count, x.dtype) == "decode"
        (grouped if joins[count] else alone).append(i)
    if not alone:  # decode: all of them in one call
        return _grouped(kern, by_expert, chosen, counts, x, bias).to(x.dtype)
    starts = _starts(counts)
    rows = by_expert[0].out_features if packed else expert_matrix(module, name, 0).shape[0]
    y = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    if grouped:  # their rows gathered (a few each), so that y stays in x's dtype; grouped means on the CPU
        index = torch.tensor([row for i in grouped for row in range(starts[i], starts[i] + counts[i])])
        y_grouped = _grouped(kern, by_expert, [chosen[i] for i in grouped], [counts[i] for i in grouped],
                             x.index_select(0, index), bias)
        y.index_copy_(0, index, y_grouped.to(x.dtype))
    for i in alone:
        rows_of_expert = slice(starts[i], starts[i] + counts[i])
        if packed:  # its SparseLinear has no bias: the experts module keeps the biases
            y[rows_of_expert] = by_expert[chosen[i]](x[rows_of_expert])
        else:  # an experts module of the same model left dense (too little sparsity)
            y[rows_of_expert] = F.linear(x[rows_of_expert], expert_matrix(module, name, chosen[i]))
        if bias is not None:
            y[rows_of_expert] += bias[chosen[i]]
    return y


def _grouped(kern, by_expert: list[SparseLinear], experts: list[int], counts: list[int], x: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """Expert experts[g]'s SparseLinear on its counts[g] rows of x, the groups one after the other, in one kernel
    call; fp32, the experts' biases added."""
    first = by_expert[experts[0]]
    y = torch.empty(x.shape[0], first.out_features, dtype=torch.float32, device=x.device)
    buffers = [by_expert[e]._buffers for e in experts]
    kern.grouped_decode_into(x, y, _starts(counts), counts, [b["mask"] for b in buffers],
                             [b["values"] for b in buffers], [b["row_offsets"] for b in buffers],
                             first.in_features, kernels.ISA_CODE)
    if bias is not None:
        y += bias.index_select(0, torch.repeat_interleave(torch.tensor(experts, device=x.device),
                                                          torch.tensor(counts, device=x.device)))
    return y


SMALL_ROUTING = 64  # up to this many (token, expert) pairs the routing is grouped in Python (decode)


def _group_small(top_k_index, top_k_weights, experts):
    """The routed experts in ascending order, their token counts, and the (token, weight) pairs in that order,
    grouped in Python: at decode this replaces a dozen small tensor operations."""
    routed: dict[int, list[tuple[int, float]]] = {}
    for token, (chosen, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.float().tolist())):
        for expert, weight in zip(chosen, weights):
            if 0 <= expert < experts:  # not an expert-parallel sentinel
                routed.setdefault(expert, []).append((token, weight))
    chosen = sorted(routed)
    pairs = [pair for expert in chosen for pair in routed[expert]]
    device = top_k_index.device
    return (chosen, [len(routed[e]) for e in chosen], torch.tensor([t for t, _ in pairs], device=device),
            torch.tensor([w for _, w in pairs], device=device))


def _group_sorted(top_k_index, top_k_weights, experts):
    """The same as `_group_small`, by one sort of the (token, expert) pairs on the tensors."""
    flat = top_k_index.reshape(-1).clamp(max=experts)  # a sentinel sorts last, into bucket `experts`
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts + 1).tolist()[:experts]
    chosen = [expert for expert, count in enumerate(counts) if count]
    routed = sum(counts)
    tokens = order[:routed] // top_k_index.shape[-1]
    return chosen, [counts[e] for e in chosen], tokens, top_k_weights.reshape(-1)[order[:routed]].float()


def sparse_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's forward on packed experts: every routed expert's tokens through its first
    projection, the gate once over all of them, their second projection, and one weighted sum (fp32) into the
    tokens' rows.

    At decode each matrix streams megabytes, and every small tensor operation between two kernel calls then runs
    with cold caches (tens of microseconds at Qwen3-30B-A3B's sizes): so each projection is one kernel call over
    all experts with few tokens (`_project`), and the gate and the weighted sum run once."""
    first, second = projections(self)
    experts = len(getattr(self, first))
    one_token = hidden_states.shape[0] == 1  # decode: its experts' rows are the token itself, the sum one product
    group = _group_small if top_k_index.numel() <= SMALL_ROUTING else _group_sorted
    chosen, counts, tokens, weights = group(top_k_index, top_k_weights, experts)
    if not chosen:
        return torch.zeros_like(hidden_states)
    x = hidden_states.expand(len(chosen), -1) if one_token else hidden_states.index_select(0, tokens)
    h = _project(self, first, chosen, counts, x)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = _project(self, second, chosen, counts, h)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    if one_token:
        return (weights.unsqueeze(0) @ y.float()).to(hidden_states.dtype)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, tokens, y.float() * weights.unsqueeze(-1))
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
