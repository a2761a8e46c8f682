"""Run by test_sparse_portability.py in a process of its own: inside an emulated CPU (qemu-x86_64 -cpu MODEL), where
the kernel must pick the instruction set that CPU really has by itself, or with the kernel built by another compiler
(CXX). Either way every path must give the dense results. An instruction the CPU lacks stops the process with
SIGILL, which no forced path on a newer CPU can show.

`--every-isa` checks each instruction set this machine runs, not only the one chosen. Prints one JSON line: the
instruction set chosen, the ones available and checked, how many comparisons passed, the built module's file, and
why there is none."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from lib.sparse import format as fmt
from lib.sparse import kernels
from lib.sparse import linear as sparse_linear
from lib.sparse.linear import SparseLinear

# fp32: another summation order than the dense GEMM; bf16: one output rounding
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (rows, columns, sparsity): a width that is no multiple of 8 or 16, and one past the kernels' column chunks
SHAPES = ((37, 300, 0.7), (20, 4500, 0.5))
# 1 and 3: the decode kernel alone; 7: decode in two passes (or measured); 40: tiled or unpack + GEMM
TOKENS = (1, 3, 7, 40)
# the kernels on every call; the unpacking for torch's GEMM above 4 tokens
POLICIES = ("sparse", "dense")
CHECKS_PER_ISA = len(POLICIES) * len(TOLERANCE) * len(SHAPES) * len(TOKENS)


def pruned(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    weight[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    return weight.to(dtype)


def check_paths(isa: str) -> int:
    """Every path on `isa` against the dense matmul; the number of comparisons, or raises on the first mismatch."""
    checks = 0
    for policy in POLICIES:
        sparse_linear.set_policy(policy)
        sparse_linear.clear_choices()
        for dtype, tolerance in TOLERANCE.items():
            for seed, (rows, cols, sparsity) in enumerate(SHAPES):
                weight = pruned(rows, cols, sparsity, dtype, seed)
                bias = torch.randn(rows).to(dtype)
                module = SparseLinear(cols, rows, **fmt.pack(weight), bias=bias)
                for tokens in TOKENS:
                    x = torch.randn(tokens, cols).to(dtype)
                    with torch.inference_mode():
                        got = module(x)
                    expected = F.linear(x.float(), weight.float(), bias.float())
                    scale = max(1.0, expected.abs().max().item())
                    error = (got.float() - expected).abs().max().item()
                    if got.shape != expected.shape or got.dtype != dtype or error > tolerance * scale:
                        raise AssertionError(f"{isa} {policy} {dtype} {rows}x{cols} {tokens} tokens: error {error:.3g}")
                    checks += 1
    return checks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every-isa", action="store_true")
    every_isa = parser.parse_args().every_isa
    torch.set_num_threads(2)
    chosen = kernels.isa()
    supported = kernels.supported_isas()
    checked, checks = [], 0
    for isa in supported if every_isa else [chosen]:
        kernels.set_isa(isa)
        try:
            checks += check_paths(isa)
        except AssertionError as error:
            print(f"mismatch: {error}", file=sys.stderr)
            return 1
        checked.append(isa)
    kernels.set_isa(chosen)
    module = kernels.get()
    print(json.dumps({"isa": chosen, "supported": supported, "checked": checked, "checks": checks,
                      "module": getattr(module, "__file__", None), "reason": kernels.reason()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
