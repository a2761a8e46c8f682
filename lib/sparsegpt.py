"""The SparseGPT solver (Frantar & Alistarh, 2023): OBS-style pruning with a shared inverse Hessian.

Pure math, no I/O. Rows of W are independent given H = 2 X X^T / n, so Linear layers that read the same input
(q/k/v, gate/up) are solved as one stacked matrix with one Cholesky factorisation; `row_groups` keeps the mask
selection per original matrix, so the result equals solving each matrix on its own.
"""
from __future__ import annotations

import math

import torch


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the mask of dead (never-active) inputs."""
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def _block_prune_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """How many weights of one matrix to prune in each column block so the total is exactly floor(numel*s)."""
    counts, done = [], 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        due = int(math.floor(rows * end * sparsity + 1e-9))
        counts.append(due - done)
        done = due
    return counts


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    row_groups: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [rows, cols] to `sparsity` and update the survivors to compensate.

    Returns (new_weight in fp32, mask with True = pruned). `row_groups` lists the row counts of stacked matrices;
    unstructured sparsity prunes exactly floor(rows_g * cols * sparsity) weights in each group.
    """
    W = weight.to(torch.float32).clone()
    rows, cols = W.shape
    groups = row_groups or [rows]
    assert sum(groups) == rows, "row_groups must add up to the number of rows"
    Hinv, dead = inverse_hessian_factor(hessian, percdamp)
    W[:, dead] = 0
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M={n_m[1]}")
    if n_m is not None and blocksize % n_m[1]:
        raise ValueError(f"SparseGPT blocksize {blocksize} must be a multiple of M={n_m[1]}")
    group_counts = [_block_prune_counts(g, cols, sparsity, blocksize) for g in groups]
    group_bounds = [0]
    for g in groups:
        group_bounds.append(group_bounds[-1] + g)
    mask = torch.zeros_like(W, dtype=torch.bool)

    for block_idx, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if n_m is None:
            # OBS saliency w^2 / [H^-1]_jj^2, lowest pruned, chosen once per column block.
            saliency = W1 ** 2 / d.unsqueeze(0) ** 2
            for g, (r0, r1) in enumerate(zip(group_bounds[:-1], group_bounds[1:])):
                k = group_counts[g][block_idx]
                if k > 0:
                    idx = torch.topk(saliency[r0:r1].flatten(), k, largest=False, sorted=False).indices
                    mask1[r0:r1].view(-1)[idx] = True
        n, m = n_m if n_m is not None else (0, 0)
        for i in range(count):
            if n_m is not None and i % m == 0:
                # N:M groups are chosen just before they are reached, on the already-updated weights.
                saliency = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                idx = torch.topk(saliency, n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask
