"""The SparseGPT solver (Frantar & Alistarh, 2023): OBS-style pruning with a shared inverse Hessian.

Pure math, no I/O. Rows of W are independent given H = 2 X X^T / n, so Linear layers that read the same input
(q/k/v, gate/up) are solved as one stacked matrix with one Cholesky factorisation; `row_groups` keeps the mask
selection per original matrix, so the result equals solving each matrix on its own.

Speed without changing the math: the solver works on W transposed, so input column j is the contiguous row j and
every per-column step is one contiguous vector op. Column-by-column OBS updates only reach the next few columns
(an inner block); the rest of the block and of the matrix receive the same updates as matrix products. Per column
there are two small kernels, no allocation and no slicing, which matters on a GPU where launches dominate.
"""
from __future__ import annotations

import math

import torch

# Columns updated one by one before their accumulated error is pushed on with one matrix product (for N:M sparsity
# the inner block is one group of M columns instead).
INNER_BLOCK = 16


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of the dampened inverse Hessian (H^-1 = U^T U), and the mask of dead inputs.

    With J the order-reversing permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is upper
    triangular with a positive diagonal, so it is that factor: one Cholesky and one triangular solve instead of
    inverting H and factorising the inverse. Half the flops on a GPU (where cholesky_inverse is two triangular
    solves), the same on a CPU, and slightly more accurate in fp32.
    """
    H = hessian.to(torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1)
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H.flip(0, 1))
    del H  # large for wide inputs (e.g. 11008 x 11008): free it before the solve allocates its own n x n buffers
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1), dead


def _block_prune_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """How many weights of one matrix to prune in each column block so the total is exactly floor(numel*s)."""
    counts, done = [], 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        due = int(math.floor(rows * end * sparsity + 1e-9))
        counts.append(due - done)
        done = due
    return counts


def _select_unstructured(slab: torch.Tensor, diag_sq: torch.Tensor, mask: torch.Tensor,
                         bounds: list[tuple[int, int]], counts: list[int]) -> None:
    """Mark the counts[g] lowest OBS saliencies w^2 / [H^-1]_jj^2 of each row group of one column block.

    `slab` and `mask` are [block columns, rows] (transposed); `mask` is filled in place.
    """
    saliency = slab.square().div_(diag_sq.unsqueeze(1))
    for (r0, r1), k in zip(bounds, counts):
        if k <= 0:
            continue
        part = saliency[:, r0:r1]
        flat = part.reshape(-1)  # a view for a single group, a copy of the group's columns otherwise
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=slab.device)
        chosen[torch.topk(flat, k, largest=False, sorted=False).indices] = True
        mask[:, r0:r1] = chosen.view(part.shape)


def _select_n_m(group: torch.Tensor, diag_sq: torch.Tensor, mask: torch.Tensor, n: int) -> None:
    """Mark the n lowest saliencies of every row among the M columns of `group` ([M, rows], transposed)."""
    saliency = group.square().div_(diag_sq.unsqueeze(1))
    mask.scatter_(0, torch.topk(saliency, n, dim=0, largest=False).indices, True)


def _solve_block(slab: torch.Tensor, hinv: torch.Tensor, inv_diag: torch.Tensor, diag_sq: torch.Tensor,
                 mask: torch.Tensor, err: torch.Tensor, n_m: tuple[int, int] | None) -> None:
    """OBS column by column over one column block, in place.

    slab [c, rows]: this block's columns of W^T, with the updates of all earlier blocks applied; on return row i
    holds column i as it was when it was reached (the caller zeroes the pruned entries). hinv [c, c]: the block's
    part of the upper Cholesky factor of H^-1. mask [c, rows]: the pruned entries (chosen here for N:M).
    err [c, rows]: receives each column's scaled pruning error, which the caller propagates to later blocks.

    Column i is brought up to date when it is reached, w_i -= sum_{k<i} err_k * hinv[k, i], with one matrix-vector
    product over its inner block (hinv is upper triangular and err is zero for columns not reached yet, so the
    product needs no slicing), and then err_i = (w_i - q_i) / d_i = w_i * mask_i / d_i is one multiply. Later inner
    blocks get the inner block's errors in one matrix product. An N:M group is one inner block, so its columns are
    fully updated when the group is chosen, as in the column-by-column algorithm.
    """
    count = slab.shape[0]
    inner = INNER_BLOCK if n_m is None else n_m[1]
    scale = mask * inv_diag.unsqueeze(1) if n_m is None else torch.empty_like(slab)
    err.zero_()
    slab_rows, err_rows, scale_rows = slab.unbind(0), err.unbind(0), scale.unbind(0)
    for j1 in range(0, count, inner):
        j2 = min(j1 + inner, count)
        if n_m is not None:
            _select_n_m(slab[j1:j2], diag_sq[j1:j2], mask[j1:j2], n_m[0])
            torch.mul(mask[j1:j2], inv_diag[j1:j2].unsqueeze(1), out=scale[j1:j2])
        inner_err_t = err[j1:j2].t()
        inner_hinv_cols = hinv[j1:j2, j1:j2].t().unbind(0)
        for i in range(j1, j2):
            if i > j1:
                slab_rows[i].addmv_(inner_err_t, inner_hinv_cols[i - j1], alpha=-1)
            torch.mul(slab_rows[i], scale_rows[i], out=err_rows[i])
        if j2 < count:
            slab[j2:].addmm_(hinv[j1:j2, j2:].t(), err[j1:j2], alpha=-1)


@torch.no_grad()
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
    rows, cols = weight.shape
    groups = row_groups or [rows]
    assert sum(groups) == rows, "row_groups must add up to the number of rows"
    if n_m is not None and cols % n_m[1]:
        raise ValueError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M={n_m[1]}")
    if n_m is not None and blocksize % n_m[1]:
        raise ValueError(f"SparseGPT blocksize {blocksize} must be a multiple of M={n_m[1]}")
    hinv, dead = inverse_hessian_factor(hessian, percdamp)
    diag = torch.diag(hinv)
    inv_diag, diag_sq = diag.reciprocal(), diag.square()

    weight_t = torch.empty((cols, rows), dtype=torch.float32, device=weight.device)
    weight_t.copy_(weight.t())
    weight_t.masked_fill_(dead.unsqueeze(1), 0)
    mask_t = torch.zeros((cols, rows), dtype=torch.bool, device=weight.device)
    err = torch.empty((min(blocksize, cols), rows), dtype=torch.float32, device=weight.device)
    group_counts = [_block_prune_counts(g, cols, sparsity, blocksize) for g in groups]
    starts = [sum(groups[:g]) for g in range(len(groups))]
    bounds = [(s, s + g) for s, g in zip(starts, groups)]

    for block_idx, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        slab, block_mask, block_err = weight_t[i1:i2], mask_t[i1:i2], err[:i2 - i1]
        if n_m is None:
            _select_unstructured(slab, diag_sq[i1:i2], block_mask, bounds, [c[block_idx] for c in group_counts])
        _solve_block(slab, hinv[i1:i2, i1:i2], inv_diag[i1:i2], diag_sq[i1:i2], block_mask, block_err, n_m)
        slab.masked_fill_(block_mask, 0)
        if i2 < cols:
            weight_t[i2:].addmm_(hinv[i1:i2, i2:].t(), block_err, alpha=-1)
    return weight_t.t().contiguous(), mask_t.t().contiguous()
