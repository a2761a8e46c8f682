"""Each pruner zeroes exactly the pattern it promises: counts per row / matrix, N:M groups, and which entries."""
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lib.pruning.masks import lowest_overall_mask, lowest_per_row_mask, n_m_mask, parse_sparsity_type
from lib.pruning.pruner import PRUNERS, default_params
from lib.calibration.stats import InputStats

def prune_linears(linears, stats, method, sparsity, n_m, blocksize=128):
    """Prune one block's Linears with the registered pruner `method` (SparseGPT at `blocksize`)."""
    pruner = PRUNERS.get(method)
    params = {**default_params(pruner), "sparsegpt_blocksize": blocksize}
    pruner.prune(linears, stats, sparsity, n_m, params)



def exact_floor(count: int, sparsity: float) -> int:
    """floor(count * s) for s as the user typed it (0.29 means 29/100, not the nearest binary float)."""
    return math.floor(count * Fraction(repr(sparsity)))


def random_linears(seed: int, shapes=((48, 64), (40, 64))) -> dict[str, nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    linears = {}
    for k, (rows, cols) in enumerate(shapes):
        lin = nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(rows, cols, generator=gen))
        linears[f"lin{k}"] = lin
    return linears


def shared_stats(linears: dict[str, nn.Linear], x: torch.Tensor) -> dict[str, InputStats]:
    """All layers read the same input x [tokens, cols]: one accumulator, as collect_input_stats would share it."""
    stats = InputStats(names=list(linears))
    stats.add(x, want_sq_norm=True, want_xtx=True)
    return {name: stats for name in linears}


def calibration_input(seed: int, tokens: int = 256, cols: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(cols, generator=gen) * 3 + 0.1  # features with very different norms
    return torch.randn(tokens, cols, generator=gen) * scales


def prune(method: str, sparsity: float, n_m=None, seed: int = 0):
    linears = random_linears(seed)
    dense = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    x = calibration_input(seed + 100)
    prune_linears(linears, shared_stats(linears, x), method, sparsity, n_m, blocksize=32)
    return linears, dense, x


@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.7, 0.95])
def test_wanda_prunes_exactly_floor_cols_times_s_in_every_row(sparsity):
    linears, _, _ = prune("wanda", sparsity)
    for lin in linears.values():
        rows, cols = lin.weight.shape
        per_row = (lin.weight == 0).sum(dim=1)
        assert per_row.tolist() == [exact_floor(cols, sparsity)] * rows


@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.7, 0.95])
def test_magnitude_prunes_exactly_floor_numel_times_s_per_matrix(sparsity):
    linears, _, _ = prune("magnitude", sparsity)
    for lin in linears.values():
        assert int((lin.weight == 0).sum()) == exact_floor(lin.weight.numel(), sparsity)


def test_wanda_prunes_the_lowest_weight_times_input_norm_entries_of_each_row():
    linears, dense, x = prune("wanda", 0.6)
    column_norms = torch.sqrt((x.double() ** 2).sum(dim=0))  # ||X_j||_2 over all calibration tokens
    for name, lin in linears.items():
        score = dense[name].double().abs() * column_norms
        k = exact_floor(score.shape[1], 0.6)
        expected = torch.zeros_like(score, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1)[:, :k], True)
        assert torch.equal(lin.weight == 0, expected)
        # survivors are untouched: Wanda does not update weights
        assert torch.equal(lin.weight[~expected], dense[name][~expected])


def test_wanda_mask_differs_from_magnitude_when_input_norms_differ():
    wanda, _, _ = prune("wanda", 0.5)
    per_row_magnitude = {n: lowest_per_row_mask(lin.weight.abs(), 0.5) for n, lin in random_linears(0).items()}
    assert any(not torch.equal(lin.weight == 0, per_row_magnitude[n]) for n, lin in wanda.items())


def test_magnitude_prunes_the_lowest_absolute_weights_of_the_matrix():
    linears, dense, _ = prune("magnitude", 0.45)
    for name, lin in linears.items():
        magnitude = dense[name].abs().flatten()
        k = exact_floor(magnitude.numel(), 0.45)
        threshold_kept = magnitude.sort().values[k]
        pruned = (lin.weight == 0).flatten()
        assert bool((magnitude[pruned] < threshold_kept).all())
        assert bool((magnitude[~pruned] >= threshold_kept).all())
        assert torch.equal(lin.weight.flatten()[~pruned], dense[name].flatten()[~pruned])
        # the count per row is free (per matrix, not per row), unlike Wanda
        assert len(set((lin.weight == 0).sum(dim=1).tolist())) > 1


@pytest.mark.parametrize("method", PRUNERS.names())
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_gives_exactly_n_zeros_in_every_group_of_m_inputs(method, n, m):
    linears, _, _ = prune(method, n / m, n_m=(n, m))
    for lin in linears.values():
        rows, cols = lin.weight.shape
        zeros_per_group = (lin.weight == 0).reshape(rows, cols // m, m).sum(dim=2)
        assert bool((zeros_per_group == n).all()), f"{method} {n}:{m}"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_n_m_prunes_the_lowest_metric_entries_of_each_group(method):
    linears, dense, x = prune(method, 0.5, n_m=(2, 4))
    norms = torch.sqrt((x.double() ** 2).sum(dim=0)) if method == "wanda" else torch.ones(x.shape[1])
    for name, lin in linears.items():
        score = (dense[name].double().abs() * norms).reshape(lin.weight.shape[0], -1, 4)
        pruned = (lin.weight == 0).reshape(score.shape)
        highest_pruned = score.masked_fill(~pruned, -1).amax(dim=2)
        lowest_kept = score.masked_fill(pruned, math.inf).amin(dim=2)
        assert bool((highest_pruned < lowest_kept).all())


def test_masks_are_pure_functions_of_the_metric():
    metric = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 0.5]])
    assert lowest_per_row_mask(metric, 0.5).tolist() == [[False, True, False, True, False, True]]
    assert lowest_overall_mask(metric, 1 / 3).tolist() == [[False, True, False, False, False, True]]
    assert lowest_per_row_mask(metric, 0.0).sum() == 0
    assert n_m_mask(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 2, 4).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("sparsity", [0.29, 0.57, 0.58])
def test_counts_are_not_off_by_one_from_binary_float_noise(sparsity):
    # 100 * 0.29 == 28.999999999999996 in floats; the user asked for 29 of 100
    metric = torch.rand(3, 100, generator=torch.Generator().manual_seed(1))
    assert lowest_per_row_mask(metric, sparsity).sum(dim=1).tolist() == [round(100 * sparsity)] * 3
    assert int(lowest_overall_mask(metric[:1], sparsity).sum()) == round(100 * sparsity)


def test_n_m_needs_a_width_divisible_by_m():
    with pytest.raises(ValueError, match="multiple of M=4"):
        n_m_mask(torch.rand(3, 10), 2, 4)


def test_parse_sparsity_type():
    assert parse_sparsity_type("unstructured") is None
    assert parse_sparsity_type("2:4") == (2, 4)
    assert parse_sparsity_type("4:8") == (4, 8)
    for bad in ("4:2", "0:4", "2:2", "two:four", "2-4", "2:4:8"):
        with pytest.raises(ValueError):
            parse_sparsity_type(bad)


def test_unknown_method_is_rejected():
    linears = random_linears(0)
    with pytest.raises(KeyError, match="unknown pruner 'random'"):
        prune_linears(linears, None, "random", 0.5, None)
