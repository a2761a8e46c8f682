"""Wanda (Sun et al., 2024): prune the lowest |W_ij| * ||X_j||_2 of every output row."""
from __future__ import annotations

import torch

from .masks import select_mask, wanda_metric
from .pruner import SQ_NORM, Pruner, register_pruner


@torch.no_grad()
def prune_wanda(linears, stats, sparsity, n_m, params) -> None:
    for name, linear in linears.items():
        metric = wanda_metric(linear.weight, stats[name].sq_norm)
        linear.weight.masked_fill_(select_mask(metric, sparsity, n_m, per_row=True), 0)


register_pruner(Pruner("wanda", prune_wanda, needs=frozenset({SQ_NORM}),
                       help="|W| times input activation norm, per output row"))
