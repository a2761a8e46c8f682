"""A run's settings as typed dataclasses, checked once, before any model is loaded.

Field names are the CLI's flag names (lib.cli maps one to the other and is the only module that knows argparse).
`RunConfig.validate` raises UserError with `setting` naming the field at fault, so the CLI can show the flag.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .allocation.allocate import AllocationSpec, check_spec
from .allocation.rule import ABSORPTION, RULES
from .errors import IllegalAllocationError, UserError
from .outputs import check_output_paths, check_writable_file, resolved
from .pruning.masks import parse_sparsity_type
from .pruning.pruner import PRUNERS, Pruner
from .sparse.markers import is_compressed_dir

HUB_CALIBRATION = "c4"
HUB_EVALUATION = "wikitext2"
DEFAULT_NSAMPLES = 128


@dataclass
class ModelConfig:
    model: str | None = None  # hub id, local directory or .gguf file
    demo: str | None = None  # "tiny" or "real"
    dtype: str = "auto"
    device: str = "auto"
    offload: bool = False
    device_map: str | None = None


@dataclass
class DataConfig:
    calib_data: str = HUB_CALIBRATION
    eval_data: str = HUB_EVALUATION
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int | None = None  # None: min(2048, the model's positions)
    seed: int = 0
    calib_batch_size: int = 8
    eval_batch_size: int = 4
    eval_dense: bool = False
    max_eval_windows: int | None = None


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity_type: str = "unstructured"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_sparsity_type(self.sparsity_type)

    @property
    def pruner(self) -> Pruner:
        return PRUNERS.get(self.method)


@dataclass
class SearchConfig:
    param: str | None = None  # the parameter to tune (--search PARAM, or --PARAM search); None: no search
    strategy: str = "golden"
    step: float = 0.002
    coarse: int = 3
    tol: float | None = None
    eval_windows: int | None = None
    refine: int = 2
    log: str | None = None
    plot: str | None = None
    workers: int = 1  # processes scoring trials at once (lib.compare.workers)
    points: int | None = None  # the parallel strategy's values per round (None: one per worker)

    @property
    def enabled(self) -> bool:
        return self.param is not None

    def start(self, spec: AllocationSpec) -> AllocationSpec:
        """`spec` with the searched value at the low end of its range (what is checked before the search)."""
        if not self.enabled:
            return spec
        if self.param == ABSORPTION.param:
            return replace(spec, absorption=0.0)
        return spec.with_params(**{self.param: 0.0})


@dataclass
class ZeroShotConfig:
    enabled: bool = False
    tasks: list[str] | None = None  # None: the paper's seven
    tasks_dir: str | None = None
    batch_size: int | str = 8
    limit: int | float | None = None
    source: str = "auto"


@dataclass
class OutputConfig:
    save_model: str | None = None
    save_format: str = "dense"
    results: str | None = None
    quiet: bool = False


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    prune: PruneConfig
    allocation: AllocationSpec
    search: SearchConfig = field(default_factory=SearchConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    record: dict[str, Any] = field(default_factory=dict)  # the resolved flags, written to results JSON as "args"

    def validate(self) -> None:
        """Everything that can be checked without loading a model."""
        _check_model(self.model)
        _check_prune(self.prune, self.allocation)
        _check_allocation(self.allocation, self.search)
        _check_data(self.data)
        _check_search(self.search)
        _check_zero_shot(self.zero_shot)
        _check_outputs(self.outputs, self.search)
        if self.model.model is not None:  # last: a hub id may need a look at the network
            from .models.loading import check_model_path
            check_model_path(self.model.model)


ZERO_SHOT_SETTINGS = ("tasks", "tasks_dir", "zs_source", "zs_batch_size", "zs_limit")
SEARCH_SETTINGS = ("search_strategy", "search_step", "search_coarse", "search_tol", "search_eval_windows",
                   "search_refine", "search_log", "search_plot", "search_workers", "search_points")


def check_given_settings(config: RunConfig, given: frozenset[str]) -> None:
    """Refuse settings the user gave that this run would ignore: a flag that does nothing must not look as if it
    did something. `given` names the settings set explicitly."""
    for setting, reason in ignored_settings(config, given).items():
        raise UserError(f"{reason}; this run would ignore it", setting)
    if "offload" in given and config.model.offload:
        from .models.loading import resolve_device
        if resolve_device(config.model.device).type != "cuda":
            raise UserError("moves decoder blocks to a GPU one at a time; this run has no CUDA device",
                            "offload")


def ignored_settings(config: RunConfig, given: frozenset[str]) -> dict[str, str]:
    """The given settings this run would not use, each with the reason (tools that run many configurations with
    one set of flags use it to pass each run only what applies to it)."""
    ignored: dict[str, str] = {}

    def only_with(settings, active: bool, condition: str) -> None:
        for setting in settings:
            if setting in given and not active:
                ignored[setting] = f"applies only {condition}"

    only_with(ZERO_SHOT_SETTINGS, config.zero_shot.enabled, "with --eval_zero_shot")
    only_with(SEARCH_SETTINGS, config.search.enabled, "with a search (--search PARAM, or e.g. --beta search)")
    only_with(("save_format",), bool(config.outputs.save_model), "with --save_model")
    only_with(("absorption_scale",), config.allocation.absorption > 0, "with --absorption above 0")
    for kind, chosen, plugins in (("--prune_method", config.prune.method, PRUNERS),
                                  ("--allocation", config.allocation.rule, RULES)):
        own = {p.name for p in plugins.get(chosen).params} if chosen in plugins else set()
        for plugin in plugins:
            for param in plugin.params:
                if param.name in given and param.name not in own:
                    ignored.setdefault(param.name, f"is a parameter of {kind} {plugin.name}, not of {kind} {chosen}")
    return ignored


def setting_error(setting: str, exc: ValueError) -> UserError:
    """A math module's ValueError as a UserError about one setting (keeps the illegal-allocation exit code)."""
    if isinstance(exc, UserError):
        return type(exc)(str(exc), exc.setting or setting)
    return UserError(str(exc), setting)


def _at_least(setting: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UserError(f"{value}: must be at least {low}", setting)


def _check_model(config: ModelConfig) -> None:
    if (config.model is None) == (config.demo is None):
        raise UserError("give exactly one of --model or --demo")
    from .models.loading import parse_device
    try:
        parse_device(config.device)
    except ValueError as exc:
        raise setting_error("device", exc) from None
    if config.model is not None and is_compressed_dir(config.model):
        raise UserError(f"{config.model} is a compressed checkpoint (--save_format compressed): it is already "
                        f"pruned and its Linears are packed. Run it with lib.sparse.load_compressed, or "
                        f"from_pretrained after lib.sparse.register() (README, 'Speed'); to prune again, start "
                        f"from the dense original", "model")


def _check_prune(config: PruneConfig, allocation: AllocationSpec) -> None:
    if config.method not in PRUNERS:
        raise UserError(f"{config.method}: unknown; choose from {', '.join(PRUNERS.names())}", "prune_method")
    try:
        n_m = config.n_m
    except ValueError as exc:
        raise setting_error("sparsity_type", exc) from None
    _check_params(config.pruner.params, config.params)
    if n_m is not None and allocation.rule in RULES and not RULES.get(allocation.rule).supports_n_m:
        raise UserError(f"{config.sparsity_type} fixes every block's sparsity at N/M; --allocation "
                        f"{allocation.rule} does not apply", "sparsity_type")


def _check_params(params, values: dict[str, Any]) -> None:
    for param in params:
        value = values.get(param.name, param.default)
        try:
            param.validate(value)
        except ValueError:
            raise UserError(f"{param.requirement or 'is out of range'}, got {value}", param.name) from None


def _check_allocation(spec: AllocationSpec, search: SearchConfig) -> None:
    if spec.rule not in RULES:
        raise UserError(f"{spec.rule}: unknown; choose from {', '.join(RULES.names())}", "allocation")
    rule = RULES.get(spec.rule)
    if search.enabled and search.param != ABSORPTION.param and (
            rule.searchable is None or rule.searchable.param != search.param):
        own = f"its searchable parameter is {rule.searchable.param}" if rule.searchable else "it has none to search"
        raise UserError(f"{search.param} is not a parameter --allocation {spec.rule} can tune ({own}; the "
                        f"absorption strength can be searched for any rule)", "search")
    _check_params(rule.params, search.start(spec).params)
    if not (math.isfinite(spec.absorption) and 0 <= spec.absorption <= 1):
        raise UserError(f"strength must lie in [0, 1] (sparsity units per standard deviation), got "
                        f"{spec.absorption}", "absorption")
    if not (math.isfinite(spec.absorption_scale) and 0 < spec.absorption_scale < 10):
        raise UserError(f"must lie in (0, 10), got {spec.absorption_scale}", "absorption_scale")
    try:
        check_spec(search.start(spec), None)
    except ValueError as exc:
        raise setting_error("allocation", exc) from None


def _check_data(config: DataConfig) -> None:
    for setting in ("nsamples", "calib_batch_size", "eval_batch_size"):
        _at_least(setting, getattr(config, setting), 1)
    for setting in ("seqlen", "max_eval_windows"):
        _at_least(setting, getattr(config, setting), 2)
    if not 0 <= config.seed < 2 ** 32:
        raise UserError(f"{config.seed}: must lie in [0, 2^32)", "seed")
    for setting, hub_name in (("calib_data", HUB_CALIBRATION), ("eval_data", HUB_EVALUATION)):
        value = getattr(config, setting)
        if value != hub_name and not os.path.exists(value):
            raise UserError(f"{value}: no such file or directory", setting)


def _check_search(config: SearchConfig) -> None:
    if not config.enabled:
        return
    if not (math.isfinite(config.step) and 1e-6 <= config.step <= 1):
        raise UserError(f"{config.step}: the grid step of the searched value must lie in [1e-6, 1]", "search_step")
    _at_least("search_coarse", config.coarse, 2)
    if config.coarse > 1000:
        raise UserError(f"{config.coarse}: at most 1000 points", "search_coarse")
    if config.tol is not None and not (math.isfinite(config.tol) and 0 < config.tol <= 1):
        raise UserError(f"{config.tol}: must lie in (0, 1]", "search_tol")
    _at_least("search_eval_windows", config.eval_windows, 2)
    _at_least("search_refine", config.refine, 0)
    _at_least("search_workers", config.workers, 1)
    _at_least("search_points", config.points, 2)
    if config.points is not None and config.strategy != "parallel":
        raise UserError(f"{config.points}: values per round are a setting of --search_strategy parallel, not of "
                        f"{config.strategy}", "search_points")
    if config.workers > 1:
        import importlib.util
        if importlib.util.find_spec("submitit") is None:
            raise UserError(f"{config.workers}: worker processes are started with submitit, which is not "
                            f"installed: pip install submitit", "search_workers")


def _check_zero_shot(config: ZeroShotConfig) -> None:
    if isinstance(config.batch_size, int):
        _at_least("zs_batch_size", config.batch_size, 1)
    elif config.batch_size != "auto":
        raise UserError(f"{config.batch_size}: must be a whole number or 'auto'", "zs_batch_size")
    if config.limit is not None and not (math.isfinite(config.limit) and config.limit > 0):
        raise UserError(f"{config.limit}: must be a positive count (or a fraction below 1)", "zs_limit")
    if config.limit is not None and config.limit > 1 and config.limit != int(config.limit):
        raise UserError(f"{config.limit}: a count above 1 must be a whole number", "zs_limit")
    if config.tasks_dir is not None and not os.path.isdir(config.tasks_dir):
        raise UserError(f"{config.tasks_dir}: not a directory", "tasks_dir")


def _check_outputs(config: OutputConfig, search: SearchConfig) -> None:
    # symbolic links resolved once, here: what is written, printed and recorded is where the data really is
    config.results, config.save_model = resolved(config.results), resolved(config.save_model)
    search.log, search.plot = resolved(search.log), resolved(search.plot)
    check_output_paths(config.results, config.save_model)
    if search.enabled:
        for setting in ("log", "plot"):
            path = getattr(search, setting)
            if path:
                check_writable_file(path, f"search_{setting}")
        if search.plot:
            from .search.plot import plotting_available
            if not plotting_available():
                raise UserError(f"{search.plot}: drawing the plot needs matplotlib (pip install matplotlib); "
                                f"leave the flag out to run without it", "search_plot")
