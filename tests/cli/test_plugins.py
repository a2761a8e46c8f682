"""A new pruner or allocation rule is one module that registers itself: here both are defined in this test module,
registered, and run through the CLI end to end without touching lib/."""
import json

import pytest
import torch

from lib.allocation.rule import RULES, Allocation, AllocationRule, register_rule
from lib.cli import build_parser
from lib.pruning.pruner import PRUNERS, Pruner, SQ_NORM, register_pruner
from lib.registry import Param, positive

SEEN = {"pruner_calls": 0, "stats_seen": False}


def prune_last_columns(linears, stats, sparsity, n_m, params):
    """Toy pruner: zero the last floor(cols * s) input columns of every Linear (scaled by --toy_scale, unused)."""
    SEEN["pruner_calls"] += 1
    SEEN["stats_seen"] = stats is not None and all(s.sq_norm is not None for s in stats.values())
    for linear in linears.values():
        cols = linear.weight.shape[1]
        k = int(cols * sparsity)
        if k:
            linear.weight[:, cols - k:] = 0


def step_rule(request):
    """Toy rule: the first half of the blocks at S - delta, the second half at S + delta (mean S for even L)."""
    delta = request.params["toy_delta"]
    half = request.num_blocks // 2
    sparsities = [request.sparsity - delta] * half + [request.sparsity + delta] * (request.num_blocks - half)
    return Allocation(sparsities, {"toy_delta": delta})


@pytest.fixture
def toy_plugins():
    pruner = register_pruner(Pruner("toy_columns", prune_last_columns, needs=frozenset({SQ_NORM}),
                                    params=(Param("toy_scale", float, 1.0, "unused toy knob", positive,
                                                  "must be positive"),),
                                    help="toy: last columns"))
    rule = register_rule(AllocationRule("toy_step", step_rule,
                                        params=(Param("toy_delta", float, 0.1, "toy step half-height",
                                                      lambda v: 0 <= v < 0.5, "must lie in [0, 0.5)"),),
                                        help="toy: a step"))
    yield pruner, rule
    PRUNERS.unregister("toy_columns")
    RULES.unregister("toy_step")


def test_cli_choices_and_help_come_from_the_registries(toy_plugins):
    text = " ".join(build_parser().format_help().split())  # argparse wraps to the terminal's width
    for name in ("toy_columns", "toy_step", "--toy_scale", "--toy_delta", "toy: a step", "toy: last columns"):
        assert name in text
    for name in ("magnitude", "wanda", "sparsegpt", "ria", "uniform", "atp", "owl", "alpha", "dlp"):
        assert name in text


def test_toy_pruner_and_rule_run_end_to_end(cli, model_dir, text_files, tmp_path, toy_plugins):
    results = tmp_path / "toy.json"
    SEEN.update(pruner_calls=0, stats_seen=False)
    code, out, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data",
                         text_files.eval, "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2",
                         "--quiet", "--prune_method", "toy_columns", "--allocation", "toy_step", "--toy_delta",
                         "0.2", "--sparsity_ratio", "0.5", "--results", results)
    assert code == 0, err
    record = json.loads(results.read_text())
    assert record["allocation"]["name"] == "toy_step"
    assert record["allocation"]["sparsities"] == pytest.approx([0.3, 0.3, 0.7, 0.7])
    assert SEEN["pruner_calls"] == 4 and SEEN["stats_seen"]  # once per block, with the statistic it declared
    # the pruner really ran: the targets it was given are what each block achieved (up to floor rounding)
    for block in record["blocks"]:
        assert abs(block["achieved"] - block["target"]) < 0.05


def test_a_toy_parameter_is_validated_with_its_flag(cli, toy_plugins):
    code, _, err = cli("--model", "org/model", "--allocation", "toy_step", "--toy_delta", "0.7")
    assert code == 2 and "error: --toy_delta must lie in [0, 0.5), got 0.7" in err


@pytest.mark.parametrize("returned, code, fragment", [
    ([0.5, 0.5, 1.2, 0.6], 3, "gives block 2 the sparsity 1.2, outside [0, 1]"),
    ([0.5, float("nan"), 0.5, 0.5], 3, "gives block 1 the sparsity nan"),
    ([0.5, 0.5, 0.5], 2, "returned 3 sparsities for 4 blocks"),
    ([0.4, 0.4, 0.4, 0.4], 2, "returned a mean sparsity of 0.400000 instead of 0.5"),
])
def test_a_plug_in_rule_breaking_the_allocation_contract_is_one_error_line(cli, model_dir, text_files, returned,
                                                                          code, fragment):
    register_rule(AllocationRule("toy_broken", lambda request: Allocation(list(returned), {}), help="toy: broken"))
    try:
        exit_code, out, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data",
                                  text_files.eval, "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2",
                                  "--quiet", "--allocation", "toy_broken", "--sparsity_ratio", "0.5")
    finally:
        RULES.unregister("toy_broken")
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code and lines[-1].startswith("error: --allocation") and fragment in lines[-1], err
    assert "Traceback" not in err and "sparsity sanity check" not in out  # nothing was pruned


def test_a_toy_rules_declared_parameter_is_searched_end_to_end_without_touching_lib(cli, model_dir, text_files,
                                                                                    tmp_path):
    from lib.allocation.rule import Searchable

    def tilt(request):  # blocks tilted around S by +-width: width 0 is uniform
        width, n = request.params["toy_width"], request.num_blocks
        return Allocation([request.sparsity + width * (2 * i / (n - 1) - 1) for i in range(n)], {})

    register_rule(AllocationRule("toy_tilt", tilt, help="toy: a tilt",
                                 params=(Param("toy_width", float, 0.0, "toy tilt half-width",
                                               lambda v: 0 <= v < 0.5, "must lie in [0, 0.5)"),),
                                 searchable=Searchable("toy_width", lambda s, n: 0.2, step=0.05)))
    try:
        for flags in (["--search", "toy_width"], ["--toy_width", "search"]):
            results = tmp_path / f"{flags[0]}.json"
            code, out, err = cli("--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data",
                                 text_files.eval, "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2",
                                 "--quiet", *flags, "--sparsity_ratio", "0.5", "--search_strategy", "grid",
                                 "--results", results)
            assert code == 0, err
            record = json.loads(results.read_text())
            search = record["search"]
            assert record["allocation"]["name"] == "toy_tilt" and search["param"] == "toy_width"
            assert sorted(t["value"] for t in search["curve"]) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
            best = min(search["curve"], key=lambda t: t["ppl"])
            assert search["best_toy_width"] == best["value"] == pytest.approx(
                (record["allocation"]["sparsities"][-1] - 0.5))
            assert f"when toy_width={best['value']:g}" in out
    finally:
        RULES.unregister("toy_tilt")


def test_a_plug_in_parameter_named_like_a_built_in_flag_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"parameter name\(s\) seed are taken by the CLI's own flags \(--seed\)"):
        register_rule(AllocationRule("toy_seeded", step_rule, params=(Param("seed", int, 0, "clashes"),)))
    assert "toy_seeded" not in RULES


def test_the_reserved_names_are_exactly_the_clis_own_flags():
    from lib.registry import BUILT_IN_SETTINGS, declared_params
    parser = build_parser()
    own = {a.dest for a in parser._actions} - {p.name for p in declared_params([*PRUNERS, *RULES])}
    assert own == set(BUILT_IN_SETTINGS)
