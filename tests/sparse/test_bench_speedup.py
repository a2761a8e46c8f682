"""scripts/bench_speedup.py: input errors and a tiny end-to-end run on a local pruned checkpoint (no timing checks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "bench_speedup.py"


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args", [
    [],
    ["--demo", "real", "--sparsities", "0.7,abc"],
    ["--demo", "real", "--sparsities", "1.5"],
    ["--demo", "real", "--sparsities", "4:2"],
    ["--demo", "real", "--repeats", "0"],
    ["--model", "/nonexistent/dir"],
    ["--skip_model", "--skip_layer"],
    ["--demo", "fake"],
    ["--skip_model", "--tokens", "1,x"],
    ["--skip_model", "--tokens", "0"],
    ["--skip_model", "--curve_level", "0.5,0.6"],
    ["--skip_model", "--isa", "neon"],
    ["--skip_model", "--isa", "avx2", "--amx", "off"],
    ["--skip_model", "--amx", "maybe"],
    ["--skip_model", "--skip_layer", "--experts", "--experts_shape", "8,64,32"],
    ["--skip_model", "--skip_layer", "--experts", "--experts_shape", "4,64,32,8"],
    ["--skip_model", "--skip_layer", "--experts", "--experts_tokens", "0"],
])
def test_bad_input_one_error_line_exit_2(args, capsys):
    assert load_script("bench_speedup").main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""


def test_bad_input_from_the_command_line():
    result = run("--demo", "real", "--sparsities", "0.7,abc")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: --sparsities: not a number or N:M pattern: 'abc'"]


def test_tiny_pruned_checkpoint(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_sparse_checkpoint import tiny_llama
    from lib.demo.tiny import train_tokenizer
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=128)
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    out = tmp_path / "out"
    result = run("--model", str(tmp_path / "pruned"), "--skip_layer", "--new_tokens", "4", "--prefill_tokens", "8",
                 "--repeats", "1", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    row = data["model"][0]
    assert row["tokens_identical"] is True and 0.6 < row["sparsity"] < 0.75
    assert row["linear_bytes_ratio"] < 0.45 and row["disk_ratio"] < 1.0
    assert (out / "results.md").read_text().count("|") > 10 and (out / "speedup.png").stat().st_size > 1000
    assert 0.0 < row["dense_decode_linear_share"] < 1.0
    assert 1.0 <= row["bound_with_rest_of_step"] <= row["linears_only_bound"] + 1e-9


def test_a_compressed_moe_checkpoint_against_its_dense_experts(tmp_path):
    """--model on a compressed Mixtral: the dense side gets its fused experts back (transformers' own experts
    forward), the same greedy tokens, and the experts counted in the Linear bytes and, at their routed share, in
    the bytes per token."""
    from lib.demo.tiny import train_tokenizer
    from lib.pruning.masks import lowest_per_row_mask
    from lib.sparse.checkpoint import save_compressed
    from transformers import MixtralConfig, MixtralForCausalLM
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=128)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if p.dim() == 3:
                for matrix in p:
                    matrix[lowest_per_row_mask(matrix.abs(), 0.7)] = 0
    saved = save_compressed(model, tok, str(tmp_path / "moe"))
    assert saved["sparse_experts"] == 2 and saved["sparse_modules"] == 0
    out = tmp_path / "out"
    result = run("--model", str(tmp_path / "moe"), "--skip_layer", "--new_tokens", "4", "--prefill_tokens", "8",
                 "--repeats", "1", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    row = json.loads((out / "results.json").read_text())["model"][0]
    assert row["tokens_identical"] is True
    assert 0.6 < row["sparsity"] < 0.7  # the experts' zeros counted (attention dense)
    experts_bytes = 2 * 8 * 3 * 96 * 64 * 4  # blocks x experts x (gate, up, down) x 96x64 fp32
    assert row["linear_dense_bytes"] == experts_bytes + 2 * (2 * 64 * 64 + 2 * 32 * 64) * 4  # + attention
    assert row["linear_sparse_bytes"] < row["linear_dense_bytes"] * 0.75
    dense_total = sum(p.numel() * 4 for p in model.parameters()) - model.model.embed_tokens.weight.numel() * 4
    assert row["bytes_per_token_dense"] == pytest.approx(dense_total - experts_bytes * (1 - 2 / 8))
    # the bounds weigh the sparse experts at their routed share (2 of 8) against the dense attention
    assert 1.0 < row["linears_only_bound"] < row["linear_dense_bytes"] / row["linear_sparse_bytes"]
    assert row["bound_with_rest_of_step"] <= row["linears_only_bound"] + 1e-9


def test_bound_with_the_rest_of_the_step():
    bound = load_script("bench_speedup").amdahl_bound
    assert bound(0.0, 0.33) == 1.0
    assert bound(1.0, 0.25) == pytest.approx(4.0)
    # half the step in Linears that shrink to a third: 1 / (0.5 + 0.5/3) = 1.5
    assert bound(0.5, 1 / 3) == pytest.approx(1.5)


def test_speedup_is_the_median_of_paired_ratios(monkeypatch):
    """A slow spell that hits one repeat's pair moves both of its times, not the ratio: the speedup is the median
    of dense/sparse within each repeat, not the ratio of the two medians."""
    bench = load_script("bench_speedup")
    # repeats (dense, sparse): (1, 1), (10, 2), (20, 20): paired ratios 1, 5, 1; medians 10 and 2 (ratio 5)
    durations = iter([1.0, 1.0, 10.0, 2.0, 20.0, 20.0])
    monkeypatch.setattr(bench, "timed", lambda fn: (next(durations), None))
    timing = bench.interleaved({"dense": lambda: None, "sparse": lambda: None}, repeats=3)
    assert timing["dense"] == 10.0 and timing["sparse"] == 2.0
    assert timing.speedup == 1.0


def test_curve_on_a_tiny_block(tmp_path, monkeypatch):
    """The speedup-against-tokens curve (a tiny stand-in for the 7B block): every token count and shape recorded
    with the path SparseLinear took, the CPU model and the instruction set in the JSON, both plot panels drawn.
    No timing is checked."""
    bench = load_script("bench_speedup")
    from lib.sparse import kernels, linear as sparse_linear
    monkeypatch.setattr(bench, "LLAMA2_7B_BLOCK", [("q", 48, 64), ("up", 80, 64), ("down", 64, 80)])
    previous = sparse_linear.policy()
    out = tmp_path / "out"
    try:
        assert bench.main(["--skip_model", "--sparsities", "0.7", "--tokens", "1,6,40", "--repeats", "1",
                           "--prefill_tokens", "20", "--threads", "1", "--out", str(out)]) == 0
    finally:
        sparse_linear.set_policy(previous)
        sparse_linear.clear_choices()
        sparse_linear.clear_workspaces()
    data = json.loads((out / "results.json").read_text())
    env = data["environment"]
    assert env["isa"] == kernels.isa() and env["cpu"] and "kernel" in env and "amx" in env
    assert env["cpu"].startswith(env["cpu_identity"]["name"]) and "flags" in env["cpu_identity"]
    curve = data["curve"]
    assert [r["tokens"] for r in curve["rows"]] == [1, 6, 40]
    for row in curve["rows"]:
        assert set(row["per_shape"]) == {"48x64", "80x64", "64x80"} and row["max_rel_diff"] < 1e-4
        paths = {v["path"] for v in row["per_shape"].values()}
        if kernels.get() is None:
            assert paths == {"torch"}
        else:
            assert paths <= ({"decode"} if row["tokens"] == 1 else {"decode", "tiled", "amx", "dense"})
    assert 0.2 < curve["bytes_ratio"] < 0.5 and curve["bound_decode"] > 2
    assert curve["min_speedup"] == min(r["speedup"] for r in curve["rows"])
    assert "Speedup against tokens per call" in (out / "results.md").read_text()
    assert (out / "speedup.png").stat().st_size > 1000


def test_without_matplotlib_the_measurements_land_and_one_warning_says_why_there_is_no_figure(tmp_path, monkeypatch,
                                                                                              capsys, no_matplotlib):
    bench = load_script("bench_speedup")
    from lib.sparse import linear as sparse_linear
    monkeypatch.setattr(bench, "LLAMA2_7B_BLOCK", [("q", 48, 64)])
    out = tmp_path / "out"
    previous = sparse_linear.policy()
    try:
        assert bench.main(["--skip_model", "--skip_curve", "--sparsities", "0.7", "--repeats", "1",
                           "--prefill_tokens", "8", "--threads", "1", "--out", str(out)]) == 0
    finally:
        sparse_linear.set_policy(previous)
        sparse_linear.clear_choices()
        sparse_linear.clear_workspaces()
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "matplotlib" in line] == [
        line for line in err.splitlines() if line.startswith("warning: matplotlib is not installed")]
    assert "warning: matplotlib is not installed" in err and "Traceback" not in err
    assert json.loads((out / "results.json").read_text())["layer"] and not (out / "speedup.png").exists()


# The script loaded as `python scripts/bench_speedup.py` loads it, without the tests' conftest: that imports
# transformers' model code, which on torch 2.6 runs a torch op and so fixes torch's kernels at AVX-512 before the cap.
FRESH_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench_speedup", {script!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
"""
SCRIPT = str(REPO / "scripts" / "bench_speedup.py")
CAPPED_RUN = FRESH_SCRIPT + """
bench.LLAMA2_7B_BLOCK = [("q", 48, 64), ("down", 64, 80)]
code = bench.main(["--skip_model", "--skip_curve", "--sparsities", "0.7", "--repeats", "1", "--prefill_tokens", "8",
                   "--threads", "1", "--isa", "avx2", "--out", {out!r}])
print(json.dumps({{"code": code}}))
"""


def test_isa_avx2_caps_the_dense_side_in_a_fresh_process(tmp_path):
    """--isa avx2 on any AVX2 machine: torch's kernels (the dense side) run at AVX2 as well, recorded in the JSON
    and the table, so that both sides run as on an AVX2-only CPU."""
    from lib.sparse import kernels
    if "avx2" not in kernels.supported_isas():
        pytest.skip("this machine cannot run the AVX2 kernel")
    out = tmp_path / "out"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MKL_ENABLE_INSTRUCTIONS",
                                                                         "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    result = subprocess.run([sys.executable, "-c", CAPPED_RUN.format(script=SCRIPT, out=str(out))],
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0 and json.loads(result.stdout.splitlines()[-1]) == {"code": 0}, result.stderr
    environment = json.loads((out / "results.json").read_text())["environment"]
    assert environment["isa"] == "avx2"
    assert environment["dense_isa"]["applied"] is True and environment["dense_isa"]["aten_capability"] == "AVX2"
    assert environment["dense_isa"]["variables"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert "torch capped at AVX2" in (out / "results.md").read_text()


def test_isa_avx2_after_torch_picked_a_wider_isa_is_one_error_and_leaves_the_environment(monkeypatch, capsys):
    """In a process where torch already chose AVX-512, the dense side cannot be capped any more: one error line,
    exit 2, and none of the variables left behind for later subprocesses."""
    import os
    import torch
    from lib.sparse import kernels
    if "avx2" not in kernels.supported_isas() or torch.backends.cpu.get_cpu_capability() == "AVX2":
        pytest.skip("needs a CPU where torch runs wider than AVX2")
    for name in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert load_script("bench_speedup").main(["--skip_model", "--isa", "avx2", "--sparsities", "0.7"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --isa avx2: torch's kernels already run at")
    assert "started with MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (" in lines[0]
    assert not any(name in os.environ for name in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                                   "ATEN_CPU_CAPABILITY"))


NO_AMX_RUN = FRESH_SCRIPT + """
bench.LLAMA2_7B_BLOCK = [("q", 48, 64), ("down", 64, 80)]
code = bench.main(["--skip_model", "--sparsities", "0.7", "--repeats", "1", "--prefill_tokens", "40", "--tokens", "40",
                   "--threads", "1", "--dtype", "bfloat16", "--amx", "off", "--out", {out!r}])
print(json.dumps({{"code": code}}))
"""


def test_amx_off_keeps_both_sides_off_the_tile_unit_in_a_fresh_process(tmp_path):
    """--amx off: this project's bf16 calls take the tiled kernel and torch's bf16 GEMM runs a oneDNN kernel without
    AMX (checked on a small product and recorded), so both sides run as on an AVX-512 CPU without AMX."""
    out = tmp_path / "out"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATP_SPARSE_AMX")}
    result = subprocess.run([sys.executable, "-c", NO_AMX_RUN.format(script=SCRIPT, out=str(out))],
                            cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0 and json.loads(result.stdout.splitlines()[-1]) == {"code": 0}, result.stderr
    saved = json.loads((out / "results.json").read_text())
    environment = saved["environment"]
    assert environment["amx"] is False
    assert environment["dense_isa"]["applied"] is True and "amx" not in environment["dense_isa"]["bf16_gemm"].lower()
    assert environment["dense_isa"]["variables"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    paths = {c["path"] for c in saved["curve"]["choices"]}
    # the decode kernel is a measured candidate too above 4 tokens on AVX512_BF16 without AMX (decode_max_tokens)
    assert "amx" not in paths and paths <= {"decode", "tiled", "dense"} and paths
    assert environment["dense_bf16_gemm"] == environment["dense_isa"]["bf16_gemm"]
    assert "torch capped at AVX512_CORE_BF16 (no AMX) (oneDNN) (bf16 GEMM: " in (out / "results.md").read_text()


def test_amx_off_after_torch_used_amx_is_one_error_and_leaves_the_environment(monkeypatch, capsys):
    """Where torch's bf16 GEMM already ran on AMX in this process, oneDNN cannot be capped any more: one error line,
    exit 2, and the variable is not left behind."""
    import os
    import torch
    import torch.nn.functional as F
    bench = load_script("bench_speedup")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    x = torch.ones(32, 64, dtype=torch.bfloat16)
    F.linear(x, x)
    if "amx" not in bench.onednn_bf16_kernel().lower():
        pytest.skip("torch's bf16 GEMM does not run on AMX here")
    assert bench.main(["--skip_model", "--amx", "off", "--sparsities", "0.7"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --amx off: torch's bf16 GEMM already runs")
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ


def test_the_experts_section_compares_the_packed_experts_with_transformers_forward(tmp_path):
    """--experts alone: a small MoE layer, dense fused tensors under transformers' experts forward against the
    packed experts; the same outputs, a speedup and a bound per token count, in JSON and the markdown table."""
    bench = load_script("bench_speedup")
    out = tmp_path / "out"
    assert bench.main(["--skip_model", "--skip_layer", "--experts", "--experts_shape", "8,64,32,2",
                       "--experts_tokens", "1,6", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    moe = result["experts"]
    assert "layer" not in result and "model" not in result
    assert moe["shape"] == {"experts": 8, "hidden": 64, "intermediate": 32, "top_k": 2}
    assert moe["level"] == "70%" and moe["dense_implementation"] == "grouped_mm"
    assert 2.0 < moe["bound_decode"] == moe["dense_bytes"] / moe["sparse_bytes"]
    assert [r["tokens"] for r in moe["rows"]] == [1, 6]
    assert moe["rows"][0]["experts_routed"] == 2 and 2 <= moe["rows"][1]["experts_routed"] <= 8
    for row in moe["rows"]:
        assert row["max_abs_diff"] < 1e-5 and row["speedup"] > 0
    assert "**Mixture-of-experts layer** (8 experts, hidden 64, intermediate 32, top-2" in (
        out / "results.md").read_text()


def test_the_moe_demo_prunes_and_packs_the_experts_too(tmp_path, monkeypatch):
    """--demo moe (shrunk here): the fused experts are pruned at the level with the Linears and run packed; the
    greedy tokens match the dense model's."""
    bench = load_script("bench_speedup")
    monkeypatch.setattr(bench, "MOE_DEMO", {**bench.MOE_DEMO, "hidden_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                            "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2})
    out = tmp_path / "out"
    assert bench.main(["--demo", "moe", "--skip_layer", "--sparsities", "0.7", "--new_tokens", "3",
                       "--prefill_tokens", "8", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["model"][0]
    assert row["model"].startswith("Qwen3-MoE-shaped, random init") and row["tokens_identical"] is True
    experts = 2 * 8 * 3 * 32 * 64 * 4  # blocks x experts x (gate, up, down) x 32x64 fp32
    assert row["linear_dense_bytes"] > experts and row["linear_sparse_bytes"] < 0.4 * row["linear_dense_bytes"]
    assert 0.65 < row["sparsity"] < 0.71  # byte-weighted over Linears and experts, all 70% per row (rounded down)
