"""The uniform allocation: every block gets the mean sparsity S (the paper's baseline)."""
from __future__ import annotations

from .atp import validate_num_blocks, validate_sparsity
from .rule import Allocation, AllocationRequest, AllocationRule, register_rule


def uniform_allocation(sparsity: float, num_blocks: int) -> list[float]:
    validate_sparsity(sparsity)
    validate_num_blocks(num_blocks)
    return [float(sparsity)] * num_blocks


register_rule(AllocationRule("uniform", lambda r: Allocation(uniform_allocation(r.sparsity, r.num_blocks)),
                             supports_n_m=True, help="every block at S"))
