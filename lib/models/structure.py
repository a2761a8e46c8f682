"""Find a causal LM's decoder blocks and their Linear layers from the module structure (not the model's name)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of repeated decoder blocks: the one holding the most parameters whose children share a type.

    This covers LLaMA/Mistral/Qwen2 (`model.layers`), OPT (`model.decoder.layers`), GPT-2 style (`h`) and others
    without a per-family table.
    """
    best, best_params = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = module, params
    if best is None:
        raise UserError(
            f"unsupported architecture {type(model).__name__}: no list of decoder blocks with nn.Linear layers found"
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and expected != len(best):
        raise UserError(
            f"unsupported architecture {type(model).__name__}: found {len(best)} repeated blocks but the config "
            f"says num_hidden_layers={expected}"
        )
    return best


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """All nn.Linear layers inside one block, by their qualified name within the block, in forward order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def block_sparsity(block: nn.Module) -> tuple[int, int]:
    """(zero weights, total weights) over the block's Linear layers: the quantity the allocation controls."""
    zeros = total = 0
    for linear in find_linears(block).values():
        zeros += (linear.weight == 0).sum().item()
        total += linear.weight.numel()
    return zeros, total


def final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last block: the first norm-like sibling registered after the block list."""
    for parent in model.modules():
        children = [child for _, child in parent.named_children()]
        positions = [i for i, child in enumerate(children) if child is blocks]
        if positions:
            for child in children[positions[0] + 1:]:
                if "norm" in type(child).__name__.lower():
                    return child
            return None
    return None
