"""Run a causal LM one decoder block at a time on captured inputs, each block called as the model calls it.

A model may call its blocks with different arguments: sliding-window and global attention layers get different
masks (and, in Gemma 3, different rotary embeddings), linear-attention and Mamba layers their own mask. So the
arguments of *every* block are captured during a normal model forward, with a pre-hook per block, and each block
is later replayed with its own. Blocks after the first are stubbed out during the capture (they hand their input
on, shaped like block 0's real output), so the capture costs one block per batch, not a whole forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.structure import module_device


class _StopForward(Exception):
    pass


BlockCall = tuple[tuple, dict[str, Any]]  # the positional arguments after the hidden states, and the keywords


@dataclass
class BlockBatch:
    """One calibration batch at the input of block `index`: hidden states plus every block's call arguments."""

    hidden: torch.Tensor
    calls: list[BlockCall] = field(default_factory=list)
    index: int = 0

    @property
    def args(self) -> tuple:
        return self.calls[self.index][0] if self.calls else ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.calls[self.index][1] if self.calls else {}

    def at(self, index: int, hidden: torch.Tensor) -> "BlockBatch":
        """The same batch's inputs for block `index`, with these hidden states."""
        return BlockBatch(hidden, self.calls, index)


def _to_device(value: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """`value` with its tensors on `device`; a tensor object seen before (blocks share masks and rotary
    embeddings) is moved once and shared."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device, non_blocking=True))
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device, memo) for k, v in value.items()}
    return value


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
    kwargs["use_cache"] = False
    return hidden, (rest, kwargs)


def _like_output(template: Any, hidden: torch.Tensor) -> Any:
    """`hidden` in the structure of a block's real output (a tensor, or a tuple whose first item is it)."""
    if isinstance(template, (tuple, list)):
        return type(template)([hidden, *([None] * (len(template) - 1))])
    return hidden


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         store_device: torch.device | str | None = None) -> list[BlockBatch]:
    """Run the model on `input_ids` [n, seqlen] in batches; keep block 0's hidden states and every block's call
    arguments, as BlockBatches at block 0."""
    captured: list[BlockBatch] = []
    calls: list[BlockCall] = []
    hidden0: list[torch.Tensor] = []
    output_template: list[Any] = []
    last = len(blocks) - 1

    def record(index: int):
        def hook(module, args, kwargs):
            hidden, call = _split_call(args, kwargs)
            if index == 0:
                hidden0.append(hidden)
            calls.append(call)
            if index == last:
                raise _StopForward
        return hook

    def remember_output(module, args, kwargs, output):
        if not output_template:
            output_template.append(output)

    def stub(module, args, kwargs):
        hidden, _ = _split_call(args, kwargs)
        return _like_output(output_template[0], hidden)

    embed_device = module_device(model.get_input_embeddings())
    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[0].register_forward_hook(remember_output, with_kwargs=True))
    originals = []  # (block, the forward set on the instance, e.g. by accelerate's hooks, or None)
    for block in list(blocks)[1:]:
        originals.append((block, block.__dict__.get("forward")))
        block.forward = lambda *a, _block=block, **k: stub(_block, a, k)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            calls.clear()
            hidden0.clear()
            try:
                model(input_ids[start:start + batch_size].to(embed_device), use_cache=False)
            except _StopForward:
                pass
            if len(calls) != len(blocks):
                raise RuntimeError(f"the model called {len(calls)} of its {len(blocks)} decoder blocks")
            dev = store_device if store_device is not None else hidden0[0].device
            memo: dict[int, Any] = {}
            captured.append(BlockBatch(_to_device(hidden0[0], dev, memo), _to_device(list(calls), dev, memo)))
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in originals:
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward
    return captured


@torch.no_grad()
def run_block(block: nn.Module, batch: BlockBatch) -> torch.Tensor:
    """The block's output hidden states for one batch, computed on the block's device, returned there too."""
    device = module_device(block)
    memo: dict[int, Any] = {}
    out = block(batch.hidden.to(device), *_to_device(batch.args, device, memo),
                **_to_device(batch.kwargs, device, memo))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def advance(block: nn.Module, batches: list[BlockBatch]) -> list[BlockBatch]:
    """The next block's inputs: this block's outputs, stored where the inputs were, with the next block's own call
    arguments."""
    return [b.at(b.index + 1, run_block(block, b).to(b.hidden.device)) for b in batches]
