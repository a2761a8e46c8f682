"""One loaded model, its calibration and evaluation data, and the operations a run performs on them.

Keeping this state in one object is what lets a beta search or a comparison table prune many times while loading
once: the dense weights of every block's Linear layers are kept on the CPU and restored between trials, and the
allocation rules' measurements of the dense model are cached in its probe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .allocation.allocate import AllocationSpec, allocate
from .allocation.probe import ModelProbe
from .allocation.rule import Allocation
from .calibration.offload import blocks_visit_device
from .eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls
from .models.matrices import ModelInventory, block_matrices
from .pruning.pruner import Pruner
from .pruning.sequential import prune_sequential


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    blocks: nn.ModuleList
    name: str  # what results and caches call it
    offload_device: torch.device | None = None  # set when blocks live on the CPU and visit this device
    inventory: ModelInventory | None = None  # what pruning touches and what stays dense


@dataclass
class SessionData:
    calib_ids: torch.Tensor | None  # [nsamples, seqlen], None when nothing needs calibration data
    eval_ids: torch.Tensor | None  # [1, tokens]
    seqlen: int
    calib_batch_size: int = 8
    eval_batch_size: int = 4


class PruningSession:
    def __init__(self, loaded: LoadedModel, data: SessionData, progress: bool = True):
        self.loaded, self.data, self.progress = loaded, data, progress
        self.probe = ModelProbe(loaded.model, loaded.blocks, data.calib_ids, data.calib_batch_size,
                                loaded.offload_device, loaded.name, progress)
        self._dense: list[dict[str, torch.Tensor]] | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.loaded.blocks

    def allocation(self, spec: AllocationSpec) -> Allocation:
        """The allocation for `spec` (call while the model is dense: rules measure it)."""
        self.probe.progress = self.progress
        return allocate(spec, self.probe)

    def keep_dense_copy(self) -> None:
        """Remember the dense prunable weights (on the CPU) so `restore_dense` can undo a pruning."""
        self._dense = [{n: m.weight.detach().to("cpu", copy=True) for n, m in block_matrices(b).items()}
                       for b in self.blocks]

    @torch.no_grad()
    def restore_dense(self) -> None:
        for block, saved in zip(self.blocks, self._dense):
            for name, matrix in block_matrices(block).items():
                matrix.weight.copy_(saved[name].to(matrix.weight.device))

    def prune(self, sparsities: list[float], pruner: Pruner, params: dict[str, Any],
              n_m: tuple[int, int] | None) -> list[dict]:
        return prune_sequential(self.model, self.blocks, self.data.calib_ids, sparsities, pruner, n_m,
                                self.data.calib_batch_size, self.loaded.offload_device, self.progress, params)

    def whole_model_forwards(self):
        """Context for full forwards (evaluation): offloaded blocks visit the device one at a time."""
        if self.loaded.offload_device is None:
            return contextlib.nullcontext()
        return blocks_visit_device(self.blocks, self.loaded.offload_device)

    def perplexity(self, max_windows: int | None = None) -> tuple[float, int]:
        """(perplexity, number of windows) on the evaluation tokens."""
        windows = eval_windows(self.data.eval_ids, self.data.seqlen, max_windows)
        with self.whole_model_forwards():
            nlls = window_nlls(self.model, windows, self.data.eval_batch_size, self.progress)
        return perplexity_from_nlls(nlls), windows.shape[0]
