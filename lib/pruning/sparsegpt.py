"""SparseGPT (Frantar & Alistarh, 2023) as a pruner: Linear layers that read one input share one Hessian and are
solved as one stacked matrix (lib.pruning.sparsegpt_solver)."""
from __future__ import annotations

import torch

from ..registry import Param, positive
from .pruner import XTX, Pruner, register_pruner
from .sparsegpt_solver import sparsegpt_prune


@torch.no_grad()
def prune_sparsegpt(linears, stats, sparsity, n_m, params) -> None:
    done: set[int] = set()
    for name in linears:
        group = stats[name]
        if id(group) in done:
            continue
        done.add(id(group))
        members = [linears[n] for n in group.names]
        rows = [m.weight.shape[0] for m in members]
        stacked = torch.cat([m.weight for m in members], dim=0)  # the solver makes its own fp32 copy
        new_weight, _ = sparsegpt_prune(stacked, group.hessian(), sparsity, n_m, params["sparsegpt_blocksize"],
                                        params["sparsegpt_percdamp"], row_groups=rows)
        for part, member in zip(new_weight.split(rows, dim=0), members):
            member.weight.copy_(part.to(member.weight.dtype))


register_pruner(Pruner(
    "sparsegpt", prune_sparsegpt, needs=frozenset({XTX}),
    params=(Param("sparsegpt_blocksize", int, 128, "SparseGPT column block size", positive, "must be positive"),
            Param("sparsegpt_percdamp", float, 0.01, "SparseGPT Hessian dampening (share of the mean diagonal)",
                  lambda v: 0 < v <= 1, "must lie in (0, 1]")),
    help="OBS reconstruction with a shared inverse Hessian"))
