"""RIA metric on a hand-computed example, its masks against a brute-force sort, N:M groups, zero rows/columns and
the exponent."""
from fractions import Fraction

import pytest
import torch

from lib.pruning.masks import lowest_overall_mask, n_m_mask
from lib.pruning.pruner import PRUNERS
from lib.pruning.ria import RIA_COMPARISON, ria_mask, ria_metric


def test_hand_computed_3x4():
    w = torch.tensor([
        [1.0, -2.0, 0.0, 1.0],
        [-3.0, 1.0, 2.0, 2.0],
        [0.0, 1.0, -2.0, 1.0],
    ])
    sq = torch.tensor([4.0, 16.0, 1.0, 0.0])  # norms 2, 4, 1, 0 -> with a = 0.5 factors sqrt: 2**.5, 2, 1, 0
    # |W| column sums: [4, 4, 4, 4]; row sums: [4, 8, 4]
    rows = [[1, 2, 0, 1], [3, 1, 2, 2], [0, 1, 2, 1]]
    col_sum = [4, 4, 4, 4]
    row_sum = [4, 8, 4]
    ri = [[Fraction(rows[i][j], col_sum[j]) + Fraction(rows[i][j], row_sum[i]) for j in range(4)] for i in range(3)]
    # e.g. RI_00 = 1/4 + 1/4 = 1/2, RI_10 = 3/4 + 3/8 = 9/8, RI_21 = 1/4 + 1/4 = 1/2
    assert ri[0][0] == Fraction(1, 2) and ri[1][0] == Fraction(9, 8) and ri[2][1] == Fraction(1, 2)
    ri_t = torch.tensor([[float(x) for x in r] for r in ri])
    torch.testing.assert_close(ria_metric(w, sq, exponent=0.0), ri_t)
    act = torch.tensor([2.0, 4.0, 1.0, 0.0]).sqrt()  # (||X_j||_2) ** 0.5
    expected = ri_t * act.unsqueeze(0)
    got = ria_metric(w, sq)  # default exponent 0.5
    assert got.dtype == torch.float32 and got.shape == w.shape
    torch.testing.assert_close(got, expected)
    assert got[1, 0].item() == pytest.approx(9 / 8 * 2 ** 0.5)
    torch.testing.assert_close(ria_metric(w, sq, exponent=1.0), ri_t * torch.tensor([2.0, 4.0, 1.0, 0.0]))


def test_metric_ignores_weight_sign_and_dtype():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=gen)
    sq = torch.rand(8, generator=gen) * 10
    torch.testing.assert_close(ria_metric(-w, sq), ria_metric(w, sq))
    half = ria_metric(w.to(torch.bfloat16), sq)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ria_metric(w.to(torch.bfloat16).float(), sq))


def test_scaling_of_activation_statistic_keeps_ranking():
    # sums vs means of x^2 differ by one factor for the whole matrix: the metric scales, the order does not change
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=gen)
    sq = torch.rand(8, generator=gen) * 10 + 0.1
    torch.testing.assert_close(ria_metric(w, 16 * sq), 2 * ria_metric(w, sq))


def test_exponent_zero_ignores_activations():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=gen)
    a = ria_metric(w, torch.rand(6, generator=gen) * 100, exponent=0.0)
    b = ria_metric(w, torch.zeros(6), exponent=0.0)  # even zero activations: 0 ** 0 == 1
    torch.testing.assert_close(a, b)
    absw = w.abs()
    torch.testing.assert_close(a, absw / absw.sum(0, keepdim=True) + absw / absw.sum(1, keepdim=True))


def test_zero_rows_columns_and_activations_give_no_nan():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    w[1] = 0.0
    w[:, 2] = 0.0
    sq = torch.rand(6) + 0.1
    sq[4] = 0.0
    for exponent in (0.0, 0.5, 1.0):
        m = ria_metric(w, sq, exponent)
        assert torch.isfinite(m).all()
        assert (m[1] == 0).all() and (m[:, 2] == 0).all()
    assert (ria_metric(w, sq)[:, 4] == 0).all()
    assert torch.isfinite(ria_metric(torch.zeros(3, 4), torch.zeros(4))).all()


def brute_force_lowest(metric: torch.Tensor, k: int) -> torch.Tensor:
    """True on the k smallest entries of `metric` (distinct values, so the set is unique)."""
    order = sorted(range(metric.numel()), key=lambda idx: metric.flatten()[idx].item())
    mask = torch.zeros(metric.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(metric)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_unstructured_mask_is_lowest_of_whole_matrix(sparsity):
    assert RIA_COMPARISON == "matrix"
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 8, generator=gen)
    sq = torch.rand(8, generator=gen) * 5 + 0.1
    metric = ria_metric(w, sq)
    assert metric.flatten().unique().numel() == metric.numel()
    k = int(48 * sparsity + 1e-9)
    mask = ria_mask(w, sq, sparsity)
    assert mask.dtype == torch.bool and int(mask.sum()) == k
    assert torch.equal(mask, brute_force_lowest(metric, k))
    assert torch.equal(mask, lowest_overall_mask(metric, sparsity))


def test_matrix_group_differs_from_per_row():
    # one row of tiny weights: a whole-matrix comparison prunes it first, a per-row comparison could not
    w = torch.ones(4, 8)
    w[0] = 1e-3
    w[0, 0] = 1.0  # keep row/column sums away from a degenerate pattern
    mask = ria_mask(w, torch.ones(8), 0.25)
    assert int(mask.sum()) == 8
    assert int(mask[0].sum()) == 7  # the 7 tiny weights of row 0 are the 7 lowest entries of the matrix


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_mask(n, m):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(5, 16, generator=gen)
    sq = torch.rand(16, generator=gen) * 3 + 0.1
    metric = ria_metric(w, sq)
    mask = ria_mask(w, sq, n / m, n_m=(n, m))
    assert torch.equal(mask, n_m_mask(metric, n, m))
    for r in range(5):
        for g in range(0, 16, m):
            group = metric[r, g:g + m]
            lowest = set(torch.argsort(group)[:n].tolist())
            assert set(torch.nonzero(mask[r, g:g + m]).flatten().tolist()) == lowest


@pytest.mark.parametrize("exponent", [-0.5, float("nan"), float("inf"), True])
def test_bad_exponent_raises(exponent):
    with pytest.raises(ValueError):
        ria_metric(torch.ones(2, 3), torch.ones(3), exponent)


def test_bad_shapes_and_norms_raise():
    with pytest.raises(ValueError):
        ria_metric(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError):
        ria_metric(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError):
        ria_metric(torch.ones(2, 3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        ria_metric(torch.ones(2, 3), torch.tensor([1.0, float("nan"), 1.0]))


def test_params_document_defaults():
    (param,) = PRUNERS.get("ria").params
    assert param.name == "ria_exponent" and param.default == 0.5 and param.help and param.requirement
