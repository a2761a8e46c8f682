"""2:4 sparsity on NVIDIA GPUs: torch's semi-structured sparse tensors (cuSPARSELt or CUTLASS) as Linear weights.

The sparse tensor cores of Ampere and newer GPUs (compute capability 8.0+) multiply a weight that keeps at most 2
nonzeros in every group of 4 consecutive inputs at up to twice the dense rate, reading half the values plus 2-bit
indices. torch exposes them as `torch.sparse.SparseSemiStructuredTensor`; with vLLM's 2:4 kernels gone it is the
maintained GPU path. This module decides whether a weight can take it (`conversion_problem`, pure and
CPU-testable except for the device checks), and wraps a converted weight as an nn.Linear replacement
(`SemiStructuredLinear`). `lib.sparse.convert.sparsify_model` calls `convert_for_sparsify` for CUDA Linears.

What torch requires, and how each requirement is met here (torch/sparse/semi_structured.py, torch 2.4 to 2.13):

* CUDA, a 2-D contiguous weight: checked; the weight is made contiguous before compression.
* dtype: cuSPARSELt takes float16, bfloat16, int8 (and float8 for scaled matmuls), CUTLASS also float32. Pruned
  models here are float16/bfloat16 on GPUs, so those two are the only dtypes converted; float32 stays dense, said.
* shape: each backend declares a minimum weight block per dtype (`_DTYPE_SHAPE_CONSTRAINTS[dtype]
  .sparse_min_rows/cols`; cuSPARSELt 16 x 16, CUTLASS 32 x 64 for half types): rows and columns must be
  positive multiples of it. The backend's own table is read, so the check is the one torch applies.
* the pattern: torch compresses whatever it is given and silently keeps 2 values of any group that holds 3 or 4
  nonzeros, which would change the layer. So every group is checked first; a weight that is not 2:4 (unstructured
  pruning, 4:8...) stays dense and the reason names the share of offending groups and the first one.
* the input: torch pads the token dimension to the backend's dense minimum itself; `forward` flattens the input
  to 2-D (contiguous) and casts it to the weight's dtype, which the cuSPARSELt matmul demands.
* the GPU: compute capability 8.0 or newer, and a working backend: before the first conversion of a (backend,
  dtype, device) a 64 x 128 2:4 matrix is compressed, multiplied and compared with the dense product (cached), so
  a torch build whose backend fails on this GPU (CUTLASS's kernels were built for some architectures only) keeps
  every Linear dense with that error instead of failing in the middle of a model.

A converted weight cannot change device or dtype (torch implements no such copy for it): `SemiStructuredLinear`
refuses `.to()`/`.half()`/`.cpu()` with an error saying so; convert after placing the model. `state_dict()`
writes the dense weight (zeros included), so `save_pretrained` of a converted model gives a normal checkpoint.
"""
from __future__ import annotations

import functools
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("cusparselt", "cutlass")
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)
FORMAT = "2:4 semi-structured"
# Used only when a torch version's backend class lacks its _DTYPE_SHAPE_CONSTRAINTS table (torch 2.4 to 2.13 have
# it, with these values for the half types): (sparse_min_rows, sparse_min_cols) of the weight.
_FALLBACK_MIN_SHAPE = {"cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
                       "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)}}

PatternCheck = namedtuple("PatternCheck", "bad_groups groups first_bad")  # first_bad: (row, first column) or None


def backend_class(backend: str):
    """torch's SparseSemiStructuredTensor subclass for `backend` ('cusparselt' or 'cutlass')."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown semi-structured backend {backend!r}; use one of {', '.join(BACKENDS)}")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS


def cusparselt_available() -> bool:
    module = getattr(torch.backends, "cusparselt", None)
    try:
        return bool(module is not None and module.is_available())
    except (RuntimeError, AttributeError):
        return False


def default_backend() -> str:
    """cuSPARSELt where torch has it (what to_sparse_semi_structured picks too), else CUTLASS."""
    return "cusparselt" if cusparselt_available() else "cutlass"


def min_weight_shape(backend: str, dtype: torch.dtype) -> tuple[int, int] | None:
    """(rows, columns) a weight must be a positive multiple of, per torch's table; None: dtype not supported."""
    if dtype not in HALF_DTYPES:
        return None
    table = getattr(backend_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None)
    if table is not None and dtype in table:
        return int(table[dtype].sparse_min_rows), int(table[dtype].sparse_min_cols)
    return _FALLBACK_MIN_SHAPE[backend][dtype]


def check_2_4(weight: torch.Tensor) -> PatternCheck:
    """How many groups of 4 consecutive inputs (per row) hold more than 2 nonzeros; the first such group."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"2:4 groups need a 2-D weight whose width is a multiple of 4, got {tuple(weight.shape)}")
    rows, cols = weight.shape
    counts = (weight != 0).reshape(rows, cols // 4, 4).sum(dim=2)
    bad = counts > 2
    n_bad = int(bad.sum())
    first = None
    if n_bad:
        flat = int(torch.nonzero(bad.reshape(-1))[0, 0])
        first = (flat // (cols // 4), 4 * (flat % (cols // 4)))
    return PatternCheck(n_bad, rows * (cols // 4), first)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def diagnose(weight: torch.Tensor, backend: str | None = None,
             check_device: bool = True) -> tuple[str, str] | None:
    """(reason, detail) why `weight` cannot become a semi-structured tensor of `backend` (default:
    `default_backend()`), or None when it can. The reason is short and shared by every weight with the same
    problem (sparsify_model groups by it); the detail is about this weight.

    With check_device=False the device, the GPU generation and the backend self-test are skipped, so the dtype,
    shape and pattern rules can be checked on any tensor (the CPU tests do).
    """
    backend = backend or default_backend()
    if weight.dim() != 2:
        return "not a 2-D weight", f"shape {tuple(weight.shape)}"
    if check_device:
        if weight.device.type != "cuda":
            return f"on {weight.device.type}", "torch's semi-structured sparsity runs on CUDA GPUs only"
        capability = tuple(torch.cuda.get_device_capability(weight.device))
        if capability < MIN_COMPUTE_CAPABILITY:
            return (f"GPU compute capability {capability[0]}.{capability[1]}",
                    "2:4 sparse tensor cores need 8.0 (Ampere) or newer")
    shape = min_weight_shape(backend, weight.dtype)
    if shape is None:
        return (f"dtype {_dtype_name(weight.dtype)}",
                "semi-structured weights are converted in float16 or bfloat16 only (--dtype float16/bfloat16)")
    rows, cols = weight.shape
    if rows < shape[0] or rows % shape[0] or cols < shape[1] or cols % shape[1]:
        return (f"shape not a multiple of {backend}'s {shape[0]}x{shape[1]} minimum",
                f"{rows}x{cols}: rows must be a multiple of {shape[0]} and columns of {shape[1]}")
    pattern = check_2_4(weight)
    if pattern.bad_groups:
        row, col = pattern.first_bad
        return ("not 2:4 (the GPU's sparse tensor cores take 2:4 only; prune with --sparsity_type 2:4)",
                f"{pattern.bad_groups} of {pattern.groups} groups of 4 consecutive inputs "
                f"({pattern.bad_groups / pattern.groups:.1%}) hold more than 2 nonzeros, the first at row {row}, "
                f"columns {col}-{col + 3}")
    if check_device:
        problem = backend_problem(backend, weight.dtype, weight.device)
        if problem is not None:
            return f"{backend} backend unusable here", problem
    return None


def conversion_problem(weight: torch.Tensor, backend: str | None = None, check_device: bool = True) -> str | None:
    """`diagnose` as one sentence (None when the weight converts)."""
    found = diagnose(weight, backend, check_device)
    return None if found is None else f"{found[0]}: {found[1]}"


@functools.lru_cache(maxsize=None)
def _self_test(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    dense = torch.randn(64, 128, generator=gen)
    keep = torch.topk(dense.abs().reshape(64, 32, 4), 2, dim=2).indices
    dense = (dense.reshape(64, 32, 4) * torch.zeros(64, 32, 4).scatter_(2, keep, 1.0)).reshape(64, 128)
    x = torch.randn(3, 128, generator=gen)
    try:
        w = dense.to(device=device, dtype=dtype)
        sparse = backend_class(backend).from_dense(w)
        got = F.linear(x.to(device=device, dtype=dtype), sparse).float().cpu()
    except Exception as exc:  # noqa: BLE001 - any failure of the backend means: do not convert
        line = (str(exc).strip().splitlines() or [""])[0]
        return f"torch's {backend} backend fails on this GPU ({type(exc).__name__}: {line[:160]})"
    want = F.linear(x.to(dtype).float(), dense.to(dtype).float())
    error = float((got - want).norm() / want.norm())
    if not error < 2e-2:
        return f"torch's {backend} backend gives wrong products on this GPU (relative error {error:.3g})"
    return None


def backend_problem(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when `backend` compresses and multiplies a small 2:4 matrix correctly on `device` (checked once)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _self_test(backend, dtype, device)


def _inner_tensors(sparse: torch.Tensor) -> list[torch.Tensor]:
    names = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
    return [t for t in (getattr(sparse, n, None) for n in names) if isinstance(t, torch.Tensor)]


class SemiStructuredLinear(nn.Module):
    """y = x W^T + b with W a torch semi-structured (2:4) sparse tensor on a CUDA GPU; y in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.weight = weight  # a plain attribute: Module._apply must not try to copy it (see _apply)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype).clone(),
                                                           requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, backend: str | None = None) -> "SemiStructuredLinear":
        """Convert a 2:4-pruned CUDA Linear; ValueError naming the reason when it cannot be."""
        return cls.from_weight(linear.weight, linear.bias, backend)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> "SemiStructuredLinear":
        """Convert a 2:4-pruned CUDA weight [out, in]; ValueError naming the reason when it cannot be."""
        backend = backend or default_backend()
        weight = weight.detach().contiguous()
        problem = conversion_problem(weight, backend)
        if problem is not None:
            raise ValueError(problem)
        return cls(backend_class(backend).from_dense(weight), bias, backend)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def packed_nbytes(self) -> int:
        """Bytes the compressed weight holds on the GPU (kept values and metadata), bias excluded."""
        return sum(t.numel() * t.element_size() for t in _inner_tensors(self.weight))

    def dense_weight(self) -> torch.Tensor:
        """The dense weight with its zeros (tests, state_dict); the module itself never keeps it."""
        return self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.weight.dtype:
            x2 = x2.to(self.weight.dtype)
        y = F.linear(x2.contiguous(), self.weight)
        if self.bias is not None:  # added apart: the fused bias of older torch versions' sparse matmuls is avoided
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        probe = torch.empty(0, device=self.weight.device, dtype=self.weight.dtype)
        moved = fn(probe)
        if isinstance(moved, torch.Tensor) and (moved.device != probe.device or moved.dtype != probe.dtype):
            raise RuntimeError(f"{type(self).__name__}: a {FORMAT} weight cannot change device or dtype (torch "
                               f"implements no such copy); place and cast the model before sparsify_model")
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={FORMAT}, backend={self.backend}, dtype={_dtype_name(self.dtype)}")


def weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())


def kernel_label(backend: str | None = None) -> str:
    backend = backend or default_backend()
    return f"CUDA {FORMAT} (torch.sparse, {'cuSPARSELt' if backend == 'cusparselt' else 'CUTLASS'})"


@torch.no_grad()
def convert_for_sparsify(linear: nn.Linear, min_sparsity: float,
                         backend: str | None = None) -> tuple[SemiStructuredLinear | None, dict]:
    """sparsify_model's CUDA step: (new module, its 'converted' record) or (None, its 'kept dense' record)."""
    backend = backend or default_backend()
    weight = linear.weight
    found = diagnose(weight.detach().contiguous(), backend)
    if found is not None:
        return None, {"reason": found[0], "detail": found[1]}
    sparsity = weight_sparsity(weight)
    if sparsity < min_sparsity:
        return None, {"reason": f"sparsity below min_sparsity={min_sparsity:g}", "sparsity": sparsity}
    new = SemiStructuredLinear.from_linear(linear, backend)
    return new, {"shape": [linear.out_features, linear.in_features], "sparsity": sparsity,
                 "dtype": _dtype_name(weight.dtype), "dense_bytes": weight.numel() * weight.element_size(),
                 "sparse_bytes": new.packed_nbytes(), "format": FORMAT, "backend": backend,
                 "device": str(weight.device)}
