"""AlphaPruning (Lu et al., 2024): layer-wise sparsity from the heavy-tailed spectra of the weights.

Heavy-Tailed Self-Regularisation theory reads the empirical spectral density (ESD) of W^T W: the smaller the
power-law exponent alpha of its tail, the more correlations the matrix has learned, so the less it should be
pruned. alpha is the continuous power-law MLE (Hill estimator) over the tail above xmin, with xmin picked, as in
WeightWatcher's "xmin near the peak" mode, by the smallest Kolmogorov-Smirnov distance among candidates close to
the peak of the histogram of log eigenvalues. Sparsities are the alphas mapped linearly onto [1-eps, 1+eps] and
scaled so that the parameter-weighted mean is the target.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..models.matrices import block_matrices
from ..outputs import cached_json_entry
from ..registry import Param
from .rule import Allocation, AllocationRequest, AllocationRule, Searchable, register_rule, rule_value_error

# Candidate (xmin, tail) pairs are evaluated as a [candidates, eigenvalues] grid; this bounds its size.
_KS_GRID_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    tail_size: int


def weight_eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of W^T W (the squared singular values of W), in fp32, ascending, on W's device."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    singular = torch.linalg.svdvals(weight.detach().float())
    return torch.flip(singular.square(), dims=[0])


def _xmin_candidates(sorted_eigs: torch.Tensor, bins: int, peak_window: tuple[float, float],
                     min_tail: int) -> torch.Tensor:
    """Indices k (xmin = sorted_eigs[k]) within peak_window times the ESD peak, keeping >= min_tail tail points."""
    last_allowed = sorted_eigs.numel() - min_tail
    log_eigs = torch.log10(sorted_eigs)
    low, high = float(log_eigs[0]), float(log_eigs[-1])
    if high > low:
        counts = torch.histc(log_eigs, bins=bins, min=low, max=high)
        width = (high - low) / bins
        peak = 10 ** (low + (int(torch.argmax(counts)) + 0.5) * width)  # centre of the tallest bin
    else:
        peak = float(sorted_eigs[0])
    near_peak = (sorted_eigs >= peak_window[0] * peak) & (sorted_eigs <= peak_window[1] * peak)
    indices = torch.nonzero(near_peak).flatten()
    indices = indices[indices <= last_allowed]
    if indices.numel() == 0:  # no eigenvalue near the peak leaves a usable tail: search every xmin instead
        indices = torch.arange(0, last_allowed + 1)
    return indices


def fit_power_law(eigenvalues: torch.Tensor, bins: int = 100, peak_window: tuple[float, float] = (0.95, 1.5),
                  min_tail: int = 10, relative_floor: float = 1e-10) -> PowerLawFit:
    """Power-law fit p(x) ~ x^-alpha of the ESD tail; see the module docstring.

    Eigenvalues below relative_floor * max are numerical zeros and are dropped before fitting.
    """
    eigs = eigenvalues.detach().flatten().to("cpu", torch.float64)
    if eigs.numel() == 0 or not bool(torch.isfinite(eigs).all()):
        raise ValueError("fit_power_law needs a non-empty, finite set of eigenvalues")
    eigs = torch.sort(eigs).values
    eigs = eigs[eigs > relative_floor * float(eigs[-1])]
    count = eigs.numel()
    if count < 3:
        raise ValueError(f"need at least 3 non-zero eigenvalues to fit a power law, got {count}")
    min_tail = max(2, min(min_tail, count - 1))
    log_eigs = torch.log(eigs)
    # suffix_log_sum[k] = sum of log eigenvalues from index k to the end
    suffix_log_sum = torch.flip(torch.cumsum(torch.flip(log_eigs, [0]), 0), [0])
    candidates = _xmin_candidates(eigs, bins, peak_window, min_tail)

    positions = torch.arange(count, dtype=torch.float64)
    best = (math.inf, 0.0, 0)  # (KS distance, alpha, index)
    chunk = max(1, _KS_GRID_ELEMENTS // count)
    for start in range(0, candidates.numel(), chunk):
        ks = candidates[start:start + chunk]
        tail_sizes = (count - ks).to(torch.float64)
        log_spread = suffix_log_sum[ks] - tail_sizes * log_eigs[ks]
        alphas = 1 + tail_sizes / log_spread  # Hill / continuous MLE; inf when the whole tail equals xmin
        rank = positions[None, :] - ks[:, None].to(torch.float64)  # position of each eigenvalue in each tail
        in_tail = rank >= 0
        exponent = (1 - alphas)[:, None] * (log_eigs[None, :] - log_eigs[ks][:, None])
        fitted_cdf = 1 - torch.exp(exponent)
        below = rank / tail_sizes[:, None]  # empirical CDF just below and at each tail point
        at = (rank + 1) / tail_sizes[:, None]
        gap = torch.maximum(fitted_cdf - below, at - fitted_cdf)
        distances = torch.where(in_tail, gap, torch.zeros_like(gap)).amax(dim=1)
        distances = torch.where(torch.isfinite(alphas) & (log_spread > 0), distances,
                                torch.full_like(distances, math.inf))
        local = int(torch.argmin(distances))
        if float(distances[local]) < best[0]:
            best = (float(distances[local]), float(alphas[local]), int(ks[local]))
    distance, alpha, index = best
    if not math.isfinite(distance):
        raise ValueError("the eigenvalue tail is degenerate (all equal); no power law can be fitted")
    return PowerLawFit(alpha=alpha, xmin=float(eigs[index]), ks_distance=distance, tail_size=count - index)


def hill_alpha(eigenvalues: torch.Tensor, bins: int = 100, peak_window: tuple[float, float] = (0.95, 1.5),
               min_tail: int = 10) -> float:
    """The power-law tail exponent alpha of an ESD (see fit_power_law)."""
    return fit_power_law(eigenvalues, bins=bins, peak_window=peak_window, min_tail=min_tail).alpha


def alpha_allocation(alphas: list[float], param_counts: list[int], target: float,
                     eps: float = 0.3) -> list[float]:
    """One sparsity per unit (block or matrix): alphas mapped linearly to [1-eps, 1+eps], then scaled so that
    sum(p_i * s_i) / sum(p_i) == target. Higher alpha -> more pruning; equal alphas -> uniform."""
    if not (math.isfinite(eps) and 0 <= eps < 1):
        raise ValueError(f"epsilon must lie in [0, 1), got {eps}")
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    if len(alphas) != len(param_counts) or not alphas:
        raise ValueError("alphas and param_counts must be non-empty and of equal length")
    if not all(math.isfinite(a) for a in alphas) or min(param_counts) <= 0:
        raise ValueError("alphas must be finite and param_counts positive")
    low, high = min(alphas), max(alphas)
    if high > low:
        factors = [1 - eps + (a - low) / (high - low) * 2 * eps for a in alphas]
    else:
        factors = [1.0] * len(alphas)
    scale = target * sum(param_counts) / sum(p * f for p, f in zip(param_counts, factors))
    sparsities = [f * scale for f in factors]
    if max(sparsities) >= 1:
        raise ValueError(
            f"epsilon {eps} gives a sparsity of {max(sparsities):.3f} >= 1 at target {target}; "
            "use a smaller epsilon"
        )
    return sparsities


def block_alphas(blocks_linear_weights: list[list[torch.Tensor]],
                 mode: str = "block") -> list[float] | list[list[float]]:
    """alpha of every Linear weight of every block: per-block means (mode "block") or, per block, the list of
    per-matrix alphas (mode "matrix")."""
    if mode not in ("block", "matrix"):
        raise ValueError(f"mode must be 'block' or 'matrix', got {mode!r}")
    per_matrix = [[hill_alpha(weight_eigenvalues(w)) for w in weights] for weights in blocks_linear_weights]
    if mode == "matrix":
        return per_matrix
    return [sum(values) / len(values) for values in per_matrix]


def measure_block_alphas(blocks, cache_path: str | None, model_key: str) -> tuple[list[float], list[int]]:
    """Per-block mean alpha of the prunable matrices (Linear weights and expert slices) and per-block parameter
    counts (alphas cached in a JSON file under the model key and the matrix shapes when a path is given)."""
    weights = [[m.weight for m in block_matrices(b).values()] for b in blocks]
    params = [sum(w.numel() for w in ws) for ws in weights]
    shapes = ";".join(",".join("x".join(map(str, w.shape)) for w in ws) for ws in weights)
    key = f"{model_key}|{hashlib.sha1(shapes.encode()).hexdigest()[:12]}"

    def compute():
        return block_alphas([[w.detach().float().cpu() for w in ws] for ws in weights], mode="block")

    alphas = cached_json_entry(cache_path, key, compute) if cache_path else compute()
    return [float(a) for a in alphas], params


def _allocate(request: AllocationRequest) -> Allocation:
    probe, eps = request.probe, request.params["alpha_eps"]
    cache = request.params["alpha_cache"] or None
    alphas, counts = probe.cached(("block alphas", cache),
                                  lambda: measure_block_alphas(probe.blocks, cache, probe.model_key))
    sparsities = rule_value_error(lambda: alpha_allocation(alphas, counts, request.sparsity, eps),
                                  "alpha_eps", "epsilon ")
    return Allocation(sparsities,
                      {"alphas": alphas, "alpha_eps": eps, "param_counts": counts}, mean_weights=counts)


DEFAULT_ALPHA_CACHE = "~/.cache/atp-sparsity/alphas.json"

register_rule(AllocationRule(
    "alpha", _allocate,
    searchable=Searchable("alpha_eps", lambda sparsity, num_blocks: min(0.99, (1 - sparsity) / max(sparsity, 1e-9)),
                          step=0.02),
    measures_model=True,
    params=(Param("alpha_eps", float, 0.3, "AlphaPruning spread epsilon", lambda v: 0 <= v < 1,
                  "must lie in [0, 1)"),
            Param("alpha_cache", str, DEFAULT_ALPHA_CACHE,
                  "JSON file caching AlphaPruning's per-block alphas ('' disables)")),
    help="AlphaPruning: heavier-tailed weight spectra are pruned less"))
