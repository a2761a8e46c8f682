"""RIA: Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024) -- pure math, no I/O.

What is implemented
-------------------
For a Linear weight W [out, in] (row i = output channel, column j = input channel) and calibration inputs X:

    RI_ij  = |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|
             (first term: normalised within input channel j, i.e. over the column;
              second term: normalised within output channel i, i.e. over the row)
    RIA_ij = RI_ij * (||X_j||_2) ** a,   ||X_j||_2 = sqrt(input_sq_norm[j]),   a = 0.5 by default

This is the paper's metric (its method section: the relative importance RI, multiplied by the activation norm of
the weight's input channel to the power a; the paper writes that norm as ||X_i||_2 with i naming the input channel,
which is column j of the [out, in] weight here).  We could not read the paper's full text from here; the formula,
the default a = 0.5 and the comparison group below were checked against the authors' released code
(github.com/biomedical-cybernetics/Relative-importance-and-activation-pruning: `--prune_method ria`, `--a 0.5`).

Comparison group: the authors' code prunes the lowest-RIA entries of the WHOLE matrix for unstructured sparsity
(its per-output-row option, `--per_outneuron`, is off by default and is described there as "Wanda's tactic"), so
RIA_COMPARISON = "matrix".  For N:M sparsity the group is every M consecutive input columns of each row, as in Wanda
and SparseGPT.  Masks are chosen by the shared helpers in the masks module.

Where this departs from the paper / the authors' code
-----------------------------------------------------
* Channel permutation (the paper's second contribution: heuristic channel reallocation and the linear-sum-assignment
  refinement for N:M) is NOT implemented; N:M masks are taken on the original column order ("RIA without CP").
* All-zero rows or columns: the authors' code divides 0 by 0 there (NaN).  Here a zero row/column sum makes that
  term 0 (every entry of such a row/column is 0 anyway), so the metric is always finite.  An input feature with zero
  activation gets metric 0 for a > 0; with a = 0 the activation factor is 1 for every feature (0 ** 0 = 1), so the
  activations are ignored entirely (the paper's "RI" variant).
* The authors' unstructured threshold prunes every entry <= the value at sorted index floor(numel * s), i.e. one
  entry (plus ties) more than floor(numel * s); the shared mask helper prunes exactly floor(numel * s).
* The authors' activation statistic is the sum over tokens of x_j^2 divided by the number of calibration sequences;
  here `input_sq_norm` is the plain sum.  The two differ by one positive factor for the whole matrix, which cannot
  change any ranking inside a row, a matrix or an N:M group.
"""
from __future__ import annotations

import math

import torch

from ..registry import Param
from .masks import select_mask
from .pruner import SQ_NORM, Pruner, register_pruner

# Unstructured RIA compares all entries of one weight matrix ("row" would be Wanda's per-output comparison).
RIA_COMPARISON = "matrix"


def _check_exponent(exponent: float) -> None:
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not math.isfinite(exponent) \
            or exponent < 0:
        raise ValueError(f"RIA exponent must be a finite number >= 0, got {exponent!r}")


def ria_metric(weight: torch.Tensor, input_sq_norm: torch.Tensor, exponent: float = 0.5) -> torch.Tensor:
    """RIA_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * sqrt(input_sq_norm[j]) ** exponent, in float32.

    `weight` is [out, in]; `input_sq_norm[j]` is the sum over calibration tokens of x_j^2.  Zero rows / columns /
    activations never produce NaN.  Larger metric = more important = kept.
    """
    _check_exponent(exponent)
    if weight.dim() != 2:
        raise ValueError(f"RIA needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if input_sq_norm.dim() != 1 or input_sq_norm.numel() != weight.shape[1]:
        raise ValueError(
            f"input squared norms must have shape ({weight.shape[1]},), got {tuple(input_sq_norm.shape)}"
        )
    sq = input_sq_norm.detach().float().to(weight.device)
    if not bool(torch.isfinite(sq).all()) or bool((sq < 0).any()):
        raise ValueError("input squared norms must be finite and >= 0")
    w = weight.detach().abs().float()
    col_sum = w.sum(dim=0, keepdim=True)  # [1, in]: sum over output channels for each input channel j
    row_sum = w.sum(dim=1, keepdim=True)  # [out, 1]: sum over input channels for each output channel i
    one = torch.ones((), dtype=w.dtype, device=w.device)
    relative = w / torch.where(col_sum > 0, col_sum, one) + w / torch.where(row_sum > 0, row_sum, one)
    activation = sq.sqrt().pow(exponent)  # 0 ** 0 == 1: exponent 0 ignores the activations
    return relative * activation.unsqueeze(0)


def ria_mask(
    weight: torch.Tensor,
    input_sq_norm: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    exponent: float = 0.5,
) -> torch.Tensor:
    """Bool mask (True = prune) of the lowest-RIA entries: per matrix for unstructured, per M-group for N:M."""
    metric = ria_metric(weight, input_sq_norm, exponent)
    return select_mask(metric, sparsity, n_m, per_row=RIA_COMPARISON == "row")


@torch.no_grad()
def prune_ria(linears, stats, sparsity, n_m, params) -> None:
    for name, linear in linears.items():
        mask = ria_mask(linear.weight, stats[name].sq_norm, sparsity, n_m, params["ria_exponent"])
        linear.weight.masked_fill_(mask, 0)


register_pruner(Pruner(
    "ria", prune_ria, needs=frozenset({SQ_NORM}),
    params=(Param("ria_exponent", float, 0.5,
                  "RIA exponent a on the input activation norm (0: relative importance only)",
                  lambda v: 0 <= v <= 10, "must lie in [0, 10]"),),
    help="RIA: relative importance (row and column normalised |W|) times activation norm^a, per matrix"))
