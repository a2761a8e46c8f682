"""What a decoder block holds, discovered from its parameters: the matrices to prune and what stays dense, and why.

Every parameter of a block is accounted for, so a matrix the pruners skip can never look pruned:

* a prunable matrix is an `nn.Linear` weight, or one expert's slice of a fused expert tensor (transformers 5
  stores a mixture of experts as 3-D parameters, [experts, out, in], or [experts, in, out] when the experts
  module says `is_transposed`, as gpt-oss does);
* dense by design: vectors (norm scales, biases, attention sinks, per-expert biases; any shape with one
  dimension above 1), convolutions (the short causal convolutions of linear-attention and Mamba layers),
  embeddings, and routers: the matrices anywhere inside a mixture-of-experts module that score the experts (as
  many outputs as there are experts) or gate a shared expert (one output);
* anything else (a 2-D or larger parameter none of these rules explains) is unclassified, and the run stops
  before pruning rather than leave it dense silently.

Nothing here looks at a family's name: the rules read module types, parameter shapes and the module tree, so a new
family built from the same parts needs no code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ROUTER = "router (scores the experts)"
SHARED_GATE = "shared-expert gate (one output)"
VECTOR = "vector (norm scale, bias, sink)"
EXPERT_VECTOR = "per-expert vector (bias)"
CONVOLUTION = "convolution"
EMBEDDING = "embedding"


@dataclass
class PrunableMatrix:
    """One 2-D weight a pruner sees as [out_features, in_features]: an nn.Linear's weight, or expert `expert` of a
    fused expert parameter. `weight` is a view of the stored tensor, so pruning it in place prunes the model."""

    name: str  # within the block, e.g. "mlp.down_proj" or "mlp.experts.gate_up_proj[3]"
    owner: nn.Module
    param_name: str
    expert: int | None = None
    transposed: bool = False  # stored as [in, out]

    @property
    def parameter(self) -> torch.Tensor:
        return getattr(self.owner, self.param_name)

    @property
    def weight(self) -> torch.Tensor:
        stored = self.parameter.data if self.expert is None else self.parameter.data[self.expert]
        return stored.t() if self.transposed else stored

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def is_expert_slice(self) -> bool:
        return self.expert is not None


@dataclass
class FusedExperts:
    """A 3-D expert parameter: `matrices[e]` is expert e's slice."""

    name: str  # qualified parameter name within the block
    parameter: nn.Parameter
    matrices: list[PrunableMatrix]


@dataclass
class BlockInventory:
    matrices: dict[str, PrunableMatrix] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)  # parameter name within the block -> reason
    unclassified: list[str] = field(default_factory=list)
    fused: list[FusedExperts] = field(default_factory=list)


def _expert_count(module: nn.Module) -> int | None:
    """How many experts `module` holds directly: the first dimension of a 3-D parameter of it (fused experts), or
    the length of a ModuleList of two or more same-type modules that contain Linears (one module per expert)."""
    for param in module.parameters(recurse=False):
        if param.ndim == 3:
            return param.shape[0]
    if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
        if any(isinstance(m, nn.Linear) for m in module[0].modules()):
            return len(module)
    return None


def _moe_parents(block: nn.Module) -> dict[int, int]:
    """id(module) -> expert count, for every module with an experts container among its direct children."""
    parents: dict[int, int] = {}
    for module in block.modules():
        for child in module.children():
            count = _expert_count(child)
            if count is not None and not isinstance(child, (nn.Conv1d, nn.Conv2d)):
                parents[id(module)] = count
    return parents


def _is_transposed(owner: nn.Module) -> bool:
    """Fused experts stored [experts, in, out]: transformers marks such experts modules with `is_transposed` (and
    lib.calibration.experts sets it on modules that use that layout without saying so, once it has seen them)."""
    return bool(getattr(owner, "is_transposed", False))


def declares_layout(owner: nn.Module) -> bool:
    """Whether the experts module states its storage layout (or calibration has observed it)."""
    return hasattr(owner, "is_transposed")


def classify_block(block: nn.Module) -> BlockInventory:
    """Every parameter of `block`: a prunable matrix (or one per expert), dense with a reason, or unclassified."""
    inventory = BlockInventory()
    moe_parents = _moe_parents(block)
    router_like: dict[int, str] = {}  # id(parameter) -> reason, for the matrices that score or gate experts
    for module in block.modules():
        count = moe_parents.get(id(module))
        if count is None:
            continue
        direct = {id(child) for child in module.children()}
        for owner in module.modules():  # routers may sit deeper (mlp.gate.wg, mlp.router.layer, ...)
            if any(p.ndim == 3 for p in owner.parameters(recurse=False)):
                continue  # per-expert vectors beside fused experts, not routers
            for param in owner.parameters(recurse=False):
                if param.ndim != 2:
                    continue
                if param.shape[0] == count:
                    router_like[id(param)] = ROUTER
                elif param.shape[0] == 1 and isinstance(owner, nn.Linear) and id(owner) in direct:
                    router_like[id(param)] = SHARED_GATE

    seen: set[int] = set()
    for module_name, module in block.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in router_like:
                inventory.dense[name] = router_like[id(param)]
            elif param.ndim <= 1 or param.numel() == max(param.shape):  # (1, n) and (1, 1, n, 1) too
                inventory.dense[name] = VECTOR
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                inventory.dense[name] = CONVOLUTION
            elif isinstance(module, nn.Embedding):
                inventory.dense[name] = EMBEDDING
            elif isinstance(module, nn.Linear) and param_name == "weight":
                inventory.matrices[module_name] = PrunableMatrix(module_name, module, param_name)
            elif param.ndim == 3:
                transposed = _is_transposed(module)
                slices = [PrunableMatrix(f"{name}[{e}]", module, param_name, e, transposed)
                          for e in range(param.shape[0])]
                for matrix in slices:
                    inventory.matrices[matrix.name] = matrix
                inventory.fused.append(FusedExperts(name, param, slices))
            elif param.ndim == 2 and any(p.ndim == 3 and p.shape[0] == param.shape[0]
                                         for p in module.parameters(recurse=False)):
                inventory.dense[name] = EXPERT_VECTOR
            else:
                inventory.unclassified.append(f"{name} {tuple(param.shape)}")
    return inventory


def block_matrices(block: nn.Module) -> dict[str, PrunableMatrix]:
    """The prunable matrices of one block, by name within the block, in registration order."""
    return classify_block(block).matrices


def block_sparsity(block: nn.Module) -> tuple[int, int]:
    """(zero weights, total weights) over every prunable matrix of the block: the quantity the allocation
    controls."""
    zeros = total = 0
    for matrix in block_matrices(block).values():
        weight = matrix.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total


@dataclass
class ModelInventory:
    """What pruning will and will not touch, over the whole model."""

    prunable_weights: int
    matrices: int
    expert_slices: int
    dense_in_blocks: dict[str, dict] = field(default_factory=dict)  # reason -> {"weights", "examples"}
    outside_blocks: dict[str, int] = field(default_factory=dict)  # top module path -> weights
    unclassified: list[str] = field(default_factory=list)  # "block i: name (shape)"
    input_widths: set[int] = field(default_factory=set)  # in_features of every prunable matrix

    def as_dict(self) -> dict:
        return {"prunable_weights": self.prunable_weights, "prunable_matrices": self.matrices,
                "expert_slices": self.expert_slices, "dense_in_blocks": self.dense_in_blocks,
                "dense_outside_blocks": self.outside_blocks}

    def text(self) -> str:
        lines = [f"  pruned: {self.matrices} matrices, {self.prunable_weights:,} weights"
                 + (f" ({self.expert_slices} of them expert slices of fused expert tensors)"
                    if self.expert_slices else "")]
        for reason, entry in self.dense_in_blocks.items():
            lines.append(f"  dense in the blocks, {reason}: {entry['weights']:,} weights, e.g. "
                         f"{', '.join(entry['examples'])}")
        outside = ", ".join(f"{name} {count:,}" for name, count in self.outside_blocks.items())
        if outside:
            lines.append(f"  dense outside the decoder blocks: {outside}")
        return "\n".join(lines)


def _outside_groups(model: nn.Module, blocks: nn.ModuleList) -> dict[str, int]:
    """Weights outside the decoder blocks, grouped by the largest module that holds no block (embeddings, final
    norm, LM head, a vision tower and its projector, ...)."""
    ancestors = {id(m) for m in model.modules() if any(sub is blocks for sub in m.modules())}
    groups: dict[str, int] = {}
    counted: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in counted:
                counted.add(id(param))
                key = f"{path}.{param_name}" if path else param_name
                groups[key] = groups.get(key, 0) + param.numel()
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if child is blocks:
                continue
            if id(child) in ancestors:
                visit(child, child_path)
                continue
            total = 0
            for param in child.parameters():
                if id(param) not in counted:
                    counted.add(id(param))
                    total += param.numel()
            if total:
                groups[child_path] = total

    visit(model, "")
    return groups


def model_inventory(model: nn.Module, blocks: nn.ModuleList, examples: int = 3) -> ModelInventory:
    """Every parameter of the model accounted for: prunable matrices, dense ones in the blocks by reason, and
    the parts outside the decoder blocks."""
    inventory = ModelInventory(0, 0, 0)
    owner_block: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for name, param in block.named_parameters():
            first = owner_block.setdefault(id(param), i)
            if first != i:  # pruning block by block would prune a shared weight once per block that holds it
                inventory.unclassified.append(f"block {i}: {name} (the same tensor as in block {first})")
        found = classify_block(block)
        for matrix in found.matrices.values():
            inventory.prunable_weights += matrix.weight.numel()
            inventory.matrices += 1
            inventory.expert_slices += matrix.is_expert_slice
            inventory.input_widths.add(matrix.in_features)
            if matrix.is_expert_slice and not declares_layout(matrix.owner):
                inventory.input_widths.add(matrix.out_features)  # layout unknown until calibration sees it
        for name, reason in found.dense.items():
            entry = inventory.dense_in_blocks.setdefault(reason, {"weights": 0, "examples": []})
            entry["weights"] += block.get_parameter(name).numel()
            if len(entry["examples"]) < examples and name not in entry["examples"]:
                entry["examples"].append(name)
        inventory.unclassified.extend(f"block {i}: {name}" for name in found.unclassified)
    inventory.outside_blocks = _outside_groups(model, blocks)
    return inventory
