"""ATP's layer-wise allocation: the arithmetic progression, its legal range, and uniform as the default."""
import pytest

from lib.allocation.allocate import AllocationSpec, check_spec, format_plan
from lib.allocation.atp import atp_allocation, max_beta, validate_beta
from lib.allocation.uniform import uniform_allocation
from lib.cli import error_line, parse_config
from lib.errors import IllegalAllocationError, UserError

CASES = [(0.5, 0.05, 4), (0.7, 0.002, 32), (0.6, 0.01, 40), (0.3, 0.0, 12), (0.8, 0.004, 24)]


@pytest.mark.parametrize("sparsity, beta, blocks", CASES)
def test_atp_follows_the_formula_with_mean_s(sparsity, beta, blocks):
    plan = atp_allocation(sparsity, beta, blocks)
    assert len(plan) == blocks
    for i, s in enumerate(plan):
        assert s == pytest.approx(sparsity - beta * (blocks - 1) / 2 + i * beta, abs=1e-12)
    assert sum(plan) / blocks == pytest.approx(sparsity, abs=1e-12)
    steps = [b - a for a, b in zip(plan, plan[1:])]
    assert steps == pytest.approx([beta] * (blocks - 1), abs=1e-12)


def test_atp_is_increasing_with_depth():
    plan = atp_allocation(0.7, 0.01, 32)
    assert all(b > a for a, b in zip(plan, plan[1:]))
    assert plan[0] == pytest.approx(0.7 - 0.155) and plan[-1] == pytest.approx(0.7 + 0.155)


@pytest.mark.parametrize("sparsity, blocks, expected", [
    (0.5, 4, 1 / 3), (0.7, 32, 0.6 / 31), (0.2, 11, 0.04), (0.9, 40, 0.2 / 39), (0.0, 8, 0.0),
])
def test_max_beta_is_min_2s_2one_minus_s_over_l_minus_1(sparsity, blocks, expected):
    assert max_beta(sparsity, blocks) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("sparsity, blocks", [(0.5, 4), (0.7, 32), (0.2, 11), (0.9, 40), (0.35, 7)])
def test_the_largest_legal_beta_is_accepted_and_stays_in_range(sparsity, blocks):
    limit = max_beta(sparsity, blocks)
    plan = atp_allocation(sparsity, limit, blocks)
    assert all(0.0 <= s <= 1.0 for s in plan)
    # at the limit one end of the progression touches 0 or 1
    assert min(plan[0], 1.0 - plan[-1]) == pytest.approx(0.0, abs=1e-12)
    assert sum(plan) / blocks == pytest.approx(sparsity, abs=1e-12)


@pytest.mark.parametrize("sparsity, blocks", [(0.5, 4), (0.7, 32), (0.2, 11)])
def test_beta_above_the_limit_is_rejected_with_the_limit_in_the_message(sparsity, blocks):
    limit = max_beta(sparsity, blocks)
    with pytest.raises(IllegalAllocationError) as info:
        atp_allocation(sparsity, limit * 1.001, blocks)
    assert f"{limit:.6g}" in str(info.value)
    with pytest.raises(IllegalAllocationError):
        atp_allocation(sparsity, limit + 1e-6, blocks)


def test_negative_or_nan_beta_is_rejected():
    with pytest.raises(IllegalAllocationError, match="beta"):
        atp_allocation(0.5, -0.001, 8)
    with pytest.raises(IllegalAllocationError):
        validate_beta(float("nan"), 0.5, 8)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.2])
def test_sparsity_outside_zero_one_is_rejected_everywhere(sparsity):
    for call in (lambda: atp_allocation(sparsity, 0.0, 4), lambda: uniform_allocation(sparsity, 4),
                 lambda: max_beta(sparsity, 4), lambda: check_spec(AllocationSpec("uniform", sparsity), None)):
        with pytest.raises(IllegalAllocationError, match="sparsity"):
            call()


def test_zero_sparsity_is_legal_and_allows_only_beta_zero():
    assert atp_allocation(0.0, 0.0, 5) == [0.0] * 5
    with pytest.raises(IllegalAllocationError):
        atp_allocation(0.0, 0.001, 5)


def test_a_single_block_allows_only_beta_zero():
    assert max_beta(0.6, 1) == 0.0
    assert atp_allocation(0.6, 0.0, 1) == [0.6]
    with pytest.raises(IllegalAllocationError):
        atp_allocation(0.6, 0.01, 1)
    with pytest.raises(IllegalAllocationError, match="at least one"):
        atp_allocation(0.6, 0.0, 0)


def test_illegal_allocation_is_a_user_error():
    assert issubclass(IllegalAllocationError, UserError)


def test_uniform_allocation_gives_every_block_s():
    assert uniform_allocation(0.55, 6) == [0.55] * 6


def _parsed(*flags):
    return parse_config(["--demo", *flags])


def test_cli_defaults_to_uniform_without_beta_and_to_atp_with_it():
    assert _parsed("--sparsity_ratio", "0.6").allocation.rule == "uniform"
    config = _parsed("--sparsity_ratio", "0.6", "--beta", "0.01")
    assert config.allocation.rule == "atp" and config.allocation.params["beta"] == pytest.approx(0.01)
    assert _parsed("--beta", "search").search.enabled and _parsed("--beta", "search").record["beta"] == "search"


def test_cli_rejects_beta_that_is_not_a_number_or_search():
    for text in ("abc", "inf", "nan"):
        with pytest.raises(UserError) as info:
            _parsed("--beta", text)
        assert "--beta" in error_line(info.value) and repr(text) in error_line(info.value)


def test_spec_checks_beta_against_the_block_count_once_known():
    spec = AllocationSpec("atp", 0.5, {"beta": 0.2})
    check_spec(spec, None)  # the block count is unknown before the model config is read
    check_spec(spec, 6)  # limit 1/5
    with pytest.raises(IllegalAllocationError, match="0.142857"):
        check_spec(spec, 8)  # limit 1/7
    with pytest.raises(UserError, match="is a parameter of --allocation atp, not of --allocation uniform"):
        _parsed("--allocation", "uniform", "--beta", "0.1")


def test_format_plan_lists_every_block_and_the_mean():
    text = format_plan([0.4, 0.5, 0.6])
    lines = text.splitlines()
    assert len(lines) == 4
    assert "block   2: sparsity 0.6000" in lines[2]
    assert "mean sparsity 0.5000 over 3 blocks" in lines[3]
