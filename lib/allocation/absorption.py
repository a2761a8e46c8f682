"""Absorption-aware correction of a layer-wise sparsity allocation.

Motivation ("Beyond Layer Importance in Layer-wise Sparsity: An Inter-Layer Perturbation-Absorption
Perspective", 2026): how much a block may be pruned depends not only on the block itself but on how the blocks
after it treat the error that pruning injects. If the following blocks damp a perturbation of block i's output,
block i can take more pruning; if they amplify it, less. The paper's exact formula is not available here; what
follows is this project's own design.

Measurement (measure_absorption). For every calibration batch, one clean pass stores the output h_i of every
block. For each block i, the output is perturbed token by token with seeded Gaussian noise rescaled to exactly
perturbation_scale * ||h_i[t]|| (a stand-in for the relative output error that pruning causes), and only blocks
i+1..L-1 are re-run. Drift is the per-token relative L2 distance ||h'[t] - h[t]|| / ||h[t]||, averaged over all
tokens of all batches, measured
  * `lookahead` blocks later (at block min(i + lookahead, L-1); at block i itself for the last block), and
  * after the final norm (or the last block's output when there is no final norm).
Each is turned into a damping factor perturbation_scale / drift (>1 the perturbation shrank, <1 it grew), and
the absorption coefficient of block i is the geometric mean of the two factors: the local view (what the next
few blocks do) and the end-to-end view (what reaches the LM head) get equal say. Cost per batch: L clean block
runs plus L(L-1)/2 perturbed ones, holding one batch's L clean outputs in memory.

Correction (absorption_adjust). With z_i the standardised log-coefficient (mean 0, population std 1 across
blocks; all zeros when the coefficients are equal), the new allocation is base_i + strength * z_i, then shifted
by one common constant and clipped into [0, 0.99] so that its (optionally weighted) mean is exactly the target.
The common shift is the unique one for which the clipped values hit the target mean, which is what iterating
"re-centre, clip" converges to; it is found by bisection and then solved exactly on the final unclipped set.
strength is in sparsity units per standard deviation (0.02 moves a block one std more absorbing than average
two points up); strength 0 returns the base allocation unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..calibration.blocks import capture_block_inputs, run_block as run_block_batch
from ..models.structure import final_norm
from .probe import ModelProbe

MAX_SPARSITY = 0.99
_DRIFT_FLOOR = 1e-12  # a perturbation absorbed to nothing still gets a finite (huge) coefficient
_NORM_FLOOR = 1e-12


def _perturb(hidden: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """hidden plus per-token Gaussian noise of norm exactly scale * ||hidden[token]|| (noise drawn on the CPU
    so the same seed gives the same directions on every device)."""
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device)
    clean = hidden.float()
    token_norms = clean.norm(dim=-1, keepdim=True)
    noise = noise * (scale * token_norms / noise.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR))
    return (clean + noise).to(hidden.dtype)


def _relative_drift_sum(perturbed: torch.Tensor, clean: torch.Tensor) -> float:
    """Sum over tokens of ||perturbed[t] - clean[t]|| / ||clean[t]||."""
    clean = clean.float()
    drift = (perturbed.float() - clean).norm(dim=-1) / clean.norm(dim=-1).clamp_min(_NORM_FLOOR)
    return float(drift.sum())


def measure_drift(blocks: list, batches: list[tuple[torch.Tensor, dict]],
                  run_block: Callable[[Any, torch.Tensor, dict], torch.Tensor], final_norm: Any,
                  perturbation_scale: float, lookahead: int = 2,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """(drift `lookahead` blocks later, drift at the final norm) per block, as mean per-token relative L2
    distances, for a perturbation of relative size perturbation_scale injected at each block's output."""
    if not (math.isfinite(perturbation_scale) and perturbation_scale > 0):
        raise ValueError(f"perturbation_scale must be positive, got {perturbation_scale}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    if not blocks or not batches:
        raise ValueError("measure_drift needs at least one block and one batch")
    num_blocks = len(blocks)
    finish = final_norm if final_norm is not None else (lambda hidden: hidden)
    generator = torch.Generator().manual_seed(seed)
    lookahead_sums = [0.0] * num_blocks
    final_sums = [0.0] * num_blocks
    tokens = 0
    with torch.no_grad():
        for hidden, block_kwargs in batches:
            clean_outputs = []
            for block in blocks:
                hidden = run_block(block, hidden, block_kwargs)
                clean_outputs.append(hidden)
            clean_final = finish(clean_outputs[-1])
            tokens += clean_final[..., 0].numel()
            for i in range(num_blocks):
                probe_at = min(i + lookahead, num_blocks - 1)
                perturbed = _perturb(clean_outputs[i], perturbation_scale, generator)
                if probe_at == i:
                    lookahead_sums[i] += _relative_drift_sum(perturbed, clean_outputs[i])
                for j in range(i + 1, num_blocks):
                    perturbed = run_block(blocks[j], perturbed, block_kwargs)
                    if j == probe_at:
                        lookahead_sums[i] += _relative_drift_sum(perturbed, clean_outputs[j])
                final_sums[i] += _relative_drift_sum(finish(perturbed), clean_final)
            del clean_outputs
    return [s / tokens for s in lookahead_sums], [s / tokens for s in final_sums]


def measure_absorption(blocks: list, batches: list[tuple[torch.Tensor, dict]],
                       run_block: Callable[[Any, torch.Tensor, dict], torch.Tensor], final_norm: Any,
                       perturbation_scale: float, lookahead: int = 2, seed: int = 0) -> list[float]:
    """Absorption coefficient per block: geometric mean of perturbation_scale / drift at the lookahead block
    and at the final norm (>1 the following blocks damp the perturbation, <1 they amplify it)."""
    lookahead_drift, final_drift = measure_drift(blocks, batches, run_block, final_norm, perturbation_scale,
                                                 lookahead=lookahead, seed=seed)
    coefficients = []
    for local, end in zip(lookahead_drift, final_drift):
        local_damping = perturbation_scale / max(local, _DRIFT_FLOOR)
        end_damping = perturbation_scale / max(end, _DRIFT_FLOOR)
        coefficients.append(math.sqrt(local_damping * end_damping))
    return coefficients


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def shift_and_clip(values: list[float], target: float, weights: list[float] | None = None,
                   low: float = 0.0, high: float = MAX_SPARSITY) -> list[float]:
    """clip(values + c, low, high) with the common shift c chosen so the weighted mean is exactly `target`."""
    if not low <= target <= high:
        raise ValueError(f"target sparsity {target} must lie in [{low}, {high}]")
    weights = weights if weights is not None else [1.0] * len(values)

    def clipped(shift: float) -> list[float]:
        return [min(high, max(low, v + shift)) for v in values]

    # the clipped mean is non-decreasing in the shift: bisect over a range that clips everything either way
    below, above = low - max(values), high - min(values)
    for _ in range(200):
        middle = (below + above) / 2
        if _weighted_mean(clipped(middle), weights) < target:
            below = middle
        else:
            above = middle
    shift = (below + above) / 2
    # exact solve: move the shift so that the entries left strictly inside (low, high) carry the whole residual
    result = clipped(shift)
    free = [k for k, v in enumerate(result) if low < v < high]
    if free:
        residual = (target - _weighted_mean(result, weights)) * sum(weights)
        correction = residual / sum(weights[k] for k in free)
        for k in free:
            result[k] = min(high, max(low, result[k] + correction))
    return result


def absorption_adjust(base: list[float], coefficients: list[float], strength: float, target: float,
                      weights: list[float] | None = None) -> list[float]:
    """Shift `base` towards pruning absorbing blocks (coefficient > average) more and amplifying ones less:
    base + strength * standardised log-coefficient, re-centred to mean `target` (weighted by `weights`, e.g.
    parameter counts, when given) and kept in [0, 0.99]. strength 0 returns base unchanged."""
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"absorption strength must be a non-negative number, got {strength}")
    if len(base) != len(coefficients) or not base:
        raise ValueError("base and coefficients must be non-empty and of equal length")
    if weights is not None and (len(weights) != len(base) or min(weights) <= 0):
        raise ValueError("weights must be positive and match base in length")
    if not all(math.isfinite(c) and c > 0 for c in coefficients):
        raise ValueError("absorption coefficients must be positive and finite")
    if strength == 0:
        return list(base)
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    if target > MAX_SPARSITY:
        raise ValueError(f"the absorption correction cannot keep a target sparsity above {MAX_SPARSITY}, "
                         f"got {target}")
    logs = [math.log(c) for c in coefficients]
    centre = sum(logs) / len(logs)
    spread = math.sqrt(sum((x - centre) ** 2 for x in logs) / len(logs))
    standardised = [(x - centre) / spread if spread > 1e-12 else 0.0 for x in logs]
    shifted = [b + strength * z for b, z in zip(base, standardised)]
    return shift_and_clip(shifted, target, weights)


@torch.no_grad()
def measure_model_absorption(probe: ModelProbe, perturbation_scale: float, num_batches: int = 2) -> list[float]:
    """Absorption coefficients of the dense model on the first `num_batches` calibration batches."""
    if probe.offload_device is not None:
        raise ValueError("the absorption correction does not support offloaded blocks yet")
    ids = probe.calib_ids[: probe.batch_size * num_batches]
    batches = capture_block_inputs(probe.model, probe.blocks, ids, probe.batch_size)
    pairs = [(b.hidden, {"__batch__": b}) for b in batches]
    index_of = {id(block): i for i, block in enumerate(probe.blocks)}

    def run(block, hidden, kwargs):  # each block with its own call arguments
        return run_block_batch(block, kwargs["__batch__"].at(index_of[id(block)], hidden))

    return measure_absorption(list(probe.blocks), pairs, run, final_norm(probe.model, probe.blocks),
                              perturbation_scale)
