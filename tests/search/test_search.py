"""Beta search: grid vs golden on synthetic objectives, the JSONL log (resume, keys), plotting, and search.sh."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lib.errors import UserError
from lib.search.plot import plot_search
from lib.search.strategies import SearchResult, grid_betas, refine_best, search_beta

REPO = Path(__file__).resolve().parents[2]
SEARCH_SH = REPO / "search.sh"
STEP = 0.002

# Unimodal shapes f(beta, optimum): smooth, kinked, lopsided and one that explodes away from the optimum.
SHAPES = {
    "quadratic": lambda b, o: 10 + 5e3 * (b - o) ** 2,
    "v_shape": lambda b, o: 10 + 50 * abs(b - o),
    "lopsided": lambda b, o: 10 + (300 * (b - o) if b > o else 15 * (o - b)),
    "explodes": lambda b, o: 9 + math.exp(250 * abs(b - o)),
}


class Counter:
    """An objective that records every beta it is asked for."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[float] = []

    def __call__(self, beta):
        self.calls.append(beta)
        return self.fn(beta)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("where", [0.0, 0.37, 1.0])  # optimum at 0, interior, at beta_hi (fraction of beta_hi)
@pytest.mark.parametrize("num_steps", [20, 37])
def test_golden_matches_grid_with_half_the_trials(shape, where, num_steps):
    beta_hi = num_steps * STEP
    objective = Counter(lambda b: SHAPES[shape](b, where * beta_hi))
    grid = search_beta(objective, beta_hi, strategy="grid", step=STEP, progress=False)
    assert grid.num_trials == num_steps == len(objective.calls)

    objective.calls.clear()
    golden = search_beta(objective, beta_hi, strategy="golden", step=STEP, progress=False)
    close = abs(golden.best_beta - grid.best_beta) <= STEP + 1e-12 and golden.best_ppl <= 1.01 * grid.best_ppl
    assert golden.best_beta == grid.best_beta or close
    assert golden.num_trials <= grid.num_trials / 2
    # Never twice the same beta, only grid betas, never beyond beta_hi, and the uniform point is among them.
    assert len(set(objective.calls)) == len(objective.calls) == golden.num_trials
    assert all(abs(b / STEP - round(b / STEP)) < 1e-6 and 0 <= b <= beta_hi for b in objective.calls)
    assert 0.0 in objective.calls


def test_golden_finds_the_exact_grid_optimum_including_zero():
    beta_hi = 50 * STEP
    for optimum_step in (0, 1, 13, 26, 49, 50):
        objective = lambda b, o=optimum_step * STEP: SHAPES["quadratic"](b, o)  # noqa: E731
        result = search_beta(objective, beta_hi, step=STEP, progress=False)
        assert result.best_beta == pytest.approx(optimum_step * STEP, abs=1e-12)
        assert result.best_ppl == pytest.approx(10.0)


def test_grid_betas_have_no_float_drift_and_respect_the_bound():
    betas = grid_betas(0.02, STEP)
    assert betas == [0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.014, 0.016, 0.018, 0.02]
    assert grid_betas(0.0199, STEP)[-1] == 0.018
    assert grid_betas(0.02 - 1e-15, STEP)[-1] == 0.02  # float noise below a multiple keeps it
    assert grid_betas(0.005, STEP, include_zero=True) == [0.0, 0.002, 0.004]


def test_grid_trials_come_in_sweep_order_with_timing():
    result = search_beta(lambda b: 20 - b, 0.01, strategy="grid", step=STEP, include_zero=True, progress=False)
    assert [t["beta"] for t in result.trials] == [0.0, 0.002, 0.004, 0.006, 0.008, 0.01]
    assert all(t["seconds"] >= 0 and t["resumed"] is False for t in result.trials)
    assert result.best_beta == 0.01 and result.num_evaluated == 6 and result.strategy == "grid"


def test_tolerance_trades_accuracy_for_trials():
    beta_hi = 100 * STEP
    objective = Counter(lambda b: SHAPES["quadratic"](b, 0.0713))
    exact = search_beta(objective, beta_hi, step=STEP, progress=False)
    coarse = search_beta(objective, beta_hi, step=STEP, tol=4 * STEP, progress=False)
    assert coarse.num_trials < exact.num_trials
    assert abs(coarse.best_beta - exact.best_beta) <= 4 * STEP + 1e-12


def test_beta_hi_below_one_step():
    golden = search_beta(lambda b: 5.0, 0.001, step=STEP, progress=False)
    assert [t["beta"] for t in golden.trials] == [0.0]
    with pytest.raises(UserError, match="step"):
        search_beta(lambda b: 5.0, 0.001, strategy="grid", step=STEP, progress=False)


@pytest.mark.parametrize("kwargs", [{"strategy": "random"}, {"step": 0.0}, {"step": -1.0}, {"coarse_points": 1}])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        search_beta(lambda b: 1.0, 0.02, progress=False, **kwargs)


def test_non_finite_perplexity_is_never_the_best(tmp_path):
    def objective(beta):  # the true optimum region returns nan/inf, as a diverged run would
        if beta in (0.01, 0.012):
            return float("nan")
        if beta == 0.014:
            return float("inf")
        return 10 + abs(beta - 0.012) * 100

    log = tmp_path / "trials.jsonl"
    result = search_beta(objective, 0.02, strategy="grid", step=STEP, log_path=str(log), progress=False)
    assert math.isfinite(result.best_ppl)
    assert result.best_beta in (0.008, 0.016)
    by_beta = {t["beta"]: t["ppl"] for t in result.trials}
    assert by_beta[0.01] == math.inf and by_beta[0.014] == math.inf
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["beta"]: r["ppl"] for r in records}[0.01] is None  # strict JSON: no NaN literal
    resumed = search_beta(objective, 0.02, strategy="grid", step=STEP, log_path=str(log), progress=False)
    assert {t["beta"]: t["ppl"] for t in resumed.trials} == by_beta


def test_resume_skips_finished_trials(tmp_path):
    log = str(tmp_path / "log" / "trials.jsonl")
    objective = Counter(lambda b: SHAPES["lopsided"](b, 0.031))
    first = search_beta(objective, 40 * STEP, step=STEP, log_path=log, key="m|wanda|0.7", progress=False)
    assert len(objective.calls) == first.num_trials == first.num_evaluated

    objective.calls.clear()
    again = search_beta(objective, 40 * STEP, step=STEP, log_path=log, key="m|wanda|0.7", progress=False)
    assert objective.calls == []
    assert again.num_evaluated == 0 and all(t["resumed"] for t in again.trials)
    assert (again.best_beta, again.best_ppl) == (first.best_beta, first.best_ppl)
    # The grid sweep reuses the golden trials that lie on its grid.
    objective.calls.clear()
    grid = search_beta(objective, 40 * STEP, strategy="grid", step=STEP, log_path=log, key="m|wanda|0.7",
                       progress=False)
    reused = {t["beta"] for t in first.trials}
    assert set(objective.calls) == {t["beta"] for t in grid.trials} - reused


def test_resume_after_a_crash_evaluates_only_the_rest(tmp_path):
    log = str(tmp_path / "trials.jsonl")
    full = Counter(lambda b: SHAPES["quadratic"](b, 0.017))
    reference = search_beta(full, 30 * STEP, step=STEP, progress=False)

    def crashing(beta):
        if len(crashing.calls) == 3:
            raise RuntimeError("out of memory")
        crashing.calls.append(beta)
        return full.fn(beta)

    crashing.calls = []
    with pytest.raises(RuntimeError):
        search_beta(crashing, 30 * STEP, step=STEP, log_path=log, progress=False)
    assert len(Path(log).read_text().splitlines()) == 3  # each trial flushed as it finished

    rest = Counter(full.fn)
    resumed = search_beta(rest, 30 * STEP, step=STEP, log_path=log, progress=False)
    assert len(rest.calls) == reference.num_trials - 3
    assert (resumed.best_beta, resumed.best_ppl) == (reference.best_beta, reference.best_ppl)


def test_log_lines_of_other_settings_are_skipped_not_mixed(tmp_path):
    log = str(tmp_path / "trials.jsonl")
    search_beta(lambda b: 100 + b, 0.02, strategy="grid", step=STEP, log_path=log, key="llama|0.7",
                progress=False)
    other = Counter(lambda b: 5 + abs(b - 0.01))
    result = search_beta(other, 0.02, strategy="grid", step=STEP, log_path=log, key="llama|0.5", progress=False)
    assert len(other.calls) == 10  # nothing borrowed from the 0.7 sweep
    assert result.best_beta == 0.01 and result.best_ppl == pytest.approx(5.0)
    keys = [json.loads(line)["key"] for line in Path(log).read_text().splitlines()]
    assert keys.count("llama|0.7") == keys.count("llama|0.5") == 10
    # And the first sweep still resumes untouched by the second.
    first = Counter(lambda b: 100 + b)
    search_beta(first, 0.02, strategy="grid", step=STEP, log_path=log, key="llama|0.7", progress=False)
    assert first.calls == []


def test_unreadable_log_lines_are_skipped_with_a_warning(tmp_path):
    log = tmp_path / "trials.jsonl"
    search_beta(lambda b: 3.0 + b, 0.004, strategy="grid", step=STEP, log_path=str(log), progress=False)
    with log.open("a") as f:
        f.write('{"key": null, "beta": 0.00')  # a line cut off by a crash
    objective = Counter(lambda b: 3.0 + b)
    with pytest.warns(UserWarning, match="unreadable"):
        search_beta(objective, 0.004, strategy="grid", step=STEP, log_path=str(log), progress=False)
    assert objective.calls == []


def test_extra_facts_are_kept_and_logged(tmp_path):
    log = tmp_path / "trials.jsonl"
    seen = []

    def objective(beta):
        return 7.0 + beta, {"block_sparsity": [0.7 - beta, 0.7 + beta]}

    result = search_beta(objective, 0.004, strategy="grid", step=STEP, log_path=str(log), key="k",
                         on_trial=seen.append, progress=False)
    assert seen == result.trials
    assert result.trials[0]["block_sparsity"] == pytest.approx([0.698, 0.702])
    record = json.loads(log.read_text().splitlines()[1])
    assert record["key"] == "k" and record["beta"] == 0.004
    assert record["block_sparsity"] == pytest.approx([0.696, 0.704])
    resumed = search_beta(objective, 0.004, strategy="grid", step=STEP, log_path=str(log), key="k", progress=False)
    assert resumed.trials[1]["block_sparsity"] == pytest.approx([0.696, 0.704])

    with pytest.raises(ValueError, match="reserved"):
        search_beta(lambda b: (1.0, {"ppl": 2.0}), 0.004, strategy="grid", step=STEP, progress=False)


def test_refine_best_rescores_the_top_candidates():
    true_ppl = lambda b: 10 + 1e4 * (b - 0.01) ** 2  # noqa: E731
    subset_noise = {0.01: 0.1}  # the subset ranks the true best beta third

    def on_subset(beta):
        return true_ppl(beta) + subset_noise.get(round(beta, 6), 0.0)

    cheap = search_beta(on_subset, 0.02, strategy="grid", step=STEP, progress=False)
    assert cheap.best_beta != 0.01
    full = Counter(true_ppl)
    refined = refine_best(full, cheap, top_k=3)
    assert len(full.calls) == refined.num_trials == 3
    assert refined.best_beta == 0.01 and refined.best_ppl == pytest.approx(10.0)
    assert refined.strategy == "grid+refine"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = search_beta(lambda b: SHAPES["quadratic"](b, 0.012), 0.03, step=STEP, progress=False)
    path = tmp_path / "plots" / "search.png"
    assert plot_search(result, str(path)) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = SearchResult(best_beta=0.0, best_ppl=math.inf, trials=[{"beta": 0.0, "ppl": math.inf}],
                         strategy="grid", num_trials=1)
    assert plot_search(empty, str(tmp_path / "empty.png"), uniform_ppl=12.0) is True


# --- search.sh end to end, against a fake main.py --------------------------------------------------------

FAKE_MAIN = textwrap.dedent(
    """
    import os, sys
    args = sys.argv[1:]
    beta = float(args[args.index("--beta") + 1])
    with open(os.environ["FAKE_ARGS_LOG"], "a") as f:
        f.write(" ".join(args) + "\\n")
    if beta > float(os.environ.get("FAKE_MAX", "0.02")) + 1e-9:
        print(f"beta {beta} is illegal", file=sys.stderr)
        sys.exit(3)
    if os.environ.get("FAKE_FAIL_AT") and abs(beta - float(os.environ["FAKE_FAIL_AT"])) < 1e-9:
        print("wikitext perplexity 1.0")  # a crash after the eval must still fail the sweep
        print("CUDA out of memory", file=sys.stderr)
        sys.exit(1)
    if os.environ.get("FAKE_SILENT_AT") and abs(beta - float(os.environ["FAKE_SILENT_AT"])) < 1e-9:
        sys.exit(0)
    if os.environ.get("FAKE_NAN_AT") and abs(beta - float(os.environ["FAKE_NAN_AT"])) < 1e-9:
        print("wikitext perplexity nan")
        sys.exit(0)
    print("pruning ...", file=sys.stderr)
    print(f"wikitext perplexity {10 + 1e4 * (beta - float(os.environ.get('FAKE_OPT', '0.008'))) ** 2:.4f}")
    """
)


def run_search_sh(tmp_path, *args, **env):
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_MAIN)
    full_env = {**os.environ, "PYTHON": sys.executable, "ATP_MAIN": str(fake),
                "FAKE_ARGS_LOG": str(tmp_path / "args.log"), **env}
    for name in ("MODEL", "METHOD", "SPARSITY", "STEP", "MAX_TRIALS", "EXTRA_ARGS", "LOG_DIR", "DEMO"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(["bash", str(SEARCH_SH), *args], env=full_env, capture_output=True, text=True,
                          timeout=120)


def best_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("Best LLM ppl = ")]
    assert len(lines) == 1, stdout
    ppl, beta = lines[0][len("Best LLM ppl = "):].split(" when beta=")
    return float(ppl), beta


def test_search_sh_sweeps_until_illegal_and_reports_the_best(tmp_path):
    proc = run_search_sh(tmp_path, "--model", "some/model", "--sparsity_ratio=0.5", "--", "--nsamples", "8",
                         FAKE_OPT="0.012", EXTRA_ARGS="--seed 3")
    assert proc.returncode == 0, proc.stderr
    assert best_line(proc.stdout) == (10.0, "0.012")
    trial_betas = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("beta=")]
    assert trial_betas == [f"beta={b:g}" for b in grid_betas(0.02, STEP)]  # 0.006, not 0.006000000000000001
    calls = (tmp_path / "args.log").read_text().splitlines()
    assert len(calls) == 11  # ten legal betas, then the illegal one that stops the sweep
    assert calls[0].split() == ["--model", "some/model", "--prune_method", "wanda", "--sparsity_ratio", "0.5",
                                "--beta", "0.002", "--seed", "3", "--nsamples", "8"]


def test_search_sh_settings_from_environment_demo_and_log_dir(tmp_path):
    log_dir = tmp_path / "logs"
    proc = run_search_sh(tmp_path, "--demo", "--include_zero", "--max_trials", "3", "--quiet",
                         "--log_dir", str(log_dir), METHOD="sparsegpt", STEP="0.005", FAKE_OPT="0.0")
    assert proc.returncode == 0, proc.stderr
    assert best_line(proc.stdout) == (10.0, "0")
    calls = [line.split() for line in (tmp_path / "args.log").read_text().splitlines()]
    assert [c[c.index("--beta") + 1] for c in calls] == ["0", "0.005", "0.01"]
    assert all("--demo" in c and "--model" not in c and c[c.index("--prune_method") + 1] == "sparsegpt"
               for c in calls)
    summary = (log_dir / "summary.tsv").read_text().splitlines()
    assert summary[0].split("\t") == ["beta", "ppl", "seconds"] and len(summary) == 4
    assert "pruning" in (log_dir / "beta_0.005.err").read_text()
    assert "pruning" not in proc.stderr  # --quiet keeps main.py's stderr in the log only


@pytest.mark.parametrize("failure", [{"FAKE_FAIL_AT": "0.006"}, {"FAKE_SILENT_AT": "0.006"}])
def test_search_sh_fails_loudly_when_a_trial_fails(tmp_path, failure):
    proc = run_search_sh(tmp_path, "--model", "m", "--quiet", **failure)
    assert proc.returncode != 0
    assert "Best LLM ppl" not in proc.stdout
    assert "beta=0.006" in proc.stderr
    assert len((tmp_path / "args.log").read_text().splitlines()) == 3  # no trial after the failed one


def test_search_sh_nan_trial_is_never_best(tmp_path):
    proc = run_search_sh(tmp_path, "--model", "m", FAKE_NAN_AT="0.008", FAKE_OPT="0.008")
    assert proc.returncode == 0, proc.stderr
    ppl, beta = best_line(proc.stdout)
    assert beta in ("0.006", "0.01") and ppl == pytest.approx(10.04)


def test_search_sh_rejects_bad_usage(tmp_path):
    assert run_search_sh(tmp_path).returncode != 0  # neither --model nor --demo
    first_illegal = run_search_sh(tmp_path, "--model", "m", "--step", "0.05")
    assert first_illegal.returncode != 0 and "illegal" in first_illegal.stderr
    assert run_search_sh(tmp_path, "--model", "m", "--step", "abc").returncode != 0
    assert run_search_sh(tmp_path, "--model", "m", "--no_such_flag").returncode != 0


def test_search_sh_help(tmp_path):
    proc = run_search_sh(tmp_path, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: search.sh") and "--prune_method" in proc.stdout
    assert not (tmp_path / "args.log").exists()  # help runs nothing


@pytest.mark.skipif(not (REPO / "main.py").exists(), reason="main.py not written yet")
def test_search_sh_with_the_real_main_demo():
    env = {k: v for k, v in os.environ.items() if k not in ("ATP_MAIN", "MODEL", "EXTRA_ARGS", "STEP")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(SEARCH_SH), "--demo", "--max_trials", "2", "--quiet"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl, beta = best_line(proc.stdout)
    assert math.isfinite(ppl) and ppl > 1 and beta in ("0.02", "0.04")  # --demo: step 0.02, a few minutes
