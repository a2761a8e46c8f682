"""OWL, AlphaPruning and the absorption-aware correction: math properties on synthetic inputs."""
import json
import math

import pytest
import torch

from lib.allocation.absorption import absorption_adjust, measure_absorption, measure_drift, shift_and_clip
from lib.allocation.alpha import alpha_allocation, block_alphas, fit_power_law, hill_alpha, weight_eigenvalues
from lib.allocation.owl import outlier_ratio, owl_allocation
from lib.outputs import cached_json_entry as load_or_compute_alphas


def _mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------- OWL

def test_outlier_ratio_counts_entries_above_m_times_joint_mean():
    # 98 ones and 2 entries of 50 across two tensors: joint mean = (98 + 100) / 100 = 1.98
    first = torch.ones(60)
    second = torch.ones(40)
    second[:2] = 50.0
    assert outlier_ratio([first, second], m=5) == pytest.approx(2 / 100)
    # at m = 0.5 everything (1 > 0.99 and 50 > 0.99) is an outlier
    assert outlier_ratio([first, second], m=0.5) == pytest.approx(1.0)
    # the mean is over the concatenation: with 10 ones and one 1000 the mean is 91.8, so only 1000 counts
    assert outlier_ratio([torch.ones(10), torch.full((1,), 1000.0)], m=5) == pytest.approx(1 / 11)
    # [1, 50, 1, 50]: joint mean 25.5, so at m=5 nothing exceeds 127.5
    assert outlier_ratio([torch.tensor([1.0, 50.0]), torch.tensor([1.0, 50.0])], m=5) == 0.0


def test_owl_allocation_mean_bounds_and_ordering():
    ratios = [0.02, 0.10, 0.05, 0.01, 0.07]
    sparsities = owl_allocation(ratios, target=0.7, lam=0.08)
    assert _mean(sparsities) == pytest.approx(0.7, abs=1e-12)
    assert all(0 <= s < 1 for s in sparsities)
    order_by_ratio = sorted(range(5), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order_by_ratio] == sorted(sparsities, reverse=True)
    # min-max scaling to [0, 2*lam]: the extreme blocks differ by exactly 2*lam
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)


def test_owl_allocation_equal_ratios_or_zero_lambda_is_uniform():
    assert owl_allocation([0.03] * 4, target=0.5, lam=0.08) == pytest.approx([0.5] * 4)
    assert owl_allocation([0.01, 0.2, 0.05], target=0.5, lam=0.0) == pytest.approx([0.5] * 3)


def test_owl_invalid_parameters_raise_value_error():
    with pytest.raises(ValueError, match="threshold M"):
        outlier_ratio([torch.ones(4)], m=0)
    with pytest.raises(ValueError, match="lambda"):
        owl_allocation([0.1, 0.2], target=0.5, lam=-0.1)
    with pytest.raises(ValueError, match="lambda"):
        owl_allocation([0.1, 0.2, 0.3], target=0.9, lam=0.2)  # the sparsest block would reach 1.1


# ---------------------------------------------------------------- AlphaPruning

def _pareto(alpha, count, seed, xmin=1.0):
    """Samples with density ~ x^-alpha for x >= xmin (inverse-CDF sampling)."""
    uniform = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return xmin * uniform.pow(-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_alpha_recovers_known_exponent(alpha):
    estimate = hill_alpha(_pareto(alpha, 3000, seed=int(alpha * 10)))
    # the MLE's standard error is (alpha - 1) / sqrt(n) ~ 0.06 at worst here
    assert estimate == pytest.approx(alpha, abs=0.2)


def test_fit_power_law_finds_tail_above_a_bulk():
    generator = torch.Generator().manual_seed(3)
    bulk = 0.3 + 0.5 * torch.rand(800, generator=generator, dtype=torch.float64)
    fit = fit_power_law(torch.cat([bulk, _pareto(3.0, 2500, seed=4)]))
    assert fit.alpha == pytest.approx(3.0, abs=0.25)
    assert fit.xmin >= 0.8  # the bulk below 0.8 is not part of the fitted tail


def test_weight_eigenvalues_are_squared_singular_values_ascending():
    generator = torch.Generator().manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(48, 32, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))
    planted = torch.sort(_pareto(2.5, 32, seed=6)).values
    weight = (left * planted.sqrt()) @ right.T
    eigenvalues = weight_eigenvalues(weight)
    assert eigenvalues.dtype == torch.float32
    assert torch.all(eigenvalues[1:] >= eigenvalues[:-1])
    assert torch.allclose(eigenvalues.double(), planted, rtol=1e-4)


def test_block_alphas_orders_heavy_tailed_blocks_below_random_ones():
    generator = torch.Generator().manual_seed(7)

    def planted_weight(alpha, seed):
        left, _ = torch.linalg.qr(torch.randn(400, 200, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator))
        return (left * _pareto(alpha, 200, seed).float().sqrt()) @ right.T

    blocks = [[planted_weight(2.0, 1), planted_weight(2.2, 2)], [planted_weight(4.0, 3), planted_weight(4.4, 4)]]
    per_block = block_alphas(blocks)
    per_matrix = block_alphas(blocks, mode="matrix")
    assert len(per_block) == 2 and [len(m) for m in per_matrix] == [2, 2]
    assert per_block[0] == pytest.approx(_mean(per_matrix[0]))
    assert per_block[0] < per_block[1]


def test_alpha_allocation_weighted_mean_ordering_and_bounds():
    alphas = [3.1, 2.4, 5.0, 4.2]
    counts = [100, 300, 50, 250]
    sparsities = alpha_allocation(alphas, counts, target=0.6, eps=0.3)
    weighted = sum(p * s for p, s in zip(counts, sparsities)) / sum(counts)
    assert weighted == pytest.approx(0.6, abs=1e-12)
    assert all(0 <= s < 1 for s in sparsities)
    order_by_alpha = sorted(range(4), key=lambda i: alphas[i])
    assert [sparsities[i] for i in order_by_alpha] == sorted(sparsities)
    # linear map to [1-eps, 1+eps]: the extremes keep the ratio 1.3 / 0.7
    assert max(sparsities) / min(sparsities) == pytest.approx(1.3 / 0.7)
    assert alpha_allocation([3.0, 3.0], [10, 20], target=0.5) == pytest.approx([0.5, 0.5])


def test_alpha_invalid_parameters_raise_value_error():
    with pytest.raises(ValueError, match="epsilon"):
        alpha_allocation([2.0, 3.0], [1, 1], target=0.5, eps=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        alpha_allocation([2.0, 3.0], [1, 1], target=0.8, eps=0.5)  # the top block would reach 1.2


def test_load_or_compute_alphas_caches_per_key(tmp_path):
    cache = tmp_path / "sub" / "alphas.json"
    calls = []

    def compute(values):
        def run():
            calls.append(values)
            return values
        return run

    assert load_or_compute_alphas(cache, "model-a", compute([2.5, 3.5])) == [2.5, 3.5]
    assert load_or_compute_alphas(cache, "model-a", compute([9.0])) == [2.5, 3.5]
    assert load_or_compute_alphas(cache, "model-b", compute([[1.0, 2.0]])) == [[1.0, 2.0]]
    assert calls == [[2.5, 3.5], [[1.0, 2.0]]]
    assert json.loads(cache.read_text()) == {"model-a": [2.5, 3.5], "model-b": [[1.0, 2.0]]}
    cache.write_text("{not json")
    assert load_or_compute_alphas(cache, "model-a", compute([4.0])) == [4.0]


# ---------------------------------------------------------------- absorption

class AnchoredGain(torch.nn.Module):
    """h -> anchor + gain * (h - anchor): the clean stream stays at `anchor`, a perturbation is scaled by gain."""

    def __init__(self, anchor, gain):
        super().__init__()
        self.anchor, self.gain = anchor, gain

    def forward(self, hidden):
        return self.anchor + self.gain * (hidden - self.anchor)


def _call_block(block, hidden, kwargs):
    return block(hidden, **kwargs)


def _anchored_setup(gains, seed=0):
    anchor = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    blocks = [AnchoredGain(anchor, g) for g in gains]
    batches = [(anchor.expand(2, 5, 16).clone(), {}), (anchor.expand(1, 3, 16).clone(), {})]
    return blocks, batches


def test_measure_drift_follows_known_gains():
    gains = [1.0, 0.5, 1.0, 2.0, 1.0, 0.25]
    blocks, batches = _anchored_setup(gains)
    scale = 0.1
    lookahead_drift, final_drift = measure_drift(blocks, batches, _call_block, None, scale, lookahead=2)
    for i in range(len(gains)):
        probe = min(i + 2, len(gains) - 1)
        assert lookahead_drift[i] == pytest.approx(scale * math.prod(gains[i + 1:probe + 1]), rel=1e-4)
        assert final_drift[i] == pytest.approx(scale * math.prod(gains[i + 1:]), rel=1e-4)


def test_measure_absorption_coefficients_ordered_by_damping():
    gains = [1.0, 1.0, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0]
    blocks, batches = _anchored_setup(gains)
    coefficients = measure_absorption(blocks, batches, _call_block, None, 0.05, lookahead=1)
    expected = [1 / math.sqrt(math.prod(gains[i + 1:i + 2]) * math.prod(gains[i + 1:])) for i in range(len(gains))]
    assert coefficients == pytest.approx(expected, rel=1e-4)
    assert coefficients[1] > 1  # block 2 halves what block 1 hands it: absorbing
    assert coefficients[4] < 1  # block 5 doubles it: amplifying
    assert coefficients[-1] == pytest.approx(1.0, rel=1e-4)  # nothing after the last block


def test_measure_absorption_is_seeded_and_runs_each_tail_once():
    calls = []

    def counting_block(block, hidden, kwargs):
        calls.append(block)
        return block(hidden) + 0.1 * torch.tanh(hidden)  # a non-linear twist so noise directions matter

    blocks, batches = _anchored_setup([0.8, 1.2, 0.9, 1.1])
    norm = torch.nn.LayerNorm(16)
    first = measure_absorption(blocks, batches, counting_block, norm, 0.1, seed=3)
    runs_per_batch = 4 + 4 * 3 // 2  # one clean pass plus blocks i+1..end for every i
    assert len(calls) == runs_per_batch * len(batches)
    assert measure_absorption(blocks, batches, counting_block, norm, 0.1, seed=3) == first
    assert measure_absorption(blocks, batches, counting_block, norm, 0.1, seed=4) != first
    assert all(math.isfinite(c) and c > 0 for c in first)


def test_absorption_adjust_keeps_mean_bounds_and_shifts_towards_absorbing_blocks():
    base = [0.7] * 5
    coefficients = [1.5, 0.6, 1.0, 2.5, 0.9]
    adjusted = absorption_adjust(base, coefficients, strength=0.05, target=0.7)
    assert _mean(adjusted) == pytest.approx(0.7, abs=1e-12)
    assert all(0 <= s <= 0.99 for s in adjusted)
    order_by_coefficient = sorted(range(5), key=lambda i: coefficients[i])
    assert [adjusted[i] for i in order_by_coefficient] == sorted(adjusted)
    assert adjusted[3] > 0.7 > adjusted[1]


def test_absorption_adjust_clips_and_keeps_mean_under_strong_shift():
    base = [0.95, 0.9, 0.5, 0.1, 0.05]
    coefficients = [3.0, 2.0, 1.0, 0.5, 0.2]
    adjusted = absorption_adjust(base, coefficients, strength=0.5, target=0.5)
    assert _mean(adjusted) == pytest.approx(0.5, abs=1e-12)
    assert all(0 <= s <= 0.99 for s in adjusted)
    assert adjusted[0] == pytest.approx(0.99) and adjusted[-1] == pytest.approx(0.0)


def test_absorption_adjust_weighted_mean():
    weights = [1.0, 4.0, 2.0]
    adjusted = absorption_adjust([0.6, 0.5, 0.55], [1.0, 2.0, 0.5], strength=0.1, target=0.55, weights=weights)
    assert sum(w * s for w, s in zip(weights, adjusted)) / sum(weights) == pytest.approx(0.55, abs=1e-12)


def test_absorption_adjust_strength_zero_or_equal_coefficients():
    base = [0.62, 0.71, 0.77]
    assert absorption_adjust(base, [0.5, 1.0, 3.0], strength=0.0, target=0.7) == base
    assert absorption_adjust(base, [1.3] * 3, strength=0.2, target=0.7) == pytest.approx(base)


def test_shift_and_clip_solves_common_shift():
    result = shift_and_clip([0.2, 0.4, 1.5], target=0.5)
    # 1.5 clips at 0.99; the other two share the shift c: (0.2 + c) + (0.4 + c) + 0.99 = 1.5
    shift = (1.5 - 0.99 - 0.6) / 2
    assert result == pytest.approx([0.2 + shift, 0.4 + shift, 0.99])


def test_absorption_invalid_strength_raises_user_error():
    with pytest.raises(ValueError, match="absorption strength"):
        absorption_adjust([0.5, 0.5], [1.0, 2.0], strength=-0.1, target=0.5)
    with pytest.raises(ValueError, match="absorption strength"):
        absorption_adjust([0.5, 0.5], [1.0, 2.0], strength=float("nan"), target=0.5)


@pytest.mark.parametrize("flags, fragment", [
    (["--allocation", "owl", "--owl_m", "0"], "--owl_m must lie in (0, 1000], got 0.0"),
    (["--allocation", "owl", "--owl_lambda", "-0.1"], "--owl_lambda"),
    (["--allocation", "alpha", "--alpha_eps", "1.5"], "--alpha_eps"),
    (["--absorption", "-0.1"], "--absorption"),
])
def test_the_cli_names_the_flag_of_a_bad_rule_parameter(cli, flags, fragment):
    code, _, err = cli("--model", "org/model", *flags)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and fragment in err
