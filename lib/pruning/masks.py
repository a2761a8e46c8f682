"""Pruning metrics and mask selection (pure math, no I/O).

A mask is a bool tensor shaped like the weight, True where a weight is pruned (set to zero).
"""
from __future__ import annotations

import math

import torch


def parse_sparsity_type(sparsity_type: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): N of every M consecutive input weights are pruned."""
    if sparsity_type == "unstructured":
        return None
    try:
        n, m = (int(x) for x in sparsity_type.split(":"))
    except ValueError:
        raise ValueError(f"sparsity type must be 'unstructured' or 'N:M', got {sparsity_type!r}") from None
    if not (0 < n < m):
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {sparsity_type!r}")
    return n, m


def magnitude_metric(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def wanda_metric(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with `input_sq_norm[j]` the summed squares of input feature j."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def lowest_per_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly floor(cols * sparsity) lowest-metric entries in every row (Wanda's comparison group)."""
    rows, cols = metric.shape
    k = int(math.floor(cols * sparsity + 1e-9))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(metric, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def lowest_overall_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly floor(numel * sparsity) lowest-metric entries of the whole matrix (magnitude's group)."""
    k = int(math.floor(metric.numel() * sparsity + 1e-9))
    mask = torch.zeros(metric.numel(), dtype=torch.bool, device=metric.device)
    if k > 0:
        idx = torch.topk(metric.flatten(), k, largest=False, sorted=False).indices
        mask[idx] = True
    return mask.view_as(metric)


def n_m_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest of every m consecutive input columns in each row."""
    rows, cols = metric.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M={m}")
    groups = metric.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(metric: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """The mask for one weight matrix: N:M when given, else the lowest `sparsity` share per row or overall."""
    if n_m is not None:
        return n_m_mask(metric, *n_m)
    return lowest_per_row_mask(metric, sparsity) if per_row else lowest_overall_mask(metric, sparsity)
