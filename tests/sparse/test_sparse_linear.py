"""SparseLinear against the dense matmul of the same pruned weight: every instruction set this machine runs
(AVX-512, AVX2, portable C++, pure PyTorch), every path (decode, tiled, dense), and the paths against each other."""
from __future__ import annotations

import os
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
# fp32: the kernels sum in another order than the dense GEMM; bf16/fp16: one output rounding (8/11-bit mantissa)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pruned_weight(rows, cols, sparsity, dtype, seed=0, empty_rows=(), dense_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    for r in empty_rows:
        w[r] = 0
    for r in dense_rows:
        w[r] = torch.randn(cols, generator=g).abs() + 0.1
    return w.to(dtype)


def check(w, bias, x, dtype):
    module = SparseLinear(w.shape[1], w.shape[0], **fmt.pack(w), bias=bias)
    y = module(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    scale = max(1.0, ref.abs().max().item())
    assert (y.float() - ref).abs().max().item() <= TOL[dtype] * scale
    return y


def isas():
    return kernels.supported_isas() if kernels.get() is not None else ["torch"]


@pytest.fixture(params=["avx512", "avx512-novbmi2", "avx2", "cpp", "torch"])
def isa(request):
    """Every test runs on each instruction set this machine has (the others are skipped, not faked); AVX-512 also
    as on a CPU without VBMI2 (Skylake-SP, Cascade Lake: bf16/fp16 values then take AVX2)."""
    name = request.param.split("-")[0]
    if name not in isas():
        pytest.skip(f"{name} not available on this machine")
    previous = kernels.set_isa(name)
    kern = kernels.get()
    vbmi2 = kernels.set_vbmi2(request.param != "avx512-novbmi2") if kern is not None else None
    sparse_linear.clear_choices()  # paths measured with VBMI2 (e.g. AMX) are keyed by the same instruction set
    try:
        yield name
    finally:
        kernels.set_isa(previous)
        if vbmi2 is not None:
            kernels.set_vbmi2(vbmi2)
        sparse_linear.clear_choices()


@pytest.fixture(params=["sparse", "dense"])
def policy(request):
    """The kernels at every token count, or unpack + dense GEMM above 4 tokens (no measuring: no timing in tests)."""
    previous = sparse_linear.set_policy(request.param)
    yield request.param
    sparse_linear.set_policy(previous)


SHAPES = [(37, 53), (5, 130), (70, 1), (64, 64), (40, 1100)]
# decode (1-4 tokens, and 5-16 on the decode kernel), 3-D batches, the tiled kernel with one and several groups
TOKENS = [(1,), (3,), (2, 3), (4, 3), (2, 9), (3, 13), (130,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense(isa, policy, dtype, shape):
    torch.manual_seed(1)
    w = pruned_weight(*shape, 0.7, dtype, empty_rows=(0,), dense_rows=(shape[0] - 1,))
    for with_bias in (False, True):
        bias = torch.randn(shape[0]).to(dtype) if with_bias else None
        for lead in TOKENS:
            check(w, bias, torch.randn(*lead, shape[1]).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 1.0, 0.5])
def test_all_zero_fully_dense_and_half(isa, dtype, sparsity):
    w = pruned_weight(37, 53, sparsity, dtype)
    for lead in TOKENS:
        check(w, torch.randn(37).to(dtype), torch.randn(*lead, 53).to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_mask_byte_pattern_places_its_values_exactly(isa, dtype):
    """The decode kernels expand each 8-column mask byte through a table (AVX2: a permute and a sign-based zeroing
    from one table row; AVX-512: expand-loads). A weight whose rows run through all 256 byte patterns, forwards
    and backwards, with small signed integer values and inputs, so every sum is exact in fp32 whatever its order:
    the decode (1 token: four rows at a time; 2-4 tokens: one row at a time) and the unpacking equal the dense
    result bit for bit."""
    patterns = torch.cat([torch.arange(256), torch.arange(255, -1, -1)]).view(16, 32)  # 16 rows x 32 bytes
    bits = (patterns.unsqueeze(-1) >> torch.arange(8)) & 1  # column 8 * byte + i is set where bit i of the byte is
    g = torch.Generator().manual_seed(5)
    magnitudes = torch.randint(1, 9, (16, 256), generator=g).float()
    signs = torch.where(torch.rand(16, 256, generator=g) < 0.5, -1.0, 1.0)
    w = (bits.reshape(16, 256).float() * magnitudes * signs).to(dtype)
    module = SparseLinear(256, 16, **fmt.pack(w))
    assert torch.equal(module.dense_weight(), w)
    for tokens in (1, 2, 3, 4):
        x = torch.randint(-4, 5, (tokens, 256), generator=g).float()
        expected = F.linear(x, w.float())
        if isa == "torch" and dtype != torch.float32:  # no kernel: the GEMM in the weight's dtype, rounded
            assert torch.allclose(module(x), expected, rtol=TOL[dtype], atol=0)
        else:
            assert torch.equal(module(x), expected)


@pytest.fixture(params=kernels.EXPAND_WAYS)
def avx2_way(request):
    """The AVX2 kernel with each way of expanding fp32 and bf16 values in the batch-1 decode (kernels.py measures
    which is faster on this CPU; both must be right wherever they run)."""
    if kernels.get() is None or "avx2" not in kernels.supported_isas():
        pytest.skip("needs the AVX2 kernel")
    previous_isa = kernels.set_isa("avx2")
    previous = {name: entry["way"] for name, entry in kernels.avx2_expand().items()}
    kernels.set_avx2_expand(request.param)
    try:
        yield request.param
    finally:
        for name, way in previous.items():
            kernels.set_avx2_expand(way, name)
        kernels.set_isa(previous_isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_expansion_ways_place_every_mask_byte_exactly(avx2_way, dtype):
    """Both ways of the AVX2 batch-1 decode (one 256-bit permute; two 128-bit shuffles, the high half's values
    read from after the low half's) on rows that run through all 256 byte patterns forwards and backwards, with
    exact small-integer sums: the dense result bit for bit. Rows 16 + 3: the last three go through the one-row
    loop."""
    patterns = torch.cat([torch.arange(256), torch.arange(255, -1, -1), torch.arange(96)]).view(19, 32)
    bits = (patterns.unsqueeze(-1) >> torch.arange(8)) & 1
    g = torch.Generator().manual_seed(7)
    magnitudes = torch.randint(1, 9, (19, 256), generator=g).float()
    signs = torch.where(torch.rand(19, 256, generator=g) < 0.5, -1.0, 1.0)
    w = (bits.reshape(19, 256).float() * magnitudes * signs).to(dtype)
    module = SparseLinear(256, 19, **fmt.pack(w))
    x = torch.randint(-4, 5, (1, 256), generator=g).float()
    assert torch.equal(module(x), F.linear(x, w.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(67, 333), (8, 64), (4, 7), (130, 1100)])
def test_avx2_expansion_ways_give_the_same_bits(dtype, shape):
    """The two ways add the same products in the same order per lane, so the decode's result does not depend on
    which one this CPU's measurement chose: equal bit for bit on random values (empty and full rows, a row length
    that is no multiple of 8 or 64), and within fp32 rounding of the dense result."""
    if kernels.get() is None or "avx2" not in kernels.supported_isas():
        pytest.skip("needs the AVX2 kernel")
    rows, cols = shape
    w = pruned_weight(rows, cols, 0.7, dtype, seed=11, empty_rows=(1,), dense_rows=(2,))
    module = SparseLinear(cols, rows, **fmt.pack(w), bias=torch.randn(rows).to(dtype))
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(3))
    previous_isa = kernels.set_isa("avx2")
    previous = {name: entry["way"] for name, entry in kernels.avx2_expand().items()}
    try:
        outs = {}
        for way in kernels.EXPAND_WAYS:
            kernels.set_avx2_expand(way, str(dtype).replace("torch.", ""))
            outs[way] = module(x)
    finally:
        for name, way in previous.items():
            kernels.set_avx2_expand(way, name)
        kernels.set_isa(previous_isa)
    assert torch.equal(outs["permute"], outs["halves"])
    ref = F.linear(x, w.float(), module.bias.float())
    assert (outs["halves"] - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("values_before", [0, 1, 3, 4, 5])
def test_avx2_halves_near_the_start_of_the_values(avx2_way, values_before):
    """fp32's high half reads the four values that end where its byte's end, so a row group with fewer than four
    values before it (the first of a matrix) takes the permute: matrices whose first rows hold 0-5 values, then
    ordinary rows, equal the dense result bit for bit (small integers: exact sums)."""
    g = torch.Generator().manual_seed(values_before)
    w = torch.randint(-4, 5, (12, 200), generator=g).float()
    w[torch.rand(12, 200, generator=g) < 0.7] = 0
    w[:4] = 0
    w[0, torch.randperm(200, generator=g)[:values_before]] = 3.0
    module = SparseLinear(200, 12, **fmt.pack(w))
    x = torch.randint(-4, 5, (1, 200), generator=g).float()
    assert int(module.row_offsets[4]) == values_before
    assert torch.equal(module(x), F.linear(x, w))


def test_avx2_expansion_measured_once_and_recorded():
    """Where the AVX2 kernel is in use the two ways were timed (finite seconds for each) and the faster kept
    unless within the margin; the kernel's description names the choice."""
    if kernels.get() is None or "avx2" not in kernels.supported_isas():
        pytest.skip("needs the AVX2 kernel")
    seconds = kernels.measure_expand(kernels.get(), "float32", rounds=1, calls=2)
    assert set(seconds) == set(kernels.EXPAND_WAYS) and all(0 < s < 1 for s in seconds.values())
    previous_isa = kernels.set_isa("avx2")
    try:
        record = kernels.avx2_expand()
        assert set(record) == set(kernels.EXPAND_DTYPES)
        for name, entry in record.items():
            assert entry["way"] in kernels.EXPAND_WAYS
            if entry["seconds"]:  # measured (not forced by ATP_SPARSE_AVX2_EXPAND)
                faster = entry["seconds"]["halves"] <= kernels.EXPAND_MARGIN * entry["seconds"]["permute"]
                assert entry["way"] == ("halves" if faster else "permute")
        assert "decode expand: fp32" in kernels.describe()
    finally:
        kernels.set_isa(previous_isa)


def test_avx2_expansion_forced_by_environment():
    """ATP_SPARSE_AVX2_EXPAND=permute|halves skips the measurement and uses that way for fp32 and bf16; an unknown
    value gives one line on stderr and the measurement."""
    if kernels.get() is None or "avx2" not in kernels.supported_isas():
        pytest.skip("needs the AVX2 kernel")
    code = "from lib.sparse import kernels\nprint(kernels.avx2_expand())\n"
    for way in kernels.EXPAND_WAYS:
        result = _run_python(code, ATP_SPARSE_ISA="avx2", ATP_SPARSE_AVX2_EXPAND=way)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
        assert result.stdout.count(f"'way': '{way}', 'seconds': {{}}") == 2
    result = _run_python(code, ATP_SPARSE_ISA="avx2", ATP_SPARSE_AVX2_EXPAND="sideways")
    assert result.returncode == 0 and "'permute':" in result.stdout
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_no_tokens(isa):
    w = pruned_weight(9, 70, 0.7, torch.float32)
    module = SparseLinear(70, 9, **fmt.pack(w))
    assert module(torch.randn(0, 70)).shape == (0, 9)
    assert module(torch.randn(2, 0, 70)).shape == (2, 0, 9)


def test_two_four_pattern(isa):
    from lib.pruning.masks import n_m_mask
    w = torch.randn(16, 64)
    w[n_m_mask(w.abs(), 2, 4)] = 0
    check(w, None, torch.randn(2, 5, 64), torch.float32)
    check(w, None, torch.randn(40, 64), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_instruction_sets_agree(dtype):
    """AVX-512, AVX2, portable C++ and the pure-PyTorch path give the same result on every kernel path: within
    fp32 rounding (they sum in different orders), and the densified weight bit for bit."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    w = pruned_weight(67, 333, 0.65, dtype, seed=3, empty_rows=(5,), dense_rows=(6,))
    module = SparseLinear(333, 67, **fmt.pack(w), bias=torch.randn(67).to(dtype))
    xs = [torch.randn(n, 333, generator=torch.Generator().manual_seed(n)).to(dtype) for n in (1, 4, 7, 16, 29, 150)]
    results = {}
    previous = kernels.isa()
    try:
        for name in isas():
            kernels.set_isa(name)
            with_policy = sparse_linear.set_policy("sparse")
            try:
                results[name] = [module(x).float() for x in xs]
            finally:
                sparse_linear.set_policy(with_policy)
            assert torch.equal(module.dense_weight(), w)
    finally:
        kernels.set_isa(previous)
    reference = results["torch"]
    for name, outs in results.items():
        for y, ref in zip(outs, reference):
            scale = max(1.0, ref.abs().max().item())
            assert (y - ref).abs().max().item() <= TOL[dtype] * scale, name


def test_avx512_without_vbmi2_runs_16bit_values_on_avx2_and_fp32_unchanged():
    """On a CPU with AVX-512 but no VBMI2 the AVX-512 kernels still run fp32 values (their expand-loads are
    AVX-512 F), while bf16/fp16 values, whose 16-bit expand-loads need VBMI2, take the AVX2 kernels bit for bit
    (and the AMX path, which needs them too, is off)."""
    kern = kernels.get()
    if kern is None or "avx512" not in kernels.supported_isas():
        pytest.skip("needs the AVX-512 kernel")
    avx512, avx2 = kernels.ISA_CODES["avx512"], kernels.ISA_CODES["avx2"]
    x = torch.randn(40, 333, generator=torch.Generator().manual_seed(1))

    def run(dtype, code):
        p = fmt.pack(pruned_weight(67, 333, 0.65, dtype, seed=4, empty_rows=(5,), dense_rows=(6,)))
        pad = torch.cat([x, torch.zeros(40, p["mask"].shape[1] * 64 - 333)], 1)
        return [kern.spmv(p["mask"], p["values"], p["row_offsets"], pad[:3].contiguous(), code),
                kern.spmm(p["mask"], p["values"], p["row_offsets"], x, code),
                kern.densify(p["mask"], p["values"], p["row_offsets"], 333, code)]

    with_vbmi2 = {dt: run(dt, avx512) for dt in DTYPES}
    on_avx2 = {dt: run(dt, avx2) for dt in DTYPES}
    before = kernels.set_vbmi2(False)
    try:
        assert not kern.has_vbmi2() and not kern.has_amx()
        without = {dt: run(dt, avx512) for dt in DTYPES}
    finally:
        kernels.set_vbmi2(before)
    for a, b in zip(without[torch.float32], with_vbmi2[torch.float32]):
        assert torch.equal(a, b)
    for dt in (torch.bfloat16, torch.float16):
        if kern.has_vbmi2():  # the two kernels sum in different orders: the routing is visible in the bits
            assert not all(torch.equal(a, b) for a, b in zip(with_vbmi2[dt][:2], on_avx2[dt][:2]))
        for a, b in zip(without[dt], on_avx2[dt]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("ntok", [1, 2, 3, 4, 5, 9])
def test_bf16_decode_reads_its_inputs_as_pairs_to_fp32_accuracy(ntok):
    """bf16 values on AVX-512 decode 32 columns per expand-load against inputs laid out as even/odd pairs: exact
    products and fp32 sums, so within fp32 rounding of a float64 reference (the AVX2 kernel too), for a matrix whose
    last rows are not a group of four, an empty and a dense row, padding columns, and 1-9 tokens; and the grouped
    decode (experts) gives each matrix's rows exactly what a call of its own gives."""
    kern = kernels.get()
    if kern is None or "avx512" not in kernels.supported_isas() or not kern.has_vbmi2():
        pytest.skip("needs the AVX-512 kernel with VBMI2")
    g = torch.Generator().manual_seed(ntok)
    weights = [pruned_weight(67, 333, 0.65, torch.bfloat16, seed=s, empty_rows=(5,), dense_rows=(6,)) for s in (1, 2)]
    packed = [fmt.pack(w) for w in weights]
    x = torch.randn(2 * ntok, 333, generator=g)
    pad = torch.cat([x, torch.zeros(2 * ntok, packed[0]["mask"].shape[1] * 64 - 333)], 1)
    alone = []
    for w, p, rows in zip(weights, packed, (slice(0, ntok), slice(ntok, 2 * ntok))):
        ref = x[rows].double() @ w.double().T
        for isa in ("avx512", "avx2"):
            y = kern.spmv(p["mask"], p["values"], p["row_offsets"], pad[rows].contiguous(), kernels.ISA_CODES[isa])
            assert (y.double() - ref).abs().max().item() <= 1e-6 * ref.abs().max().item(), isa
        alone.append(kern.spmv(p["mask"], p["values"], p["row_offsets"], pad[rows].contiguous(),
                               kernels.ISA_CODES["avx512"]))
    y = torch.full((2 * ntok, 67), float("nan"))
    kern.grouped_decode_into(x, y, [0, ntok], [ntok, ntok], [p["mask"] for p in packed],
                             [p["values"] for p in packed], [p["row_offsets"] for p in packed], 333,
                             kernels.ISA_CODES["avx512"])
    assert torch.equal(y, torch.cat(alone))


def _with_and_without_bf16_dot(run):
    """run() with the dot products, then again with them switched off."""
    on = run()
    before = kernels.set_bf16_dot(False)
    try:
        off = run()
    finally:
        kernels.set_bf16_dot(before)
    return on, off


def _needs_bf16_dot():
    kern = kernels.get()
    if kern is None or kernels.isa() != "avx512" or not kernels.has_bf16_dot():
        pytest.skip("needs the AVX-512 kernel on a CPU with AVX512_BF16 and VBMI2")
    return kern


# (rows, cols, tokens): the fp32 kernel's work items (short: one group of few tokens on a wide weight; tall: a narrow
# weight; standard, halved for the dot kernel) with an odd width, padding columns, groups of 1-8 chunks of 32 tokens
# with padding tokens (300 and 520: full groups of 256 and a short one), several column blocks and a short last one
# (2100); 2100 rows (up to 4 threads): the dot kernel's 128-row items, a short last one
BF16_DOT_CASES = [(67, 333, 1), (67, 333, 17), (300, 1000, 130), (150, 576, 300), (64, 4100, 40), (40, 64, 16),
                  (2100, 200, 140), (150, 1000, 90), (2100, 2100, 128), (150, 1000, 170), (67, 333, 200),
                  (67, 333, 520)]


@pytest.mark.parametrize("rows,cols,ntok", BF16_DOT_CASES)
def test_bf16_dot_tiled_kernel_sums_exact_products_in_fp32(rows, cols, ntok):
    """On AVX512_BF16 the tiled kernel for bf16 weights and bf16 inputs multiplies each two consecutive nonzeros of a
    row together on the dot products: bf16 x bf16 products are exact in fp32, so the result lies within fp32
    rounding of a float64 reference, as the fp32 tiled kernel's does (which it replaces: the bits differ, the sums
    run in another order); an empty and a dense row, and rows with an odd count of nonzeros in a block, included."""
    kern = _needs_bf16_dot()
    w = pruned_weight(rows, cols, 0.7, torch.bfloat16, seed=cols, empty_rows=(1,), dense_rows=(2,))
    p = fmt.pack(w)
    x = torch.randn(ntok, cols, generator=torch.Generator().manual_seed(ntok)).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    dot, fp32 = _with_and_without_bf16_dot(
        lambda: kern.spmm(p["mask"], p["values"], p["row_offsets"], x, kernels.ISA_CODES["avx512"]))
    bound = 1e-6 * max(1.0, ref.abs().max().item())
    assert dot.dtype == torch.float32 and dot.shape == (ntok, rows)
    assert (dot.double() - ref).abs().max().item() <= bound
    assert (fp32.double() - ref).abs().max().item() <= bound
    assert not torch.equal(dot, fp32)
    assert torch.equal(dot[:, 1], torch.zeros(ntok))


@pytest.mark.parametrize("rows,cols,ntok", [(67, 333, 17), (300, 1000, 300), (2100, 200, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_tiled_kernel_writes_bf16_as_torch_rounds_its_fp32_result(rows, cols, ntok, with_bias):
    """bf16 inputs on the tiled path come out of the kernel as bf16, the bias added in fp32 first: bit for bit what
    the fp32 result plus the bias, rounded by torch, gives (rows not a multiple of 16, tokens not of 32 included)."""
    kern = _needs_bf16_dot()
    w = pruned_weight(rows, cols, 0.7, torch.bfloat16, seed=rows)
    p = fmt.pack(w)
    gen = torch.Generator().manual_seed(ntok)
    x = torch.randn(2, ntok, cols, generator=gen).to(torch.bfloat16)
    bias = torch.randn(rows, generator=gen).to(torch.bfloat16) if with_bias else None
    out = kern.linear(x, p["mask"], p["values"], p["row_offsets"], bias, cols, 1, kernels.ISA_CODES["avx512"])
    fp32 = kern.spmm(p["mask"], p["values"], p["row_offsets"], x.reshape(-1, cols), kernels.ISA_CODES["avx512"])
    if with_bias:
        fp32 = fp32 + bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (2, ntok, rows)
    assert torch.equal(out.reshape(-1, rows), fp32.to(torch.bfloat16))


def _passes_give_the_same_bits(run, x, cuts):
    """run(x) against run on the tokens between each two cuts, alone (each under the one-buffer limit)."""
    whole = run(x)
    alone = torch.cat([run(x[a:b].contiguous()) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, alone)
    return whole


# 40 x 8200 (8256 padded columns) at 1900 tokens: the laid-out inputs pass the tiled kernels' one-buffer limit
# (TILED_INPUTS_MAX_BYTES, 32 MiB: bf16 column-major 31.7 MB for 8 groups of 256 tokens, 34 MB; fp32 62.7 MB), so
# they go in passes of whole groups (bf16: 768 tokens, fp32: 384 on AVX-512, 448 on AVX2)
PASSES_SHAPE = (40, 8200, 1900)


def test_bf16_tiled_kernel_takes_inputs_past_one_buffer_in_passes_with_the_same_bits():
    """The packed-pairs kernel in passes: the same bits as each group-aligned part of the tokens alone, for the fp32
    result and for bf16 out with a bias, and within fp32 rounding of a float64 reference."""
    kern = _needs_bf16_dot()
    rows, cols, ntok = PASSES_SHAPE
    w = pruned_weight(rows, cols, 0.7, torch.bfloat16, seed=5, empty_rows=(1,), dense_rows=(2,))
    p = fmt.pack(w)
    x = torch.randn(ntok, cols, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(7))
    avx512, cuts = kernels.ISA_CODES["avx512"], (0, 768, 1536, ntok)  # multiples of 256 tokens
    y = _passes_give_the_same_bits(lambda t: kern.spmm(p["mask"], p["values"], p["row_offsets"], t, avx512), x, cuts)
    _passes_give_the_same_bits(lambda t: kern.linear(t, p["mask"], p["values"], p["row_offsets"], bias, cols,
                                                     sparse_linear._PATH_CODES["tiled"], avx512), x, cuts)
    assert (y.double() - x.double() @ w.double().T).abs().max().item() <= \
        1e-5 * (x.double().abs() @ w.double().abs().T).max().item()


def test_fp32_tiled_kernel_takes_inputs_past_one_buffer_in_passes_with_the_same_bits(isa):
    """The fp32 tiled kernel (and bf16 inputs read as fp32) in passes: the same bits as each group-aligned part of
    the tokens alone, on every instruction set."""
    if isa == "torch":
        pytest.skip("no C++ kernel: no tiled kernel")
    kern = kernels.get()
    rows, cols, ntok = PASSES_SHAPE
    w = pruned_weight(rows, cols, 0.7, torch.float32, seed=5, empty_rows=(1,), dense_rows=(2,))
    p = fmt.pack(w)
    x = torch.randn(ntok, cols, generator=torch.Generator().manual_seed(6))
    code, cuts = kernels.ISA_CODES[isa], (0, 896, 1792, ntok)  # multiples of 128 tokens
    y = _passes_give_the_same_bits(lambda t: kern.spmm(p["mask"], p["values"], p["row_offsets"], t, code), x, cuts)
    assert (y.double() - x.double() @ w.double().T).abs().max().item() <= \
        1e-5 * (x.double().abs() @ w.double().abs().T).max().item()
    xb = x.to(torch.bfloat16)  # against fp32 values: widened to fp32, pass by pass
    _passes_give_the_same_bits(lambda t: kern.spmm(p["mask"], p["values"], p["row_offsets"], t, code), xb, cuts)


def test_bf16_tiled_kernel_refuses_a_bias_of_the_wrong_length():
    """The bf16 path adds the bias inside the kernel: one of the wrong length is a clear error, not a read past it."""
    kern = _needs_bf16_dot()
    w = pruned_weight(40, 64, 0.7, torch.bfloat16)
    p = fmt.pack(w)
    x = torch.randn(20, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bias: one per row"):
        kern.linear(x, p["mask"], p["values"], p["row_offsets"], torch.zeros(39, dtype=torch.bfloat16), 64, 1,
                    kernels.ISA_CODES["avx512"])


# (rows, cols, tokens): 5-7 tokens in one pass; from 8 the column-blocked decode: rows three at a time (67: a last
# lone row; 200: items of 48 rows, the last of 8), an odd width and padding columns, two column blocks and a
# short one (2100 columns), groups of 8 tokens with padding tokens (13, 35), passes of 128 tokens (130, 300)
DOT_DECODE_CASES = [(67, 333, 4), (67, 333, 5), (67, 333, 7), (67, 333, 8), (67, 333, 9), (67, 333, 13),
                    (67, 333, 16), (200, 2100, 17), (67, 333, 35), (50, 2100, 64), (49, 130, 130), (7, 1100, 300)]


@pytest.mark.parametrize("rows,cols,ntok", DOT_DECODE_CASES)
def test_bf16_dot_decode_sums_exact_products_in_fp32(rows, cols, ntok):
    """From 5 tokens, bf16 inputs against bf16 weights decode on the dot products: within fp32 rounding of a float64
    reference like the fp32 decode, and another route (the bits differ) except at 4 tokens and below, which keep
    the fp32 decode; an empty and a dense row."""
    kern = _needs_bf16_dot()
    w = pruned_weight(rows, cols, 0.7, torch.bfloat16, seed=ntok, empty_rows=(1,), dense_rows=(2,))
    p = fmt.pack(w)
    x = torch.randn(ntok, cols, generator=torch.Generator().manual_seed(ntok)).to(torch.bfloat16)
    ref = x.double() @ w.double().T
    dot, fp32 = _with_and_without_bf16_dot(
        lambda: kern.spmv(p["mask"], p["values"], p["row_offsets"], x, kernels.ISA_CODES["avx512"]))
    bound = 1e-6 * max(1.0, ref.abs().max().item())
    assert dot.dtype == torch.float32 and dot.shape == (ntok, rows)
    assert (dot.double() - ref).abs().max().item() <= bound
    assert (fp32.double() - ref).abs().max().item() <= bound
    assert torch.equal(dot, fp32) == (ntok <= 4)
    assert torch.equal(dot[:, 1], torch.zeros(ntok))


def test_16bit_kernels_read_no_value_past_the_end():
    """The 16-bit kernels load 32 packed values at a time except within 32 of the end of the values, where a masked
    load reads only those that exist: values cut to exactly their count (no padding) and ending where a page that
    may not be read begins give the same results as the padded ones, in the dot products' decode (6 and 24 tokens)
    and tiled kernel and in the unpacking (the last row is dense, so its every load meets the end). In a child
    process: a read past the end is a crash there."""
    _needs_bf16_dot()
    code = """
import ctypes, mmap, torch
from lib.sparse import format as fmt, kernels
kern, avx512 = kernels.get(), kernels.ISA_CODES["avx512"]
g = torch.Generator().manual_seed(3)
w = torch.randn(20, 300, generator=g) * (torch.rand(20, 300, generator=g) > 0.7)
w[19] = torch.randn(300, generator=g)  # dense
w = w.to(torch.bfloat16)
p = fmt.pack(w)
nnz = int(p["row_offsets"][-1])
pages = (nnz * 2 + 4095) // 4096
area = mmap.mmap(-1, (pages + 1) * 4096)
start = ctypes.addressof(ctypes.c_char.from_buffer(area))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
assert libc.mprotect(start + pages * 4096, 4096, 0) == 0  # the page after the values: no access
values = torch.frombuffer(area, dtype=torch.bfloat16, count=pages * 2048)[pages * 2048 - nnz:]
values.copy_(p["values"][:nnz])
for n in (6, 24):
    x = torch.randn(n, 300, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    for call in (kern.spmv, kern.spmm):
        assert torch.equal(call(p["mask"], values, p["row_offsets"], x, avx512),
                           call(p["mask"], p["values"], p["row_offsets"], x, avx512))
assert torch.equal(kern.densify(p["mask"], values, p["row_offsets"], 300, avx512), w)
print("ok")
"""
    result = _run_python(code)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-2000:]


def test_bf16_dot_decode_is_a_candidate_up_to_512_tokens(monkeypatch):
    """bf16 weights and inputs on AVX512_BF16 without AMX: the decode (in column blocks) is measured against the
    other paths up to DOT_DECODE_MAX_TOKENS tokens; fp32, fp32 inputs and the dot products switched off keep
    DECODE_MAX_TOKENS."""
    _needs_bf16_dot()
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    previous_amx = kernels.set_amx(False)
    try:
        bf16 = (torch.bfloat16, torch.bfloat16)
        assert sparse_linear.decode_max_tokens(*bf16) == sparse_linear.DOT_DECODE_MAX_TOKENS == 512
        assert sparse_linear.candidate_paths(512, *bf16) == ("decode", "tiled", "dense")
        assert sparse_linear.candidate_paths(513, *bf16) == ("tiled", "dense")
        assert sparse_linear.decode_max_tokens(torch.bfloat16, torch.float32) == sparse_linear.DECODE_MAX_TOKENS
        assert sparse_linear.candidate_paths(17, torch.float32, torch.float32) == ("tiled", "dense")
        monkeypatch.setattr(sparse_linear, "_policy", "sparse")
        assert sparse_linear.candidate_paths(512, *bf16) == ("decode",)
        before = kernels.set_bf16_dot(False)
        try:
            assert sparse_linear.decode_max_tokens(*bf16) == sparse_linear.DECODE_MAX_TOKENS
        finally:
            kernels.set_bf16_dot(before)
    finally:
        kernels.set_amx(previous_amx)


def test_bf16_dot_only_for_bf16_inputs_and_not_when_switched_off():
    """fp32 inputs against bf16 weights keep the fp32 kernels (rounding them to bf16 would lose precision the
    caller asked for): bit for bit what the tiled kernel and the decode give with the dot products switched off.
    Switched off, kernels.describe() and has_bf16_dot() say so."""
    kern = _needs_bf16_dot()
    w = pruned_weight(64, 200, 0.7, torch.bfloat16, seed=7)
    p = fmt.pack(w)
    x = torch.randn(40, 200, generator=torch.Generator().manual_seed(3))
    pad = torch.cat([x, torch.zeros(40, p["mask"].shape[1] * 64 - 200)], 1)
    avx512 = kernels.ISA_CODES["avx512"]

    def run():
        said.append((kernels.has_bf16_dot(), "AVX512_BF16" in kernels.describe()))
        return [kern.spmm(p["mask"], p["values"], p["row_offsets"], x, avx512),
                kern.spmv(p["mask"], p["values"], p["row_offsets"], pad[:9].contiguous(), avx512)]

    said = []
    on, off = _with_and_without_bf16_dot(run)
    assert said == [(True, True), (False, False)]
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert kernels.has_bf16_dot() and "AVX512_BF16" in kernels.describe()


def test_bf16_dot_choices_are_measured_apart(monkeypatch):
    """A choice of path measured with the dot-product kernel is not reused without it, nor the other way round;
    both give the dense result."""
    _needs_bf16_dot()
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    previous_amx = kernels.set_amx(False)  # on AMX CPUs bf16 would take the AMX path instead of the tiled kernel
    sparse_linear.clear_choices()
    w = pruned_weight(64, 96, 0.7, torch.bfloat16)
    x = torch.randn(40, 96).to(torch.bfloat16)
    before = kernels.set_bf16_dot(False)
    try:
        check(w, None, x, torch.bfloat16)
        kernels.set_bf16_dot(True)
        check(w, None, x, torch.bfloat16)
        assert len(sparse_linear.choices()) == 2
    finally:
        kernels.set_bf16_dot(before)
        kernels.set_amx(previous_amx)
        sparse_linear.clear_choices()


def test_bf16_dot_switched_off_by_environment():
    """ATP_SPARSE_BF16_DOT=off keeps bf16 tiled calls on the fp32 multiply-adds from the start."""
    _needs_bf16_dot()
    code = ("from lib.sparse import kernels\n"
            "print(kernels.has_bf16_dot(), kernels.describe())\n")
    result = _run_python(code, ATP_SPARSE_BF16_DOT="off")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False" and "AVX512_BF16" not in result.stdout
    result = _run_python(code)
    assert result.returncode == 0 and result.stdout.split()[0] == "True"


def test_vbmi2_instructions_only_in_code_for_16bit_values_and_amx():
    """The AVX-512 region is compiled with VBMI2 allowed (for bf16/fp16 expand-loads), but a CPU without VBMI2 runs
    its fp32 code: in the built extension, every VBMI2 instruction sits in a function for 16-bit values or AMX."""
    import re
    import shutil

    kern = kernels.get()
    if kern is None or shutil.which("objdump") is None:
        pytest.skip("needs the built kernel and objdump")
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", kern.__file__], capture_output=True,
                             text=True, check=True).stdout
    function, using = "", set()
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif re.search(r"\s(vpexpand[bw]|vpcompress[bw]|vpshl[dv]|vpshr[dv])", line):
            using.add(function)
    if kernels.has_amx() or kern.has_vbmi2():
        assert using, "no VBMI2 instruction found at all: the pattern no longer matches objdump's output"
    assert all(re.search(r"BFloat16|Half|amx", f) for f in using), sorted(using)


def test_measured_choice_is_cached_and_correct(monkeypatch):
    """policy auto: the first call per (shape, dtype, token bucket) times the candidate paths and caches one; the
    result is right whichever wins, and later calls in the bucket reuse the choice without measuring."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    sparse_linear.clear_choices()
    w = pruned_weight(48, 200, 0.7, torch.float32)
    x = torch.randn(20, 200)
    try:
        check(w, None, x, torch.float32)
        (entry,) = sparse_linear.choices()
        assert entry["path"] in ("tiled", "dense") and entry["tokens_up_to"] == 32
        assert set(entry["seconds"]) == {"tiled", "dense"} and entry["isa"] == kernels.isa()
        if entry["path"] != "dense":  # the dense path's workspace was only measured: not kept
            assert torch.float32 not in sparse_linear._workspaces
        monkeypatch.setattr(SparseLinear, "_tune", lambda *a: pytest.fail("measured twice"))
        check(w, None, torch.randn(25, 200), torch.float32)  # same bucket (17-32 tokens)
        check(w, None, torch.randn(3, 200), torch.float32)   # decode: never measured
    finally:
        sparse_linear.clear_choices()
    assert sparse_linear.token_bucket(1) == 1 and sparse_linear.token_bucket(5) == 8
    assert sparse_linear.token_bucket(2048) == 2048 and sparse_linear.token_bucket(2049) == 4096


def test_measured_choices_are_kept_apart_by_density(monkeypatch):
    """Two Linears of one shape at 50% and 80% get a measured choice each (the kernels' time follows the nonzeros,
    the dense GEMM's does not); two within one density step share one."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    sparse_linear.clear_choices()
    modules = [SparseLinear.from_weight(pruned_weight(48, 200, level, torch.float32, seed=k))
               for k, level in enumerate((0.5, 0.8, 0.81))]
    x = torch.randn(20, 200)
    try:
        for module in modules:
            module(x)
        densities = sorted(entry["density"] for entry in sparse_linear.choices())
        assert densities == [0.2, 0.5]
        assert sparse_linear.density_bucket(0.19) == sparse_linear.density_bucket(0.2) != \
            sparse_linear.density_bucket(0.3)
    finally:
        sparse_linear.clear_choices()


def test_candidate_paths_are_remembered_until_the_policy_or_a_kernel_setting_changes(monkeypatch):
    """forward takes its candidate paths from _candidates, which asks candidate_paths once per key: the dtypes,
    where the token count falls against the limits, the policy, and kernels.SETTINGS_VERSION, which every switch
    of the instruction set, VBMI2, AMX or the dot products bumps. A switched setting is never answered from memory."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    asked = []
    original = sparse_linear.candidate_paths
    monkeypatch.setattr(sparse_linear, "candidate_paths", lambda *a: asked.append(a) or original(*a))
    sparse_linear._paths_memo.clear()
    f32 = (torch.float32, torch.float32)
    limit = sparse_linear.DECODE_MAX_TOKENS
    assert sparse_linear._candidates(limit - 3, *f32) == sparse_linear._candidates(limit, *f32) == \
        original(limit, *f32) and len(asked) == 1
    assert sparse_linear._candidates(limit + 1, *f32) == original(limit + 1, *f32) != original(limit, *f32)
    assert len(asked) == 2
    monkeypatch.setattr(sparse_linear, "_policy", "dense")
    assert sparse_linear._candidates(limit + 1, *f32) == ("dense",)
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    version = kernels.SETTINGS_VERSION
    kernels.set_amx(kernels.set_amx(False))  # off and back: the same setting, asked anew all the same
    assert kernels.SETTINGS_VERSION == version + 2
    asked.clear()
    assert sparse_linear._candidates(limit + 1, *f32) == original(limit + 1, *f32) and len(asked) == 1
    if kernels.has_bf16_dot():  # where the answer itself changes with a switch
        bf16 = (torch.bfloat16, torch.bfloat16)
        previous_amx = kernels.set_amx(False)
        try:
            assert "decode" in sparse_linear._candidates(64, *bf16)
            for switch_off in (kernels.set_bf16_dot, kernels.set_vbmi2):  # without VBMI2 no dot products either
                before = switch_off(False)
                try:
                    assert "decode" not in sparse_linear._candidates(64, *bf16)
                finally:
                    switch_off(before)
                assert "decode" in sparse_linear._candidates(64, *bf16)
        finally:
            kernels.set_amx(previous_amx)


def test_choice_key_density_follows_buffers_put_in_place_of_others():
    """The density in a measured choice's key is remembered per row_offsets tensor: buffers assigned from another
    Linear of the same shape (other nonzeros) give that Linear's density, not the first one's."""
    first = SparseLinear.from_weight(pruned_weight(48, 200, 0.5, torch.float32, seed=1))
    other = SparseLinear.from_weight(pruned_weight(48, 200, 0.8, torch.float32, seed=2))
    assert first._density_now() == first.density != other.density
    first.mask, first.values, first.row_offsets = other.mask, other.values, other.row_offsets
    assert first._density_now() == other.density == first.density


def test_path_for_says_which_path_forward_takes(monkeypatch):
    """path_for(n, dtype) is forward's path for n tokens: 'decode' up to ALWAYS_DECODE_TOKENS, the measured choice of
    n's bucket (None before it is measured, and for another thread count: another key), never 'decode' above
    DECODE_MAX_TOKENS; the policies' fixed paths; 'dense' without the C++ kernel."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    sparse_linear.clear_choices()
    module = SparseLinear(200, 48, **fmt.pack(pruned_weight(48, 200, 0.7, torch.float32)))
    threads = torch.get_num_threads()
    try:
        assert module.path_for(1, torch.float32) == module.path_for(4, torch.float32) == "decode"
        assert module.path_for(8, torch.float32) is None
        module(torch.randn(8, 200))
        (entry,) = sparse_linear.choices()
        assert entry["path"] in ("decode", "tiled", "dense")
        assert module.path_for(5, torch.float32) == module.path_for(8, torch.float32) == entry["path"]
        assert module.path_for(9, torch.float32) is None and module.path_for(8, torch.bfloat16) is None
        torch.set_num_threads(threads + 1)
        assert module.path_for(8, torch.float32) is None
        torch.set_num_threads(threads)
        monkeypatch.setattr(sparse_linear, "_policy", "sparse")
        assert module.path_for(16, torch.float32) == "decode" and module.path_for(17, torch.float32) == "tiled"
        monkeypatch.setattr(sparse_linear, "_policy", "dense")
        assert module.path_for(5, torch.float32) == "dense" and module.path_for(4, torch.float32) == "decode"
        monkeypatch.setattr(kernels, "get", lambda: None)
        assert module.path_for(1, torch.float32) == "dense"
    finally:
        torch.set_num_threads(threads)
        sparse_linear.clear_choices()


def test_amx_path_for_bf16_where_the_cpu_has_it(monkeypatch):
    """bf16 weights and inputs take the AMX kernel where it exists (instead of the tiled one); its result is checked
    against dense with the other paths in test_matches_dense."""
    monkeypatch.setattr(sparse_linear, "_policy", "sparse")
    amx = kernels.get() is not None and kernels.isa() == "avx512" and kernels.has_amx()
    assert sparse_linear.candidate_paths(600, torch.bfloat16, torch.bfloat16) == (("amx",) if amx else ("tiled",))
    assert sparse_linear.candidate_paths(40, torch.bfloat16, torch.float32) == ("tiled",)
    assert sparse_linear.candidate_paths(40, torch.float16, torch.float16) == ("tiled",)
    assert sparse_linear.candidate_paths(9, torch.bfloat16, torch.bfloat16) == ("decode",)
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    assert sparse_linear.candidate_paths(3) == ("decode",)
    assert sparse_linear.candidate_paths(9) == ("decode", "tiled", "dense")
    if amx:
        w = pruned_weight(100, 300, 0.7, torch.bfloat16)
        y = check(w, torch.randn(100).to(torch.bfloat16), torch.randn(3, 17, 300).to(torch.bfloat16), torch.bfloat16)
        assert y.is_contiguous()


def test_amx_switched_off_takes_the_tiled_kernel_and_measures_anew(monkeypatch):
    """kernels.set_amx(False) (ATP_SPARSE_AMX=off): bf16 calls take the tiled kernel as on a CPU without AMX, and a
    choice measured with the AMX path is not reused without it (nor the other way round)."""
    if not (kernels.get() is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AVX-512 kernel on a CPU with AMX")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    sparse_linear.clear_choices()
    w = pruned_weight(64, 96, 0.7, torch.bfloat16)
    x = torch.randn(600, 96).to(torch.bfloat16)  # above DOT_DECODE_MAX_TOKENS: no decode once AMX is off
    previous = kernels.set_amx(False)
    try:
        assert not kernels.has_amx()
        assert sparse_linear.candidate_paths(600, torch.bfloat16, torch.bfloat16) == ("tiled", "dense")
        check(w, None, x, torch.bfloat16)
        kernels.set_amx(True)
        assert sparse_linear.candidate_paths(600, torch.bfloat16, torch.bfloat16) == ("amx", "dense")
        check(w, None, x, torch.bfloat16)
        assert sorted(tuple(sorted(c["seconds"])) for c in sparse_linear.choices()) == [("amx", "dense"),
                                                                                      ("dense", "tiled")]
    finally:
        kernels.set_amx(previous)
        sparse_linear.clear_choices()


def test_amx_path_in_k_chunks_matches_whole_rows_and_dense(monkeypatch):
    """From AMX_CHUNK_TOKENS tokens a weight wider than one 2048-column chunk goes through the tile unit in K chunks
    (partial sums carried between chunks): 4500 columns make two 2048-column chunks and a 404-column one, 40 rows
    one 64-row block with 24 rows past the matrix, 261 tokens an odd lone token tile. Against dense and against the
    same weight with fewer tokens than that (whole rows, no chunks)."""
    if not (kernels.get() is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    few = kernels.get().AMX_CHUNK_TOKENS - 1
    monkeypatch.setattr(sparse_linear, "_policy", "sparse")
    w = pruned_weight(40, 4500, 0.7, torch.bfloat16, seed=5, empty_rows=(7,), dense_rows=(39,))
    bias = torch.randn(40).to(torch.bfloat16)
    x = torch.randn(261, 4500, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    chunked = check(w, bias, x, torch.bfloat16)
    whole = check(w, bias, x[:few], torch.bfloat16)
    assert torch.allclose(chunked[:few].float(), whole.float(), atol=0.05, rtol=0.02)


def test_amx_path_goes_in_token_slices_beyond_its_pass_size():
    """Above AMX_SLICE_TOKENS tokens the AMX path runs one slice of tokens after the other: each slice's rows are
    exactly what the slice alone gives, and the whole matches dense."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    slice_tokens = kern.AMX_SLICE_TOKENS
    w = pruned_weight(40, 300, 0.7, torch.bfloat16, seed=8)
    p = fmt.pack(w)
    x = torch.randn(slice_tokens + 77, 300, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)

    def amx(inputs):
        return kern.linear(inputs, p["mask"], p["values"], p["row_offsets"], None, 300, 2, kernels.ISA_CODE)

    y = amx(x.float())
    assert torch.equal(y[:slice_tokens], amx(x[:slice_tokens].float()))
    assert torch.equal(y[slice_tokens:], amx(x[slice_tokens:].float()))
    torch.testing.assert_close(y, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)


def test_amx_path_writes_each_output_dtype_as_torch_rounds_it():
    """The AMX path writes y straight from the tiles in x's dtype: bf16 and fp16 outputs are exactly the fp32 output
    rounded by torch (to nearest even; a NaN token stays NaN and leaves the others alone), fp32 matches dense. Odd
    sizes: 50 rows (a partial 16-row tile), 333 columns (a partial 32-column block), 37 tokens (a partial token
    tile)."""
    if not (kernels.get() is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    kern = kernels.get()
    w = pruned_weight(50, 333, 0.7, torch.bfloat16, seed=3, empty_rows=(4,))
    p = fmt.pack(w)
    bias = torch.randn(50, generator=torch.Generator().manual_seed(4))
    x = torch.randn(37, 333, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[5, 7] = float("nan")

    def amx(inputs):
        return kern.linear(inputs, p["mask"], p["values"], p["row_offsets"], bias, 333, 2, kernels.ISA_CODE)

    y32 = amx(x.float())
    assert y32.dtype == torch.float32 and y32.shape == (37, 50)
    assert torch.isnan(y32[5]).all() and not torch.isnan(y32[torch.arange(37) != 5]).any()
    ref = F.linear(x.float(), w.float(), bias)
    torch.testing.assert_close(y32, ref, rtol=1e-5, atol=1e-4, equal_nan=True)
    for dtype in (torch.bfloat16, torch.float16):
        y = amx(x.to(dtype))  # bf16 values are exact in fp16: the same inputs reach the tiles
        assert y.dtype == dtype
        torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rows,cols,tokens,tokens_as_a", [
    (1100, 576, 40, False),    # weights as A, whole rows; a lone last token tile (40 = 2 x 16 + 8)
    (1100, 4500, 261, False),  # weights as A in K chunks (2048 + 2048 + 404 columns), a lone last token tile
    (1100, 4500, 65, False),   # the same just past AMX_CHUNK_TOKENS, a lone partial last token tile
    (300, 576, 80, True),      # tokens as A, whole rows, x's rows read in place
    (300, 576, 77, True),      # the same with a partial last token tile (padded apart)
    (300, 4544, 261, False),   # in K chunks the weights stay A even with many tokens; 300 rows = 2 x 160
    (300, 4500, 1100, False),  # the same with 4500 columns (no whole 64-column block), 35 token tiles
    (200, 4096, 60, True),     # tokens as A, x copied: its rows 8 KiB apart would share one L1 set
    (200, 4096, 64, False),    # from AMX_CHUNK_TOKENS, 4096 columns go in two K chunks, weights as A
    (64, 2048, 50, True),      # x copied: its rows 4 KiB apart would share one L1 set
    (45, 333, 37, True),       # tokens as A, partial row tile, partial column block, partial token tile
])
def test_amx_both_operand_layouts_match_dense(rows, cols, tokens, tokens_as_a):
    """The AMX path puts the decoded weights or the tokens in the A tiles depending on the call's size; each layout,
    whole or in K chunks, with partial tiles everywhere, gives dense's result in fp32 and torch's rounding of it in
    bf16, bias included."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    assert kern.amx_tokens_as_a(tokens, rows, cols) == tokens_as_a
    w = pruned_weight(rows, cols, 0.7, torch.bfloat16, seed=rows + cols, empty_rows=(1,), dense_rows=(rows - 2,))
    p = fmt.pack(w)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(cols))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)

    def amx(inputs):
        return kern.linear(inputs, p["mask"], p["values"], p["row_offsets"], bias, cols, 2, kernels.ISA_CODE)

    y32 = amx(x.float())
    torch.testing.assert_close(y32, F.linear(x.float(), w.float(), bias), rtol=1e-5, atol=2e-4)
    assert torch.equal(amx(x), y32.to(torch.bfloat16))


def test_amx_scratch_kept_across_calls_never_leaks_a_previous_call():
    """The AMX path keeps its inputs-as-tiles and partial sums between calls: a smaller call after a larger one (the
    scratch holding the larger call's data past the smaller's end), then a larger one again, each equal to a call on
    a freshly released scratch and to dense; release_scratch frees it."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    g = torch.Generator().manual_seed(11)
    w = pruned_weight(70, 4500, 0.7, torch.bfloat16, seed=12)  # wider than a K chunk: partial sums at 300 tokens
    p = fmt.pack(w)

    def amx(inputs):
        return kern.linear(inputs, p["mask"], p["values"], p["row_offsets"], None, 4500, 2, kernels.ISA_CODE)

    calls = [torch.randn(n, 4500, generator=g).to(torch.bfloat16) * scale for n, scale in ((300, 1), (20, 3), (290, -2))]
    kern.release_scratch()
    fresh = []
    for x in calls:
        fresh.append(amx(x))
        assert kern.scratch_bytes() > 0 and sparse_linear.workspace_bytes() >= kern.scratch_bytes()
        kern.release_scratch()
        assert kern.scratch_bytes() == 0
    kept = [amx(x) for x in calls]
    for x, a, b in zip(calls, fresh, kept):
        assert torch.equal(a, b)
        torch.testing.assert_close(b.float(), F.linear(x.float(), w.float()), rtol=0.02, atol=0.1)


def test_amx_scratch_busy_in_another_thread_gives_the_same_results():
    """Two threads calling the AMX path at once: one holds the shared scratch, the other allocates its own; both
    get exactly what they get alone."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    import threading

    w = pruned_weight(300, 4200, 0.7, torch.bfloat16, seed=13)
    p = fmt.pack(w)
    xs = [torch.randn(260 + 7 * i, 4200, generator=torch.Generator().manual_seed(20 + i)).to(torch.bfloat16)
          for i in range(4)]

    def amx(inputs):
        return kern.linear(inputs, p["mask"], p["values"], p["row_offsets"], None, 4200, 2, kernels.ISA_CODE)

    alone = [amx(x) for x in xs]
    together: dict[int, list] = {0: [], 1: []}

    def worker(k):
        for _ in range(3):
            together[k].append([amx(x) for x in xs])

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for runs in together.values():
        assert len(runs) == 3
        for run in runs:
            for a, b in zip(alone, run):
                assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [31, 192, 576, 600, 1100])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_row_blocks_split_evenly_over_threads_and_cover_every_row(rows, threads):
    """The AMX path sizes its row blocks so each thread gets as many of one size (576 rows on 2 threads: 2 x 288,
    not 512 + 64; 1100 rows: 4 x 288): every row is computed once, at any thread count, as dense computes it."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    w = pruned_weight(rows, 576, 0.7, torch.bfloat16, seed=rows, empty_rows=(rows - 1,))
    p = fmt.pack(w)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kern.linear(x.float(), p["mask"], p["values"], p["row_offsets"], None, 576, 2, kernels.ISA_CODE)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,tokens", [(1100, 261), (600, 300)])  # 4-5 row blocks, a lone token tile or not
@pytest.mark.parametrize("threads", [2, 3])
def test_amx_k_chunk_partial_sums_never_shared_between_threads(rows, tokens, threads):
    """In K chunks every unit of 32 rows x 32 tokens keeps its partial sums in its own piece of the scratch while
    the threads run their row blocks side by side: at 2 and 3 threads (other row blocks, the same order of sums
    per output) the result is bit-identical to 1 thread's and matches dense."""
    kern = kernels.get()
    if not (kern is not None and kernels.isa() == "avx512" and kernels.has_amx()):
        pytest.skip("needs the AMX path")
    w = pruned_weight(rows, 4500, 0.7, torch.bfloat16, seed=rows + threads)
    p = fmt.pack(w)
    x = torch.randn(tokens, 4500, generator=torch.Generator().manual_seed(tokens)).float()

    def amx(n_threads):
        before = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            return kern.linear(x, p["mask"], p["values"], p["row_offsets"], None, 4500, 2, kernels.ISA_CODE)
        finally:
            torch.set_num_threads(before)

    one = amx(1)
    for _ in range(3):
        assert torch.equal(amx(threads), one)
    torch.testing.assert_close(one, F.linear(x.bfloat16().float(), w.float()), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("rows,cols,tokens,threads,item_rows", [
    # item rows with AVX-512 (token groups of 128) and with AVX2 (groups of 64)
    (192, 576, 300, 1, (192, 192)),   # 3 or 5 groups, the last partial; one tall item each
    (150, 576, 770, 3, (192, 192)),   # 7 or 13 groups for 3 threads, rows short of a whole item
    (192, 576, 100, 2, (64, 96)),     # 1 or 2 groups: one item per group would leave a thread idle
    (193, 576, 300, 1, (64, 96)),     # more rows than one tall item
    (150, 2100, 300, 1, (64, 96)),    # wider than 2048 columns
    (100, 2100, 60, 2, (48, 48)),     # one group of at most 96 tokens, wide: short items, the last partial
    (100, 2100, 90, 1, (48, 96)),     # 90 tokens: one AVX-512 group, two AVX2 groups
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vector_isa", ["avx512", "avx2"])
def test_tiled_kernel_work_items_match_dense(rows, cols, tokens, threads, item_rows, vector_isa, dtype):
    """The AVX-512 and AVX2 tiled kernels split a call into work items of 64 (AVX-512) or 96 (AVX2) rows per token
    group, except tall items (one per group, up to 192 rows) for weights of at most 2048 columns where every thread
    still gets two, and short items (48 rows) for a call of one group of at most 96 tokens on a wider weight: each
    kind, with partial items and groups, as dense."""
    kern = kernels.get()
    if kern is None or vector_isa not in kernels.supported_isas():
        pytest.skip(f"needs the {vector_isa} kernel")
    previous = kernels.set_isa(vector_isa)
    try:
        assert kern.tiled_item_rows(tokens, rows, cols, threads, kernels.ISA_CODE) == item_rows[vector_isa == "avx2"]
        w = pruned_weight(rows, cols, 0.6, dtype, seed=rows + tokens, empty_rows=(1,), dense_rows=(rows - 1,))
        p = fmt.pack(w)
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(cols)).to(dtype)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = kern.linear(x, p["mask"], p["values"], p["row_offsets"], None, cols, 1, kernels.ISA_CODE)
        finally:
            torch.set_num_threads(before)
    finally:
        kernels.set_isa(previous)
    ref = F.linear(x.float(), w.float())
    assert (y.float() - ref).abs().max().item() <= TOL[dtype] * max(1.0, ref.abs().max().item())


def test_dense_workspace_is_shared_and_bounded(policy):
    """The dense path unpacks into one workspace per dtype (the largest Linear's size), never a copy per layer."""
    if kernels.get() is None or policy != "dense":
        pytest.skip("dense path of the kernel")
    sparse_linear.clear_workspaces()
    small = SparseLinear(30, 20, **fmt.pack(pruned_weight(20, 30, 0.7, torch.float32)))
    big = SparseLinear(100, 50, **fmt.pack(pruned_weight(50, 100, 0.7, torch.float32)))
    for module in (small, big, small):
        module(torch.randn(8, module.in_features))
    assert list(sparse_linear._workspaces) == [torch.float32]
    assert sparse_linear._workspaces[torch.float32].numel() == 50 * 100
    assert sparse_linear.workspace_bytes() == 50 * 100 * 4 + sparse_linear.scratch_bytes()
    sparse_linear.clear_workspaces()
    assert sparse_linear.workspace_bytes() == 0
    assert not any(k.startswith("_") or k == "weight" for k in dict(big.named_buffers()))


def test_pack_roundtrip_and_bytes():
    w = pruned_weight(37, 53, 0.7, torch.bfloat16, empty_rows=(3,))
    p = fmt.pack(w)
    assert p["mask"].shape == (37, 1) and p["row_offsets"][-1] == int((w != 0).sum())
    assert torch.equal(fmt.unpack(p["mask"], p["values"], p["row_offsets"], 53), w)
    assert torch.equal(fmt.unpack_mask(p["mask"], 53), w != 0)
    big = pruned_weight(256, 1024, 0.7, torch.float32)
    ratio = fmt.packed_nbytes(**fmt.pack(big)) / (big.numel() * 4)
    assert abs(ratio - fmt.bytes_per_weight(0.3, 4) / 4) < 0.01


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        fmt.pack(torch.zeros(3))
    with pytest.raises(ValueError):
        fmt.pack(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        sparse_linear.set_policy("fastest")
    if kernels.get() is not None:
        with pytest.raises(ValueError):
            kernels.set_isa("neon")


def _run_python(code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for key, value in env.items():
        if value is None:
            full_env.pop(key)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=180)


def test_isa_forced_by_environment():
    """ATP_SPARSE_ISA picks the kernel's instruction set (the way to run the AVX2 path on an AVX-512 machine); an
    unknown name or one the CPU lacks gives one line on stderr and the best available."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    code = ("from lib.sparse import kernels; import torch\n"
            "from lib.sparse.linear import SparseLinear; from lib.sparse import format as fmt\n"
            "w = torch.randn(8, 70); w[w.abs() < 1] = 0\n"
            "assert torch.allclose(SparseLinear(70, 8, **fmt.pack(w))(torch.ones(2, 70)), torch.ones(2, 70) @ w.T, "
            "atol=1e-4)\n"
            "print(kernels.isa(), kernels.describe())\n")
    best = kernels.supported_isas()[0]
    for forced in ("avx2",):  # the others are covered in-process by set_isa
        result = _run_python(code, ATP_SPARSE_ISA=forced)
        assert result.returncode == 0, result.stderr
        if forced in kernels.supported_isas():
            assert result.stdout.split()[0] == forced and not result.stderr.strip()
    result = _run_python(code, ATP_SPARSE_ISA="bogus")
    assert result.returncode == 0 and result.stdout.split()[0] == best
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    if best != "avx512":
        result = _run_python(code, ATP_SPARSE_ISA="avx512")
        assert result.returncode == 0 and result.stdout.split()[0] == best and "cannot run" in result.stderr


def test_cuda_build_of_torch_without_a_gpu_adds_nothing_to_stderr(tmp_path):
    """A CUDA build of torch on a machine with a CUDA toolkit and no GPU (torch 2.14 and 2.15 from PyPI on such a
    machine) warns 'No CUDA runtime is found' when torch.utils.cpp_extension is imported; loading the CPU kernels
    must not pass that on. The CUDA build is simulated on any torch; the plain import is the control (it warns
    on 2.6 and 2.13-2.15)."""
    simulate = ("import torch\n"
                "torch.cuda._is_compiled = lambda: True\n"
                "torch.version.cuda = '13.0'\n"
                "torch.cuda.is_available = lambda: False\n")
    env = {"CUDA_HOME": str(tmp_path), "ATP_SPARSE_KERNEL": "off"}  # the kernel's own lines stay out of this
    plain = _run_python(simulate + "import torch.utils.cpp_extension\n", **env)
    assert plain.returncode == 0, plain.stderr
    if "No CUDA runtime" not in plain.stderr:
        pytest.skip("this torch's cpp_extension does not warn about a missing CUDA runtime")
    ours = _run_python(simulate + "from lib.sparse import kernels\n"
                       "kernels._cpp_extension(); kernels._built_before()\n", **env)
    assert ours.returncode == 0 and not ours.stderr.strip(), ours.stderr



def test_an_edited_kernel_source_gets_a_build_of_its_own(tmp_path):
    """torch rebuilds an extension whose source changed in the same folder, so the 'building' line (said only when
    the folder holds no build) would stay silent through the minute a rebuild takes, and two checkouts at different
    versions would rebuild each other's. The name carries a digest of the source: same text, same name wherever
    it lies; one byte more, another name."""
    from lib.sparse import kernels
    source = Path(kernels._SOURCE).read_bytes()
    copy, edited = tmp_path / "copy.cpp", tmp_path / "edited.cpp"
    copy.write_bytes(source)
    edited.write_bytes(source + b"\n")
    assert kernels.kernel_name(str(copy)) == kernels.KERNEL_NAME
    assert kernels.kernel_name(str(edited)) != kernels.KERNEL_NAME
    assert kernels.KERNEL_NAME.startswith("atp_sparse_bitmask_v") and kernels.KERNEL_NAME.isidentifier()

def test_failed_build_prints_one_line_and_falls_back(tmp_path):
    """A broken compiler: one clear line on stderr, the pure-PyTorch path, correct results, no crash."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from lib.sparse import format as fmt, kernels\n"
        "from lib.sparse.linear import SparseLinear\n"
        "w = torch.randn(7, 9); w[w.abs() < 0.8] = 0\n"
        "m = SparseLinear(9, 7, **fmt.pack(w)); x = torch.randn(2, 9)\n"
        "assert torch.allclose(m(x), F.linear(x, w), atol=1e-5)\n"
        "assert kernels.get() is None and kernels.reason() and kernels.isa() == 'torch'\n"
        "print('ok')\n")
    result = _run_python(code, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
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
        assert kernels.isa() == "torch"
        err = capsys.readouterr().err
        assert err.count("atp sparse: C++ kernel unavailable") == 1
    finally:
        monkeypatch.delenv("ATP_SPARSE_KERNEL")
        kernels.reset()


@pytest.mark.parametrize("scripted, rounds, path", [
    # seconds per call in the order the rounds run them (tiled, dense, tiled, dense, ...)
    ({"tiled": [3.0, 1.00, 1.00, 1.00], "dense": [9.0, 2.00, 0.90, 0.90]}, 2, "tiled"),   # clear after two
    ({"tiled": [3.0, 1.00, 1.00, 1.00], "dense": [9.0, 1.02, 0.94, 0.94]}, 3, "dense"),   # close: a third decides
    ({"tiled": [3.0, 1.00, 1.00, 0.99], "dense": [9.0, 1.01, 1.02, 1.00]}, 4, "tiled"),   # close to the end: four
])
def test_measuring_takes_more_rounds_while_the_two_fastest_are_close(monkeypatch, scripted, rounds, path):
    """The choice is the fastest best time; a third and fourth round run only while the two fastest best times lie
    within TUNE_CLOSE (a fake clock stands in for the timings, the calls still compute)."""
    if kernels.get() is None:
        pytest.skip("no C++ kernel")
    monkeypatch.setattr(sparse_linear, "_policy", "auto")
    durations = {p: list(v) for p, v in scripted.items()}
    calls = []
    clock = {"now": 0.0, "running": None}
    real_run = SparseLinear._run

    def timed_run(self, p, x, kern):
        calls.append(p)
        clock["running"] = durations[p].pop(0)
        return real_run(self, p, x, kern)

    class FakeTime:
        @staticmethod
        def perf_counter():
            if clock["running"] is not None:  # the second reading of a call: its scripted duration has passed
                clock["now"] += clock["running"]
                clock["running"] = None
            return clock["now"]

    monkeypatch.setattr(SparseLinear, "_run", timed_run)
    monkeypatch.setattr(sparse_linear, "time", FakeTime)
    sparse_linear.clear_choices()
    w = pruned_weight(48, 200, 0.7, torch.float32)
    x = torch.randn(40, 200)
    try:
        y = SparseLinear(200, 48, **fmt.pack(w))(x)
        (entry,) = sparse_linear.choices()
    finally:
        sparse_linear.clear_choices()
    assert calls == ["tiled", "dense"] * rounds
    assert entry["rounds"] == rounds and entry["path"] == path
    assert entry["seconds"] == pytest.approx({p: min(scripted[p][:rounds]) for p in scripted})
    assert (y - F.linear(x, w)).abs().max().item() <= TOL[torch.float32] * max(1.0, F.linear(x, w).abs().max().item())
    assert sparse_linear.too_close_to_call({"a": 1.0, "b": 1.05}) and not sparse_linear.too_close_to_call(
        {"a": 1.0, "b": 1.06}) and not sparse_linear.too_close_to_call({"a": 1.0})


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_decode_equals_each_matrix_on_its_own_rows(isa, dtype):
    """One call over several matrices (the packed experts' decode) writes matrix g times x's rows
    [starts[g], starts[g] + counts[g]) into the same rows of y, and nothing else: five matrices with 0 to 6 rows
    each (6: two passes of the 4-token loop), 70 input columns (a padded mask word)."""
    kern = kernels.get()
    if kern is None:
        pytest.skip("no C++ kernel")
    weights = [pruned_weight(40, 70, 0.7, dtype, seed=g, empty_rows=(3,) if g == 1 else ()) for g in range(5)]
    packed = [fmt.pack(w) for w in weights]
    starts, counts = [0, 1, 4, 4, 11], [1, 3, 0, 6, 2]
    x = torch.randn(14, 70, generator=torch.Generator().manual_seed(9)).to(dtype)
    y = torch.full((14, 40), float("nan"))
    kern.grouped_decode_into(x, y, starts, counts, [p["mask"] for p in packed], [p["values"] for p in packed],
                             [p["row_offsets"] for p in packed], 70, kernels.ISA_CODE)
    expected = torch.full((14, 40), float("nan"))
    for w, start, count in zip(weights, starts, counts):
        expected[start:start + count] = F.linear(x[start:start + count].float(), w.float())
    assert torch.isnan(y[10]).all() and torch.isnan(y[13]).all()  # rows of no matrix stay as they were
    assert torch.allclose(y, expected, atol=TOL[dtype] * expected.nan_to_num().abs().max().item(), equal_nan=True)


@pytest.mark.parametrize("threads", [1, 3, 7, 64])
def test_grouped_decode_splits_the_rows_exactly_once_over_any_number_of_threads(isa, threads):
    """Enough work for the parallel region: rows that are not multiples of 4, empty and 9-row groups, more threads
    than rows of a matrix. Bit-identical to the single-matrix decode of each matrix (the same row groups)."""
    kern = kernels.get()
    if kern is None:
        pytest.skip("no C++ kernel")
    weights = [pruned_weight(rows, 513, 0.7, torch.float32, seed=rows) for rows in (130, 257, 3, 130)]
    packed = [fmt.pack(w) for w in weights]
    counts = [2, 0, 9, 1]
    starts = [0, 2, 2, 11]
    x = torch.randn(12, 513, generator=torch.Generator().manual_seed(3))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (130, 257, 3):  # one row count per call: every matrix of a call has the same shape
            group = [g for g, w in enumerate(weights) if w.shape[0] == rows]
            y = torch.full((12, rows), float("nan"))
            kern.grouped_decode_into(x, y, [starts[g] for g in group], [counts[g] for g in group],
                                     [packed[g]["mask"] for g in group], [packed[g]["values"] for g in group],
                                     [packed[g]["row_offsets"] for g in group], 513, kernels.ISA_CODE)
            padded = F.pad(x, (0, packed[group[0]]["mask"].shape[1] * 64 - 513))
            for g in group:
                alone = kern.spmv(packed[g]["mask"], packed[g]["values"], packed[g]["row_offsets"],
                                  padded[starts[g]:starts[g] + counts[g]].contiguous(), kernels.ISA_CODE)
                assert torch.equal(y[starts[g]:starts[g] + counts[g]], alone)
            written = sum(counts[g] for g in group)
            assert torch.isnan(y).any(dim=1).sum() == 12 - written  # and no other row
    finally:
        torch.set_num_threads(previous)


def test_grouped_decode_refuses_inconsistent_arguments():
    kern = kernels.get()
    if kern is None:
        pytest.skip("no C++ kernel")
    p = fmt.pack(pruned_weight(8, 64, 0.5, torch.float32))
    other = fmt.pack(pruned_weight(8, 128, 0.5, torch.float32))
    x, y = torch.randn(3, 64), torch.empty(3, 8)
    args = dict(masks=[p["mask"]], values=[p["values"]], row_offsets=[p["row_offsets"]], in_features=64,
                isa=kernels.ISA_CODE)
    with pytest.raises(RuntimeError, match="one start, count"):
        kern.grouped_decode_into(x, y, [0, 1], [1, 1], **args)
    with pytest.raises(RuntimeError, match="rows out of x"):
        kern.grouped_decode_into(x, y, [2], [2], **args)
    with pytest.raises(RuntimeError, match="fp32"):
        kern.grouped_decode_into(x, y.double(), [0], [1], **args)
    with pytest.raises(RuntimeError, match="ascending, disjoint"):
        kern.grouped_decode_into(x, y, [1, 0], [2, 1], [p["mask"]] * 2, [p["values"]] * 2, [p["row_offsets"]] * 2, 64,
                                 kernels.ISA_CODE)
    with pytest.raises(RuntimeError, match="every matrix"):
        kern.grouped_decode_into(x, y, [0, 1], [1, 1], [p["mask"], other["mask"]], [p["values"], other["values"]],
                                 [p["row_offsets"], other["row_offsets"]], 64, kernels.ISA_CODE)
