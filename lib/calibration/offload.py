"""Offloading: the decoder blocks stay on the CPU and visit the GPU one at a time."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def place_for_offload(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Everything but the decoder blocks on `device`; the blocks stay on the CPU until they are worked on."""
    block_modules = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in block_modules:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)
    blocks.to("cpu")


@contextlib.contextmanager
def blocks_visit_device(blocks: nn.ModuleList, device: torch.device):
    """During whole-model forwards (evaluation), move each offloaded block to `device` only while it runs."""
    def pre(module, args):
        module.to(device)

    def post(module, args, output):
        module.to("cpu")

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def iter_blocks(blocks: nn.ModuleList, device: torch.device | None, offload: bool) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block); with `offload` each block lives on `device` only while it is being worked on."""
    for i, block in enumerate(blocks):
        if offload:
            block.to(device)
        try:
            yield i, block
        finally:
            if offload:
                block.to("cpu")
