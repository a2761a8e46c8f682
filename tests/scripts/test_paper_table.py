"""scripts/paper_table.py on the tiny demo: every row and pruner through the one session, Markdown/JSON/PNG, and a
rerun served entirely from the cell cache (what resuming an interrupted table relies on)."""
import importlib.util
import json

import pytest

from conftest import REPO

FAST = ["--", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--tasks", "tiny_mc", "--tasks_dir",
        str(REPO / "tasks"), "--zs_limit", "8", "--alpha_cache", ""]


def load_script():
    spec = importlib.util.spec_from_file_location("paper_table", REPO / "scripts" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_rows_columns_and_resume(tmp_path, capsys):
    table = load_script()
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
    assert load_script().main(["--demo", "--rows", "dense,best", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --rows: unknown ['best']")


def test_tune_all_searches_each_rows_own_parameter_and_the_absorption_strength(tmp_path, capsys):
    table = load_script()
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
