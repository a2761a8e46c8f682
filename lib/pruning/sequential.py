"""Prune a model block by block on calibration data: block i is pruned to sparsities[i] with one pruner, on the
inputs produced by the already-pruned blocks before it.

Every prunable matrix of a block (lib.models.matrices: Linear weights and each expert's slice of a fused expert
tensor) gets the block's sparsity. A matrix that received no calibration input (an expert the router never picked
on the calibration data, or a weight the model uses without calling its module) has no statistics to prune by;
it is pruned by magnitude instead, and the block's record names it.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import BlockBatch
from ..calibration.stats import collect_input_stats
from ..calibration.walk import walk_blocks
from ..errors import UserError
from ..models.matrices import block_matrices, block_sparsity, declares_layout
from .magnitude import prune_magnitude
from .pruner import PRUNERS, SQ_NORM, XTX, Pruner, default_params


@torch.no_grad()
def prune_block(pruner: Pruner, params: dict[str, Any], block: nn.Module, batches: list[BlockBatch],
                sparsity: float, n_m: tuple[int, int] | None) -> list[str]:
    """Collect what `pruner` needs from the block's inputs, then prune every matrix of the block; return the
    matrices that got no calibration input (experts the router never picked), which magnitude pruning handles."""
    matrices = block_matrices(block)
    if not pruner.needs:
        if n_m is not None:
            _require_known_layouts(matrices)
        pruner.prune(matrices, None, sparsity, n_m, params)
        return []
    stats = collect_input_stats(block, matrices, batches, SQ_NORM in pruner.needs, XTX in pruner.needs)
    matrices = block_matrices(block)  # again: calibration may have learnt an experts module's storage layout
    unseen = {name: m for name, m in matrices.items() if name not in stats}
    seen = {name: m for name, m in matrices.items() if name in stats}
    if seen:
        pruner.prune(seen, stats, sparsity, n_m, params)
    if unseen:
        prune_magnitude(unseen, None, sparsity, n_m, {})
    return list(unseen)


def _require_known_layouts(matrices: dict) -> None:
    """N:M groups inputs: without calibration the input axis of experts stored without a stated layout is unknown."""
    unknown = sorted({m.name.rsplit("[", 1)[0] for m in matrices.values()
                      if m.is_expert_slice and not declares_layout(m.owner)})
    if unknown:
        raise UserError(f"N:M needs each matrix's input axis, and the experts {', '.join(unknown[:2])} do not state "
                        f"their storage layout; use a pruner with calibration data (it observes the layout)",
                        "sparsity_type")


def prune_sequential(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor | None,
                     sparsities: list[float], pruner: Pruner | str, n_m: tuple[int, int] | None = None,
                     batch_size: int = 8, offload_device: torch.device | None = None, progress: bool = True,
                     params: dict[str, Any] | None = None) -> list[dict]:
    """Prune block i to sparsities[i] with `pruner` (or the registered pruner of that name) and its `params`
    (default: the declared defaults); return per-block records (target, achieved, zeros, weights, seconds)."""
    if isinstance(pruner, str):
        pruner = PRUNERS.get(pruner)
    params = {**default_params(pruner), **(params or {})}
    if len(sparsities) != len(blocks):
        raise ValueError(f"{len(sparsities)} sparsities for {len(blocks)} blocks")
    if pruner.requires_calibration_data and calib_ids is None:
        raise ValueError(f"pruner {pruner.name!r} needs calibration data")
    records: list[dict] = []

    def visit(i: int, block: nn.Module, batches: list[BlockBatch]) -> None:
        start = time.perf_counter()
        fallback = prune_block(pruner, params, block, batches, sparsities[i], n_m)
        zeros, total = block_sparsity(block)
        records.append({"block": i, "target": sparsities[i], "achieved": zeros / total, "zeros": zeros,
                        "weights": total, "magnitude_fallback": fallback, "seconds": time.perf_counter() - start})

    ids = calib_ids if pruner.requires_calibration_data else None  # a data-free pruner runs no forward pass
    walk_blocks(model, blocks, ids, visit, batch_size, offload_device, f"prune {pruner.name}", progress)
    return records
