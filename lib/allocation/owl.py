"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2024).

A block whose Wanda scores |W_ij| * ||X_j||_2 contain many outliers (entries far above the block's mean score) is
assumed to matter more, so it is pruned less. Pure math: the caller supplies the scores of one block.
"""
from __future__ import annotations

import math

import torch

from ..pruning.masks import wanda_metric
from ..registry import Param
from .probe import ModelProbe
from .rule import Allocation, AllocationRequest, AllocationRule, Searchable, register_rule, rule_value_error


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of entries, over all tensors of one block together, that exceed `m` times their joint mean.

    The tensors are never concatenated (a 7B block holds ~200M scores); sum and count are accumulated instead.
    """
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"the outlier threshold M must be a positive number, got {m}")
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
        raise ValueError(f"lambda must be a non-negative number, got {lam}")
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
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
        raise ValueError(
            f"lambda {lam} pushes block sparsities out of [0, 1) at target {target} "
            f"(range {min(sparsities):.3f}..{max(sparsities):.3f}); use a smaller lambda"
        )
    return sparsities


def measure_outlier_ratios(probe: ModelProbe, m: float) -> list[float]:
    """Per-block outlier ratio of the dense model's Wanda scores (each block sees dense predecessors)."""
    return probe.per_block(lambda linears, stats: outlier_ratio(
        [wanda_metric(lin.weight, stats[name].sq_norm) for name, lin in linears.items()], m), "OWL outliers")


def _allocate(request: AllocationRequest) -> Allocation:
    m, lam = request.params["owl_m"], request.params["owl_lambda"]
    ratios = request.probe.cached(("owl outlier ratios", m), lambda: measure_outlier_ratios(request.probe, m))
    sparsities = rule_value_error(lambda: owl_allocation(ratios, request.sparsity, lam),
                                  "owl_lambda", "lambda ")
    return Allocation(sparsities,
                      {"outlier_ratios": ratios, "owl_m": m, "owl_lambda": lam})


register_rule(AllocationRule(
    "owl", _allocate, measures_model=True, requires_calibration_data=True,
    searchable=Searchable("owl_lambda", lambda sparsity, num_blocks: min(0.498, sparsity, 1 - sparsity), step=0.01),
    params=(Param("owl_m", float, 5.0, "OWL outlier threshold M (times the mean score)", lambda v: 0 < v <= 1000,
                  "must lie in (0, 1000]"),
            Param("owl_lambda", float, 0.08, "OWL sparsity spread lambda", lambda v: 0 <= v < 0.5,
                  "must lie in [0, 0.5)")),
    help="OWL: blocks with more activation outliers are pruned less"))
