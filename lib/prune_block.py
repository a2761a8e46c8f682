"""Prune every Linear layer of one decoder block to one sparsity, given its input statistics."""
from __future__ import annotations

import torch
from torch import nn

from .masks import magnitude_metric, select_mask, wanda_metric
from .sparsegpt import sparsegpt_prune
from .stats import InputStats

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def needed_stats(method: str) -> tuple[bool, bool]:
    """(squared input norms, X X^T) that `method` needs."""
    return method == "wanda", method == "sparsegpt"


@torch.no_grad()
def prune_linears(linears: dict[str, nn.Linear], stats: dict[str, InputStats] | None, method: str,
                  sparsity: float, n_m: tuple[int, int] | None, blocksize: int = 128,
                  percdamp: float = 0.01) -> None:
    """Zero the pruned weights in place (and, for SparseGPT, update the kept ones)."""
    if method == "magnitude":
        for lin in linears.values():
            _apply_mask(lin, select_mask(magnitude_metric(lin.weight), sparsity, n_m, per_row=False))
    elif method == "wanda":
        for name, lin in linears.items():
            metric = wanda_metric(lin.weight, stats[name].sq_norm)
            _apply_mask(lin, select_mask(metric, sparsity, n_m, per_row=True))
    elif method == "sparsegpt":
        done: set[int] = set()
        for name in linears:
            group = stats[name]
            if id(group) in done:
                continue
            done.add(id(group))
            members = [linears[n] for n in group.names]
            stacked = torch.cat([m.weight for m in members], dim=0)  # the solver makes its own fp32 copy
            new_weight, _ = sparsegpt_prune(stacked, group.hessian(), sparsity, n_m, blocksize, percdamp,
                                            row_groups=[m.weight.shape[0] for m in members])
            for part, m in zip(new_weight.split([m.weight.shape[0] for m in members], dim=0), members):
                m.weight.copy_(part.to(m.weight.dtype))
    else:
        raise ValueError(f"unknown prune method {method!r}; choose from {', '.join(PRUNE_METHODS)}")


def _apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.masked_fill_(mask, 0)
