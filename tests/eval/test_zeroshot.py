"""Zero-shot evaluation through lm-eval on the shipped offline task, plus its error paths."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.errors import UserError
from lib.eval.zeroshot import (
    DEFAULT_TASKS,
    SHIPPED_TASKS_DIR,
    evaluate_zero_shot,
    format_zero_shot_table,
    resolve_local_paths,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMIT = 20


def _tiny_mc_rows() -> list[dict]:
    return [json.loads(line) for line in (SHIPPED_TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    pytest.importorskip("lm_eval")
    from lib.demo.tiny import build_tiny_model, train_tokenizer

    texts = [f"Question: {row['question']}\nAnswer: {' '.join(row['choices'])}" for row in _tiny_mc_rows()]
    return build_tiny_model(seed=0), train_tokenizer(texts)


@pytest.fixture(scope="module")
def tiny_result(model_and_tokenizer, tmp_path_factory):
    model, tokenizer = model_and_tokenizer
    # Run from an unrelated directory: the data file must resolve relative to the YAML, not the CWD.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        return evaluate_zero_shot(model, tokenizer, ["tiny_mc"], tasks_dir=str(SHIPPED_TASKS_DIR), limit=LIMIT)
    finally:
        os.chdir(cwd)


def test_shipped_task_data_is_well_formed():
    rows = _tiny_mc_rows()
    assert len(rows) >= 24
    for row in rows:
        assert 2 <= len(row["choices"]) <= 4 and 0 <= row["label"] < len(row["choices"])
    assert len({row["label"] for row in rows}) > 1, "answers should not all sit in the same position"


def test_default_tasks_are_the_papers_seven():
    assert DEFAULT_TASKS == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def test_resolve_local_paths_anchors_existing_relative_paths(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text("{}\n")
    absolute = str(tmp_path / "data.jsonl")
    spec = {"test": "data.jsonl", "train": ["shards/*.jsonl", "missing.jsonl"], "url": "https://x.org/d.jsonl"}
    resolved = resolve_local_paths(spec, tmp_path)
    assert resolved == {"test": absolute, "train": [str(tmp_path / "shards/*.jsonl"), "missing.jsonl"],
                        "url": "https://x.org/d.jsonl"}
    assert resolve_local_paths(absolute, Path("/nonexistent")) == absolute
    assert resolve_local_paths(3, tmp_path) == 3


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes lm_eval look uninstalled
    with pytest.raises(UserError, match="pip install lm-eval"):
        evaluate_zero_shot(object(), object(), ["tiny_mc"])


def test_table_formats_a_hand_made_result():
    result = {"tasks": {"boolq": {"acc": 0.625, "acc_stderr": 0.01, "acc_norm": None, "acc_norm_stderr": None},
                        "arc_challenge": {"acc": 0.25, "acc_stderr": None, "acc_norm": 0.3, "acc_norm_stderr": 0.02}},
              "mean_acc": 0.4375, "limit": None, "num_fewshot": 0}
    lines = format_zero_shot_table(result).splitlines()
    assert lines[0].split() == ["task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"]
    assert lines[2].split() == ["boolq", "0.6250", "0.0100", "-", "-"]
    assert lines[3].split() == ["arc_challenge", "0.2500", "-", "0.3000", "0.0200"]
    assert len({len(line) for line in lines[:2]}) == 1, "header and rule should be equally wide"
    assert "0.4375" in lines[-1] and "2 tasks" in lines[-1]


def test_tiny_task_result_has_every_field(tiny_result):
    import lm_eval

    assert set(tiny_result) == {"lm_eval_version", "tasks", "mean_acc", "limit", "num_fewshot"}
    assert tiny_result["lm_eval_version"] == lm_eval.__version__
    assert tiny_result["limit"] == LIMIT and tiny_result["num_fewshot"] == 0
    row = tiny_result["tasks"]["tiny_mc"]
    assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "version"}
    assert row["version"] == 1.0
    json.dumps(tiny_result)  # plain data only


def test_tiny_task_accuracies_are_fractions_of_the_limit(tiny_result):
    row = tiny_result["tasks"]["tiny_mc"]
    for key in ("acc", "acc_norm"):
        assert 0.0 <= row[key] <= 1.0
        assert math.isclose(row[key] * LIMIT, round(row[key] * LIMIT), abs_tol=1e-9)
    # lm-eval's stderr of a mean of 0/1 outcomes uses the sample variance (n - 1).
    expected = math.sqrt(row["acc"] * (1 - row["acc"]) / (LIMIT - 1))
    assert math.isclose(row["acc_stderr"], expected, rel_tol=1e-6)
    assert tiny_result["mean_acc"] == row["acc"]


def test_rerun_with_same_seed_is_identical(model_and_tokenizer, tiny_result):
    model, tokenizer = model_and_tokenizer
    again = evaluate_zero_shot(model, tokenizer, ["tiny_mc"], tasks_dir=str(SHIPPED_TASKS_DIR), limit=LIMIT)
    assert again == tiny_result


def test_table_prints_for_a_real_result(tiny_result):
    table = format_zero_shot_table(tiny_result)
    assert table.splitlines()[2].split()[0] == "tiny_mc"
    assert f"{tiny_result['mean_acc']:.4f}" in table.splitlines()[-1]


def test_unknown_task_names_close_matches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserError, match="unknown zero-shot task 'tiny_mcc'.*tiny_mc.*--tasks_dir"):
        evaluate_zero_shot(model, tokenizer, ["tiny_mcc"], tasks_dir=str(SHIPPED_TASKS_DIR))


def test_hub_task_offline_raises_hub_user_error():
    pytest.importorskip("lm_eval")
    # A fresh process, because the hub libraries read the offline switches when first imported.
    script = (
        "from lib.errors import UserError\n"
        "from lib.demo.tiny import build_tiny_model, train_tokenizer\n"
        "from lib.eval.zeroshot import evaluate_zero_shot\n"
        "try:\n"
        "    evaluate_zero_shot(build_tiny_model(), train_tokenizer(['yes no']), ['boolq'], limit=2)\n"
        "except UserError as err:\n"
        "    print('USER_ERROR:', err)\n"
        "    raise SystemExit(3)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stdout.split("USER_ERROR:", 1)[1].strip()
    assert "\n" not in message
    assert "'boolq'" in message and "needs the HuggingFace hub" in message and "--tasks_dir" in message
