"""What a pruner is: a name, the input statistics it needs, its parameters, and a function that prunes the Linear
layers of one decoder block to one sparsity. Each pruner lives in its own module of this package and registers
itself with `register_pruner`; the sequential walk (lib.pruning.sequential) feeds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..calibration.stats import InputStats
from ..registry import Param, Registry

# The statistics lib.calibration.stats can collect per Linear input.
SQ_NORM = "sq_norm"  # sum over tokens of x_j^2, per input feature
XTX = "xtx"  # sum over tokens of x x^T
KNOWN_STATS = frozenset({SQ_NORM, XTX})

PruneFn = Callable[[dict[str, nn.Linear], "dict[str, InputStats] | None", float, "tuple[int, int] | None",
                    dict[str, Any]], None]


@dataclass(frozen=True)
class Pruner:
    """prune(linears, stats, sparsity, n_m, params) zeroes weights in place (and may update the kept ones).

    `stats` holds each Linear's input statistics when `needs` is not empty, else None. `n_m` is (N, M) for N:M
    sparsity, else None. `params` maps each declared Param's name to its value.
    """

    name: str
    prune: PruneFn
    needs: frozenset[str] = field(default_factory=frozenset)
    params: tuple[Param, ...] = ()
    help: str = ""

    def __post_init__(self):
        unknown = set(self.needs) - KNOWN_STATS
        if unknown:
            raise ValueError(f"pruner {self.name!r} needs unknown statistics {sorted(unknown)}")

    @property
    def requires_calibration_data(self) -> bool:
        return bool(self.needs)


PRUNERS: Registry[Pruner] = Registry("pruner", "lib.pruning")


def register_pruner(pruner: Pruner) -> Pruner:
    return PRUNERS.register(pruner)


def default_params(pruner: Pruner) -> dict[str, Any]:
    return {p.name: p.default for p in pruner.params}
