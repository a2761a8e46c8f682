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
class Searchable:
    """A parameter a search may tune: values k * step in [0, upper(S, L)] (0 is the rule's neutral setting, e.g.
    the uniform allocation). A value the rule cannot realise scores as a failed trial, so `upper` may be loose."""

    param: str
    upper: Callable[[float, int], float]
    step: float = 0.002


@dataclass(frozen=True)
class AllocationRule:
    """allocate(request) -> Allocation. `check(sparsity, params, num_blocks)` raises ValueError for settings the
    rule cannot realise; it runs before the model is loaded (num_blocks None) and again once the block count is
    known. `requires_calibration_data`: the rule measures activations; `measures_model`: it looks at the model at
    all (weights or activations). `searchable`: the parameter `--search` (or `--PARAM search`) tunes.
    `supports_n_m`: whether the rule's allocation means anything under N:M sparsity (which fixes every block at
    N/M). `record(sparsity, num_blocks, params)`: extra facts for the results JSON."""

    name: str
    allocate: Callable[[AllocationRequest], Allocation]
    params: tuple[Param, ...] = ()
    measures_model: bool = False
    requires_calibration_data: bool = False
    check: Callable[[float, dict, "int | None"], None] | None = None
    help: str = ""
    searchable: Searchable | None = None
    supports_n_m: bool = False
    record: Callable[[float, int, dict], dict] | None = None


RULES: Registry[AllocationRule] = Registry("allocation rule", "lib.allocation")


def register_rule(rule: AllocationRule) -> AllocationRule:
    if rule.searchable is not None and rule.searchable.param not in {p.name for p in rule.params}:
        raise ValueError(f"rule {rule.name!r}: its searchable parameter {rule.searchable.param!r} is not one of its "
                         f"parameters")
    return RULES.register(rule)


# The absorption correction's strength can be tuned on top of any rule (lib.allocation.absorption).
ABSORPTION = Searchable("absorption", lambda sparsity, num_blocks: 0.1, step=0.005)


def searchable_params() -> dict[str, Searchable]:
    """Every parameter a search can tune, by name: each rule's declared one, and the absorption strength."""
    found = {rule.searchable.param: rule.searchable for rule in RULES if rule.searchable is not None}
    return {**found, ABSORPTION.param: ABSORPTION}


def rule_searching(param: str) -> str | None:
    """The rule whose searchable parameter `param` is (None for the absorption strength, which any rule takes)."""
    return next((rule.name for rule in RULES if rule.searchable is not None and rule.searchable.param == param), None)


def rule_value_error(compute: Callable[[], Any], param: str, prefix: str = "") -> Any:
    """compute(), with a ValueError about the parameter `param` reported as a UserError naming it (the math says
    "epsilon 0.3 gives ...": the message keeps what follows `prefix`)."""
    try:
        return compute()
    except ValueError as exc:
        raise UserError(str(exc).removeprefix(prefix), param) from None
