"""The SparseGPT solver: exact sparsity, better reconstruction than mask-only pruners, and the stacked solve."""
import math
from fractions import Fraction

import pytest
import torch

from lib.pruning.masks import lowest_overall_mask, lowest_per_row_mask, magnitude_metric, n_m_mask, wanda_metric
from lib.pruning.sparsegpt_solver import sparsegpt_prune


def correlated_inputs(seed: int, tokens: int = 512, cols: int = 64) -> torch.Tensor:
    """[tokens, cols] activations with strongly correlated features, as in a transformer's hidden states."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, cols // 4, generator=gen)
    mixing = torch.randn(cols // 4, cols, generator=gen)
    return latent @ mixing + 0.1 * torch.randn(tokens, cols, generator=gen)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def random_weight(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def output_error(dense: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F over the calibration tokens."""
    return float(torch.linalg.norm((dense.double() - pruned.double()) @ x.double().T))


@pytest.mark.parametrize("rows, cols, blocksize", [(48, 64, 128), (30, 80, 32), (17, 100, 16)])
@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.73])
def test_prunes_exactly_floor_rows_cols_s_per_matrix(rows, cols, blocksize, sparsity):
    x = correlated_inputs(1, cols=cols)
    new, mask = sparsegpt_prune(random_weight(2, rows, cols), hessian_of(x), sparsity, blocksize=blocksize)
    expected = math.floor(rows * cols * Fraction(repr(sparsity)))
    assert int(mask.sum()) == expected
    assert int((new == 0).sum()) == expected
    assert torch.equal(new == 0, mask)


def test_row_groups_each_get_their_exact_count():
    x = correlated_inputs(3)
    weight = random_weight(4, 16 + 24 + 8, 64)
    _, mask = sparsegpt_prune(weight, hessian_of(x), 0.55, blocksize=32, row_groups=[16, 24, 8])
    counts = [int(part.sum()) for part in mask.split([16, 24, 8], dim=0)]
    assert counts == [math.floor(g * 64 * 0.55) for g in (16, 24, 8)]


def test_zero_sparsity_changes_nothing():
    weight = random_weight(5, 20, 64)
    new, mask = sparsegpt_prune(weight, hessian_of(correlated_inputs(6)), 0.0, blocksize=32)
    assert not mask.any()
    assert torch.equal(new, weight)


def test_survivors_are_updated_to_compensate():
    weight = random_weight(7, 20, 64)
    new, mask = sparsegpt_prune(weight, hessian_of(correlated_inputs(8)), 0.5, blocksize=32)
    assert not torch.allclose(new[~mask], weight[~mask])


@pytest.mark.parametrize("sparsity, n_m", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_reconstruction_error_is_below_magnitude_and_wanda(sparsity, n_m):
    x = correlated_inputs(10)
    weight = random_weight(11, 48, 64)
    new, _ = sparsegpt_prune(weight, hessian_of(x), sparsity, n_m=n_m, blocksize=32)
    wanda_score = wanda_metric(weight, (x ** 2).sum(dim=0))
    if n_m is None:
        wanda_mask = lowest_per_row_mask(wanda_score, sparsity)
        magnitude_mask = lowest_overall_mask(magnitude_metric(weight), sparsity)
    else:
        wanda_mask = n_m_mask(wanda_score, *n_m)
        magnitude_mask = n_m_mask(magnitude_metric(weight), *n_m)
    errors = {
        "sparsegpt": output_error(weight, new, x),
        "wanda": output_error(weight, weight.masked_fill(wanda_mask, 0), x),
        "magnitude": output_error(weight, weight.masked_fill(magnitude_mask, 0), x),
    }
    assert errors["sparsegpt"] < errors["wanda"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors
    # a real margin, not a tie decided by rounding
    assert errors["sparsegpt"] < 0.95 * min(errors["wanda"], errors["magnitude"]), errors


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_stacked_solve_equals_solving_each_matrix_alone(n_m):
    x = correlated_inputs(12)
    hessian = hessian_of(x)
    parts = [random_weight(13, 16, 64), random_weight(14, 24, 64), random_weight(15, 8, 64)]
    stacked, stacked_mask = sparsegpt_prune(torch.cat(parts), hessian, 0.6, n_m=n_m, blocksize=32,
                                            row_groups=[p.shape[0] for p in parts])
    for part, got, got_mask in zip(parts, stacked.split([16, 24, 8]), stacked_mask.split([16, 24, 8])):
        alone, alone_mask = sparsegpt_prune(part, hessian, 0.6, n_m=n_m, blocksize=32)
        assert torch.equal(got_mask, alone_mask)
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_inputs_that_are_never_active_have_their_weights_zeroed():
    x = correlated_inputs(16)
    x[:, [3, 40]] = 0  # dead features: no information about these weights
    new, mask = sparsegpt_prune(random_weight(17, 20, 64), hessian_of(x), 0.5, blocksize=32)
    assert bool((new[:, [3, 40]] == 0).all())
    assert int(mask.sum()) == 20 * 64 // 2
    assert torch.isfinite(new).all()


def test_n_m_needs_compatible_width_and_blocksize():
    hessian = hessian_of(correlated_inputs(18))
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(random_weight(19, 8, 64), hessian, 0.5, n_m=(2, 4), blocksize=30)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(random_weight(19, 8, 60), torch.eye(60), 0.5, n_m=(4, 8), blocksize=32)
