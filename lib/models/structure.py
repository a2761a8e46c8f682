"""Find a causal LM's decoder blocks and their Linear layers from the module structure (not the model's name)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def find_decoder_blocks(model: nn.Module, layer_types: tuple[type, ...] = (nn.Linear,)) -> nn.ModuleList:
    """The language model's ModuleList of repeated decoder blocks: among the lists of same-type blocks holding
    weight matrices whose parent also holds the input embeddings (which rules out a vision tower's blocks), the
    one with the most parameters.

    This covers LLaMA/Mistral/Qwen2 (`model.layers`), OPT (`model.decoder.layers`), GPT-2 style (`h`), and the
    language model inside a vision-language wrapper (`model.language_model.layers`) without a per-family table.
    A block list must contain at least one module of `layer_types` (lib.sparse adds its SparseLinear).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    best, best_params = None, 0
    for parent in model.modules():
        if embeddings is not None and not any(m is embeddings for m in parent.modules()):
            continue
        for module in parent.children():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            if not any(isinstance(m, layer_types) for m in module[0].modules()):
                continue
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = module, params
    if best is None:
        raise UserError(
            f"unsupported architecture {type(model).__name__}: no list of decoder blocks with nn.Linear layers found"
        )
    expected = getattr(_text_config(model), "num_hidden_layers", None)
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


def final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The norm applied after the last block: a norm-like sibling of the block list, the first one registered
    after it if any (OPT registers its final norm before the list)."""
    for parent in model.modules():
        children = [child for _, child in parent.named_children()]
        positions = [i for i, child in enumerate(children) if child is blocks]
        if positions:
            after = children[positions[0] + 1:]
            before = children[:positions[0]]
            for child in after + before[::-1]:
                if "norm" in type(child).__name__.lower():
                    return child
            return None
    return None
