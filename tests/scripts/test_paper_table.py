"""scripts/paper_table.py on the tiny demo: every row and pruner through the one session, Markdown/JSON/PNG, and a
rerun served entirely from the cell cache (what resuming an interrupted table relies on)."""
import importlib.util
import json

import pytest

from conftest import REPO, load_script

FAST = ["--", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--tasks", "tiny_mc", "--tasks_dir",
        str(REPO / "tasks"), "--zs_limit", "8", "--alpha_cache", ""]


def test_table_rows_columns_and_resume(tmp_path, capsys):
    table = load_script("paper_table")
    out = str(tmp_path / "t")
    argv = ["--demo", "--methods", "wanda,ria", "--absorption_methods", "wanda", "--rows", "dense,uniform,atp,dlp",
            "--method_rows", "wanda=uniform,dlp", "--method_rows", "ria=uniform,dlp",
            "--set", "beta=0.05", "--absorption", "0.02", "--out", out, *FAST]
    assert table.main(argv) == 0
    first = capsys.readouterr().out
    data = json.loads((tmp_path / "t.json").read_text())
    labels = [(c["method"], c["row"]) for c in data["cells"]]
    assert labels == [("-", "dense"), ("wanda", "uniform"), ("wanda", "dlp"), ("wanda", "uniform+absorption"),
                      ("wanda", "dlp+absorption"), ("ria", "uniform"), ("ria", "dlp")]
    for cell in data["cells"]:
        assert cell["ppl"] > 1 and cell["zero_shot"]["tasks"]["tiny_mc"]["acc"] is not None
        if cell["method"] != "-":
            assert sum(cell["sparsities"]) / len(cell["sparsities"]) == pytest.approx(0.7)
    md = (tmp_path / "t.md").read_text()
    assert "| ria | dlp |" in md and "tiny_mc" in md and "first 8 items" in md
    assert (tmp_path / "t.png").stat().st_size > 0
    assert first.count(": cached") == 0

    assert table.main(argv) == 0  # the rerun finds every cell in the cache and scores nothing again
    second = capsys.readouterr().out
    assert second.count(": cached") == len(labels)
    again = json.loads((tmp_path / "t.json").read_text())
    assert [c["ppl"] for c in again["cells"]] == [c["ppl"] for c in data["cells"]]


def test_unknown_row_is_one_error_line(tmp_path, capsys):
    assert load_script("paper_table").main(["--demo", "--rows", "dense,best", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --rows: unknown ['best']")


def test_tune_all_searches_each_rows_own_parameter_and_the_absorption_strength(tmp_path, capsys):
    table = load_script("paper_table")
    out = str(tmp_path / "tuned")
    argv = ["--demo", "--methods", "wanda", "--rows", "dense,uniform,owl", "--absorption", "0.02", "--tune", "all",
            "--no_zero_shot", "--out", out, "--", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2",
            "--search_step", "0.05", "--search_coarse", "2"]
    assert table.main(argv) == 0
    cells = {c["row"]: c for c in json.loads((tmp_path / "tuned.json").read_text())["cells"]}
    assert "owl_lambda" in cells["owl"]["tuned"] and cells["uniform"]["tuned"] == {}
    assert set(cells["owl+absorption"]["tuned"]) == {"owl_lambda", "absorption"}
    assert cells["owl+absorption"]["tuned"]["owl_lambda"] == cells["owl"]["tuned"]["owl_lambda"]
    assert set(cells["uniform+absorption"]["tuned"]) == {"absorption"}
    md = (tmp_path / "tuned.md").read_text()
    assert f"owl (owl_lambda={cells['owl']['tuned']['owl_lambda']:g})" in md


def test_sparsities_profiles_and_the_plans_of_each_row(tmp_path, capsys, monkeypatch):
    """Several mean sparsities in one table, the per-block profile PNG, and what each rule does to the plan. The
    in-process table never imports submitit (an import of it would fail here)."""
    import sys
    monkeypatch.setitem(sys.modules, "submitit", None)
    out = tmp_path / "s"
    argv = ["--demo", "--methods", "wanda", "--rows", "uniform,atp,owl,alpha", "--sparsities", "0.5,0.6",
            "--set", "beta=0.05", "--no_zero_shot", "--out", str(out), "--", "--nsamples", "4", "--seqlen", "64",
            "--max_eval_windows", "2", "--alpha_cache", ""]
    assert load_script("paper_table").main(argv) == 0
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    plans = {(c["sparsity"], c["row"]): c["sparsities"] for c in cells}
    assert len(plans) == 16
    for (sparsity, row), plan in plans.items():
        assert sum(plan) / len(plan) == pytest.approx(sparsity, abs=1e-6) or row.startswith("alpha")

    def gap(a, b, s=0.6):
        return max(abs(x - y) for x, y in zip(plans[(s, a)], plans[(s, b)]))

    for row in ("atp", "owl", "alpha", "uniform+absorption"):
        assert gap(row, "uniform") > 1e-3, row
    for base in ("uniform", "atp", "owl", "alpha"):
        assert gap(f"{base}+absorption", base) > 1e-3, base
    md = out.with_suffix(".md").read_text()
    assert "| pruner | sparsity | allocation | ppl |" in md and "| wanda | 0.6 | atp | " in md
    png = (tmp_path / "s.profiles.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_a_cell_that_cannot_be_realised_shows_its_error_and_the_others_survive(model_dir, text_files, tmp_path,
                                                                                capsys):
    # at 0.95 AlphaPruning's default spread (x0.7..x1.3) pushes a block past sparsity 1
    out = tmp_path / "e"
    argv = ["--model", str(model_dir("llama")), "--methods", "wanda", "--rows", "uniform,alpha", "--sparsity", "0.95",
            "--absorption", "0", "--no_zero_shot", "--out", str(out), "--", "--calib_data", str(text_files.calib),
            "--eval_data", str(text_files.eval), "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "4",
            "--alpha_cache", ""]
    assert load_script("paper_table").main(argv) == 1
    printed = capsys.readouterr().out
    assert "error: 1 of 2 cells failed" in printed
    cells = {c["row"]: c for c in json.loads(out.with_suffix(".json").read_text())["cells"]}
    assert cells["uniform"]["ppl"] > 1 and cells["alpha"]["error"].startswith("--alpha_eps 0.3 gives a sparsity of")
    assert "| wanda | alpha | error: --alpha_eps 0.3 gives a sparsity of" in out.with_suffix(".md").read_text()
    assert load_script("paper_table").main(argv) == 1 and ": cached" in capsys.readouterr().out  # a setting error is kept


def test_markdown_bolds_the_best_of_each_pruner_and_shows_errors():
    from lib.compare.table import markdown
    records = [
        {"method": "-", "row": "dense", "ppl": 20.0, "zero_shot": {"mean_acc": 0.5}},
        {"method": "wanda", "row": "uniform", "sparsity": 0.7, "ppl": 30.0, "zero_shot": {"mean_acc": 0.40}},
        {"method": "wanda", "row": "atp", "sparsity": 0.7, "ppl": 25.0, "zero_shot": {"mean_acc": 0.38},
         "tuned": {"beta": 0.01}},
        {"method": "wanda", "row": "owl", "sparsity": 0.7, "error": "bad | flag"},
    ]
    lines = markdown(records, [], "t").splitlines()
    assert lines[4] == "| - | dense | 20.00 | 0.5000 |"
    assert lines[5] == "| wanda | uniform | 30.00 | **0.4000** |"
    assert lines[6] == "| wanda | atp (beta=0.01) | **25.00** | 0.3800 |"
    assert lines[7] == "| wanda | owl | error: bad \\| flag | - |"


@pytest.mark.parametrize("argv, fragment", [
    (["--executor", "slurm"], "--executor: applies only with --workers N"),
    (["--workers", "0"], "--workers 0: at least 1"),
    (["--workers", "2", "--slurm_partition", "gpu"], "--slurm_partition: applies only with --executor slurm"),
    (["--workers", "2", "--executor", "slurm", "--time_limit", "soon"], "--time_limit soon: give minutes"),
    (["--sparsities", "0.6,1.5"], "must lie strictly between 0 and 1"),
    (["--methods", "wanda,wanda"], "repeats a name"),
])
def test_bad_table_flags_are_one_error_line(tmp_path, capsys, argv, fragment):
    assert load_script("paper_table").main(["--demo", "--out", str(tmp_path / "t"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_asking_for_workers_without_submitit_is_one_error_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    assert load_script("paper_table").main(["--demo", "--workers", "2", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --workers 2:") and "pip install submitit" in err[0]
