"""The one route to an allocation: a spec (rule, mean sparsity, the rule's parameters, the optional absorption
correction) plus the dense model's probe give one sparsity per decoder block. The final prune, every beta-search
trial and every comparison row go through `allocate`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import IllegalAllocationError, UserError
from .absorption import absorption_adjust, measure_model_absorption
from .atp import validate_sparsity
from .probe import ModelProbe
from .rule import RULES, Allocation, AllocationRequest

ABSORPTION_BATCHES = 2  # calibration batches the absorption measurement runs (it costs O(L^2) block runs each)


@dataclass(frozen=True)
class AllocationSpec:
    """Which rule, with which parameters, at which mean sparsity; `absorption` > 0 adds the correction."""

    rule: str = "uniform"
    sparsity: float = 0.5
    params: dict[str, Any] = field(default_factory=dict)
    absorption: float = 0.0
    absorption_scale: float = 0.1

    def with_params(self, **changes) -> "AllocationSpec":
        return AllocationSpec(self.rule, self.sparsity, {**self.params, **changes}, self.absorption,
                              self.absorption_scale)

    @property
    def requires_calibration_data(self) -> bool:
        return RULES.get(self.rule).requires_calibration_data or self.absorption > 0

    @property
    def measures_model(self) -> bool:
        return RULES.get(self.rule).measures_model or self.absorption > 0

    def key(self, exclude: str | None = None) -> str:
        """Every setting that changes the allocation, as text (for search logs and caches); `exclude` leaves out
        the parameter a search varies."""
        params = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k != exclude)
        absorption = f"|absorption={self.absorption},{self.absorption_scale}" \
            if self.absorption > 0 and exclude != "absorption" else ""
        if exclude == "absorption":
            absorption = f"|absorption=*,{self.absorption_scale}"
        return f"{self.rule}({params}){absorption}"


def check_spec(spec: AllocationSpec, num_blocks: int | None) -> None:
    """Raise ValueError (IllegalAllocationError for an unrealisable sparsity / beta) for a spec that cannot work;
    before the model is loaded pass num_blocks=None, then again with the block count."""
    validate_sparsity(spec.sparsity)
    rule = RULES.get(spec.rule)
    for param in rule.params:
        param.validate(spec.params.get(param.name, param.default))
    if rule.check is not None:
        rule.check(spec.sparsity, spec.params, num_blocks)
    if not spec.absorption >= 0:
        raise ValueError(f"absorption strength must be >= 0, got {spec.absorption}")
    if not 0 < spec.absorption_scale < 10:
        raise ValueError(f"absorption perturbation scale must lie in (0, 10), got {spec.absorption_scale}")


def allocate(spec: AllocationSpec, probe: ModelProbe | None, num_blocks: int | None = None) -> Allocation:
    """The allocation for `spec` on the dense model behind `probe` (measurements are cached there).

    Values a rule cannot realise surface as UserError (IllegalAllocationError for sparsity / beta)."""
    rule = RULES.get(spec.rule)
    num_blocks = len(probe.blocks) if probe is not None else num_blocks
    params = {p.name: p.default for p in rule.params} | spec.params
    try:
        result = rule.allocate(AllocationRequest(spec.sparsity, num_blocks, params, probe))
        info = {"name": spec.rule, **result.info}
        sparsities = result.sparsities
        if spec.absorption > 0:
            coefficients = probe.cached(("absorption", spec.absorption_scale, ABSORPTION_BATCHES),
                                        lambda: measure_model_absorption(probe, spec.absorption_scale,
                                                                         ABSORPTION_BATCHES))
            info.update(base_sparsities=list(sparsities), absorption_coefficients=coefficients,
                        absorption_strength=spec.absorption, absorption_scale=spec.absorption_scale)
            sparsities = absorption_adjust(sparsities, coefficients, spec.absorption, spec.sparsity,
                                           result.mean_weights)
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"allocation {spec.rule}: {exc}", "allocation") from None
    sparsities = [float(s) for s in sparsities]
    check_allocation_contract(spec, sparsities, num_blocks, result.mean_weights)
    return Allocation(sparsities, info, result.mean_weights)


def check_allocation_contract(spec: AllocationSpec, sparsities: list[float], num_blocks: int,
                              mean_weights: list[float] | None) -> None:
    """What every rule (built-in or plug-in) must return: one sparsity per block, each in [0, 1], with mean S
    (weighted by the rule's stated weights, when it states them). 1 is allowed because ATP's legal range is
    closed: at its largest beta the last block is pruned whole, and searches score that end of the range."""
    where = f"allocation {spec.rule}" + (f" with absorption {spec.absorption:g}" if spec.absorption > 0 else "")
    if len(sparsities) != num_blocks:
        raise UserError(f"{where} returned {len(sparsities)} sparsities for {num_blocks} blocks", "allocation")
    for i, value in enumerate(sparsities):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise IllegalAllocationError(f"{where} gives block {i} the sparsity {value:g}, outside [0, 1]; choose "
                                         f"a smaller --sparsity_ratio or spread", "allocation")
    weights = mean_weights if mean_weights is not None else [1.0] * num_blocks
    mean = sum(s * w for s, w in zip(sparsities, weights)) / sum(weights)
    if abs(mean - spec.sparsity) > 1e-6:
        raise UserError(f"{where} returned a mean sparsity of {mean:.6f} instead of {spec.sparsity:g}", "allocation")


def format_plan(sparsities: list[float]) -> str:
    """Human-readable per-block plan, one line per block."""
    lines = [f"  block {i:3d}: sparsity {s:.4f}" for i, s in enumerate(sparsities)]
    mean = sum(sparsities) / len(sparsities)
    return "\n".join(lines + [f"  mean sparsity {mean:.4f} over {len(sparsities)} blocks"])
