"""What decides, without a GPU, whether a weight can become a torch semi-structured (2:4) tensor: the 2:4
pattern, dtype and shape rules against torch's own tables, and the reasons given. Runs on the CPU."""
from __future__ import annotations

import pytest
import torch

from cuda_helpers import HAS_CUDA, prune_2_4_, prune_unstructured_
from lib.sparse import semi_structured as ss


def two_four(rows=64, cols=128, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return prune_2_4_(torch.randn(rows, cols, generator=gen).to(dtype))


def test_pattern_check_counts_groups_and_finds_the_first_bad_one():
    w = two_four()
    assert ss.check_2_4(w) == (0, 64 * 32, None)
    w[5, 40:44] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=w.dtype)  # 3 nonzeros in group 10 of row 5
    w[9, 0:4] = 1.0  # 4 in group 0 of row 9
    assert ss.check_2_4(w) == (2, 64 * 32, (5, 40))
    sparser = torch.zeros(8, 16)
    sparser[:, ::4] = 1.0  # 1 of 4: still fits 2:4 (the kept slots hold zeros)
    assert ss.check_2_4(sparser).bad_groups == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        ss.check_2_4(torch.zeros(4, 6))


def test_a_2_4_half_weight_passes_every_backend():
    for dtype in ss.HALF_DTYPES:
        for backend in ss.BACKENDS:
            assert ss.diagnose(two_four(dtype=dtype), backend, check_device=False) is None


def test_unstructured_sparsity_is_refused_with_its_share_and_location():
    w = prune_unstructured_(torch.randn(64, 128, dtype=torch.float16), 0.5)
    reason, detail = ss.diagnose(w, "cusparselt", check_device=False)
    assert reason.startswith("not 2:4") and "--sparsity_type 2:4" in reason
    bad = ss.check_2_4(w)
    assert f"{bad.bad_groups} of 2048 groups of 4" in detail
    assert f"row {bad.first_bad[0]}, columns {bad.first_bad[1]}-{bad.first_bad[1] + 3}" in detail
    four_eight = two_four(cols=128)
    four_eight[:, 0:8] = 0
    four_eight[:, 0:4] = 1.0  # a 4:8 group packed into one group of 4: fine for 4:8, not for 2:4
    assert ss.diagnose(four_eight, "cutlass", check_device=False)[0].startswith("not 2:4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_only_half_types_are_converted(dtype):
    w = two_four(dtype=torch.float32).to(dtype)
    reason, detail = ss.diagnose(w, "cusparselt", check_device=False)
    assert reason == f"dtype {str(dtype).removeprefix('torch.')}" and "float16 or bfloat16" in detail


@pytest.mark.parametrize("backend", ss.BACKENDS)
def test_minimum_shapes_are_torch_own(backend):
    """The rule is read from torch's class; the fallback table (for a torch without it) agrees with it."""
    table = ss.backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    for dtype in ss.HALF_DTYPES:
        want = (table[dtype].sparse_min_rows, table[dtype].sparse_min_cols)
        assert ss.min_weight_shape(backend, dtype) == want == ss._FALLBACK_MIN_SHAPE[backend][dtype]
        rows, cols = want
        assert ss.diagnose(two_four(rows, cols), backend, check_device=False) is None
        assert ss.diagnose(two_four(2 * rows, 3 * cols), backend, check_device=False) is None
        for bad_rows, bad_cols in ((rows + 8, cols), (rows, cols + 4), (rows // 2, cols)):
            reason, detail = ss.diagnose(two_four(bad_rows, bad_cols), backend, check_device=False)
            assert reason.startswith("shape") and f"{bad_rows}x{bad_cols}" in detail


def test_the_7b_block_shapes_fit_both_backends():
    for rows, cols in ((4096, 4096), (11008, 4096), (4096, 11008), (5120, 13824), (13824, 5120)):
        for backend in ss.BACKENDS:
            r, c = ss.min_weight_shape(backend, torch.bfloat16)
            assert rows % r == 0 and cols % c == 0


def test_not_2_d():
    assert ss.diagnose(torch.zeros(2, 64, 64, dtype=torch.float16), check_device=False)[0] == "not a 2-D weight"


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal of CPU tensors where there is no GPU")
def test_cpu_tensors_are_refused_by_the_converter():
    w = two_four()
    assert ss.conversion_problem(w) == "on cpu: torch's semi-structured sparsity runs on CUDA GPUs only"
    with pytest.raises(ValueError, match="on cpu"):
        ss.SemiStructuredLinear.from_weight(w)
    linear = torch.nn.Linear(128, 64, dtype=torch.float16)
    new, record = ss.convert_for_sparsify(linear, 0.3)
    assert new is None and record["reason"] == "on cpu"


def test_backend_names_and_labels():
    assert ss.default_backend() in ss.BACKENDS
    assert ss.kernel_label("cutlass").endswith("CUTLASS)") and "cuSPARSELt" in ss.kernel_label("cusparselt")
    with pytest.raises(ValueError, match="unknown semi-structured backend"):
        ss.backend_class("vllm")


def test_cpu_models_still_get_the_cpu_format(monkeypatch):
    """sparsify_model's CUDA branch leaves CPU models to the bitmask SparseLinear, as before."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.sparse import kernels
    from lib.sparse.convert import block_linears, sparsify_model
    from lib.sparse.linear import SparseLinear
    monkeypatch.setattr(kernels, "get", lambda: None)  # the conversion is what is tested, not the C++ build
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for _, module in block_linears(model):
            prune_2_4_(module.weight.data)
    summary = sparsify_model(model, verbose=False)
    assert len(summary.converted) == 14 and all("format" not in c for c in summary.converted)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14
    assert "CUDA" not in summary.text() and not summary.kernel.startswith("CUDA")
