"""Magnitude pruning: the smallest |W| of each whole matrix; needs no calibration data."""
from __future__ import annotations

import torch

from .masks import magnitude_metric, select_mask
from .pruner import Pruner, register_pruner


@torch.no_grad()
def prune_magnitude(linears, stats, sparsity, n_m, params) -> None:
    for linear in linears.values():
        linear.weight.masked_fill_(select_mask(magnitude_metric(linear.weight), sparsity, n_m, per_row=False), 0)


register_pruner(Pruner("magnitude", prune_magnitude, help="smallest |W| per matrix (no calibration data)"))
