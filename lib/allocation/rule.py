"""What an allocation rule is: a name, its parameters, whether it measures the model, and a function that gives one
sparsity per decoder block with mean S. Each rule lives in its own module of this package and registers itself
with `register_rule`; lib.allocation.allocate is the one route that calls them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError
from ..registry import Param, Registry
from .probe import ModelProbe


@dataclass
class Allocation:
    """One sparsity per block, the facts to record, and (optionally) the weights under which the mean is S."""

    sparsities: list[float]
    info: dict = field(default_factory=dict)
    mean_weights: list[float] | None = None  # e.g. parameter counts, when the rule keeps a weighted mean


@dataclass
class AllocationRequest:
    sparsity: float
    num_blocks: int
    params: dict[str, Any]
    probe: ModelProbe | None  # measurements of the dense model; None only for rules that measure nothing


@dataclass(frozen=True)
class AllocationRule:
    """allocate(request) -> Allocation. `check(sparsity, params, num_blocks)` raises ValueError for settings the
    rule cannot realise; it runs before the model is loaded (num_blocks None) and again once the block count is
    known. `requires_calibration_data`: the rule measures activations; `measures_model`: it looks at the model at
    all (weights or activations)."""

    name: str
    allocate: Callable[[AllocationRequest], Allocation]
    params: tuple[Param, ...] = ()
    measures_model: bool = False
    requires_calibration_data: bool = False
    check: Callable[[float, dict, "int | None"], None] | None = None
    help: str = ""


RULES: Registry[AllocationRule] = Registry("allocation rule", "lib.allocation")


def register_rule(rule: AllocationRule) -> AllocationRule:
    return RULES.register(rule)


def rule_value_error(compute: Callable[[], Any], param: str, prefix: str = "") -> Any:
    """compute(), with a ValueError about the parameter `param` reported as a UserError naming it (the math says
    "epsilon 0.3 gives ...": the message keeps what follows `prefix`)."""
    try:
        return compute()
    except ValueError as exc:
        raise UserError(str(exc).removeprefix(prefix), param) from None
