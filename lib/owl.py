"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2024).

A block whose Wanda scores |W_ij| * ||X_j||_2 contain many outliers (entries far above the block's mean score) is
assumed to matter more, so it is pruned less. Pure math: the caller supplies the scores of one block.
"""
from __future__ import annotations

import math

import torch

from lib.errors import UserError


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of entries, over all tensors of one block together, that exceed `m` times their joint mean.

    The tensors are never concatenated (a 7B block holds ~200M scores); sum and count are accumulated instead.
    """
    if not (math.isfinite(m) and m > 0):
        raise UserError(f"--owl_m must be a positive number, got {m}")
    if not scores:
        raise ValueError("outlier_ratio needs at least one score tensor")
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise ValueError("outlier_ratio got only empty score tensors")
    threshold = m * total / count
    outliers = sum(int((s > threshold).sum()) for s in scores)
    return outliers / count


def owl_allocation(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """One sparsity per block: S - (D_i - mean D), with D the ratios min-max scaled to [0, 2*lam].

    The mean is exactly `target`; more outliers give lower sparsity; equal ratios give the uniform allocation.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise UserError(f"--owl_lambda must be a non-negative number, got {lam}")
    if not 0 <= target < 1:
        raise UserError(f"target sparsity must lie in [0, 1), got {target}")
    if not outlier_ratios:
        raise ValueError("owl_allocation needs at least one block")
    low, high = min(outlier_ratios), max(outlier_ratios)
    spread = high - low
    if spread > 0:
        scaled = [(r - low) / spread * 2 * lam for r in outlier_ratios]
    else:
        scaled = [0.0] * len(outlier_ratios)
    mean_scaled = sum(scaled) / len(scaled)
    sparsities = [target - (d - mean_scaled) for d in scaled]
    if min(sparsities) < 0 or max(sparsities) >= 1:
        raise UserError(
            f"--owl_lambda {lam} pushes block sparsities out of [0, 1) at target {target} "
            f"(range {min(sparsities):.3f}..{max(sparsities):.3f}); use a smaller --owl_lambda"
        )
    return sparsities
