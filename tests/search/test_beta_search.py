"""`--beta search` end to end on the trained tiny demo model: strategies agree, trials are logged and resumed."""
import json

import pytest

from lib.allocation.atp import max_beta

FAST = ["--demo", "--sparsity_ratio", "0.7", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "6",
        "--calib_batch_size", "4", "--quiet", "--beta", "search", "--search_step", "0.01"]


def _search(cli, tmp_path, name, *extra):
    results = tmp_path / f"{name}.json"
    code, out, err = cli(*FAST, "--results", results, *extra)
    assert code == 0, err
    return json.loads(results.read_text()), out


def test_golden_finds_the_grid_best_with_at_most_half_the_trials(cli, tmp_path):
    grid, _ = _search(cli, tmp_path, "grid", "--search_strategy", "grid")
    golden, out = _search(cli, tmp_path, "golden", "--search_strategy", "golden")
    g, s = grid["search"], golden["search"]
    assert g["num_trials"] == round(max_beta(0.7, 4) / 0.01) + 1  # every grid point, beta=0 included
    assert s["num_trials"] <= g["num_trials"] / 2
    curve = {t["beta"]: t["ppl"] for t in g["curve"]}
    assert abs(s["best_beta"] - g["best_beta"]) <= 0.01 + 1e-9
    assert curve[s["best_beta"]] <= g["best_ppl_scored"] * 1.01
    # The final model is pruned at the chosen beta and evaluated in full.
    assert golden["allocation"]["beta"] == s["best_beta"]
    assert "Best LLM ppl = " in out and f"wikitext perplexity {golden['perplexity']}" in out
    assert (tmp_path / "golden_search.png").exists() == (golden["search"]["plot"] is not None)


def test_trials_are_logged_as_they_finish_and_a_rerun_resumes(cli, tmp_path):
    log = tmp_path / "trials.jsonl"
    first, _ = _search(cli, tmp_path, "first", "--search_log", log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == first["search"]["num_trials"] == first["search"]["num_evaluated"]
    for line in lines:
        assert {"beta", "ppl", "seconds", "sparsities"} <= set(line)
        assert sum(line["sparsities"]) / 4 == pytest.approx(0.7)
    again, _ = _search(cli, tmp_path, "again", "--search_log", log)
    assert again["search"]["num_evaluated"] == 0
    assert again["search"]["best_beta"] == first["search"]["best_beta"]
    assert len(log.read_text().splitlines()) == len(lines)


def test_scoring_on_a_window_subset_reevaluates_the_winner_on_all_windows(cli, tmp_path):
    subset, _ = _search(cli, tmp_path, "subset", "--search_eval_windows", "2", "--search_strategy", "golden")
    search = subset["search"]
    assert search["scored_windows"] == 2
    assert subset["eval"]["windows"] == 6
    # The two best subset betas are re-scored on all windows and the better of them is the final beta.
    rescored = search["rescored"]
    subset_ranked = sorted(search["curve"], key=lambda t: t["ppl"])[:2]
    assert sorted(t["beta"] for t in rescored) == sorted(t["beta"] for t in subset_ranked)
    assert search["best_beta"] == min(rescored, key=lambda t: t["ppl"])["beta"]
    assert subset["allocation"]["beta"] == search["best_beta"]
    assert subset["perplexity"] == pytest.approx(min(t["ppl"] for t in rescored), rel=1e-9)


def test_every_search_trial_goes_through_the_allocation_route_with_absorption(cli, tmp_path):
    """--beta search --absorption X: each trial's sparsities carry the correction (not plain ATP) and keep mean S,
    and the final prune uses the same allocation as the winning trial."""
    from lib.allocation.atp import atp_allocation
    log = tmp_path / "trials.jsonl"
    record, _ = _search(cli, tmp_path, "absorb", "--absorption", "0.5", "--search_log", log)
    trials = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(trials) == record["search"]["num_trials"] >= 3
    for trial in trials:
        plain = atp_allocation(0.7, trial["beta"], 4)
        assert trial["sparsities"] != pytest.approx(plain, abs=1e-6)
        assert sum(trial["sparsities"]) / 4 == pytest.approx(0.7)
    best = next(t for t in trials if t["beta"] == record["search"]["best_beta"])
    assert record["allocation"]["sparsities"] == pytest.approx(best["sparsities"])
    assert record["allocation"]["absorption_strength"] == 0.5
    # the log's settings key names the correction: a plain search does not reuse these trials
    plain, _ = _search(cli, tmp_path, "plain", "--search_log", log)
    assert plain["search"]["num_evaluated"] == plain["search"]["num_trials"]


@pytest.mark.parametrize("flags, param", [(["--allocation", "owl", "--search", "owl_lambda"], "owl_lambda"),
                                          (["--owl_lambda", "search"], "owl_lambda"),
                                          (["--beta", "0.02", "--search", "absorption"], "absorption")])
def test_any_declared_parameter_is_searched_with_the_same_strategies_and_log(cli, tmp_path, flags, param):
    log, results = tmp_path / "log.jsonl", tmp_path / "run.json"
    base = ["--demo", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--quiet", "--search_step",
            "0.02", "--search_coarse", "3", "--search_log", log, "--results", results]
    code, out, err = cli(*base, *flags)
    assert code == 0, err
    record = json.loads(results.read_text())
    search = record["search"]
    assert search["param"] == param and search["best"] == search[f"best_{param}"]
    best = min(search["curve"], key=lambda t: t["ppl"])
    assert search["best"] == best["value"]
    used = record["allocation"].get("absorption_strength", 0.0) if param == "absorption" else \
        record["allocation"][param]
    assert used == pytest.approx(search["best"])
    code, out, err = cli(*base, *flags)  # the log resumes every trial
    assert code == 0 and json.loads(results.read_text())["search"]["num_evaluated"] == 0


@pytest.mark.parametrize("extra, fragment", [
    (["--search_strategy", "golden", "--search_points", "3"], "--search_points 3: values per round are a setting"),
    (["--search_workers", "0"], "--search_workers 0: must be at least 1"),
    (["--search_strategy", "parallel", "--search_points", "1"], "--search_points 1: must be at least 2"),
])
def test_bad_search_worker_settings_are_one_error_line(cli, extra, fragment):
    code, out, err = cli(*FAST, *extra)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {fragment}"), err


def test_search_workers_without_submitit_is_one_error_line_before_any_work(cli, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    code, out, err = cli(*FAST, "--search_workers", "2")
    assert code == 2 and out == ""
    assert err.strip() == ("error: --search_workers 2: worker processes are started with submitit, which is not "
                           "installed: pip install submitit")


def test_the_parallel_strategy_in_one_process(cli, tmp_path):
    record, out = _search(cli, tmp_path, "parallel", "--search_strategy", "parallel", "--search_points", "3")
    search = record["search"]
    assert search["strategy"] == "parallel" and search["points_per_round"] == 3 and search["workers"] == 1
    assert search["best"] == min(search["curve"], key=lambda t: t["ppl"])["value"]
    assert f"{search['num_trials']} trials in {search['rounds']} rounds, parallel" in out
