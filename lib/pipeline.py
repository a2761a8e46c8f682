"""One loaded model, its calibration and evaluation data, and the operations a run performs on them.

Keeping this state in one object is what lets a beta search prune many times while loading once: the dense
weights of every block's Linear layers are kept on the CPU and restored between trials.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from .allocate import AllocationSpec, compute_allocation
from .evaluate import eval_windows, perplexity_from_nlls, window_nlls
from .loading import blocks_visit_device
from .model_utils import find_linears
from .sequential import prune_sequential


class PruningSession:
    def __init__(self, model: nn.Module, tokenizer, blocks: nn.ModuleList, calib_ids: torch.Tensor | None,
                 eval_ids: torch.Tensor | None, seqlen: int, model_key: str, calib_batch_size: int = 8,
                 eval_batch_size: int = 4, offload_device: torch.device | None = None, progress: bool = True):
        self.model, self.tokenizer, self.blocks = model, tokenizer, blocks
        self.calib_ids, self.eval_ids, self.seqlen = calib_ids, eval_ids, seqlen
        self.model_key = model_key
        self.calib_batch_size, self.eval_batch_size = calib_batch_size, eval_batch_size
        self.offload_device = offload_device
        self.progress = progress
        self._dense: list[dict[str, torch.Tensor]] | None = None

    def allocation(self, spec: AllocationSpec) -> tuple[list[float], dict]:
        return compute_allocation(spec, self.model, self.blocks, self.calib_ids, self.calib_batch_size,
                                  self.offload_device, self.model_key, self.progress)

    def keep_dense_copy(self) -> None:
        """Remember the dense Linear weights (on the CPU) so `restore_dense` can undo a pruning."""
        self._dense = [{n: lin.weight.detach().to("cpu", copy=True) for n, lin in find_linears(b).items()}
                       for b in self.blocks]

    @torch.no_grad()
    def restore_dense(self) -> None:
        for block, saved in zip(self.blocks, self._dense):
            for name, lin in find_linears(block).items():
                lin.weight.copy_(saved[name].to(lin.weight.device))

    def prune(self, sparsities: list[float], method: str, n_m: tuple[int, int] | None) -> list[dict]:
        return prune_sequential(self.model, self.blocks, self.calib_ids, sparsities, method, n_m,
                                self.calib_batch_size, self.offload_device, progress=self.progress)

    def whole_model_forwards(self):
        """Context for full forwards (evaluation): offloaded blocks visit the device one at a time."""
        if self.offload_device is None:
            return contextlib.nullcontext()
        return blocks_visit_device(self.blocks, self.offload_device)

    def perplexity(self, max_windows: int | None = None) -> tuple[float, int]:
        """(perplexity, number of windows) on the evaluation tokens."""
        windows = eval_windows(self.eval_ids, self.seqlen, max_windows)
        with self.whole_model_forwards():
            nlls = window_nlls(self.model, windows, self.eval_batch_size, self.progress)
        return perplexity_from_nlls(nlls), windows.shape[0]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
