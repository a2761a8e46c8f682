"""Run a causal LM one decoder block at a time on captured inputs.

The inputs of block 0 (hidden states plus whatever keyword arguments the model passes its blocks, e.g. the rotary
`position_embeddings` and the causal mask of transformers 5.x) are captured with a pre-hook during a normal model
forward, so every architecture's own calling convention is reused as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.structure import module_device


class _StopForward(Exception):
    pass


@dataclass
class BlockBatch:
    """One calibration batch at the input of some block: hidden states plus the block's call arguments."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         store_device: torch.device | str | None = None) -> list[BlockBatch]:
    """Run the model up to block 0 on `input_ids` [n, seqlen] in batches and keep what block 0 receives."""
    captured: list[BlockBatch] = []

    def grab(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        kwargs["use_cache"] = False
        dev = store_device if store_device is not None else hidden.device
        captured.append(BlockBatch(hidden.to(dev), _to_device(rest, dev), _to_device(kwargs, dev)))
        raise _StopForward

    embed_device = module_device(model.get_input_embeddings())
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start:start + batch_size].to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, batch: BlockBatch) -> torch.Tensor:
    """The block's output hidden states for one batch, computed on the block's device, returned there too."""
    device = module_device(block)
    out = block(batch.hidden.to(device), *_to_device(batch.args, device), **_to_device(batch.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def advance(block: nn.Module, batches: list[BlockBatch]) -> list[BlockBatch]:
    """The next block's inputs: this block's outputs, stored where the inputs were, with the same call arguments."""
    return [BlockBatch(run_block(block, b).to(b.hidden.device), b.args, b.kwargs) for b in batches]
