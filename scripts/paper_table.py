"""The paper's comparison table on one model, in one process: rows dense / uniform / ATP / OWL / AlphaPruning /
DLP, each also with the absorption correction; for each pruner; columns perplexity, each zero-shot task's
accuracy and the mean over the tasks. Markdown + JSON + PNG; every finished cell is cached in a JSONL file next
to the JSON, so rerunning the same command resumes an interrupted table.

  python scripts/paper_table.py --demo real --methods wanda,ria --zs_limit 100 --set beta=0.008 --out out/table
  python scripts/paper_table.py --demo real --methods wanda --tune all --no_zero_shot --out out/tuned
  python scripts/paper_table.py --model meta-llama/Llama-2-7b-hf --methods wanda,sparsegpt --out out/llama2

Flags after `--` go to main.py's parser unchanged (data, sizes, device, --zs_source, --tasks, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lib.allocation.rule import RULES, searchable_params  # noqa: E402
from lib.compare.table import DENSE, Row, markdown, plot, run_table  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.pruning.pruner import PRUNERS  # noqa: E402



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paper_table.py", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub id, local model directory or .gguf file (as main.py --model)")
    model.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"], help="as main.py --demo")
    p.add_argument("--methods", default="wanda,sparsegpt", help=f"pruners, from {', '.join(PRUNERS.names())}")
    p.add_argument("--rows", default=",".join((DENSE,) + RULES.names()),
                   help=f"'dense' and allocation rules from {', '.join(RULES.names())} (default: all)")
    p.add_argument("--sparsity", type=float, default=0.7, help="mean sparsity S")
    p.add_argument("--absorption", type=float, default=0.02,
                   help="also run each allocation row with this absorption strength (0: no such rows)")
    p.add_argument("--absorption_methods", default=None,
                   help="pruners that get the absorption rows (default: every pruner in --methods)")
    p.add_argument("--method_rows", action="append", default=[], metavar="PRUNER=RULE,RULE",
                   help="limit one pruner to some rows, e.g. ria=uniform,atp,dlp (repeatable)")
    p.add_argument("--tune", choices=("needed", "all"), default="needed",
                   help="search each row's searchable parameter per pruner: 'needed' only where the rule has no "
                        "default (ATP's beta), 'all' for every row (absorption rows: also the strength)")
    p.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="fix a rule parameter for every pruner instead of searching it, e.g. beta=0.008")
    p.add_argument("--zs_limit", type=float, default=None, help="zero-shot items per task (default: all)")
    p.add_argument("--no_zero_shot", action="store_true", help="perplexity only")
    p.add_argument("--out", default="out/table", help="prefix of the .md, .json, .png and .cells.jsonl outputs")
    return p


def parse_settings(items: list[str]) -> dict[str, float]:
    """--set PARAM=VALUE flags as {param: value}, each naming a parameter some rule declares."""
    known = {p.name for rule in RULES for p in rule.params}
    fixed = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            fixed[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--set {item}: expected PARAM=NUMBER") from None
        if name.strip() not in known:
            raise UserError(f"--set {item}: no rule has a parameter {name.strip()!r}; known: {', '.join(sorted(known))}")
    return fixed


def replace_absorption(spec, strength: float):
    from dataclasses import replace
    return replace(spec, absorption=strength)


def parse_names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise UserError(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    try:
        return make_table(args, passthrough)
    except UserError as exc:
        from lib.cli import error_line
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (finished cells are cached; rerun the same command to resume)", file=sys.stderr)
        return 130


def make_table(args: argparse.Namespace, passthrough: list[str]) -> int:
    from lib import run as steps
    from lib.cli import build_parser as main_parser, config_from_flags
    from lib.eval.zeroshot import evaluate_zero_shot
    from lib.outputs import check_writable_file, write_json_atomic
    from lib.search.tune import run_search, settings_key
    from lib.session import PruningSession

    methods = parse_names(args.methods, PRUNERS.names(), "--methods")
    rules = parse_names(args.rows, (DENSE,) + RULES.names(), "--rows")
    rows = [Row(r) for r in rules] + ([Row(r, args.absorption) for r in rules if r != DENSE]
                                      if args.absorption > 0 else [])
    model_flags = ["--model", args.model] if args.model else ["--demo", args.demo]
    ns = main_parser().parse_args(model_flags + ["--sparsity_ratio", str(args.sparsity), "--allocation", "owl",
                                                 "--quiet"] + passthrough)
    if not args.no_zero_shot:
        ns.eval_zero_shot = True
        if args.zs_limit is not None:
            ns.zs_limit = args.zs_limit
    config = config_from_flags(ns)
    config.validate()
    for suffix in (".md", ".json", ".png", ".cells.jsonl"):
        check_writable_file(args.out + suffix, "out")

    device, dtype = steps.prepare(config)
    loaded = steps.load_model(config, device, dtype)
    data, data_records = steps.load_data(config, loaded)  # owl above: the calibration data is loaded
    session = PruningSession(loaded, data, progress=False)
    source = steps.zero_shot_tasks(config) if config.zero_shot.enabled else None
    tasks = source.tasks if source else []
    if source:
        print(source.describe(), flush=True)

    def prune(method: str, sparsities: list[float]) -> None:
        pruner = PRUNERS.get(method)
        session.prune(sparsities, pruner, config.prune.params, config.prune.n_m)

    def perplexity() -> float:
        return session.perplexity(config.data.max_eval_windows)[0]

    def zero_shot():
        if not config.zero_shot.enabled:
            return None
        with session.whole_model_forwards():
            return evaluate_zero_shot(session.model, loaded.tokenizer, tasks, source.tasks_dir,
                                      config.zero_shot.batch_size, config.zero_shot.limit, config.data.seed)

    fixed = parse_settings(args.set)
    chosen: dict[tuple, dict] = {}

    def search(method: str, spec, param: str) -> float:
        from dataclasses import replace
        method_config = replace(config, prune=replace(config.prune, method=method), allocation=spec,
                                search=replace(config.search, param=param,
                                               step=searchable_params()[param].step))
        return run_search(session, method_config)[1]

    def settle(method: str, spec):
        """The spec a cell uses: --set values, then (per --tune) the searched parameter and, on an absorption
        row, the searched strength on top of the base rule's tuned setting."""
        rule = RULES.get(spec.rule)
        spec = spec.with_params(**{k: v for k, v in fixed.items() if k in {p.name for p in rule.params}})
        tuned: dict[str, float] = {}
        target = rule.searchable.param if rule.searchable else None
        default = next((p.default for p in rule.params if p.name == target), None)
        if target and target not in fixed and (args.tune == "all" or spec.params.get(target, default) is None):
            key = (method, spec.rule, target)
            if key not in chosen:
                chosen[key] = search(method, replace_absorption(spec, 0.0), target)
            tuned[target] = chosen[key]
            spec = spec.with_params(**{target: tuned[target]})
        if spec.absorption > 0 and args.tune == "all":
            key = (method, spec.rule, "absorption", tuple(sorted(tuned.items())))
            if key not in chosen:
                chosen[key] = search(method, spec, "absorption")
            tuned["absorption"] = chosen[key]
            spec = replace_absorption(spec, tuned["absorption"])
        return spec, tuned

    settings = "|".join(str(x) for x in (
        settings_key(session, config), config.zero_shot.limit, ",".join(tasks), source.source if source else "",
        args.tune, sorted(fixed.items())))
    started = time.perf_counter()
    absorbed = set(parse_names(args.absorption_methods, tuple(methods), "--absorption_methods")) \
        if args.absorption_methods else set(methods)
    rows_of = {}
    for item in args.method_rows:
        method, _, names = item.partition("=")
        rows_of[parse_names(method, tuple(methods), "--method_rows")[0]] = set(
            parse_names(names, RULES.names(), "--method_rows"))
    records = run_table(session, rows, methods, config.allocation.with_params(), prune, perplexity, zero_shot,
                        settle, args.out + ".cells.jsonl", settings, absorbed=absorbed, rows_of=rows_of)
    limit = config.zero_shot.limit
    title = (f"{loaded.name}, mean sparsity {args.sparsity:g}; perplexity on {os.path.basename(config.data.eval_data)}"
             f" ({data_records['eval']['seqlen']}-token windows"
             f"{f', first {config.data.max_eval_windows}' if config.data.max_eval_windows else ''}); "
             + (f"zero-shot acc on {f'the first {limit} items' if limit else 'all items'} of each task"
                if tasks else "no zero-shot"))
    table = markdown(records, tasks, title)
    print(table)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plotted = plot(records, args.out + ".png")
    write_json_atomic(args.out + ".json", {
        "model": loaded.name, "sparsity": args.sparsity, "methods": methods, "rows": [r.label for r in rows],
        "tasks": tasks, "zs_limit": limit, "zs_source": source.record if source else None,
        "tune": args.tune, "set": fixed,
        "eval": data_records["eval"], "calibration": data_records["calibration"], "cells": records,
        "plot": args.out + ".png" if plotted else None, "seconds": time.perf_counter() - started})
    print(f"table written to {args.out}.md, .json{', .png' if plotted else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
