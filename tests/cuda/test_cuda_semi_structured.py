"""2:4 on the GPU: torch's semi-structured sparse Linears (lib/sparse/semi_structured.py), sparsify_model's CUDA
branch, the CLI's 2:4 pruning followed by conversion, and bench_speedup.py's GPU section on small shapes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cuda_helpers import (CUDA_ONLY, block_zero_masks, perplexity_of, prune_2_4_, prune_unstructured_,
                          relative_error, write_texts)
from conftest import load_script
from lib.sparse import semi_structured as ss
from lib.sparse.semi_structured import SemiStructuredLinear

pytestmark = CUDA_ONLY

HALF = [torch.float16, torch.bfloat16]
# one output rounding of a product accumulated in fp32 (fp16: 11-bit mantissa, bf16: 8-bit)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def usable(backend: str, dtype: torch.dtype) -> None:
    problem = ss.backend_problem(backend, dtype, torch.device("cuda"))
    if problem is not None:
        pytest.skip(problem)


def pruned(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return prune_2_4_(torch.randn(rows, cols, device="cuda", generator=gen).to(dtype))


@pytest.mark.parametrize("backend", ss.BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_the_dense_product(backend, dtype, bias):
    usable(backend, dtype)
    w = pruned(128, 256, dtype)
    b = torch.randn(128, device="cuda").to(dtype) if bias else None
    module = SemiStructuredLinear.from_weight(w, b, backend)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for shape in [(1, 256), (5, 256), (2, 7, 256), (64, 256), (300, 256)]:  # decode, odd sizes, 3-D, prefill
        x = torch.randn(*shape, device="cuda", generator=gen).to(dtype)
        y = module(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 128)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert relative_error(y, want) < TOL[dtype], shape


@pytest.mark.parametrize("backend", ss.BACKENDS)
def test_dense_weight_state_dict_and_bytes(backend):
    usable(backend, torch.float16)
    w = pruned(256, 512, torch.float16)
    module = SemiStructuredLinear.from_weight(w, torch.ones(256, device="cuda", dtype=torch.float16), backend)
    assert torch.equal(module.dense_weight(), w)
    state = module.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], w)
    ratio = module.packed_nbytes() / (w.numel() * w.element_size())
    assert 0.5 <= ratio <= 0.6  # half the values plus 2-bit indices (metadata layouts differ a little)
    assert "2:4 semi-structured" in repr(module)


def test_refuses_what_it_cannot_take_and_says_why():
    w = pruned(128, 256, torch.float16)
    unstructured = prune_unstructured_(torch.randn(128, 256, device="cuda", dtype=torch.float16), 0.5)
    with pytest.raises(ValueError, match="not 2:4.*groups of 4"):
        SemiStructuredLinear.from_weight(unstructured)
    with pytest.raises(ValueError, match="dtype float32"):
        SemiStructuredLinear.from_weight(w.float())
    with pytest.raises(ValueError, match="on cpu"):
        SemiStructuredLinear.from_weight(w.cpu())
    with pytest.raises(ValueError, match="shape"):
        SemiStructuredLinear.from_weight(pruned(100, 256, torch.float16))


def test_device_and_dtype_changes_are_refused():
    module = SemiStructuredLinear.from_weight(pruned(64, 128, torch.bfloat16))
    module.to("cuda")  # no change: allowed
    for move in (lambda m: m.to("cpu"), lambda m: m.half(), lambda m: m.float()):
        with pytest.raises(RuntimeError, match="cannot change device or dtype"):
            move(module)


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device="cuda", dtype=dtype).eval()


@pytest.mark.parametrize("dtype", HALF)
def test_sparsify_model_converts_2_4_and_keeps_the_rest_dense(dtype, monkeypatch):
    from lib.sparse import kernels
    from lib.sparse.convert import block_linears, sparsify_model
    usable(ss.default_backend(), dtype)
    monkeypatch.setattr(kernels, "get", lambda: pytest.fail("a CUDA model must not build the CPU kernel"))
    model = _tiny_llama(dtype)
    with torch.no_grad():
        for name, module in block_linears(model):
            if name.endswith("layers.1.mlp.down_proj"):
                prune_unstructured_(module.weight.data, 0.5)
            elif not name.endswith("layers.0.self_attn.o_proj"):  # that one stays dense
                prune_2_4_(module.weight.data)
    ids = torch.randint(3, 512, (2, 24), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits.float()
    summary = sparsify_model(model, verbose=False)
    assert len(summary.converted) == 12 and all(c["format"] == ss.FORMAT for c in summary.converted)
    kept = {k["name"].split("model.")[-1]: k for k in summary.kept_dense}
    assert set(kept) == {"layers.0.self_attn.o_proj", "layers.1.mlp.down_proj"}
    assert all(k["reason"].startswith("not 2:4") for k in kept.values())
    assert "groups of 4" in kept["layers.1.mlp.down_proj"]["detail"]
    assert summary.kernel.startswith("CUDA 2:4 semi-structured")
    assert "dense (not 2:4" in summary.text() and "12 CUDA Linear(s)" in summary.text()
    assert sum(isinstance(m, SemiStructuredLinear) for m in model.modules()) == 12
    with torch.no_grad():
        after = model(ids).logits.float()
    assert relative_error(after, before) < 5 * TOL[dtype]
    out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    state = model.state_dict()  # dense again, zeros and all
    assert all(state[f"{c['name']}.weight"].shape == tuple(c["shape"]) for c in summary.converted)
    again = sparsify_model(model, verbose=False)  # converted modules are left alone
    assert not again.converted


def test_cli_2_4_prune_then_convert_keeps_the_perplexity(cli, model_dir, tmp_path):
    """--sparsity_type 2:4 on the GPU, reload, sparsify_model: every Linear converts (or stays dense for a shape
    the backend cannot take), and the converted model scores the run's perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.sparse.convert import sparsify_model
    usable(ss.default_backend(), torch.float16)
    texts = write_texts(tmp_path)
    out_dir, results = tmp_path / "model", tmp_path / "run.json"
    code, _, err = cli("--model", model_dir("llama"), "--calib_data", texts.calib, "--eval_data", texts.eval,
                       "--nsamples", "4", "--seqlen", "32", "--max_eval_windows", "4", "--eval_batch_size", "4",
                       "--quiet", "--dtype", "float16", "--sparsity_type", "2:4", "--save_model", out_dir,
                       "--results", results)
    assert code == 0, err
    record = json.loads(results.read_text())
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float16).to("cuda").eval()
    masks = block_zero_masks(model)
    summary = sparsify_model(model, verbose=False)
    assert len(summary.converted) + len(summary.kept_dense) == len(masks)
    assert summary.converted and all(k["reason"].startswith("shape") for k in summary.kept_dense)
    ppl = perplexity_of(model, AutoTokenizer.from_pretrained(out_dir), texts.eval, 32, 4, 4)
    assert ppl == pytest.approx(record["perplexity"], rel=1e-2)


def test_bench_speedup_gpu_section_on_small_shapes(tmp_path):
    bench = load_script("bench_speedup")
    code = bench.main(["--gpu", "--shapes", "small", "--tokens", "1,64", "--iters", "2", "--repeats", "2",
                       "--out", str(tmp_path), "--json_name", "gpu.json"])
    assert code == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["status"] == "ran" and result["peak_gib"] > 0
    assert result["environment"]["gpu"] and result["environment"]["torch"] and result["environment"]["transformers"]
    for dtype, record in result["dtypes"].items():
        working = [b for b, r in record["backends"].items() if r["status"] == "ok"]
        assert working, record["backends"]
        for backend in working:
            assert record["backends"][backend]["max_rel_error_16_tokens"] < TOL[getattr(torch, dtype)]
            assert record["backends"][backend]["bytes_ratio"] < 0.6
        assert {(r["tokens"], r["variant"]) for r in record["rows"]} >= {(t, b) for t in (1, 64) for b in working}
        assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] > 0 for r in record["rows"])
