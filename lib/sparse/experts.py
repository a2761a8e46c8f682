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
        setattr(module, name, nn.Parameter(fused.to(dtype or fused.dtype).contiguous()))  # trainable, as before


def _project(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    weights = getattr(module, name)
    if isinstance(weights, nn.ModuleList):
        y = weights[expert](x)
    else:  # an experts module of the same model left dense (too little sparsity)
        y = F.linear(x, weights[expert].t() if module.is_transposed else weights[expert])
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[expert]
    return y


SMALL_ROUTING = 64  # up to this many (token, expert) pairs the routing is grouped in Python (decode)


def _group_small(hidden_states, top_k_index, top_k_weights, experts):
    """(expert, its tokens' rows) in ascending expert order, and the tokens and weights in that order, grouped in
    Python: at decode this replaces a dozen small tensor operations; one token is read as a view."""
    routed: dict[int, list[tuple[int, float]]] = {}
    for token, (chosen, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.float().tolist())):
        for expert, weight in zip(chosen, weights):
            if 0 <= expert < experts:  # not an expert-parallel sentinel
                routed.setdefault(expert, []).append((token, weight))
    groups, tokens, weights = [], [], []
    for expert in sorted(routed):
        pairs = routed[expert]
        rows = [t for t, _ in pairs]
        x = (hidden_states[rows[0]:rows[0] + 1] if len(rows) == 1 else
             hidden_states.index_select(0, torch.tensor(rows, device=hidden_states.device)))
        groups.append((expert, x))
        tokens += rows
        weights += [w for _, w in pairs]
    device = hidden_states.device
    return groups, torch.tensor(tokens, device=device), torch.tensor(weights, device=device)


def _group_sorted(hidden_states, top_k_index, top_k_weights, experts):
    """The same as `_group_small`, by one sort of the (token, expert) pairs on the tensors."""
    flat = top_k_index.reshape(-1).clamp(max=experts)  # a sentinel sorts last, into bucket `experts`
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts + 1).tolist()
    tokens = order // top_k_index.shape[-1]
    groups, start = [], 0
    for expert, count in enumerate(counts[:experts]):
        if count:
            groups.append((expert, hidden_states.index_select(0, tokens[start:start + count])))
            start += count
    return groups, tokens[:start], top_k_weights.reshape(-1)[order[:start]].float()


def sparse_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's forward on packed experts: each routed expert's tokens through its first projection,
    the gate once over all of them, each expert's rows through its second projection, and one weighted sum (fp32)
    into the tokens' rows.

    At decode each kernel call streams megabytes, and every small tensor operation between two calls then runs
    with cold caches (tens of microseconds at Qwen3-30B-A3B's sizes): so the calls run back to back, per expert
    only the two projections, and the gate and the weighted sum once."""
    first, second = projections(self)
    experts = len(getattr(self, first))
    group = _group_small if top_k_index.numel() <= SMALL_ROUTING else _group_sorted
    groups, tokens, weights = group(hidden_states, top_k_index, top_k_weights, experts)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    if not groups:
        return out.to(hidden_states.dtype)
    h = torch.cat([_project(self, first, expert, x) for expert, x in groups])
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    outputs, start = [], 0
    for expert, x in groups:
        outputs.append(_project(self, second, expert, h[start:start + x.shape[0]]))
        start += x.shape[0]
    y = torch.cat(outputs)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
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
