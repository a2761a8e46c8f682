"""SparseLinear against the dense matmul of the same pruned weight: kernel paths and the pure-PyTorch fallback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib.sparse import format as fmt
from lib.sparse import kernels
from lib.sparse import linear as sparse_linear
from lib.sparse.linear import SparseLinear

REPO = Path(__file__).resolve().parents[2]
# fp32: the kernel sums in another order than the dense GEMM; bf16/fp16: one output rounding (8/11-bit mantissa)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def pruned_weight(rows, cols, sparsity, dtype, seed=0, empty_rows=(), dense_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    for r in empty_rows:
        w[r] = 0
    for r in dense_rows:
        w[r] = torch.randn(cols, generator=g).abs() + 0.1
    return w.to(dtype)


def check(w, bias, x, dtype, **kw):
    module = SparseLinear(w.shape[1], w.shape[0], **fmt.pack(w), bias=bias)
    y = module(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    scale = max(1.0, ref.abs().max().item())
    assert (y.float() - ref).abs().max().item() <= TOL[dtype] * scale


SHAPES = [(37, 53), (64, 64), (5, 130), (70, 1)]
TOKENS = [(1,), (3,), (2, 9), (4, 25), (3, 70)]  # decode, few tokens, 3-D batches (tiled kernel)


@pytest.fixture(autouse=True, params=["tiled", "dense-above-8"])
def large_batch_policy(request, monkeypatch):
    """Every test runs twice: batches on the tiled kernel, and with the dense workspace fallback above 8 tokens."""
    if request.param == "dense-above-8":
        monkeypatch.setattr(sparse_linear, "DENSE_ABOVE_TOKENS", {d: 8 for d in fmt.SUPPORTED_DTYPES})
    return request.param


@pytest.fixture(params=["kernel", "fallback"])
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "get", lambda: None)
    elif kernels.get() is None:
        pytest.skip("no C++ kernel on this machine")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense(path, dtype, shape):
    torch.manual_seed(1)
    w = pruned_weight(*shape, 0.7, dtype, empty_rows=(0,), dense_rows=(shape[0] - 1,))
    for with_bias in (False, True):
        bias = torch.randn(shape[0]).to(dtype) if with_bias else None
        for lead in TOKENS:
            check(w, bias, torch.randn(*lead, shape[1]).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 1.0, 0.5])
def test_all_zero_fully_dense_and_half(path, dtype, sparsity):
    w = pruned_weight(37, 53, sparsity, dtype)
    for lead in TOKENS:
        check(w, torch.randn(37).to(dtype), torch.randn(*lead, 53).to(dtype), dtype)


def test_two_four_pattern(path):
    from lib.pruning.masks import n_m_mask
    w = torch.randn(16, 64)
    w[n_m_mask(w.abs(), 2, 4)] = 0
    check(w, None, torch.randn(2, 5, 64), torch.float32)


def test_paths_agree_with_each_other(monkeypatch):
    """The tiled and dense-fallback thresholds do not change the result beyond rounding."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    w = pruned_weight(40, 100, 0.6, torch.float32)
    module = SparseLinear(100, 40, **fmt.pack(w))
    x = torch.randn(30, 100)
    outs = []
    for spmv_max, dense_above in ((64, 64), (4, 64), (4, 0)):
        monkeypatch.setattr(sparse_linear, "SPMV_MAX_TOKENS", spmv_max)
        monkeypatch.setattr(sparse_linear, "DENSE_ABOVE_TOKENS", {torch.float32: dense_above})
        outs.append(module(x))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-5)


def test_pack_roundtrip_and_bytes():
    w = pruned_weight(37, 53, 0.7, torch.bfloat16, empty_rows=(3,))
    p = fmt.pack(w)
    assert p["mask"].shape == (37, 1) and p["row_offsets"][-1] == int((w != 0).sum())
    assert torch.equal(fmt.unpack(p["mask"], p["values"], p["row_offsets"], 53), w)
    assert torch.equal(fmt.unpack_mask(p["mask"], 53), w != 0)
    if kernels.get() is not None:
        assert torch.equal(kernels.get().densify(p["mask"], p["values"], p["row_offsets"], 53), w)
    big = pruned_weight(256, 1024, 0.7, torch.float32)
    ratio = fmt.packed_nbytes(**fmt.pack(big)) / (big.numel() * 4)
    assert abs(ratio - fmt.bytes_per_weight(0.3, 4) / 4) < 0.01


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        fmt.pack(torch.zeros(3))
    with pytest.raises(ValueError):
        fmt.pack(torch.zeros(3, 3, dtype=torch.float64))


def test_failed_build_prints_one_line_and_falls_back(tmp_path):
    """A broken compiler: one clear line on stderr, the pure-PyTorch path, correct results, no crash."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from lib.sparse import format as fmt, kernels\n"
        "from lib.sparse.linear import SparseLinear\n"
        "w = torch.randn(7, 9); w[w.abs() < 0.8] = 0\n"
        "m = SparseLinear(9, 7, **fmt.pack(w)); x = torch.randn(2, 9)\n"
        "assert torch.allclose(m(x), F.linear(x, w), atol=1e-5)\n"
        "assert kernels.get() is None and kernels.reason()\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "CXX": str(tmp_path / "no-such-compiler"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    flagged = [line for line in lines if "atp sparse: C++ kernel unavailable" in line]
    assert len(flagged) == 1 and "pure-PyTorch" in flagged[0]


def test_disabled_by_env(monkeypatch, capsys):
    monkeypatch.setenv("ATP_SPARSE_KERNEL", "off")
    kernels.reset()
    try:
        assert kernels.get() is None
        assert kernels.get() is None
        err = capsys.readouterr().err
        assert err.count("atp sparse: C++ kernel unavailable") == 1
    finally:
        monkeypatch.delenv("ATP_SPARSE_KERNEL")
        kernels.reset()
