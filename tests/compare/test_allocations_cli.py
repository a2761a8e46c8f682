"""Every allocation rule with every pruner through main.py on a tiny local model: the plan has the requested mean,
each block is pruned to its planned sparsity, and bad allocation flags are one error line. (The side-by-side
comparison itself is scripts/paper_table.py: tests/scripts/test_paper_table.py, tests/compare/.)"""
import json

import pytest

from conftest import HIDDEN, NUM_BLOCKS

TARGET = 0.6


def plan_mean(allocation: dict) -> float:
    """The mean each rule promises: parameter-weighted for AlphaPruning, plain for the others."""
    plan = allocation["sparsities"]
    weights = allocation.get("param_counts") or [1] * len(plan)
    return sum(s * w for s, w in zip(plan, weights)) / sum(weights)


def assert_achieved_matches_plan(results: dict, min_cols: int) -> None:
    """Each block was pruned to its planned sparsity, up to the floor() of the pruners' per-row/per-matrix counts."""
    plan = results["allocation"]["sparsities"]
    assert [b["target"] for b in results["blocks"]] == pytest.approx(plan, abs=1e-12)
    for block in results["blocks"]:
        assert block["target"] - 1 / min_cols - 1e-9 <= block["achieved"] <= block["target"] + 1e-9, block


@pytest.fixture
def local_flags(model_dir, text_files):
    return ["--calib_data", text_files.calib, "--eval_data", text_files.eval, "--nsamples", "4", "--seqlen", "32",
            "--max_eval_windows", "4", "--calib_batch_size", "4"]


ALLOCATION_FLAGS = {
    "uniform": ["--allocation", "uniform"],
    "atp": ["--allocation", "atp", "--beta", "0.05"],
    "owl": ["--allocation", "owl"],
    "alpha": ["--allocation", "alpha", "--alpha_cache", ""],
    "owl+absorption": ["--allocation", "owl", "--absorption", "0.02"],
}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("allocation", list(ALLOCATION_FLAGS))
def test_each_allocation_works_with_each_pruner(cli, model_dir, local_flags, tmp_path, method, allocation):
    results_path = tmp_path / "run.json"
    code, _, err = cli("--model", model_dir("llama"), *local_flags, "--quiet", "--prune_method", method,
                       "--sparsity_ratio", TARGET, *ALLOCATION_FLAGS[allocation], "--results", results_path)
    assert code == 0, err
    results = json.loads(results_path.read_text(encoding="utf-8"))
    plan = results["allocation"]["sparsities"]
    assert len(plan) == NUM_BLOCKS
    assert plan_mean(results["allocation"]) == pytest.approx(TARGET, abs=1e-6)
    if allocation != "uniform":
        assert max(plan) - min(plan) > 1e-3
    assert_achieved_matches_plan(results, min_cols=HIDDEN)


@pytest.mark.parametrize("extra, fragment", [
    (["--allocation", "foo"], "invalid choice: 'foo'"),
    (["--allocation", "owl", "--owl_lambda", "-1"], "--owl_lambda must lie in [0, 0.5)"),
    (["--allocation", "alpha", "--alpha_eps", "1.5"], "--alpha_eps must lie in [0, 1)"),
    (["--absorption", "-1"], "--absorption strength must lie in [0, 1]"),
    (["--allocation", "owl", "--beta", "0.1"], "--beta is a parameter of --allocation atp, not of --allocation owl"),
])
def test_bad_allocation_flags_exit_with_one_error_line(cli, capsys, model_dir, local_flags, tmp_path, extra,
                                                       fragment):
    results_path = tmp_path / "run.json"
    try:
        code, _, err = cli("--model", model_dir("llama"), *local_flags, *extra, "--results", results_path)
    except SystemExit as exc:  # argparse's `choices` check exits by itself
        code, err = exc.code, capsys.readouterr().err
    assert code != 0
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert not results_path.exists()
