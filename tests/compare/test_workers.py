"""The table and the search on submitit workers, in its local mode on this CPU-only machine with the tiny demo:
two workers give the same table as one process, a worker SIGKILLed mid-cell is recovered by the other, the
search's trials spread over workers give the in-process result, and the SLURM submission is what a user asked
for (its sbatch script, without a cluster)."""
import importlib.util
import json
import os
import signal
import threading

import pytest

from conftest import REPO, load_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                reason="submitit is not installed (pip install submitit)")

# dense, uniform, ATP (its beta searched: trials are shared work too) and OWL, Wanda only; perplexity only
TABLE = ["--demo", "--methods", "wanda", "--rows", "dense,uniform,atp,owl", "--absorption", "0", "--no_zero_shot",
         "--threads", "1"]
FAST = ["--", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--search_step", "0.05"]
HOLD = "|wanda|owl|0.0"  # the cell the killed worker is writing


def cells(path):
    """What must not depend on the workers: every cell's key, perplexity, plan and tuned values."""
    data = json.loads(path.read_text())
    return [(c["key"], c["ppl"], c.get("sparsities"), c.get("tuned")) for c in data["cells"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "t"
    assert load_script("paper_table").main([*TABLE, "--out", str(out), *FAST]) == 0
    return out


def test_two_workers_give_the_table_of_one_process(reference, tmp_path, capsys):
    out = tmp_path / "t"
    assert load_script("paper_table").main([*TABLE, "--workers", "2", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "2 workers started (local" in printed and "cells finished: 4/4" in printed
    assert cells(out.with_suffix(".json")) == cells(reference.with_suffix(".json"))
    assert (tmp_path / "t.md").read_text() == reference.with_suffix(".md").read_text()
    by = {c["by"]["pid"] for c in json.loads(out.with_suffix(".json").read_text())["cells"]}
    assert os.getpid() not in by  # computed by the workers, not here
    assert load_script("paper_table").main([*TABLE, "--workers", "2", "--out", str(out), *FAST]) == 0
    assert "workers started" not in capsys.readouterr().out  # complete: a rerun only assembles


def test_a_worker_killed_mid_cell_is_recovered(reference, tmp_path, monkeypatch, capsys):
    out, marker = tmp_path / "t", tmp_path / "held"
    monkeypatch.setenv("ATP_STORE_HOLD", f"{HOLD}={marker}")  # the first writer of that cell stops half-way
    killed = {}

    def kill_the_holder():
        while not (marker.exists() and marker.read_text()):
            threading.Event().wait(0.2)
        killed["pid"] = int(marker.read_text())
        killed["partial"] = os.listdir(tmp_path / "t.cells" / "tmp")
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_holder, daemon=True)
    killer.start()
    assert load_script("paper_table").main([*TABLE, "--workers", "2", "--out", str(out), *FAST]) == 0
    killer.join(timeout=60)
    printed = capsys.readouterr().out
    assert killed["partial"]  # it died with half a record in tmp/, which never counted
    assert "ended without finishing" in printed
    assert cells(out.with_suffix(".json")) == cells(reference.with_suffix(".json"))
    owl = next(c for c in json.loads(out.with_suffix(".json").read_text())["cells"] if c["key"].endswith(HOLD))
    assert owl["by"]["pid"] != killed["pid"]  # re-run by the other worker
    assert os.listdir(tmp_path / "t.cells" / "claims") == []


def test_the_search_on_two_workers_finds_what_one_process_finds(cli, tmp_path):
    base = ["--demo", "--nsamples", "4", "--seqlen", "64", "--max_eval_windows", "2", "--quiet", "--beta",
            "search", "--search_step", "0.02"]
    code, out, err = cli(*base, "--search_strategy", "parallel", "--search_points", "2", "--results",
                         tmp_path / "one.json")
    assert code == 0, err
    code, out, err = cli(*base, "--search_workers", "2", "--search_log", tmp_path / "log.jsonl", "--results",
                         tmp_path / "two.json")
    assert code == 0, err
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["search"] for n in ("one", "two"))
    assert two["workers"] == 2 and two["strategy"] == "parallel" and two["points_per_round"] == 2
    assert [(t["value"], t["ppl"]) for t in two["curve"]] == [(t["value"], t["ppl"]) for t in one["curve"]]
    assert (two["best"], two["rounds"]) == (one["best"], one["rounds"])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted(r["beta"] for r in logged) == sorted(t["value"] for t in two["curve"])


def test_slurm_submission_is_one_job_array_with_the_users_settings(tmp_path, monkeypatch):
    """A fake `sbatch` (and `srun`, which submitit looks for) on PATH records what would be submitted."""
    from lib.compare import workers
    from lib.compare.table import TableArgs
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launch = workers.Launch(workers=8, folder=str(tmp_path / "jobs"), executor="slurm", gpus_per_worker=2,
                            time_limit_min=240, partition="gpu", cpus_per_worker=16, slurm_options={"account": "p"})
    args = TableArgs(None, "tiny", ["wanda"], ["dense"], [0.7])
    from lib.compare.table import worker_steps
    jobs = workers.start(launch, workers.Worker(str(tmp_path / "cells"), worker_steps, args))
    assert [job.job_id for job in jobs] == [f"4242_{i}" for i in range(8)]
    text = script.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=240",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --account=p", "#SBATCH --array=0-7%8",
                 "#SBATCH --signal=USR2@120", f"export PYTHONPATH={REPO}"):
        assert line in text, text
