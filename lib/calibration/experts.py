"""The calibration inputs each expert of a fused mixture-of-experts tensor actually receives.

transformers 5 stores a block's experts as 3-D parameters and, in its eager implementation, runs each expert that
the router picked on exactly the tokens routed to it: `F.linear(tokens, gate_up_proj[e])`, or
`tokens @ gate_up_proj[e]` for experts stored [experts, in, out]. There is no module per expert to hook, so a
torch-function mode watches the block's forward: it remembers which tensor is expert e's slice of which fused
parameter, and hands the activation of every matrix product with such a slice to the caller. A batched product
with the whole 3-D parameter (`torch.bmm(x, experts)`, x [experts, tokens, in]) gives expert e the rows x[e].

While observing, the experts modules run transformers' eager implementation (the grouped and batched ones index
all experts at once, which hides which tokens went where); the outputs are the same.

How mixture-of-experts blocks are pruned here, and how that relates to published work:
* Each expert's matrices are pruned with statistics of the tokens the router sent to that expert (Wanda's input
  norms, RIA's, SparseGPT's Hessian), unweighted. This is what running Wanda or SparseGPT per expert means,
  and what the usual MoE baselines do. MoE-Pruner (Xie et al., 2024) also multiplies each token's contribution
  by its router weight; we do not (the expert's own input distribution is what its output error depends on).
* Every expert slice gets its block's sparsity: the allocation rules allocate across blocks, not across experts
  inside a block. Expert-level pruning (removing whole experts, as in STUN, Lee et al., 2024, before an
  unstructured pass) is out of scope.
* Shared experts and the dense MLPs of the first blocks (DeepSeek's `first_k_dense_replace`) are ordinary
  Linears and see every token. Routers and shared-expert gates stay dense (lib.models.matrices).
* An expert that received no calibration token cannot be scored by activations; it is pruned by magnitude to the
  same sparsity, and the run names it (lib.pruning.sequential). Published methods mostly do not discuss this
  case, which calibration sets of 128 x 2048 tokens make rare but not impossible for models with hundreds of
  experts.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..models.matrices import FusedExperts, PrunableMatrix, declares_layout

# on_input(matrix, activation [tokens, in_features]) for each product with an expert's slice
OnInput = Callable[[PrunableMatrix, torch.Tensor], None]

_LINEAR = {F.linear}
_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_BATCHED = {torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class ExpertOrientationError(RuntimeError):
    pass


def _single_index(index) -> int | None:
    if isinstance(index, int):
        return index
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.dtype.is_floating_point \
            and index.dtype != torch.bool:
        return int(index)
    return None


class _ExpertInputs(TorchFunctionMode):
    def __init__(self, fused: list[FusedExperts], on_input: OnInput):
        super().__init__()
        self.by_parameter = {id(f.parameter): f for f in fused}
        self.slices: dict[int, tuple[FusedExperts, int, torch.Tensor]] = {}  # id(slice) -> (.., expert, keepalive)
        self.on_input = on_input

    def _emit(self, fused: FusedExperts, expert: int, activation: torch.Tensor, stored_in_out: bool) -> None:
        matrix = fused.matrices[expert]
        if matrix.transposed != stored_in_out:
            owner = matrix.owner
            if declares_layout(owner) and bool(owner.is_transposed) != stored_in_out:
                raise ExpertOrientationError(
                    f"{fused.name}: the experts are used as {'[in, out]' if stored_in_out else '[out, in]'} "
                    f"matrices but the module declares {'[in, out]' if matrix.transposed else '[out, in]'}")
            # an experts module that does not state its layout (Llama 4's bmm(x, W)): record what it does, in
            # transformers' own attribute, so every later look at the block sees the right input axis
            owner.is_transposed = stored_in_out
            for slice_ in fused.matrices:
                slice_.transposed = stored_in_out
        self.on_input(matrix, activation.reshape(-1, activation.shape[-1]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.by_parameter:
            expert = _single_index(args[1])
            if expert is not None:
                self.slices[id(out)] = (self.by_parameter[id(args[0])], expert, out)
        elif func in _LINEAR:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.slices.get(id(weight))
            if hit is not None:
                self._emit(hit[0], hit[1], args[0] if args else kwargs["input"], stored_in_out=False)
        if func in _PRODUCTS and len(args) == 2:
            hit = self.slices.get(id(args[1]))
            if hit is not None:
                self._emit(hit[0], hit[1], args[0], stored_in_out=True)
        if func in _BATCHED and len(args) == 2 and id(args[1]) in self.by_parameter and args[0].ndim == 3:
            fused = self.by_parameter[id(args[1])]
            for expert in range(args[0].shape[0]):
                self._emit(fused, expert, args[0][expert], stored_in_out=True)
        return out

    def forget_slices(self) -> None:
        self.slices.clear()


@contextlib.contextmanager
def eager_experts(block: nn.Module) -> Iterator[None]:
    """transformers' eager experts implementation for the experts modules of `block` while inside."""
    changed = []
    for module in block.modules():
        config = getattr(module, "config", None)
        if not any(p.ndim == 3 for p in module.parameters(recurse=False)) or config is None:
            continue
        current = getattr(config, "_experts_implementation_internal", None)
        if current not in (None, "eager"):
            changed.append((config, current))
            config._experts_implementation_internal = "eager"
    try:
        yield
    finally:
        for config, previous in reversed(changed):
            config._experts_implementation_internal = previous


@contextlib.contextmanager
def observe_expert_inputs(block: nn.Module, fused: list[FusedExperts], on_input: OnInput) -> Iterator[_ExpertInputs]:
    """Inside, every forward of `block` reports each expert slice's activations to on_input."""
    if not fused:
        yield None
        return
    mode = _ExpertInputs(fused, on_input)
    with eager_experts(block), mode:
        yield mode
