"""The dense model as the allocation rules see it: its blocks, the calibration data, and a cache so each
measurement (OWL outlier ratios, alphas, absorption coefficients, ...) is made once per session however many
allocations (search trials, comparison rows) ask for it."""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch import nn

from ..calibration.blocks import BlockBatch
from ..calibration.stats import InputStats, collect_input_stats
from ..calibration.walk import Visitor, walk_blocks
from ..models.matrices import PrunableMatrix, block_matrices


class ModelProbe:
    def __init__(self, model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor | None,
                 batch_size: int = 8, offload_device: torch.device | None = None, model_key: str = "",
                 progress: bool = True):
        self.model, self.blocks, self.calib_ids = model, blocks, calib_ids
        self.batch_size, self.offload_device = batch_size, offload_device
        self.model_key, self.progress = model_key, progress
        self._cache: dict[Hashable, Any] = {}

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """compute() the first time `key` is asked for; the stored value afterwards. Measurements must be taken
        while the model is dense: callers measure before any pruning (the session restores dense weights)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def walk(self, visit: Visitor, desc: str) -> None:
        """Walk the dense blocks on the calibration data (each block sees its dense predecessors' outputs)."""
        if self.calib_ids is None:
            raise ValueError("this measurement needs calibration data")
        walk_blocks(self.model, self.blocks, self.calib_ids, visit, self.batch_size, self.offload_device, desc,
                    self.progress)

    @torch.no_grad()
    def per_block(self, measure: Callable[[dict[str, PrunableMatrix], dict[str, InputStats]], Any],
                  desc: str) -> list:
        """measure(matrices, input statistics with squared norms) of every dense block, in order. The matrices
        are those that received calibration input (an expert the router never picked has nothing to measure)."""
        values: list = []

        def visit(i: int, block: nn.Module, batches: list[BlockBatch]) -> None:
            matrices = block_matrices(block)
            stats = collect_input_stats(block, matrices, batches, want_sq_norm=True, want_xtx=False)
            matrices = block_matrices(block)  # again: calibration may have learnt an experts layout
            values.append(measure({n: m for n, m in matrices.items() if n in stats}, stats))

        self.walk(visit, desc)
        return values
