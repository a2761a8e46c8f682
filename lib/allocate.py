"""Compute a layer-wise allocation for a loaded model: the seam between allocation rules and pruners.

Each rule gives one sparsity per decoder block with mean S; the rules that look at the model (OWL, AlphaPruning,
the absorption correction) measure the dense model here, before any pruning.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .absorption import absorption_adjust, measure_absorption
from .allocation import atp_allocation, uniform_allocation, validate_sparsity
from .alpha_pruning import block_alphas, alpha_allocation, load_or_compute_alphas
from .blocks import BlockBatch, capture_block_inputs, run_block
from .errors import UserError
from .masks import wanda_metric
from .model_utils import find_linears
from .owl import outlier_ratio, owl_allocation
from .sequential import walk_blocks
from .stats import collect_input_stats

ALLOCATIONS = ("uniform", "atp", "owl", "alpha")


@dataclass
class AllocationSpec:
    """Which rule and its parameters; validated before the model is loaded."""

    name: str = "uniform"
    sparsity: float = 0.5
    beta: float | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    alpha_eps: float = 0.3
    alpha_cache: str | None = None
    absorption: float = 0.0
    absorption_scale: float = 0.1
    absorption_batches: int = 2
    extra: dict = field(default_factory=dict)

    def validate(self, num_blocks: int | None) -> None:
        validate_sparsity(self.sparsity)
        if self.name not in ALLOCATIONS:
            raise UserError(f"--allocation {self.name}: unknown; choose from {', '.join(ALLOCATIONS)}")
        if self.name == "atp":
            if self.beta is not None and num_blocks is not None:
                atp_allocation(self.sparsity, self.beta, num_blocks)
        elif self.beta not in (None, 0.0):
            raise UserError(f"--beta is ATP's rate; it does not apply to --allocation {self.name}")
        if self.owl_m <= 0:
            raise UserError(f"--owl_m must be positive, got {self.owl_m}")
        if not 0 <= self.owl_lambda < 0.5:
            raise UserError(f"--owl_lambda must lie in [0, 0.5), got {self.owl_lambda}")
        if not 0 <= self.alpha_eps < 1:
            raise UserError(f"--alpha_eps must lie in [0, 1), got {self.alpha_eps}")
        if self.absorption < 0:
            raise UserError(f"--absorption strength must be >= 0, got {self.absorption}")
        if not 0 < self.absorption_scale < 10:
            raise UserError(f"--absorption_scale must lie in (0, 10), got {self.absorption_scale}")

    def needs_calibration(self) -> bool:
        return self.name == "owl" or self.absorption > 0


def compute_allocation(spec: AllocationSpec, model: nn.Module, blocks: nn.ModuleList,
                       calib_ids: torch.Tensor | None, batch_size: int, offload_device: torch.device | None,
                       model_key: str, progress: bool = True) -> tuple[list[float], dict]:
    """(per-block sparsities, facts to record) for the spec on the still-dense model."""
    num_blocks = len(blocks)
    info: dict = {"name": spec.name}
    if spec.name == "uniform":
        sparsities = uniform_allocation(spec.sparsity, num_blocks)
    elif spec.name == "atp":
        sparsities = atp_allocation(spec.sparsity, spec.beta, num_blocks)
        info["beta"] = spec.beta
    elif spec.name == "owl":
        ratios = owl_outlier_ratios(model, blocks, calib_ids, spec.owl_m, batch_size, offload_device, progress)
        sparsities = owl_allocation(ratios, spec.sparsity, spec.owl_lambda)
        info.update(outlier_ratios=ratios, owl_m=spec.owl_m, owl_lambda=spec.owl_lambda)
    else:  # alpha
        alphas, params = block_alpha_values(blocks, spec.alpha_cache, model_key)
        sparsities = alpha_allocation(alphas, params, spec.sparsity, spec.alpha_eps)
        info.update(alphas=alphas, alpha_eps=spec.alpha_eps, param_counts=params)
    if spec.absorption > 0:
        coefficients = absorption_coefficients(model, blocks, calib_ids, spec, batch_size, offload_device)
        info.update(base_sparsities=list(sparsities), absorption_coefficients=coefficients,
                    absorption_strength=spec.absorption, absorption_scale=spec.absorption_scale)
        weights = info.get("param_counts")  # AlphaPruning keeps the parameter-weighted mean
        sparsities = absorption_adjust(sparsities, coefficients, spec.absorption, spec.sparsity, weights)
    return [float(s) for s in sparsities], info


@torch.no_grad()
def owl_outlier_ratios(model, blocks, calib_ids, m: float, batch_size: int, offload_device, progress: bool):
    """Per-block outlier ratio of the dense model's Wanda scores (each block sees dense predecessors)."""
    ratios: list[float] = []

    def visit(i: int, block: nn.Module, batches: list[BlockBatch]) -> None:
        linears = find_linears(block)
        stats = collect_input_stats(block, linears, batches, want_sq_norm=True, want_xtx=False)
        scores = [wanda_metric(lin.weight, stats[name].sq_norm) for name, lin in linears.items()]
        ratios.append(outlier_ratio(scores, m))

    walk_blocks(model, blocks, calib_ids, visit, batch_size, offload_device, "OWL outliers", progress)
    return ratios


def block_alpha_values(blocks: nn.ModuleList, cache_path: str | None, model_key: str):
    """Per-block mean heavy-tail exponent alpha of the Linear weights (cached when a path is given)."""
    weights = [[lin.weight for lin in find_linears(b).values()] for b in blocks]
    params = [sum(w.numel() for w in ws) for ws in weights]
    shapes = ";".join(",".join("x".join(map(str, w.shape)) for w in ws) for ws in weights)
    key = f"{model_key}|{hashlib.sha1(shapes.encode()).hexdigest()[:12]}"

    def compute():
        return block_alphas([[w.detach().float().cpu() for w in ws] for ws in weights], mode="block")

    alphas = load_or_compute_alphas(cache_path, key, compute) if cache_path else compute()
    return [float(a) for a in alphas], params


@torch.no_grad()
def absorption_coefficients(model, blocks, calib_ids, spec: AllocationSpec, batch_size: int, offload_device):
    if offload_device is not None:
        raise UserError("--absorption is not supported together with --offload yet")
    batches = capture_block_inputs(model, blocks, calib_ids[: batch_size * spec.absorption_batches], batch_size)
    pairs = [(b.hidden, {"__batch__": b}) for b in batches]

    def run(block, hidden, kwargs):
        b = kwargs["__batch__"]
        return run_block(block, BlockBatch(hidden, b.args, b.kwargs))

    final_norm = _final_norm(model, blocks)
    return measure_absorption(list(blocks), pairs, run, final_norm, spec.absorption_scale)


def _final_norm(model: nn.Module, blocks: nn.ModuleList):
    """The norm applied after the last block: the norm-like sibling module registered after the block list."""
    for parent in model.modules():
        children = list(parent.named_children())
        names = [c for _, c in children]
        if any(c is blocks for c in names):
            after = names[[i for i, c in enumerate(names) if c is blocks][0] + 1:]
            for c in after:
                if "norm" in type(c).__name__.lower():
                    return c
            return None
    return None
