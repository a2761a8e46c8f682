"""SparseLinear: an nn.Linear replacement holding its pruned weight bitmask-packed (format.py), never dense.

forward(x) = x @ W^T + b for inputs (..., in_features), accumulated in fp32, returned in x's dtype. The kernel
paths below are one C++ call (kernel.cpp `linear`: reshape, padding, kernel, bias, dtype), because the PyTorch glue
around a decode matvec cost as much as the matvec of a small layer. Paths:

* kernel, few tokens (<= SPMV_MAX_TOKENS, i.e. decode): one streaming pass over the packed weight per token;
* kernel, up to DENSE_ABOVE_TOKENS[dtype] tokens: the 16-token tiled kernel (each decoded nonzero reused 16
  times);
* more tokens than that (long fp32 prefill): the kernel unpacks the weight into a reusable dense workspace (one
  per weight shape and dtype, shared by all layers: a transient the size of one dense Linear) and torch's dense
  GEMM runs on it. Measured on a 2-core AVX2 CPU at 70% sparsity, fp32: the tiled kernel beats MKL's GEMM up to
  ~128-256 tokens and is ~0.9x at 512, so fp32 switches above 256 tokens. bf16/fp16: torch's CPU GEMM without
  native bf16 instructions is 3-6x slower than the tiled kernel at every batch size, so they never switch;
* no kernel (no compiler): pure PyTorch, unpacking the weight on every call (correct, slow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import format as fmt
from . import kernels

SPMV_MAX_TOKENS = 4
DENSE_ABOVE_TOKENS = {torch.float32: 256, torch.bfloat16: 1 << 62, torch.float16: 1 << 62}
_workspaces: dict[tuple, torch.Tensor] = {}


def dense_above_tokens(dtype: torch.dtype) -> int:
    return DENSE_ABOVE_TOKENS.get(dtype, 256)


def clear_workspaces() -> None:
    """Free the dense workspaces of the large-batch fallback."""
    _workspaces.clear()


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
        if values.numel() < int(row_offsets[-1]) + fmt.VALUE_PAD:
            raise ValueError("values shorter than row_offsets[-1] + padding")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("mask", mask.contiguous())
        self.register_buffer("values", values.contiguous())
        self.register_buffer("row_offsets", row_offsets.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SparseLinear":
        packed = fmt.pack(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(linear.in_features, linear.out_features, packed["mask"], packed["values"],
                   packed["row_offsets"], bias)

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

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (for tests and the dense fallback; the module itself never keeps it)."""
        kern = kernels.get()
        if kern is not None:
            return kern.densify(self.mask, self.values, self.row_offsets, self.in_features)
        return fmt.unpack(self.mask, self.values, self.row_offsets, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.3f}, dtype={self.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kern = kernels.get()
        buffers = self._buffers  # direct: nn.Module attribute lookup is a measurable share of a decode step
        values = buffers["values"]
        if kern is not None and x.numel() <= dense_above_tokens(values.dtype) * self.in_features:
            return kern.linear(x, buffers["mask"], values, buffers["row_offsets"], self.bias, self.in_features,
                               SPMV_MAX_TOKENS)
        return self._dense_forward(x, kern)

    def _dense_forward(self, x: torch.Tensor, kern) -> torch.Tensor:
        """Many tokens (or no kernel): unpack into a shared workspace and let torch's dense GEMM run."""
        lead = x.shape[:-1]
        if kern is None:
            w = self.dense_weight()
        else:
            key = (self.out_features, self.in_features, self.values.dtype)
            if key not in _workspaces:
                _workspaces[key] = torch.empty(self.out_features, self.in_features, dtype=self.values.dtype)
            w = kern.densify_into(self.mask, self.values, self.row_offsets, _workspaces[key])
        y = F.linear(x.reshape(-1, self.in_features).to(w.dtype), w,
                     None if self.bias is None else self.bias.to(w.dtype))
        return y.to(x.dtype).reshape(*lead, self.out_features)
