"""The paper's comparison table on one model: rows dense / uniform / ATP / OWL / AlphaPruning / DLP, each also with
the absorption correction; for each pruner and mean sparsity; columns perplexity, each zero-shot task's accuracy
and the mean over the tasks. Markdown + JSON + a PNG of the scores + a PNG of the per-block sparsity profiles.
Every finished cell (and every trial of the searches that tune a row) is cached under `<out>.cells/`, so rerunning
the same command resumes an interrupted table.

In one process by default (the model is loaded once). With --workers N the cells are spread over N worker
processes started by submitit (pip install submitit): on this machine (--executor local, one GPU per worker, or a
share of the CPU cores each) or as a SLURM job array (--executor slurm). The table is the same either way.

  python scripts/paper_table.py --demo real --methods wanda,ria --zs_limit 100 --set beta=0.008 --out out/table
  python scripts/paper_table.py --demo real --methods wanda --tune all --no_zero_shot --out out/tuned
  python scripts/paper_table.py --model meta-llama/Llama-2-7b-hf --methods wanda,sparsegpt --workers 8 --out out/l2
  python scripts/paper_table.py --model meta-llama/Llama-2-7b-hf --workers 16 --executor slurm \\
      --slurm_partition gpu --gpus_per_worker 1 --time_limit 4:00:00 --out /shared/out/l2

Flags after `--` go to main.py's parser unchanged (data, sizes, device, --zs_source, --tasks, --search_*, ...).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lib.allocation.rule import RULES  # noqa: E402
from lib.compare.table import DENSE, TableArgs, worker_steps as table_worker_steps  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.pruning.pruner import PRUNERS  # noqa: E402

EXECUTORS = ("local", "slurm")
WORKER_FLAGS = ("executor", "slurm_partition", "gpus_per_worker", "cpus_per_worker", "time_limit", "slurm_option")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paper_table.py", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub id, local model directory or .gguf file (as main.py --model)")
    model.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"], help="as main.py --demo")
    p.add_argument("--methods", default="wanda,sparsegpt", help=f"pruners, from {', '.join(PRUNERS.names())}")
    p.add_argument("--rows", default=",".join((DENSE,) + RULES.names()),
                   help=f"'dense' and allocation rules from {', '.join(RULES.names())} (default: all)")
    p.add_argument("--sparsity", type=float, default=0.7, help="mean sparsity S")
    p.add_argument("--sparsities", default=None, help="several mean sparsities, e.g. 0.6,0.7 (instead of --sparsity)")
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
    p.add_argument("--out", default="out/table",
                   help="prefix of the .md, .json, .png, .profiles.png outputs and the .cells/ cache")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (per worker with --workers; default: all cores, or each worker's share)")
    g = p.add_argument_group("workers (submitit: pip install submitit)")
    g.add_argument("--workers", type=int, default=None,
                   help="spread the cells over N worker processes, each loading the model once")
    g.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="local: processes on this machine (default); slurm: one SLURM job array")
    g.add_argument("--gpus_per_worker", type=int, default=None,
                   help="GPUs per worker (local default: 1 when there are enough GPUs, else CPU workers; slurm: 1)")
    g.add_argument("--slurm_partition", default=None, help="slurm: the partition to submit to")
    g.add_argument("--time_limit", default=None,
                   help="per worker, minutes or H:MM:SS (default 24:00:00); a worker that reaches it is requeued")
    g.add_argument("--cpus_per_worker", type=int, default=None, help="slurm: --cpus-per-task")
    g.add_argument("--slurm_option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=myproj or qos=high (repeatable)")
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


def parse_names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise UserError(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: {text} repeats a name")
    return names


def parse_sparsities(args: argparse.Namespace) -> list[float]:
    texts = args.sparsities.split(",") if args.sparsities is not None else [repr(args.sparsity)]
    values = []
    for text in (t.strip() for t in texts if t.strip()):
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"--sparsities: {text!r} is not a number") from None
        if not 0 < value < 1:
            raise UserError(f"--sparsities: {text} must lie strictly between 0 and 1")
        values.append(value)
    if not values or len(set(values)) != len(values):
        raise UserError(f"--sparsities: give distinct values, got {args.sparsities!r}")
    return values


def parse_time_limit(text: str | None) -> int:
    """Minutes, from 'M' or 'H:MM:SS' (or 'H:MM')."""
    if text is None:
        return 24 * 60
    try:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) in (2, 3) and all(0 <= p < 60 for p in parts[1:]):
            minutes = parts[0] * 60 + parts[1] + (1 if len(parts) == 3 and parts[2] else 0)
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"--time_limit {text}: give minutes or H:MM:SS") from None
    if minutes < 1:
        raise UserError(f"--time_limit {text}: at least one minute")
    return minutes


def table_args(args: argparse.Namespace, passthrough: list[str]) -> TableArgs:
    methods = parse_names(args.methods, PRUNERS.names(), "--methods")
    rules = parse_names(args.rows, (DENSE,) + RULES.names(), "--rows")
    if not (math.isfinite(args.absorption) and args.absorption >= 0):
        raise UserError(f"--absorption must be a non-negative number, got {args.absorption}")
    absorbed = parse_names(args.absorption_methods, tuple(methods), "--absorption_methods") \
        if args.absorption_methods else None
    rows_of = {}
    for item in args.method_rows:
        method, _, names = item.partition("=")
        rows_of[parse_names(method, tuple(methods), "--method_rows")[0]] = parse_names(names, RULES.names(),
                                                                                      "--method_rows")
    return TableArgs(args.model, args.demo, methods, rules, parse_sparsities(args), args.absorption, absorbed,
                     rows_of, args.tune, parse_settings(args.set), args.zs_limit, not args.no_zero_shot,
                     list(passthrough))


def check_worker_flags(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: at least 1")
    if args.workers is None:
        given = [f"--{name}" for name in WORKER_FLAGS if getattr(args, name) not in (None, [])]
        if given:
            raise UserError(f"{', '.join(given)}: applies only with --workers N")
        return
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: at least 1")
    for name in ("gpus_per_worker", "cpus_per_worker"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus_per_worker" else 1):
            raise UserError(f"--{name} {value}: out of range")
    if (args.executor or "local") == "local":
        slurm_only = [f"--{n}" for n in ("slurm_partition", "cpus_per_worker", "slurm_option") if getattr(args, n)]
        if slurm_only:
            raise UserError(f"{', '.join(slurm_only)}: applies only with --executor slurm")
    args.time_limit_min = parse_time_limit(args.time_limit)
    for item in args.slurm_option:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"--slurm_option {item}: expected KEY=VALUE, e.g. account=myproj")
    import importlib.util
    if importlib.util.find_spec("submitit") is None:
        raise UserError(f"--workers {args.workers}: worker processes are started with submitit, which is not "
                        f"installed: pip install submitit")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)

    def body() -> int:
        check_worker_flags(args)
        targs = table_args(args, passthrough)
        return in_process(args, targs) if args.workers is None else with_workers(args, targs)
    from lib.cli import run_command
    return run_command(body, "interrupted (finished cells are cached; rerun the same command to resume)")


def open_store(out: str):
    from lib.compare.store import CellStore
    from lib.outputs import check_writable_file
    for suffix in (".md", ".json", ".png", ".profiles.png"):
        check_writable_file(out + suffix, "out")
    try:
        return CellStore(out + ".cells", legacy=out + ".cells.jsonl")
    except OSError as exc:
        raise UserError(f"{out}.cells: cannot create the cell cache ({exc.strerror or exc})", "out") from None


def in_process(args: argparse.Namespace, targs: TableArgs) -> int:
    from lib.compare.store import work_through
    from lib.compare.table import Table, assemble, drop_retryable, write_outputs
    started = time.perf_counter()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    store = open_store(args.out)
    drop_retryable(store)
    table = Table(targs, store)
    table.load()
    manifest = table.write_manifest()
    for number, (key, label) in enumerate(zip(manifest["cells"], manifest["labels"]), 1):
        if store.has(key):
            print(f"[{number}/{len(manifest['cells'])}] {label}: cached", flush=True)
    with store.heartbeating():
        work_through(table.steps(), store)
    records, _ = assemble(store, manifest)
    return write_outputs(targs, manifest, records, args.out, time.perf_counter() - started)


def with_workers(args: argparse.Namespace, targs: TableArgs) -> int:
    from lib.compare import workers
    from lib.compare.table import Table, assemble, describe, drop_retryable, write_outputs
    started = time.perf_counter()
    store = open_store(args.out)
    drop_retryable(store)
    Table(targs, store).prepare()  # every check that needs no weights, here, before anything is submitted
    key = targs.manifest_key()
    launch = workers.Launch(
        workers=args.workers, folder=os.path.abspath(args.out + ".workers"), executor=args.executor or "local",
        gpus_per_worker=args.gpus_per_worker, time_limit_min=args.time_limit_min,
        partition=args.slurm_partition, cpus_per_worker=args.cpus_per_worker,
        slurm_options=dict(item.split("=", 1) for item in args.slurm_option), threads=args.threads)
    problems: list[str] = []
    manifest = store.get(key)
    if manifest is None or assemble(store, manifest)[1]:
        jobs = workers.start(launch, workers.Worker(store.root, table_worker_steps, targs, args.threads))
        print(f"{len(jobs)} workers started ({launch.executor}; job {jobs[0].job_id}"
              f"{' ...' if len(jobs) > 1 else ''}); their logs: {launch.folder}", flush=True)
        shown: set[str] = set()

        def progress() -> str | None:
            found = store.get(key)
            if found is None:
                return None
            for number, cell_key in enumerate(found["cells"], 1):
                record = store.get(cell_key)
                if record is not None and cell_key not in shown:
                    shown.add(cell_key)
                    print(f"[{number}/{len(found['cells'])}] {describe(record)}", flush=True)
            return f"cells finished: {len(shown)}/{len(found['cells'])}"
        try:
            problems = workers.wait(jobs, progress)
        except KeyboardInterrupt:
            what = workers.cancel(jobs, launch.executor)
            print(f"error: interrupted; {what}; finished cells are cached, rerun the same command to resume",
                  file=sys.stderr)
            return 130
        manifest = store.get(key)
    if manifest is None:
        raise UserError(f"no worker got as far as loading the model ({'; '.join(problems) or 'no reason given'}); "
                        f"see the logs in {launch.folder}")
    records, missing = assemble(store, manifest)
    if missing:
        print(f"error: {len(missing)} of {len(manifest['cells'])} cells not finished ({'; '.join(problems)}); "
              f"logs in {launch.folder}; rerun the same command to resume", file=sys.stderr)
        return 1
    for line in problems:
        print(f"note: {line} (its cells were finished by the others)", flush=True)
    return write_outputs(targs, manifest, records, args.out, time.perf_counter() - started,
                         {"workers": args.workers, "executor": launch.executor})


if __name__ == "__main__":
    sys.exit(main())
