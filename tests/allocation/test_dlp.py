"""DLP allocation: exact mean, range, direction (higher unimportance -> higher sparsity), uniform on ties, bad
hyperparameters, and the block score (pooled median / mean of Wanda scores) on hand-computed examples."""
import math

import pytest
import torch

from lib.allocation import dlp
from lib.allocation.rule import RULES

dlp_allocation = dlp.dlp_allocation
dlp_block_importance = dlp.dlp_block_importance
dlp_relative_importance = dlp.dlp_relative_importance


def mean(xs):
    return math.fsum(xs) / len(xs)


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.8])
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.1])
def test_mean_is_target_and_values_in_range(target, alpha):
    gen = torch.Generator().manual_seed(0)
    scores = (torch.rand(32, generator=gen, dtype=torch.float64) * 5 + 0.1).tolist()
    if target - alpha < 0:  # the window [target + mean(d) - 2 alpha, target + mean(d)] may dip below 0
        try:
            s = dlp_allocation(scores, target, alpha)
        except ValueError:
            return
    else:
        s = dlp_allocation(scores, target, alpha)
    assert len(s) == 32
    assert mean(s) == pytest.approx(target, abs=1e-15)
    assert all(0 <= x < 1 for x in s)
    assert max(s) - min(s) == pytest.approx(2 * alpha, abs=1e-12)
    assert min(s) >= target - 2 * alpha - 1e-12 and max(s) <= target + 2 * alpha + 1e-12


def test_direction_higher_unimportance_gets_higher_sparsity():
    # Block scores S_l are the paper's *unimportance*: block 2 is the most redundant, block 0 the least.
    scores = [1.0, 2.0, 4.0, 3.0]
    s = dlp_allocation(scores, 0.7, 0.15)
    assert sorted(range(4), key=lambda i: s[i]) == [0, 1, 3, 2]
    # importance I_l = 1 - S_l / sum S orders the blocks the other way round
    imp = dlp_relative_importance(scores)
    assert imp == pytest.approx([1 - 1 / 10, 1 - 2 / 10, 1 - 4 / 10, 1 - 3 / 10])
    assert sorted(range(4), key=lambda i: -imp[i]) == [0, 1, 3, 2]


def test_hand_computed_allocation():
    # S = [1, 2, 3]: I = [5/6, 4/6, 3/6]; d = 2*0.1*(I - 3/6)/(2/6) = [0.2, 0.1, 0.0]; mean d = 0.1
    # s = 0.5 + 0.1 - d = [0.4, 0.5, 0.6]
    assert dlp_allocation([1.0, 2.0, 3.0], 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6], abs=1e-15)
    # scale invariance: a common factor on the scores (e.g. sums vs means of x^2) changes nothing
    assert dlp_allocation([7.0, 14.0, 21.0], 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6], abs=1e-15)


def test_equal_scores_single_block_and_zero_alpha_give_uniform():
    assert dlp_allocation([2.5] * 6, 0.7, 0.15) == [0.7] * 6
    assert dlp_allocation([0.0] * 3, 0.6, 0.15) == [0.6] * 3
    assert dlp_allocation([3.0], 0.7, 0.15) == [0.7]
    assert dlp_allocation([1.0, 5.0, 2.0], 0.7, 0.0) == [0.7] * 3


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError):
        dlp_allocation([1.0, 2.0], 0.5, alpha)


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_target_raises(target):
    with pytest.raises(ValueError):
        dlp_allocation([1.0, 2.0], target, 0.1)


@pytest.mark.parametrize("scores", [[], [1.0, -1.0], [1.0, float("nan")], [float("inf"), 1.0]])
def test_bad_scores_raise(scores):
    with pytest.raises(ValueError):
        dlp_allocation(scores, 0.5, 0.1)


def test_allocation_leaving_unit_interval_raises():
    with pytest.raises(ValueError):  # target 0.9, alpha 0.3: the least important block would exceed 1
        dlp_allocation([1.0, 2.0, 3.0], 0.9, 0.3)
    with pytest.raises(ValueError):  # target 0.1, alpha 0.3: the most important block would go below 0
        dlp_allocation([1.0, 2.0, 3.0], 0.1, 0.3)
    with pytest.raises(ValueError):  # same allocation twice the other way: must not depend on the order given
        dlp_allocation([3.0, 2.0, 1.0], 0.1, 0.3)


def test_params_document_defaults():
    params = {p.name: p for p in RULES.get("dlp").params}
    assert params["dlp_alpha"].default == 0.15
    assert params["dlp_statistic"].default == "median"
    for param in params.values():
        assert param.help and param.requirement


def test_block_importance_hand_example():
    # W1 [2, 2] with input squared norms [4, 9] (norms 2, 3); W2 [1, 3] with squared norms [1, 0, 16] (norms 1, 0, 4)
    w1 = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    w2 = torch.tensor([[-3.0, 5.0, 0.25]])
    sq1 = torch.tensor([4.0, 9.0])
    sq2 = torch.tensor([1.0, 0.0, 16.0])
    # scores: W1 -> [2, 6, 1, 3]; W2 -> [3, 0, 1]; pooled sorted: [0, 1, 1, 2, 3, 3, 6] -> median (index 3) = 2
    assert dlp_block_importance([w1, w2], [sq1, sq2]) == 2.0
    assert dlp_block_importance([w1, w2], [sq1, sq2], statistic="mean") == pytest.approx(16 / 7)
    # a single matrix with an even count: lower median, as torch.median; scores [2, 6, 1, 3] -> sorted [1, 2, 3, 6]
    assert dlp_block_importance([w1], [sq1]) == 2.0


@pytest.mark.parametrize("chunk_elems", [1, 7, 1 << 22])
def test_block_median_matches_concatenated_torch_median(chunk_elems):
    gen = torch.Generator().manual_seed(1)
    shapes = [(24, 16), (16, 24), (40, 16), (16, 40)]
    weights = [torch.randn(*s, generator=gen) * (k + 1) for k, s in enumerate(shapes)]
    sq = [torch.rand(s[1], generator=gen) * 50 for s in shapes]
    sq[1][3] = 0.0  # a dead input feature gives exact zeros
    weights[2][5] = 0.0  # a zero row
    pooled = torch.cat([(w.abs() * s.sqrt().unsqueeze(0)).flatten() for w, s in zip(weights, sq)])
    got = dlp_block_importance(weights, sq, chunk_elems=chunk_elems)
    assert got == float(torch.median(pooled))
    got_mean = dlp_block_importance(weights, sq, statistic="mean", chunk_elems=chunk_elems)
    assert got_mean == pytest.approx(float(pooled.double().mean()), rel=1e-6)


def test_block_median_with_ties_and_bf16_weights():
    w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]], dtype=torch.bfloat16)
    sq = torch.tensor([1.0, 1.0, 1.0])
    assert dlp_block_importance([w], [sq]) == 1.0  # sorted [1, 1, 1, 1, 2, 2]: index 2
    assert dlp_block_importance([torch.zeros(3, 4)], [torch.ones(4)]) == 0.0
    # negative zeros in weights or norms are plain zeros
    assert dlp_block_importance([torch.full((2, 2), -0.0)], [torch.tensor([-0.0, 1.0])]) == 0.0
    assert dlp_block_importance([torch.tensor([[-0.0, 3.0, 2.0]])], [torch.tensor([1.0, 1.0, -0.0])]) == 0.0


def test_block_importance_bad_inputs_raise():
    w = torch.ones(2, 3)
    with pytest.raises(ValueError):
        dlp_block_importance([], [])
    with pytest.raises(ValueError):
        dlp_block_importance([w], [])
    with pytest.raises(ValueError):
        dlp_block_importance([w], [torch.ones(2)])  # wrong input width
    with pytest.raises(ValueError):
        dlp_block_importance([w], [torch.tensor([1.0, -1.0, 1.0])])  # negative squared norm
    with pytest.raises(ValueError):
        dlp_block_importance([torch.ones(3)], [torch.ones(3)])  # not 2-D
    with pytest.raises(ValueError):
        dlp_block_importance([w], [torch.ones(3)], statistic="max")
    with pytest.raises(ValueError):
        dlp_block_importance([torch.tensor([[1.0, float("nan"), 1.0]])], [torch.ones(3)])


def test_end_to_end_more_redundant_block_is_pruned_more():
    # Block B has the same weights as A but twice the input activation: every Wanda score doubles, so B's median
    # unimportance is higher and B gets the higher sparsity; C (the weakest activations) gets the lowest.
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(8, 6, generator=gen), torch.randn(6, 8, generator=gen)]
    sq = [torch.rand(6, generator=gen) + 0.5, torch.rand(8, generator=gen) + 0.5]
    score_a = dlp_block_importance(weights, sq)
    score_b = dlp_block_importance(weights, [4 * s for s in sq])
    score_c = dlp_block_importance(weights, [0.25 * s for s in sq])
    assert score_b == pytest.approx(2 * score_a) and score_c == pytest.approx(0.5 * score_a)
    s = dlp_allocation([score_a, score_b, score_c], 0.7, 0.15)
    assert s[2] < s[0] < s[1]
    assert mean(s) == pytest.approx(0.7, abs=1e-15)
