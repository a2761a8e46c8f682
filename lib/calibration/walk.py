"""Walk the decoder blocks in order on calibration data; each block sees the outputs of the blocks before it.

`walk_blocks` is the one loop: pruning and the allocation rules' measurements (OWL outlier ratios, DLP
importances) are visitors of it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockBatch, advance, capture_block_inputs
from .offload import iter_blocks

Visitor = Callable[[int, nn.Module, list[BlockBatch]], None]


@torch.no_grad()
def walk_blocks(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor | None, visit: Visitor,
                batch_size: int = 8, offload_device: torch.device | None = None, desc: str = "blocks",
                progress: bool = True, update_inputs: bool = True) -> None:
    """Capture block 0's inputs, then for each block: visit(i, block, inputs), then recompute its outputs.

    Without calibration ids (a pruner that needs no data) the visitor gets no inputs and nothing runs forward.
    With `offload_device`, blocks live on the CPU and visit the device one at a time; activations stay on the CPU.
    """
    offload = offload_device is not None
    batches: list[BlockBatch] = []
    if calib_ids is not None:
        store = torch.device("cpu") if offload else None
        batches = capture_block_inputs(model, blocks, calib_ids, batch_size, store_device=store)
    for i, block in tqdm(iter_blocks(blocks, offload_device, offload), total=len(blocks), desc=desc,
                         disable=not progress, unit="block"):
        visit(i, block, batches)
        if batches and update_inputs and i + 1 < len(blocks):
            batches = advance(block, batches)
