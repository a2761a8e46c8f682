"""main.py on the new architectures, as a user runs it: the sparsity the run prints equals the zero fraction of
the saved model's prunable matrices, the plan and the results say what stayed dense, and every allocation rule
that measures the model sees the expert matrices."""
from __future__ import annotations

import json
import re

import pytest
import torch

from lib.models.loading import auto_model_class
from lib.models.matrices import ROUTER, model_inventory
from lib.models.structure import find_decoder_blocks

from test_families import build, prunable_param_zeros

OVERALL = re.compile(r"overall sparsity (\S+) over ([\d,]+) prunable weights")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer):
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"family-{family}")
            build(family, len(tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = path
        return cache[family]
    return get


def run_flags(path, text_files):
    return ["--model", path, "--calib_data", text_files.calib, "--eval_data", text_files.eval, "--nsamples", "4",
            "--seqlen", "32", "--max_eval_windows", "2", "--calib_batch_size", "2", "--quiet"]


@pytest.mark.parametrize("family, method", [("mixtral", "wanda"), ("gpt_oss", "sparsegpt"), ("deepseek_v3", "wanda"),
                                            ("qwen3_next", "wanda"), ("gemma3_text", "ria"),
                                            ("qwen2_5_vl", "wanda"), ("gemma3", "sparsegpt"),
                                            ("qwen3_vl_moe", "wanda")])
def test_the_printed_sparsity_is_the_saved_models_zero_fraction(cli, family_dir, text_files, tmp_path, family,
                                                                method):
    saved, results = tmp_path / "pruned", tmp_path / "run.json"
    code, out, err = cli(*run_flags(family_dir(family), text_files), "--prune_method", method,
                         "--sparsity_ratio", "0.7", "--beta", "0.02", "--save_model", saved, "--results", results)
    assert code == 0, err
    printed, weights = OVERALL.search(out).groups()
    record = json.loads(results.read_text())
    from transformers import AutoConfig
    reloaded = auto_model_class(AutoConfig.from_pretrained(saved)).from_pretrained(saved, dtype=torch.float32)
    zeros, total = prunable_param_zeros(reloaded)
    assert total == int(weights.replace(",", "")) == record["structure"]["prunable_weights"]
    assert abs(zeros / total - float(printed)) < 1e-4
    assert record["overall_sparsity"] == pytest.approx(zeros / total)
    assert "pruned:" in out and "dense" in out
    inventory = model_inventory(reloaded, find_decoder_blocks(reloaded))
    assert record["structure"]["dense_in_blocks"].keys() == inventory.dense_in_blocks.keys()
    if family in ("qwen2_5_vl", "gemma3"):
        assert any("vision" in name or "visual" in name for name in record["structure"]["dense_outside_blocks"])
    if family in ("mixtral", "gpt_oss", "deepseek_v3", "qwen3_next"):
        assert ROUTER in record["structure"]["dense_in_blocks"] and record["structure"]["expert_slices"] > 0


@pytest.mark.parametrize("allocation", ["owl", "alpha", "dlp"])
def test_rules_that_measure_the_model_see_the_expert_matrices(cli, family_dir, text_files, tmp_path, allocation,
                                                             tokenizer):
    results = tmp_path / "run.json"
    extra = ["--alpha_cache", ""] if allocation == "alpha" else []
    code, out, err = cli(*run_flags(family_dir("mixtral"), text_files), "--allocation", allocation,
                         "--sparsity_ratio", "0.6", "--results", results, *extra)
    assert code == 0, err
    record = json.loads(results.read_text())
    if allocation == "alpha":  # its parameter counts are the blocks' prunable weights, experts included
        model = build("mixtral", len(tokenizer))
        per_block = record["allocation"]["param_counts"]
        assert sum(per_block) == model_inventory(model, find_decoder_blocks(model)).prunable_weights
    sparsities = record["allocation"]["sparsities"]
    assert len(set(round(s, 6) for s in sparsities)) > 1  # the rule measured something that varies by block


def test_a_compressed_checkpoint_packs_each_experts_matrix_and_says_so(cli, family_dir, text_files, tmp_path):
    from lib.sparse import experts
    from lib.sparse.checkpoint import MANIFEST, load_compressed
    from lib.sparse.linear import SparseLinear
    dense_dir, packed_dir = tmp_path / "dense", tmp_path / "packed"
    flags = [*run_flags(family_dir("mixtral"), text_files), "--sparsity_ratio", "0.6", "--seed", "3"]
    assert cli(*flags, "--save_model", dense_dir)[0] == 0
    code, out, err = cli(*flags, "--save_model", packed_dir, "--save_format", "compressed")
    assert code == 0, err
    manifest = json.loads((packed_dir / MANIFEST).read_text())
    assert len(manifest["sparse_experts"]) == 4 and manifest["dense_fused_experts"] == []
    assert "the fused expert tensors of 4 experts module(s) packed one matrix per expert" in out
    packed, _ = load_compressed(str(packed_dir))
    dense = auto_model_class(packed.config).from_pretrained(dense_dir, dtype=torch.float32)
    for name in manifest["sparse_experts"]:
        module = packed.get_submodule(name)
        for proj in experts.projections(module):
            fused = dense.get_parameter(f"{name}.{proj}")
            assert (fused == 0).float().mean() > 0.5
            linears = getattr(module, proj)
            assert all(isinstance(m, SparseLinear) and torch.equal(m.dense_weight(), fused[e])
                       for e, m in enumerate(linears))


def test_a_family_with_a_matrix_no_rule_explains_is_refused_before_its_weights_are_read(cli, tmp_path, tokenizer,
                                                                                        text_files, monkeypatch):
    from families import REFUSED
    import lib.models.loading
    config = REFUSED["jamba"](len(tokenizer))
    path = tmp_path / "jamba"
    auto_model_class(config).from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    loads = []
    real = lib.models.loading.load_model_and_tokenizer
    monkeypatch.setattr(lib.models.loading, "load_model_and_tokenizer",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    code, out, err = cli(*run_flags(path, text_files), "--results", tmp_path / "run.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: --model") and "mamba.A_log" in lines[-1], err
    assert "refusing rather than leave them dense silently" in lines[-1]
    assert not loads and not (tmp_path / "run.json").exists()
