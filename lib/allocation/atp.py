"""ATP (Huang et al., ICML 2025): an arithmetic progression of block sparsities that increases with depth,
s_i = S - beta*(L-1)/2 + i*beta, whose mean is S. Pure math plus the rule's registration."""
from __future__ import annotations

from ..errors import IllegalAllocationError
from ..registry import Param
from .rule import Allocation, AllocationRequest, AllocationRule, Searchable, register_rule

# Tolerance for comparing a user-given beta against its legal maximum (decimal flags like 0.002 are not exact).
_BETA_SLACK = 1e-9


def validate_sparsity(sparsity: float) -> None:
    if not (0.0 <= sparsity < 1.0):
        raise IllegalAllocationError(f"{sparsity}: the mean sparsity S must satisfy 0 <= S < 1", "sparsity_ratio")


def validate_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise IllegalAllocationError(f"the model must have at least one decoder block, got {num_blocks}")


def max_beta(sparsity: float, num_blocks: int) -> float:
    """Largest beta that keeps every block's sparsity in [0, 1]: min(2S, 2(1-S)) / (L-1)."""
    validate_sparsity(sparsity)
    validate_num_blocks(num_blocks)
    if num_blocks == 1:
        return 0.0
    return min(2 * sparsity, 2 * (1 - sparsity)) / (num_blocks - 1)


def validate_beta(beta: float, sparsity: float, num_blocks: int) -> None:
    limit = max_beta(sparsity, num_blocks)
    if not (beta == beta) or beta < 0 or beta > limit + _BETA_SLACK:
        raise IllegalAllocationError(
            f"{beta} is illegal for sparsity {sparsity} and {num_blocks} blocks: "
            f"it must satisfy 0 <= beta <= min(2S, 2(1-S))/(L-1) = {limit:.6g}", "beta")


def atp_allocation(sparsity: float, beta: float, num_blocks: int) -> list[float]:
    """ATP's arithmetic progression; block 0 is pruned least, the last block most."""
    validate_beta(beta, sparsity, num_blocks)
    start = sparsity - beta * (num_blocks - 1) / 2
    # Clamp only the float noise at the legal maximum (e.g. -1e-17 or 1+1e-16).
    return [min(max(start + i * beta, 0.0), 1.0) for i in range(num_blocks)]


def _allocate(request: AllocationRequest) -> Allocation:
    beta = request.params["beta"]
    return Allocation(atp_allocation(request.sparsity, beta, request.num_blocks), {"beta": beta})


def _check(sparsity: float, params: dict, num_blocks: int | None) -> None:
    validate_sparsity(sparsity)
    if params.get("beta") is None:
        raise IllegalAllocationError("ATP needs a beta (a number, or 'search')", "beta")
    if num_blocks is not None:
        validate_beta(params["beta"], sparsity, num_blocks)


register_rule(AllocationRule(
    "atp", _allocate, check=_check,
    params=(Param("beta", float, None, "ATP rate: block i gets S - beta*(L-1)/2 + i*beta; 'search' finds the best "
                  "beta"),),  # its range depends on S and L: _check says so, with exit code 3
    searchable=Searchable("beta", max_beta, step=0.002),
    record=lambda sparsity, num_blocks, params: {"max_beta": max_beta(sparsity, num_blocks)},
    help="ATP: sparsity rising linearly with depth at rate --beta"))
