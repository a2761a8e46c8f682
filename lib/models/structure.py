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
    """The language model's ModuleList of decoder blocks: among the lists of blocks holding weight matrices whose
    parent also holds the input embeddings (which rules out a vision tower's blocks) and whose length is the
    config's num_hidden_layers, the one of same-type blocks with the most parameters (a hybrid stack that mixes
    block classes, attention and Mamba layers, is taken when no list of one class fits).

    This covers LLaMA/Mistral/Qwen2 (`model.layers`), OPT (`model.decoder.layers`), GPT-2 style (`h`), and the
    language model inside a vision-language wrapper (`model.language_model.layers`) without a per-family table.
    A block list must contain at least one module of `layer_types` (lib.sparse adds its SparseLinear).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    expected = getattr(_text_config(model), "num_hidden_layers", None)
    candidates = []  # (length matches the config, same-type blocks, parameters, the list)
    for parent in model.modules():
        if embeddings is not None and not any(m is embeddings for m in parent.modules()):
            continue
        for module in parent.children():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if not any(isinstance(m, layer_types) for m in module[0].modules()):
                continue
            homogeneous = len({type(child) for child in module}) == 1
            params = sum(p.numel() for p in module.parameters())
            candidates.append((expected is None or len(module) == expected, homogeneous, params, module))
    # a hybrid stack may mix block classes (attention and Mamba layers): a list of the config's length wins
    usable = [c for c in candidates if c[0] and (c[1] or expected is not None)]
    if not usable:
        found = ", ".join(sorted({str(len(c[3])) for c in candidates})) or "none"
        raise UserError(
            f"unsupported architecture {type(model).__name__}: no list of {expected or 'repeated'} decoder blocks "
            f"with nn.Linear layers beside the input embeddings (lists found: {found} blocks)"
        )
    return max(usable, key=lambda c: (c[1], c[2]))[3]


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
