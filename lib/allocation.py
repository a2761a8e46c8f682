"""Layer-wise sparsity allocation rules (pure math, no I/O).

An allocation is one sparsity per decoder block. ATP (Huang et al., ICML 2025) uses an arithmetic progression that
increases with depth: s_i = S - beta*(L-1)/2 + i*beta, whose mean is S.
"""
from __future__ import annotations

from .errors import UserError

# Tolerance for comparing a user-given beta against its legal maximum (decimal flags like 0.002 are not exact).
_BETA_SLACK = 1e-9


class IllegalAllocationError(UserError):
    """The requested sparsity / beta cannot be realised for this model (search.sh stops on it cleanly)."""


def validate_sparsity(sparsity: float) -> None:
    if not (0.0 <= sparsity < 1.0):
        raise IllegalAllocationError(f"--sparsity_ratio must satisfy 0 <= S < 1, got {sparsity}")


def max_beta(sparsity: float, num_blocks: int) -> float:
    """Largest beta that keeps every block's sparsity in [0, 1]: min(2S, 2(1-S)) / (L-1)."""
    validate_sparsity(sparsity)
    if num_blocks < 1:
        raise IllegalAllocationError(f"the model must have at least one decoder block, got {num_blocks}")
    if num_blocks == 1:
        return 0.0
    return min(2 * sparsity, 2 * (1 - sparsity)) / (num_blocks - 1)


def validate_beta(beta: float, sparsity: float, num_blocks: int) -> None:
    limit = max_beta(sparsity, num_blocks)
    if not (beta == beta) or beta < 0 or beta > limit + _BETA_SLACK:
        raise IllegalAllocationError(
            f"--beta {beta} is illegal for sparsity {sparsity} and {num_blocks} blocks: "
            f"it must satisfy 0 <= beta <= min(2S, 2(1-S))/(L-1) = {limit:.6g}"
        )


def uniform_allocation(sparsity: float, num_blocks: int) -> list[float]:
    validate_sparsity(sparsity)
    if num_blocks < 1:
        raise IllegalAllocationError(f"the model must have at least one decoder block, got {num_blocks}")
    return [float(sparsity)] * num_blocks


def atp_allocation(sparsity: float, beta: float, num_blocks: int) -> list[float]:
    """ATP's arithmetic progression; block 0 is pruned least, the last block most."""
    validate_beta(beta, sparsity, num_blocks)
    start = sparsity - beta * (num_blocks - 1) / 2
    # Clamp only the float noise at the legal maximum (e.g. -1e-17 or 1+1e-16).
    return [min(max(start + i * beta, 0.0), 1.0) for i in range(num_blocks)]


def format_plan(sparsities: list[float]) -> str:
    """Human-readable per-block plan, one line per block."""
    lines = [f"  block {i:3d}: sparsity {s:.4f}" for i, s in enumerate(sparsities)]
    mean = sum(sparsities) / len(sparsities)
    return "\n".join(lines + [f"  mean sparsity {mean:.4f} over {len(sparsities)} blocks"])
