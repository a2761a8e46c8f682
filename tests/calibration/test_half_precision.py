"""Half precision end to end on the CPU (--dtype float16 / bfloat16): calibration statistics, every pruner and
evaluation. Every GPU run uses fp16 by default, so a dtype bug here would reach every GPU user."""
import json
import math

import pytest
import torch

from lib.calibration.blocks import capture_block_inputs
from lib.calibration.stats import collect_input_stats
from lib.models.matrices import block_matrices
from lib.models.structure import find_decoder_blocks

HALF = ["float16", "bfloat16"]


@pytest.fixture
def run_flags(model_dir, text_files):
    return ["--model", model_dir("llama"), "--calib_data", text_files.calib, "--eval_data", text_files.eval,
            "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "4", "--calib_batch_size", "2", "--quiet",
            "--device", "cpu", "--sparsity_ratio", "0.5"]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria", "magnitude"])
def test_every_pruner_runs_in_half_precision_and_hits_its_targets(cli, run_flags, tmp_path, dtype, method):
    results_path = tmp_path / "run.json"
    code, out, err = cli(*run_flags, "--dtype", dtype, "--prune_method", method, "--beta", "0.05",
                         "--eval_dense", "--results", results_path)
    assert code == 0, err
    results = json.loads(results_path.read_text())
    assert results["model"]["dtype"] == f"torch.{dtype}"
    assert math.isfinite(results["perplexity"]) and math.isfinite(results["dense_perplexity"])
    for block in results["blocks"]:  # per-row floor for Wanda / per-matrix for the others: within a column
        assert abs(block["achieved"] - block["target"]) < 0.02, block


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_of_half_activations_are_accumulated_in_fp32_and_match_fp32(make_model, dtype):
    model32 = make_model("llama", seed=3)
    model_half = make_model("llama", seed=3).to(dtype)
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = {}
    for name, model in (("fp32", model32), ("half", model_half)):
        blocks = find_decoder_blocks(model)
        batches = capture_block_inputs(model, blocks, ids, batch_size=2)
        stats[name] = collect_input_stats(blocks[0], block_matrices(blocks[0]), batches, True, True)
    for layer, s in stats["half"].items():
        assert s.sq_norm.dtype == torch.float32 and s.xtx.dtype == torch.float32
        reference = stats["fp32"][layer]
        # half activations round each input to ~3 significant digits: the sums agree to about 1%
        assert torch.allclose(s.sq_norm, reference.sq_norm, rtol=0.03, atol=1e-3)
        assert (s.xtx - reference.xtx).norm() / reference.xtx.norm() < 0.03


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_wanda_masks_agree_with_fp32(cli, run_flags, tmp_path, dtype):
    """The same model pruned in fp32 and in half precision: the masks differ only near ties of the metric."""
    saved = {}
    for name in ("float32", dtype):
        out_dir = tmp_path / name
        code, _, err = cli(*run_flags, "--dtype", name, "--save_model", out_dir)
        assert code == 0, err
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        saved[name] = [lin.weight == 0 for b in find_decoder_blocks(model) for lin in block_matrices(b).values()]
    same = sum(int((a == b).sum()) for a, b in zip(saved["float32"], saved[dtype]))
    total = sum(a.numel() for a in saved["float32"])
    assert same / total > 0.97
