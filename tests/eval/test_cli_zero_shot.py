"""--eval_zero_shot through the CLI: results land in the JSON, bad task names fail before any pruning, and a hub
failure keeps the pruning results already written."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("lm_eval")


@pytest.fixture
def fast(model_dir, text_files):
    return ["--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data", text_files.eval,
            "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "4", "--quiet", "--sparsity_ratio", "0.5"]


def test_local_task_results_are_in_the_json(cli, fast, tmp_path):
    results = tmp_path / "zs.json"
    code, out, err = cli(*fast, "--eval_zero_shot", "--tasks", "tiny_mc", "--zs_limit", "10", "--results", results)
    assert code == 0, err
    record = json.loads(results.read_text())
    zero_shot = record["zero_shot"]
    task = zero_shot["tasks"]["tiny_mc"]
    assert 0 <= task["acc"] <= 1 and 0 <= task["acc_norm"] <= 1
    assert zero_shot["mean_acc"] == task["acc"] and zero_shot["num_fewshot"] == 0 and zero_shot["lm_eval_version"]
    assert "tiny_mc" in out and "mean acc" in out
    assert record["perplexity"] > 1  # the pruning results are there too


def test_unknown_task_fails_before_any_pruning(cli, fast, tmp_path):
    results = tmp_path / "zs.json"
    code, out, err = cli(*fast, "--eval_zero_shot", "--tasks", "tiny_mcq", "--results", results)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: unknown zero-shot task 'tiny_mcq'")
    assert "wikitext perplexity" not in out and not results.exists()


def test_unreachable_hub_task_keeps_the_pruning_results(fast, tmp_path):
    results = tmp_path / "zs.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "main.py", *map(str, fast), "--eval_zero_shot", "--zs_source", "hub", "--tasks", "boolq",
                           "--results", str(results)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "needs the HuggingFace hub" in proc.stderr.strip().splitlines()[-1]
    record = json.loads(results.read_text())
    assert record["perplexity"] > 1 and "zero_shot" not in record
