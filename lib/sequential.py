"""Walk the decoder blocks in order on calibration data; each block sees the outputs of the blocks before it.

`walk_blocks` is the one loop; pruning and the allocation measurements (OWL outlier ratios) are visitors of it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockBatch, advance, capture_block_inputs, iter_blocks
from .model_utils import block_sparsity, find_linears
from .prune_block import needed_stats, prune_linears
from .stats import collect_input_stats

Visitor = Callable[[int, nn.Module, list[BlockBatch]], None]


@torch.no_grad()
def walk_blocks(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, visit: Visitor,
                batch_size: int = 8, offload_device: torch.device | None = None, desc: str = "blocks",
                progress: bool = True, update_inputs: bool = True) -> None:
    """Capture block 0's inputs, then for each block: visit(i, block, inputs), then recompute its outputs.

    With `offload_device`, blocks live on the CPU and visit the device one at a time; activations stay on the CPU.
    """
    store = torch.device("cpu") if offload_device is not None else None
    batches = capture_block_inputs(model, blocks, calib_ids, batch_size, store_device=store)
    for i, block in tqdm(iter_blocks(blocks, offload_device, offload_device is not None), total=len(blocks),
                         desc=desc, disable=not progress, unit="block"):
        visit(i, block, batches)
        if update_inputs and i + 1 < len(blocks):
            batches = advance(block, batches)


def prune_sequential(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor | None,
                     sparsities: list[float], method: str, n_m: tuple[int, int] | None = None,
                     batch_size: int = 8, offload_device: torch.device | None = None, blocksize: int = 128,
                     percdamp: float = 0.01, progress: bool = True) -> list[dict]:
    """Prune block i to sparsities[i] with `method`; return per-block records (target, achieved, seconds)."""
    if len(sparsities) != len(blocks):
        raise ValueError(f"{len(sparsities)} sparsities for {len(blocks)} blocks")
    want_sq_norm, want_xtx = needed_stats(method)
    records: list[dict] = []

    def visit(i: int, block: nn.Module, batches: list[BlockBatch]) -> None:
        start = time.perf_counter()
        linears = find_linears(block)
        stats = None
        if want_sq_norm or want_xtx:
            stats = collect_input_stats(block, linears, batches, want_sq_norm, want_xtx)
        prune_linears(linears, stats, method, sparsities[i], n_m, blocksize, percdamp)
        zeros, total = block_sparsity(block)
        records.append({"block": i, "target": sparsities[i], "achieved": zeros / total, "zeros": zeros,
                        "weights": total, "seconds": time.perf_counter() - start})

    if method == "magnitude":  # needs no data: no forward passes at all
        for i, block in tqdm(iter_blocks(blocks, offload_device, offload_device is not None), total=len(blocks),
                             desc=f"prune {method}", disable=not progress, unit="block"):
            visit(i, block, [])
    else:
        walk_blocks(model, blocks, calib_ids, visit, batch_size, offload_device, f"prune {method}", progress)
    return records
