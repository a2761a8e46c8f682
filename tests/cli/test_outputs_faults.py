"""Nothing silently wrong at the edges of a run: faults while writing end in one line with nothing half-written,
printed and recorded paths are where the data is, concurrent runs never share an output, search logs are
validated before they are trusted, and a missing plotting package is said plainly."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture
def run_flags(model_dir, text_files):
    return ["--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data", text_files.eval,
            "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "2", "--quiet"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("what", ["dense model", "compressed model", "results"])
def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(cli, run_flags, tmp_path, monkeypatch, what):
    out = tmp_path / "out"
    if what == "dense model":
        monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", disk_full)
        flags = ["--save_model", out / "m"]
    elif what == "compressed model":
        monkeypatch.setattr("safetensors.torch.save_file", disk_full)
        flags = ["--save_model", out / "m", "--save_format", "compressed"]
    else:
        monkeypatch.setattr("lib.outputs.atomic.json.dump", disk_full)
        flags = ["--results", out / "run.json"]
    code, stdout, err = cli(*run_flags, *flags)
    assert code == 2
    assert "No space left on device" in one_error_line(err) and "nothing was left half-written" in err
    assert not out.exists() or list(out.rglob("*")) == []


def test_a_symlinked_output_directory_is_written_through_and_reported_where_the_data_is(cli, run_flags, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    code, out, err = cli(*run_flags, "--save_model", tmp_path / "link" / "model", "--results",
                         tmp_path / "link" / "run.json")
    assert code == 0, err
    assert (real / "model" / "model.safetensors").is_file() and (real / "run.json").is_file()
    assert f"pruned model saved to {real / 'model'}" in out
    record = json.loads((real / "run.json").read_text())
    assert record["saved_model"]["directory"] == str(real / "model")
    assert not [p for p in real.iterdir() if p.name.startswith(".")]  # no lock or temporary file left


def test_a_save_directory_that_is_a_symlink_to_an_empty_directory_is_used(cli, run_flags, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "model").symlink_to(target, target_is_directory=True)
    code, out, err = cli(*run_flags, "--save_model", tmp_path / "model")
    assert code == 0, err
    assert (target / "model.safetensors").is_file()
    assert f"pruned model saved to {target}" in out


def test_when_the_save_directory_is_taken_meanwhile_the_printed_and_recorded_path_is_the_real_one(
        cli, run_flags, tmp_path, monkeypatch):
    import lib.pruning.sequential as sequential
    target = tmp_path / "model"
    real = sequential.prune_sequential

    def prune_while_something_else_fills_the_target(*args, **kwargs):
        records = real(*args, **kwargs)
        target.mkdir()
        (target / "config.json").write_text("{}", encoding="utf-8")
        return records
    monkeypatch.setattr("lib.session.prune_sequential", prune_while_something_else_fills_the_target)
    code, out, err = cli(*run_flags, "--save_model", target, "--results", tmp_path / "run.json")
    assert code == 0, err
    beside = [p for p in tmp_path.iterdir() if p.name.startswith("model-")]
    assert len(beside) == 1
    assert f"pruned model saved to {beside[0]}" in out and f"pruned model saved to {target}\n" not in out
    assert json.loads((tmp_path / "run.json").read_text())["saved_model"]["directory"] == str(beside[0])


def test_a_second_run_given_the_same_output_is_refused_up_front(cli, run_flags, tmp_path, loads):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".run.json.atp-lock").write_text(str(holder.pid), encoding="ascii")
        code, out, err = cli(*run_flags, "--results", tmp_path / "run.json")
        assert code == 2
        assert f"another run (process {holder.pid}) is writing it" in one_error_line(err)
        assert not loads and not (tmp_path / "run.json").exists()
        assert (tmp_path / ".run.json.atp-lock").read_text() == str(holder.pid)  # the other run's claim stays
    finally:
        holder.kill()
        holder.wait()


def test_a_claim_left_by_a_killed_run_is_taken_over(cli, run_flags, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".run.json.atp-lock").write_text(str(gone.pid), encoding="ascii")
    code, out, err = cli(*run_flags, "--results", tmp_path / "run.json")
    assert code == 0, err
    assert (tmp_path / "run.json").is_file() and not (tmp_path / ".run.json.atp-lock").exists()


@pytest.fixture
def loads(monkeypatch):
    import lib.models.loading
    calls = []
    real = lib.models.loading.load_model_and_tokenizer

    def spy(*args, **kwargs):
        calls.append(args[:1])
        return real(*args, **kwargs)
    monkeypatch.setattr(lib.models.loading, "load_model_and_tokenizer", spy)
    return calls


@pytest.mark.parametrize("record", [{"beta": 0.0, "ppl": -5}, {"beta": 0.0, "ppl": "abc"}, {"beta": 0.0, "ppl": True},
                                    {"beta": 0.0, "ppl": 0.5}, {"beta": -1.0, "ppl": 3.0},
                                    {"beta": 0.0, "ppl": 3.0, "seconds": "x"}])
def test_an_impossible_search_log_record_is_skipped_with_one_warning_and_run_again(cli, tmp_path, record):
    log = tmp_path / "log.jsonl"
    flags = ["--demo", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--quiet", "--beta", "search",
             "--search_step", "0.05", "--search_coarse", "2", "--search_log", log]
    code, out, err = cli(*flags)
    assert code == 0, err
    key = json.loads(log.read_text().splitlines()[0])["key"]
    first = {json.loads(line)["beta"]: json.loads(line)["ppl"] for line in log.read_text().splitlines()}
    log.write_text(json.dumps({"key": key, "seconds": 1.0, **record}) + "\n", encoding="utf-8")
    code, out, err = cli(*flags)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "impossible" in warnings[0], err
    best = float(out.split("Best LLM ppl = ")[1].split()[0])
    assert best == min(v for v in first.values() if v is not None)  # the bogus record was not trusted
    rerun = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert any(r["beta"] == 0.0 and r["ppl"] == first[0.0] for r in rerun)  # beta 0 was scored again


def test_an_asked_for_plot_without_matplotlib_is_refused_before_the_work(cli, run_flags, tmp_path, monkeypatch,
                                                                       loads):
    monkeypatch.setattr("lib.search.plot.plotting_available", lambda: False)
    code, out, err = cli(*run_flags, "--beta", "search", "--search_plot", tmp_path / "p.png")
    assert code == 2 and "needs matplotlib" in one_error_line(err) and not loads


def test_the_default_plot_without_matplotlib_is_one_warning_and_the_results_land(cli, tmp_path, no_matplotlib):
    code, out, err = cli("--demo", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--quiet",
                         "--beta", "search", "--search_step", "0.05", "--search_coarse", "2", "--results",
                         tmp_path / "run.json")
    assert code == 0, err
    warnings = [line for line in (out + err).splitlines() if "matplotlib" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), out + err
    assert json.loads((tmp_path / "run.json").read_text())["search"]["best_beta"] is not None


def test_an_interruption_under_an_open_progress_bar_starts_its_own_line():
    from tqdm import tqdm

    from lib.cli import _end_of_open_bar
    assert _end_of_open_bar() == ""
    bar = tqdm(total=3, disable=False, file=open(os.devnull, "w"))
    try:
        assert _end_of_open_bar() == "\n"
    finally:
        bar.close()
    assert _end_of_open_bar() == ""


def test_every_command_ends_the_same_way_on_bad_input_and_on_ctrl_c(capsys):
    """main.py and the scripts share run_command: a UserError is one `error:` line and its own exit code, Ctrl-C is
    `error: <what the command says>` and 130, anything else passes through untouched."""
    from lib.cli import run_command
    from lib.errors import IllegalAllocationError, UserError

    def raising(exc):
        def body():
            raise exc
        return body
    assert run_command(lambda: 0) == 0
    assert run_command(raising(UserError("at least 1", "seed"))) == 2
    assert run_command(raising(IllegalAllocationError("block 3 above 1"))) == 3
    assert run_command(raising(KeyboardInterrupt()), "interrupted (rerun to resume)") == 130
    assert capsys.readouterr().err.splitlines() == ["error: --seed at least 1", "error: block 3 above 1",
                                                    "error: interrupted (rerun to resume)"]
    with pytest.raises(ZeroDivisionError):
        run_command(raising(ZeroDivisionError()))
