"""Input statistics of a block's matrices on calibration data, shared between Linear layers that read one input.

Wanda needs the squared norm of every input feature; SparseGPT needs X X^T. Layers fed the very same tensor object
in a forward pass (q/k/v, gate/up) share one accumulator, so the work and memory are paid once per distinct input.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.matrices import FusedExperts, PrunableMatrix, classify_block
from .blocks import BlockBatch, run_block
from .experts import observe_expert_inputs


@contextlib.contextmanager
def _tf32_matmul(enabled: bool):
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@dataclass
class InputStats:
    """Running sums over all calibration tokens seen by one group of Linear layers (fp32)."""

    names: list[str] = field(default_factory=list)
    tokens: int = 0
    sq_norm: torch.Tensor | None = None  # [in_features]: sum over tokens of x_j^2
    xtx: torch.Tensor | None = None  # [in_features, in_features]: sum over tokens of x x^T

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2 X X^T / n."""
        return self.xtx * (2.0 / max(self.tokens, 1))

    def add(self, x: torch.Tensor, want_sq_norm: bool, want_xtx: bool) -> None:
        half_input = x.dtype in (torch.float16, torch.bfloat16)
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if want_sq_norm:
            part = x.pow(2).sum(0)
            self.sq_norm = part if self.sq_norm is None else self.sq_norm.add_(part)
        if want_xtx:
            if self.xtx is None:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            # Half-precision activations are exact in TF32 and their products exact in fp32 accumulation, so
            # tensor cores change only the summation order here, at several times the fp32 speed.
            with _tf32_matmul(half_input and x.is_cuda):
                self.xtx.addmm_(x.t(), x)


@torch.no_grad()
def collect_input_stats(block: nn.Module, matrices: dict[str, PrunableMatrix], batches: list[BlockBatch],
                        want_sq_norm: bool, want_xtx: bool) -> dict[str, InputStats]:
    """Run the block over all batches; return each matrix's input statistics (shared objects for Linears fed the
    same tensor). An expert slice gets the tokens routed to it; one that received none is absent from the result.
    """
    stats_of: dict[str, InputStats] = {}
    seen_this_pass: list[tuple[torch.Tensor, InputStats]] = []  # holding the tensors keeps their memory unreused

    def add(name: str, x: torch.Tensor) -> None:
        for tensor, stats in seen_this_pass:
            if tensor is x:
                if name not in stats_of:
                    stats_of[name] = stats
                    stats.names.append(name)
                return
        stats = stats_of.get(name)
        if stats is None:
            stats = stats_of[name] = InputStats(names=[name])
        stats.add(x, want_sq_norm, want_xtx)
        seen_this_pass.append((x, stats))

    def make_hook(name: str):
        def hook(module, args):
            add(name, args[0])
        return hook

    def expert_input(matrix: PrunableMatrix, x: torch.Tensor) -> None:
        if x.shape[0]:
            stats = stats_of.get(matrix.name)
            if stats is None:
                stats = stats_of[matrix.name] = InputStats(names=[matrix.name])
            stats.add(x, want_sq_norm, want_xtx)

    handles = [m.owner.register_forward_pre_hook(make_hook(n)) for n, m in matrices.items()
               if not m.is_expert_slice]
    fused = _fused_of(block, matrices)
    try:
        with observe_expert_inputs(block, fused, expert_input) as observer:
            for batch in batches:
                run_block(block, batch)
                seen_this_pass.clear()
                if observer is not None:
                    observer.forget_slices()
    finally:
        for h in handles:
            h.remove()
    return stats_of


def _fused_of(block: nn.Module, matrices: dict[str, PrunableMatrix]) -> list[FusedExperts]:
    """The fused expert parameters some of whose slices are among `matrices`."""
    wanted = {id(m.parameter) for m in matrices.values() if m.is_expert_slice}
    return [f for f in classify_block(block).fused if id(f.parameter) in wanted]
