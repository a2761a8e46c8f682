"""The whole CLI on a CUDA GPU: fp16 and bf16 with every pruner and every allocation rule, --offload,
--device_map auto, saved checkpoints (dense and compressed) that reproduce the run's perplexity, zero-shot, and
Wanda on CUDA against Wanda on the CPU. Tiny models: the whole file takes well under a minute on one GPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cuda_helpers import CUDA_ONLY, DTYPES, REPO, block_zero_masks, perplexity_of, write_texts
from lib.allocation.rule import RULES
from lib.pruning.pruner import PRUNERS

pytestmark = CUDA_ONLY

SEQLEN, WINDOWS, EVAL_BATCH = 32, 4, 4


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return write_texts(tmp_path_factory.mktemp("cuda-text"))


@pytest.fixture
def flags(model_dir, texts):
    return ["--model", model_dir("llama"), "--calib_data", texts.calib, "--eval_data", texts.eval, "--nsamples", "4",
            "--seqlen", str(SEQLEN), "--max_eval_windows", str(WINDOWS), "--eval_batch_size", str(EVAL_BATCH),
            "--calib_batch_size", "2", "--quiet", "--sparsity_ratio", "0.5"]


def run_ok(cli, tmp_path, *flags, name="run.json") -> dict:
    results = tmp_path / name
    code, out, err = cli(*flags, "--results", results)
    assert code == 0, err[-3000:]
    return json.loads(results.read_text())


def check_run(record: dict, dtype: str, device: str = "cuda", offload: bool = False) -> None:
    assert record["model"]["device"].startswith(device)
    assert record["model"]["dtype"] == f"torch.{dtype}"
    assert record["model"]["offload"] is offload
    assert math.isfinite(record["perplexity"]) and record["perplexity"] > 1
    for block in record["blocks"]:  # Wanda's per-row floor / a matrix's rounding: within a column of 64
        assert abs(block["achieved"] - block["target"]) < 0.02, block
    assert abs(record["overall_sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", PRUNERS.names())
def test_every_pruner_on_cuda(cli, flags, tmp_path, dtype, method):
    record = run_ok(cli, tmp_path, *flags, "--dtype", dtype, "--prune_method", method, "--beta", "0.05")
    check_run(record, dtype)
    sparsities = record["allocation"]["sparsities"]  # ATP: 0.05 more per block, mean 0.5
    assert [b - a for a, b in zip(sparsities, sparsities[1:])] == pytest.approx([0.05] * (len(sparsities) - 1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rule", RULES.names())
def test_every_allocation_on_cuda(cli, flags, tmp_path, dtype, rule):
    extra = ["--beta", "0.05"] if rule == "atp" else []
    record = run_ok(cli, tmp_path, *flags, "--dtype", dtype, "--allocation", rule, *extra)
    check_run(record, dtype)
    sparsities = record["allocation"]["sparsities"]
    assert abs(sum(sparsities) / len(sparsities) - 0.5) < 1e-6


def test_absorption_correction_on_cuda(cli, flags, tmp_path):
    record = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--beta", "0.05", "--absorption", "0.5")
    check_run(record, "float16")


def test_2_4_on_cuda_is_exactly_2_4(cli, flags, tmp_path):
    from transformers import AutoModelForCausalLM

    from lib.sparse.semi_structured import check_2_4
    out_dir = tmp_path / "model"
    record = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--sparsity_type", "2:4", "--save_model", out_dir)
    check_run(record, "float16")
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float16)
    for mask in block_zero_masks(model):
        assert check_2_4((~mask).to(torch.float16)).bad_groups == 0
        assert int(mask.sum()) * 2 == mask.numel()


def test_offload_gives_the_resident_result(cli, flags, tmp_path):
    resident = run_ok(cli, tmp_path, *flags, "--dtype", "float16", name="resident.json")
    offloaded = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--offload", name="offloaded.json")
    check_run(offloaded, "float16", offload=True)
    assert [b["achieved"] for b in offloaded["blocks"]] == [b["achieved"] for b in resident["blocks"]]
    assert offloaded["perplexity"] == pytest.approx(resident["perplexity"], rel=1e-3)


def test_device_map_auto_gives_the_plain_cuda_result(cli, flags, tmp_path):
    pytest.importorskip("accelerate", reason="--device_map needs accelerate")
    plain = run_ok(cli, tmp_path, *flags, "--dtype", "float16", name="plain.json")
    mapped = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--device_map", "auto", name="mapped.json")
    assert mapped["model"]["device"].startswith("cuda")
    assert [b["achieved"] for b in mapped["blocks"]] == [b["achieved"] for b in plain["blocks"]]
    assert mapped["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_saved_model_reloads_with_its_zeros_and_perplexity(cli, flags, texts, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out_dir = tmp_path / "model"
    record = run_ok(cli, tmp_path, *flags, "--dtype", dtype, "--beta", "0.05", "--save_model", out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=DTYPES[dtype]).to("cuda").eval()
    masks = block_zero_masks(model)
    zeros, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    assert zeros / total == pytest.approx(record["overall_sparsity"], abs=1e-9)
    ppl = perplexity_of(model, AutoTokenizer.from_pretrained(out_dir), texts.eval, SEQLEN, WINDOWS, EVAL_BATCH)
    assert ppl == pytest.approx(record["perplexity"], rel=1e-3)


def test_compressed_checkpoint_reproduces_the_pruned_model(cli, flags, texts, tmp_path):
    from torch import nn

    from lib.sparse import format as fmt
    from lib.sparse.checkpoint import load_compressed
    from lib.sparse.linear import SparseLinear
    out_dir = tmp_path / "compressed"
    record = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--beta", "0.05", "--save_model", out_dir,
                    "--save_format", "compressed")
    model, tokenizer = load_compressed(str(out_dir), dtype=torch.float16)
    converted = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):  # dense again without the CPU kernel (pure unpacking)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=torch.float16)
            dense.weight.data = fmt.unpack(module.mask, module.values, module.row_offsets, module.in_features)
            if module.bias is not None:
                dense.bias.data = module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
            converted += 1
    assert converted == len(record["blocks"]) * 7  # every LLaMA block Linear is above the 30% threshold
    model = model.to("cuda").eval()
    masks = block_zero_masks(model)
    assert sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == pytest.approx(
        record["overall_sparsity"], abs=1e-9)
    ppl = perplexity_of(model, tokenizer, texts.eval, SEQLEN, WINDOWS, EVAL_BATCH)
    assert ppl == pytest.approx(record["perplexity"], rel=1e-3)


def test_zero_shot_on_the_shipped_task(cli, flags, tmp_path):
    pytest.importorskip("lm_eval.evaluator", reason="lm_eval is not importable here (gpu_check.sh installs it and "
                                                    "its dependencies from GPU_CHECK_WHEELS when given)")
    record = run_ok(cli, tmp_path, *flags, "--dtype", "float16", "--eval_zero_shot", "--tasks", "tiny_mc",
                    "--tasks_dir", REPO / "tasks", "--zs_limit", "10")
    task = record["zero_shot"]["tasks"]["tiny_mc"]
    assert 0 <= task["acc"] <= 1 and 0 <= task["acc_norm"] <= 1


@pytest.mark.parametrize("cuda_dtype, min_agreement", [("float32", 0.995), ("float16", 0.97)])
def test_wanda_on_cuda_agrees_with_the_cpu(cli, flags, tmp_path, cuda_dtype, min_agreement):
    """The same pruning on both devices: masks differ only where the metric ties within rounding (fp32: the
    summation order; fp16: the activations' rounding), and the perplexities agree within 1%."""
    from transformers import AutoModelForCausalLM
    runs = {}
    for label, device, dtype in (("cpu", "cpu", "float32"), ("cuda", "cuda", cuda_dtype)):
        out_dir = tmp_path / label
        record = run_ok(cli, tmp_path, *flags, "--device", device, "--dtype", dtype, "--beta", "0.05",
                        "--save_model", out_dir, name=f"{label}.json")
        check_run(record, dtype, device=device)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        runs[label] = (record, block_zero_masks(model))
    (cpu, cpu_masks), (cuda, cuda_masks) = runs["cpu"], runs["cuda"]
    same = sum(int((a == b).sum()) for a, b in zip(cpu_masks, cuda_masks))
    total = sum(a.numel() for a in cpu_masks)
    assert same / total >= min_agreement
    assert cuda["perplexity"] == pytest.approx(cpu["perplexity"], rel=0.01)
