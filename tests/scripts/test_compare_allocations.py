"""scripts/compare_allocations.py end to end on the tiny demo, and every allocation through the CLI."""
import contextlib
import importlib.util
import io
import json
import re
import sys

import pytest

from lib.demo.models import TINY_SHAPE

from conftest import HIDDEN, NUM_BLOCKS, REPO

ALL_COLUMNS = ["uniform", "uniform+absorption", "atp", "atp+absorption", "owl", "owl+absorption", "alpha",
               "alpha+absorption"]
FAST_RUN = ["--nsamples", "4", "--max_eval_windows", "4", "--seqlen", "64"]
TARGET = 0.6


def load_script():
    spec = importlib.util.spec_from_file_location("compare_allocations", REPO / "scripts" / "compare_allocations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = load_script()


def run_script(argv):
    """(exit code, stdout, stderr) of the script's main run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


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


def table_cells(markdown: str) -> dict[tuple[str, str], list[str]]:
    """{(method, sparsity): cells} of the table rows."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a literal bar
        if line.startswith("| ") and cells[0] != "method":
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def cell_number(cell: str) -> float:
    return float(re.match(r"\**([0-9.]+)", cell).group(1))


# ---------------------------------------------------------------- the script on the tiny demo

@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    paths = {"md": out / "table.md", "png": out / "profiles.png", "json": out / "all.json"}
    code, stdout, stderr = run_script([
        "--demo", "--sparsities", TARGET, "--methods", "wanda", "--allocations", "uniform,atp,owl,alpha",
        "--absorption", "0.02", "--out_md", paths["md"], "--out_png", paths["png"], "--out_json", paths["json"],
        "--", *FAST_RUN, "--alpha_cache", out / "alphas.json"])
    assert code == 0, stderr
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    runs = {r["allocation"]: r for r in data["runs"]}
    return {"stdout": stdout, "paths": paths, "data": data, "runs": runs}


def test_table_has_a_number_in_every_cell_and_one_bold_best(comparison):
    markdown = comparison["paths"]["md"].read_text(encoding="utf-8")
    assert markdown in comparison["stdout"]
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == ALL_COLUMNS
    rows = table_cells(markdown)
    assert list(rows) == [("wanda", f"{TARGET:g}")]
    cells = rows[("wanda", f"{TARGET:g}")]
    values = [cell_number(c) for c in cells]
    for cell, column, value in zip(cells, ALL_COLUMNS, values):
        assert value == pytest.approx(comparison["runs"][column]["results"]["perplexity"], abs=0.006)
    bold = [v for c, v in zip(cells, values) if c.startswith("**")]
    assert bold and all(v == min(values) for v in bold)
    beta = comparison["runs"]["atp"]["results"]["search"]["best_beta"]
    assert f"(β={beta:g})" in cells[ALL_COLUMNS.index("atp")]


def test_every_plan_has_the_requested_mean_and_was_pruned_as_planned(comparison):
    assert set(comparison["runs"]) == set(ALL_COLUMNS)
    for column, run in comparison["runs"].items():
        assert run["ok"] and run["error"] is None, column
        allocation = run["results"]["allocation"]
        assert allocation["name"] == run["base_allocation"]
        assert len(allocation["sparsities"]) == TINY_SHAPE["num_layers"]
        assert plan_mean(allocation) == pytest.approx(TARGET, abs=1e-6), column
        assert_achieved_matches_plan(run["results"], min_cols=TINY_SHAPE["hidden"])
    assert "param_counts" in comparison["runs"]["alpha"]["results"]["allocation"]
    atp = comparison["runs"]["atp"]["results"]
    assert atp["allocation"]["beta"] == atp["search"]["best_beta"]


def test_owl_alpha_and_absorption_plans_differ_from_their_baselines(comparison):
    def plan(column):
        return comparison["runs"][column]["results"]["allocation"]["sparsities"]

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(plan(a), plan(b)))

    for column in ("owl", "alpha", "uniform+absorption"):
        assert gap(column, "uniform") > 1e-3, column
    for base in ("uniform", "atp", "owl", "alpha"):
        assert gap(f"{base}+absorption", base) > 1e-3, base
        absorbed = comparison["runs"][f"{base}+absorption"]["results"]["allocation"]
        if base == "atp":  # the search chose its beta with the correction applied (one allocation route)
            from lib.allocation.atp import atp_allocation
            expected = atp_allocation(TARGET, absorbed["beta"], TINY_SHAPE["num_layers"])
        else:
            expected = plan(base)
        assert absorbed["base_sparsities"] == pytest.approx(expected, abs=1e-12)


def test_profile_png_is_written(comparison):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    png = comparison["paths"]["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


# ---------------------------------------------------------------- failures and bad flags

@pytest.fixture
def local_flags(model_dir, text_files):
    return ["--calib_data", text_files.calib, "--eval_data", text_files.eval, "--nsamples", "4", "--seqlen", "32",
            "--max_eval_windows", "4", "--calib_batch_size", "4"]


def test_a_failing_run_is_reported_in_its_cell_and_the_others_survive(model_dir, local_flags, tmp_path):
    # at 0.95 AlphaPruning's default spread (x0.7..x1.3) pushes a block past sparsity 1: that run fails after
    # loading the model
    code, stdout, stderr = run_script(["--model", model_dir("llama"), "--sparsities", "0.95",
                                       "--allocations", "uniform,alpha", "--out_json", tmp_path / "all.json",
                                       "--", *local_flags, "--alpha_cache", ""])
    assert code == compare.EXIT_RUN_FAILED
    cells = table_cells(stdout)[("wanda", "0.95")]
    assert cell_number(cells[0]) > 0
    assert cells[1].startswith("error: --alpha_eps 0.3 gives a sparsity of") and "use a smaller" in cells[1]
    runs = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))["runs"]
    assert [r["ok"] for r in runs] == [True, False]
    assert stderr.strip().splitlines()[-1] == "error: 1 of 2 runs failed (see the table)"


@pytest.mark.parametrize("argv, fragment", [
    (["--demo", "--allocations", "uniform,foo"], "--allocations: unknown 'foo'"),
    (["--demo", "--methods", "wanda,wanda"], "repeats a value"),
    (["--demo", "--sparsities", "0.5,1.2"], "strictly between 0 and 1"),
    (["--demo", "--absorption", "-1"], "--absorption must be a non-negative number"),
    (["--demo", "--", "--allocation", "owl"], "--allocation is set by compare_allocations.py"),
    (["--demo", "--", "--beta", "0.1"], "--beta is set by compare_allocations.py"),
    (["--demo", "--", "--owl_lambda", "x"], "invalid float value"),
])
def test_script_rejects_bad_flags_before_any_run(argv, fragment):
    code, stdout, stderr = run_script(argv)
    assert code == compare.EXIT_USAGE
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr


def test_markdown_table_bolds_the_lowest_perplexity_and_highest_accuracy():
    def record(column, ppl, acc, error=None):
        results = None if error else {"perplexity": ppl, "zero_shot": {"mean_acc": acc},
                                      "allocation": {"beta": 0.01} if column == "atp" else {}}
        return {"method": "wanda", "sparsity": 0.7, "allocation": column, "ok": error is None, "error": error,
                "results": results}

    records = [record("uniform", 30.0, 0.40), record("atp", 25.0, 0.38), record("owl", None, None, "bad | flag")]
    table = compare.markdown_table(records, ["uniform", "atp", "owl", "alpha"])
    cells = table_cells(table)[("wanda", "0.7")]
    assert cells[0] == "30.00 / **0.4000**"
    assert cells[1] == "**25.00** / 0.3800 (β=0.01)"
    assert cells[2] == "error: bad \\| flag"
    assert cells[3] == "-"


# ---------------------------------------------------------------- every allocation through main.py

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


def test_the_comparison_script_accepts_dlp_and_ria(model_dir, local_flags, tmp_path):
    out = tmp_path / "t.json"
    code, stdout, stderr = run_script(["--model", str(model_dir("llama")), "--sparsities", "0.5", "--methods",
                                       "ria,wanda", "--allocations", "uniform,dlp", "--out_json", str(out), "--",
                                       *map(str, local_flags)])
    assert code == 0, stderr
    runs = json.loads(out.read_text())["runs"]
    assert {(r["method"], r["allocation"]) for r in runs} == {("ria", "uniform"), ("ria", "dlp"),
                                                               ("wanda", "uniform"), ("wanda", "dlp")}
    for run in runs:
        plan = run["results"]["allocation"]["sparsities"]
        assert sum(plan) / len(plan) == pytest.approx(0.5)
        if run["allocation"] == "dlp":
            assert max(plan) - min(plan) == pytest.approx(0.3)  # DLP's window of width 2 * alpha (0.15)
