"""SparseLinear: an nn.Linear replacement holding its pruned weight bitmask-packed (format.py), never dense.

forward(x) = x @ W^T + b for inputs (..., in_features), accumulated in fp32, returned in x's dtype. The kernel
paths are one C++ call each (kernel.cpp `linear`: reshape, padding, kernel, bias, dtype), because the PyTorch glue
around a decode matvec cost as much as the matvec of a small layer. Paths, chosen per call:

* ``decode`` (up to DECODE_MAX_TOKENS tokens, see decode_max_tokens): one streaming pass over the packed weight, the
  expanded weights reused for up to 4 tokens at a time. Always taken for 1 to 4 tokens: it reads a third of the
  dense bytes. bf16 weights and inputs on AVX512_BF16 without AMX: 5-7 tokens in one pass on the dot products,
  8-512 in column blocks whose inputs stay in L1 while the rows pass over them, three rows sharing each load of
  inputs, each row's block expanded once for all the tokens.
* ``tiled``: the 16-token tiled kernel (each decoded nonzero reused for every token of a tile); for bf16 weights and
  bf16 inputs on CPUs with AVX512_BF16, on the dot products, each two consecutive nonzeros of a row together (their
  columns' inputs interleaved at run time);
* ``amx`` (bf16 weights and inputs, CPUs with AMX): rows decoded into dense bf16 tiles in cache, multiplied on the
  tile unit; it replaces ``tiled`` there, since torch's own bf16 GEMM runs on AMX too;
* ``dense``: the kernel unpacks the weight into a reusable workspace (one per dtype, the size of the largest
  converted Linear, shared by every layer: a transient, never a per-layer dense copy) and torch's dense GEMM runs
  on it. What the layer costs then is the dense GEMM plus the unpacking.

Above 4 tokens the fastest path is not the same on every CPU (AMX makes torch's bf16 GEMM several times faster
than any AVX-512 code, for instance), so it is measured: the first call with a given (shape, dtype, token-count
bucket, density within 5%, threads, instruction set) times each candidate path on its actual input (two rounds, up to four while
the two fastest lie within 5%) and caches the fastest (``choices()`` lists them, ``clear_choices()`` forgets
them). Buckets are powers of two (5-8, 9-16, ..., 1025-2048).
``ATP_SPARSE_PATH=sparse|dense`` (or `set_policy`) forces the kernels or the dense GEMM instead of measuring.
Without the C++ kernel: pure PyTorch, unpacking the weight on every call (correct, slow).
"""
from __future__ import annotations

import math
import os
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import format as fmt
from . import kernels
from . import pages

DECODE_MAX_TOKENS = 16   # the decode kernel is a candidate up to this many tokens (one pass per 4 tokens)
# ... up to this many for bf16 weights and inputs on AVX512_BF16's dot products without AMX (decode_max_tokens)
DOT_DECODE_MAX_TOKENS = 512
ALWAYS_DECODE_TOKENS = 4  # up to this many, the decode kernel without measuring
TUNE_ROUNDS = 2           # timed rounds per candidate path when measuring a choice (the first one warms up)
TUNE_MAX_ROUNDS = 4       # ... up to this many while the two fastest are within TUNE_CLOSE
TUNE_CLOSE = 0.05
DENSITY_STEP = 0.05       # measured choices are shared within density buckets this wide (density_bucket)
POLICIES = ("auto", "sparse", "dense")
_PATH_CODES = {"decode": 0, "tiled": 1, "amx": 2}
_policy = os.environ.get("ATP_SPARSE_PATH", "auto").strip().lower() or "auto"
if _policy not in POLICIES:
    _policy = "auto"
_choices: dict[tuple, dict] = {}
# candidate_paths' answers, keyed by everything they depend on (see _candidates)
_paths_memo: dict[tuple, tuple[str, ...]] = {}
_workspaces: dict[torch.dtype, torch.Tensor] = {}
_tune_lock = threading.Lock()


def set_policy(policy: str) -> str:
    """'auto' (measure per shape, density and token bucket), 'sparse' (the kernels always) or 'dense' (unpack + dense GEMM
    above 4 tokens). Returns the previous policy."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    previous, _policy = _policy, policy
    return previous


def policy() -> str:
    return _policy


def choices() -> list[dict]:
    """The measured choices so far: shape, dtype, token bucket, threads, isa, the chosen path and the timings."""
    return [dict(entry) for entry in _choices.values()]


def clear_choices() -> None:
    _choices.clear()


def clear_workspaces() -> None:
    """Free the dense workspaces of the dense path and the AMX path's scratch."""
    _workspaces.clear()
    kern = kernels.get()
    if kern is not None:
        kern.release_scratch()


def scratch_bytes() -> int:
    """Bytes the kernels keep between calls: the AMX path's inputs-as-tiles and partial sums (not the dense
    workspaces, which `_workspaces` holds)."""
    kern = kernels.get()
    return int(kern.scratch_bytes()) if kern is not None else 0


def workspace_bytes() -> int:
    """Everything held besides the packed weights: the dense path's workspaces and the AMX path's scratch."""
    return sum(b.numel() * b.element_size() for b in _workspaces.values()) + scratch_bytes()


def token_bucket(n: int) -> int:
    """The power of two at or above n: calls within a bucket share one measured choice."""
    return 1 << (max(1, n) - 1).bit_length()


def density_bucket(density: float) -> int:
    """Densities within one DENSITY_STEP share a measured choice: the sparse kernels' time follows the nonzeros and
    the dense GEMM's does not, so layers of one shape at different sparsities (ATP gives every block its own) may
    want different paths (the 7B block in bf16 at 512 tokens on Zen 5: the tiled kernel 1.27x dense at 70%, the
    dense path at 50%)."""
    return round(density / DENSITY_STEP)


def amx_usable(values_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """The AMX path: bf16 weights and inputs, the AVX-512 kernels, a CPU with AMX that the OS lets us use."""
    kern = kernels.get()
    return (values_dtype == torch.bfloat16 and x_dtype == torch.bfloat16 and kern is not None
            and kernels.isa() == "avx512" and kernels.has_amx())


def decode_max_tokens(values_dtype: torch.dtype = torch.float32, x_dtype: torch.dtype = torch.float32) -> int:
    """The most tokens the decode kernel is a candidate for: DOT_DECODE_MAX_TOKENS for bf16 weights and inputs on
    AVX512_BF16 without AMX (on Zen 5 its column-blocked decode beat the tiled kernel at every count up to 1024
    tokens and unpacking + GEMM up to 256-512; on AMX CPUs the AMX path takes over from 17), else
    DECODE_MAX_TOKENS."""
    dot = (values_dtype == torch.bfloat16 and x_dtype == torch.bfloat16 and kernels.get() is not None
           and kernels.isa() == "avx512" and kernels.has_bf16_dot())
    return DOT_DECODE_MAX_TOKENS if dot and not amx_usable(values_dtype, x_dtype) else DECODE_MAX_TOKENS


def candidate_paths(n: int, values_dtype: torch.dtype = torch.float32,
                    x_dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The paths a call with n tokens may take (the first is the only one, or they are measured). bf16 on AMX
    machines replaces the tiled kernel by the AMX one (the tiled kernel runs 3-6x slower than torch's AMX GEMM)."""
    if n <= ALWAYS_DECODE_TOKENS:
        return ("decode",)
    many = "amx" if amx_usable(values_dtype, x_dtype) else "tiled"
    decode_max = decode_max_tokens(values_dtype, x_dtype)
    if _policy == "sparse":
        return ("decode",) if n <= decode_max else (many,)
    if _policy == "dense":
        return ("dense",)
    return ("decode", many, "dense") if n <= decode_max else (many, "dense")


def _candidates(n: int, values_dtype: torch.dtype, x_dtype: torch.dtype) -> tuple[str, ...]:
    """candidate_paths(n, ...), remembered: asking the kernel module about AMX and the dot products on every call
    cost a few microseconds, a tenth of a small layer's call at 8 tokens. The key holds all it reads: the policy, the
    dtypes, where n falls against the token limits, and kernels.SETTINGS_VERSION (bumped by set_isa, set_vbmi2,
    set_amx, set_bf16_dot)."""
    key = (kernels.SETTINGS_VERSION, _policy, values_dtype, x_dtype, n <= ALWAYS_DECODE_TOKENS,
           n <= DECODE_MAX_TOKENS, n <= DOT_DECODE_MAX_TOKENS)
    paths = _paths_memo.get(key)
    if paths is None:
        paths = _paths_memo[key] = candidate_paths(n, values_dtype, x_dtype)
    return paths


def too_close_to_call(seconds: dict[str, float]) -> bool:
    """Whether the two fastest paths' best times so far lie within TUNE_CLOSE of each other: one more round then.
    (On the 7B block at 50% and 2048 tokens, two rounds once picked the tiled kernel by 0.3% where unpack + GEMM
    runs 6% faster in steady state.)"""
    fastest = sorted(seconds.values())[:2]
    return len(fastest) == 2 and fastest[1] <= fastest[0] * (1 + TUNE_CLOSE)


def _workspace(dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    buf = _workspaces.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        _workspaces.pop(dtype, None)
        buf = torch.empty(rows * cols, dtype=dtype)
        _workspaces[dtype] = buf
    return buf[: rows * cols].view(rows, cols)


def replaces_exactly(module: nn.Module) -> bool:
    """Whether a SparseLinear computes what `module` computes: an nn.Linear whose class keeps nn.Linear's forward.
    A subclass with its own forward (Llama 4's router returns top-k scores besides the logits) stays dense."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def own_forward_reason(module: nn.Module) -> str:
    return f"{type(module).__name__} has its own forward (a SparseLinear computes only x W^T + b)"


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, values: torch.Tensor,
                 row_offsets: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        words = fmt.words_for(in_features)
        if mask.shape != (out_features, words) or mask.dtype != torch.int64:
            raise ValueError(f"mask must be int64 {(out_features, words)}, got {mask.dtype} {tuple(mask.shape)}")
        if row_offsets.shape != (out_features + 1,):
            raise ValueError("row_offsets must have out_features + 1 entries")
        if values.dtype not in fmt.SUPPORTED_DTYPES:
            raise ValueError(f"unsupported values dtype {values.dtype}")
        if mask.device.type != "meta":
            fmt.validate_packed(mask, values, row_offsets, in_features)
        self.in_features = in_features
        self.out_features = out_features
        # The packed tensors on huge pages where the OS allows (pages.py: the decode streams them at full speed).
        self.register_buffer("mask", pages.on_huge_pages(mask.contiguous()))
        self.register_buffer("values", pages.on_huge_pages(values.contiguous()))
        self.register_buffer("row_offsets", row_offsets.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._weight_read_warned = False
        self._nnz_memo: tuple | None = None  # (row_offsets, values.numel(), nnz): see _density_now

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        return cls.from_weight(linear.weight.data, None if linear.bias is None else linear.bias.data)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "SparseLinear":
        """From a dense [out, in] weight (and bias)."""
        packed = fmt.pack(weight)
        return cls(weight.shape[1], weight.shape[0], packed["mask"], packed["values"], packed["row_offsets"], bias)

    @property
    def nnz(self) -> int:
        return int(self.row_offsets[-1])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def packed_nbytes(self) -> int:
        return fmt.packed_nbytes(self.mask, self.values, self.row_offsets)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, unpacked on every read, for model code that reads a Linear's `.weight` itself
        (HunYuan's router checks its dtype, Mamba's dt_proj its device): right, but an unpack per read, so the
        first read warns. Not a parameter: writing to it changes nothing."""
        if not self._weight_read_warned:
            self._weight_read_warned = True
            warnings.warn(f"SparseLinear({self.in_features} -> {self.out_features}): the model's code reads its "
                          ".weight, which is unpacked to dense on every read (slower than the packed path; a "
                          "higher min_sparsity keeps such a Linear dense)", stacklevel=2)
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (for tests and the dense fallback; the module itself never keeps it)."""
        kern = kernels.get()
        if kern is not None:
            return kern.densify(self.mask, self.values, self.row_offsets, self.in_features, kernels.ISA_CODE)
        return fmt.unpack(self.mask, self.values, self.row_offsets, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.3f}, dtype={self.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kern = kernels.get()
        if kern is None:
            return self._dense_forward(x, None)
        n = x.numel() // self.in_features if self.in_features else 0
        buffers = self._buffers  # direct: nn.Module attribute lookup is a measurable share of a small layer's call
        if n <= ALWAYS_DECODE_TOKENS:
            return kern.linear(x, buffers["mask"], buffers["values"], buffers["row_offsets"], self.bias,
                               self.in_features, 0, kernels.ISA_CODE)
        paths = _candidates(n, buffers["values"].dtype, x.dtype)
        if len(paths) == 1:
            return self._run(paths[0], x, kern)
        key = self._choice_key(n, x.dtype, paths)
        entry = _choices.get(key)
        if entry is not None:
            return self._run(entry["path"], x, kern)
        return self._tune(key, paths, x, kern)

    def _choice_key(self, n: int, x_dtype: torch.dtype, paths: tuple[str, ...]) -> tuple:
        values_dtype = self._buffers["values"].dtype
        return (self.out_features, self.in_features, values_dtype, x_dtype, token_bucket(n),
                torch.get_num_threads(), kernels.ISA_CODE, paths,  # paths: with or without AMX (kernels.set_amx)
                # bf16 on AVX512_BF16's dot products or not (set_bf16_dot); other dtypes never take them
                values_dtype == torch.bfloat16 and kernels.has_bf16_dot(),
                density_bucket(self._density_now()))

    def _density_now(self) -> float:
        """`density` for the choice key, its nonzero count remembered while the same row_offsets tensor and the
        same number of values are in place (reading row_offsets[-1] took 3 of a call's 15 microseconds of Python):
        loading a state dict copies into the buffers, which keeps their sizes, so a new count comes with new
        tensors or a new values length."""
        buffers = self._buffers
        offsets, count = buffers["row_offsets"], buffers["values"].numel()
        memo = self.__dict__.get("_nnz_memo")  # (modules pickled before it was added lack it)
        if memo is None or memo[0] is not offsets or memo[1] != count:
            memo = self._nnz_memo = (offsets, count, int(offsets[-1]))
        return memo[2] / max(1, self.in_features * self.out_features)

    def path_for(self, n: int, x_dtype: torch.dtype) -> str | None:
        """The path `forward` takes for n tokens of x_dtype: the only candidate, the measured choice, or None while
        it is not measured yet (the next call measures it). Without the C++ kernel: 'dense'."""
        if kernels.get() is None:
            return "dense"
        paths = _candidates(n, self.values.dtype, x_dtype)
        if len(paths) == 1:
            return paths[0]
        entry = _choices.get(self._choice_key(n, x_dtype, paths))
        return None if entry is None else entry["path"]

    def _run(self, path: str, x: torch.Tensor, kern) -> torch.Tensor:
        if path == "dense":
            return self._dense_forward(x, kern)
        buffers = self._buffers
        return kern.linear(x, buffers["mask"], buffers["values"], buffers["row_offsets"], self.bias,
                           self.in_features, _PATH_CODES[path], kernels.ISA_CODE)

    def _tune(self, key: tuple, paths: tuple[str, ...], x: torch.Tensor, kern) -> torch.Tensor:
        """Time every candidate path on this input in interleaved rounds (the first also warms caches and
        allocates the workspace; more rounds while the two fastest are close), cache the fastest for this key and
        return its output."""
        with _tune_lock:
            times = {p: math.inf for p in paths}
            outs = {}
            rounds = 0
            while rounds < TUNE_ROUNDS or (rounds < TUNE_MAX_ROUNDS and too_close_to_call(times)):
                for p in paths:
                    start = time.perf_counter()
                    outs[p] = self._run(p, x, kern)
                    times[p] = min(times[p], time.perf_counter() - start)
                rounds += 1
            best = min(paths, key=lambda p: times[p])
            if best != "dense" and not any(c["path"] == "dense" and k[2] == key[2] for k, c in _choices.items()):
                _workspaces.pop(key[2], None)  # measured but not chosen: the memory saving holds without it
            _choices[key] = {"out_features": key[0], "in_features": key[1], "dtype": str(key[2]).replace("torch.", ""),
                             "tokens_up_to": key[4], "threads": key[5], "isa": kernels.isa(),
                             "density": round(key[9] * DENSITY_STEP, 4), "path": best,
                             "seconds": {p: times[p] for p in paths}, "rounds": rounds}
            return outs[best]

    def _dense_forward(self, x: torch.Tensor, kern) -> torch.Tensor:
        """Unpack into the shared workspace (or, without the kernel, a fresh tensor) and let torch's GEMM run."""
        lead = x.shape[:-1]
        if kern is None:
            w = self.dense_weight()
        else:
            w = kern.densify_into(self.mask, self.values, self.row_offsets,
                                  _workspace(self.values.dtype, self.out_features, self.in_features),
                                  kernels.ISA_CODE)
        y = F.linear(x.reshape(-1, self.in_features).to(w.dtype), w,
                     None if self.bias is None else self.bias.to(w.dtype))
        return y.to(x.dtype).reshape(*lead, self.out_features)


def path_summary() -> str:
    """One line on how calls choose their path (for the conversion summary)."""
    if _policy == "sparse":
        return f"the sparse kernels at every token count (ATP_SPARSE_PATH=sparse), {kernels.describe()}"
    if _policy == "dense":
        return f"1-{ALWAYS_DECODE_TOKENS} tokens the sparse decode kernel, more: unpack + torch's dense GEMM"
    return (f"1-{ALWAYS_DECODE_TOKENS} tokens the sparse decode kernel; more: the faster of the sparse kernels and "
            "unpack + torch's dense GEMM, measured on first use per shape, density and token-count bucket")
