"""Packed experts (lib/sparse/experts.py) against transformers' own experts forward on the same pruned fused
tensors: decode (every expert's few tokens in one kernel call), batches where some experts get more tokens (those
join the call where their own path would be the decode kernel, else run their own SparseLinear), every
instruction set, and both layouts (Qwen3-MoE's
concatenated gate/up; GPT-OSS's transposed, biased, interleaved and clamped)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GptOssConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from lib.sparse import experts as sparse_experts
from lib.sparse import kernels
from lib.sparse import linear as sparse_linear
from lib.sparse.linear import ALWAYS_DECODE_TOKENS, SparseLinear

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 6, 64, 48, 2


def experts_module(layout: str):
    if layout == "qwen3_moe":
        config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                                num_experts_per_tok=TOP_K)
        module = Qwen3MoeExperts(config)
    else:
        config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                              num_experts_per_tok=TOP_K)
        module = GptOssExperts(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            if not name.endswith("bias"):
                tensor[torch.rand(tensor.shape, generator=gen) < 0.7] = 0
    return module.eval()


def routing(tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    index = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), -1)
    return x, index, weights


def run(module, implementation, x, index, weights):
    module.config._experts_implementation_internal = implementation
    with torch.inference_mode():
        return module(x, index, weights)


@pytest.fixture(params=["qwen3_moe", "gpt_oss"])
def pair(request):
    dense = experts_module(request.param)
    packed = copy.deepcopy(dense)
    sparse_experts.pack(packed)
    sparse_experts.register()
    return dense, packed


@pytest.fixture(params=kernels.ISA_NAMES)
def isa(request):
    if request.param not in kernels.supported_isas():
        pytest.skip(f"{request.param} not available on this machine")
    previous = kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(previous)


@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
def test_packed_experts_equal_transformers_forward(pair, isa, tokens):
    dense, packed = pair
    x, index, weights = routing(tokens, seed=tokens)
    expected = run(dense, "eager", x, index, weights)
    got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.fixture
def counting(monkeypatch):
    """Records each SparseLinear run on its own (its token count) and each grouped kernel call (its counts)."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    calls = {"alone": [], "grouped": []}
    original_forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: calls["alone"].append(x.shape[0]) or
                        original_forward(self, x))
    kern = kernels.get()

    class Counting:  # the extension module's functions cannot be patched one by one
        def __getattr__(self, name):
            return getattr(kern, name)

        def grouped_decode_into(self, x, y, starts, counts, *rest):
            calls["grouped"].append(list(counts))
            return kern.grouped_decode_into(x, y, starts, counts, *rest)

    monkeypatch.setattr(kernels, "get", lambda: Counting())
    sparse_linear.clear_choices()
    yield calls
    sparse_linear.clear_choices()


def test_decode_runs_every_expert_in_one_kernel_call(pair, counting):
    dense, packed = pair
    x, index, weights = routing(1, seed=3)
    got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
    assert counting["alone"] == [] and counting["grouped"] == [[1] * TOP_K, [1] * TOP_K]
    assert torch.allclose(got, run(dense, "eager", x, index, weights), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["auto", "sparse", "dense"])
def test_experts_with_more_tokens_join_the_grouped_call_where_their_own_path_is_the_decode_kernel(
        pair, counting, policy):
    """12 tokens: some experts get more than ALWAYS_DECODE_TOKENS. They join the grouped call only where their own
    SparseLinear would take the decode kernel: always under ATP_SPARSE_PATH=sparse (up to 16 tokens), never under
    dense, and under auto once measured (the first call runs them alone, which measures)."""
    dense, packed = pair
    x, index, weights = routing(12, seed=4)
    per_expert = [c for c in torch.bincount(index.reshape(-1), minlength=EXPERTS).tolist() if c]
    large = [c for c in per_expert if c > ALWAYS_DECODE_TOKENS]
    assert large and len(large) < len(per_expert)  # this routing has both kinds
    expected = run(dense, "eager", x, index, weights)
    previous = sparse_linear.set_policy(policy)
    try:
        got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
        if policy == "sparse":
            assert counting["alone"] == [] and counting["grouped"] == [per_expert, per_expert]
        else:  # dense: never grouped; auto: not measured yet, so they run alone (and are measured)
            assert sorted(counting["alone"]) == sorted(large * 2)
            small = [c for c in per_expert if c <= ALWAYS_DECODE_TOKENS]
            assert counting["grouped"] == [small, small]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        if policy == "auto":  # again: each projection's large experts follow the path measured for its shape
            measured = {(c["out_features"], c["in_features"], c["tokens_up_to"]): c["path"]
                        for c in sparse_linear.choices()}
            counting["alone"].clear(), counting["grouped"].clear()
            got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
            for projection, call in zip(sparse_experts.projections(packed), counting["grouped"]):
                linear = getattr(packed, projection)[0]
                shape = (linear.out_features, linear.in_features)
                assert call == [c for c in per_expert if c <= ALWAYS_DECODE_TOKENS or
                                measured[(*shape, sparse_linear.token_bucket(c))] == "decode"]
            assert len(counting["grouped"]) == 2
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    finally:
        sparse_linear.set_policy(previous)


@pytest.mark.parametrize("policy", ["auto", "sparse"])
def test_bf16_experts_equal_transformers_forward_up_to_rounding(policy):
    """bf16 weights and inputs, GPT-OSS's biases: grouped experts (fp32 sums, bias in fp32) and experts run on their
    own (bf16 out) written into one bf16 output, against transformers' bf16 forward."""
    dense = experts_module("gpt_oss").to(torch.bfloat16)
    packed = copy.deepcopy(dense)
    sparse_experts.pack(packed)
    sparse_experts.register()
    x, index, weights = routing(12, seed=4)
    x, weights = x.to(torch.bfloat16), weights.to(torch.bfloat16)
    previous = sparse_linear.set_policy(policy)
    try:
        for _ in range(2):  # the second call after measuring
            got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
            expected = run(dense, "eager", x, index, weights)
            assert got.dtype == torch.bfloat16
            assert (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
    finally:
        sparse_linear.set_policy(previous)
        sparse_linear.clear_choices()


def test_a_token_routed_nowhere_gets_zeros(pair):
    """Expert parallelism marks experts of other ranks with an index past the last expert: they add nothing."""
    dense, packed = pair
    x, index, weights = routing(3, seed=5)
    index[1] = EXPERTS  # token 1 routed to experts this rank does not hold
    got = run(packed, sparse_experts.IMPLEMENTATION, x, index, weights)
    assert torch.equal(got[1], torch.zeros(HIDDEN))
    keep = [0, 2]
    expected = run(dense, "eager", x[keep], index[keep], weights[keep])
    assert torch.allclose(got[keep], expected, atol=1e-5, rtol=1e-4)
