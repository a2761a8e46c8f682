"""Named plug-ins (pruners, allocation rules) and the typed parameters they declare.

A plug-in module registers itself when imported; the CLI builds its choices, flags and --help from what is
registered, so adding a pruner or a rule is one new file and no edit anywhere else.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a plug-in; `name` is also its flag (--name) and its key in the params dict."""

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # what `check` demands, in words ("must be positive")
    choices: tuple | None = None  # the only values allowed, when they can be listed

    def validate(self, value: Any) -> None:
        """Raise ValueError when `value` breaks this parameter's rule (non-finite floats always do)."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value}: {self.name} must be a finite number")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value}: {self.name} must be one of {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{value}: {self.name} {self.requirement or 'is out of range'}")


def positive(value) -> bool:
    return value > 0


def non_negative(value) -> bool:
    return value >= 0


T = TypeVar("T")

# The settings the CLI defines itself (lib.cli; a test keeps this list equal to its flags). A plug-in parameter
# is also a flag, so it may not take one of these names.
BUILT_IN_SETTINGS = frozenset({
    "help", "model", "demo", "dtype", "device", "offload", "device_map", "prune_method", "sparsity_ratio",
    "sparsity_type", "allocation", "absorption", "absorption_scale", "calib_data", "eval_data", "nsamples", "seqlen",
    "seed", "calib_batch_size", "eval_batch_size", "eval_dense", "max_eval_windows", "search", "search_strategy",
    "search_step", "search_coarse", "search_tol", "search_eval_windows", "search_refine", "search_log",
    "search_plot", "search_workers", "search_points", "eval_zero_shot", "tasks", "tasks_dir", "zs_source",
    "zs_batch_size", "zs_limit", "save_model", "save_format", "results", "quiet"})


class Registry(Generic[T]):
    """Plug-ins of one kind by name, in registration order. `package` names the package whose modules hold the
    built-in ones: they are imported on first use, so every module there registers itself."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, item: T) -> T:
        name = getattr(item, "name")
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        clash = sorted(p.name for p in getattr(item, "params", ()) if p.name in BUILT_IN_SETTINGS)
        if clash:
            raise ValueError(f"{self.kind} {name!r}: parameter name(s) {', '.join(clash)} are taken by the CLI's own "
                             f"flags (--{clash[0]}); give the parameter a name of its own, e.g. {name}_{clash[0]}")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> tuple[str, ...]:
        self._load_builtins()
        return tuple(self._items)

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._items)}") from None

    def __iter__(self) -> Iterator[T]:
        self._load_builtins()
        return iter(list(self._items.values()))

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._items


def declared_params(plugins) -> list[Param]:
    """Every parameter declared by `plugins`, once per name (two plug-ins may share one, e.g. a threshold)."""
    seen: dict[str, Param] = {}
    for plugin in plugins:
        for param in plugin.params:
            seen.setdefault(param.name, param)
    return list(seen.values())
