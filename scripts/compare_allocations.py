"""Compare layer-wise sparsity allocations side by side: one main.py run per (pruner, sparsity, allocation).

Every run goes through lib.cli.main in this process (the model is loaded again per run) and writes its results
JSON into a temporary directory; this script gathers them into
  * a Markdown table (rows: pruner x mean sparsity; columns: allocations; cells: perplexity, plus zero-shot mean
    accuracy when --eval_zero_shot is passed through; the best of each row in bold), printed and saved to --out_md,
  * a PNG of the per-block sparsity profiles (one subplot per sparsity, one line per allocation), --out_png,
  * a JSON with every run's full results, --out_json.
ATP runs use `--beta search`, i.e. they are scored at their searched best beta. --absorption X adds a
"<base>+absorption" column next to every base allocation. A failed run shows as "error: <message>" in its cell
and makes the exit code 1 once all other runs are done.

Example:
  python scripts/compare_allocations.py --demo --sparsities 0.6,0.7 --methods wanda \\
      --allocations uniform,atp,owl,alpha --absorption 0.02 --out_md cmp.md --out_png cmp.png -- --nsamples 32
Flags after `--` go to every main.py run unchanged (data, sizes, zero-shot, device, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as `python scripts/compare_allocations.py` from anywhere
    sys.path.insert(0, REPO_ROOT)

from lib.allocation.rule import RULES  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.outputs import check_writable_file  # noqa: E402
from lib.pruning.pruner import PRUNERS  # noqa: E402

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
# main.py flags (argparse dests) that this script sets for each run itself.
CONTROLLED_DESTS = ("model", "demo", "prune_method", "sparsity_ratio", "sparsity_type", "allocation", "beta",
                    "absorption", "results", "save_model")
ERROR_TAIL_LINES = 15  # of a failed run's output, shown on stderr


@dataclass(frozen=True)
class Combination:
    method: str
    sparsity: float
    base: str  # the allocation rule
    absorption: float = 0.0  # strength of the absorption correction; 0 is off

    @property
    def column(self) -> str:
        return f"{self.base}+absorption" if self.absorption > 0 else self.base

    def flags(self) -> list[str]:
        out = ["--prune_method", self.method, "--sparsity_ratio", repr(self.sparsity), "--allocation", self.base]
        searchable = RULES.get(self.base).searchable
        needed = searchable is not None and next(p.default for p in RULES.get(self.base).params
                                                 if p.name == searchable.param) is None
        if needed:  # a parameter without a default (ATP's beta) is searched
            out += ["--search", searchable.param]
        if self.absorption > 0:
            out += ["--absorption", repr(self.absorption)]
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_allocations.py", description=__doc__.split("\n\n")[0],
        epilog="Flags after `--` are passed to every main.py run.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="hub id, local model directory or .gguf file (as main.py --model)")
    model.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"], help="as main.py --demo")
    p.add_argument("--sparsities", default="0.7", help="comma-separated mean sparsities, e.g. 0.6,0.7")
    p.add_argument("--methods", default="wanda", help=f"comma-separated pruners from {', '.join(PRUNERS.names())}")
    p.add_argument("--allocations", default=",".join(RULES.names()),
                   help=f"comma-separated allocations from {', '.join(RULES.names())}")
    p.add_argument("--absorption", type=float, default=0.0,
                   help="also run every allocation with this absorption strength ('<base>+absorption' columns)")
    p.add_argument("--out_md", default=None, help="Markdown file for the table (always printed too)")
    p.add_argument("--out_png", default=None, help="PNG of the per-block sparsity profiles (needs matplotlib)")
    p.add_argument("--out_json", default=None, help="JSON file with every run's results")
    p.add_argument("--verbose", action="store_true", help="show each run's own output")
    return p


def parse_list(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag}: give at least one value")
    for item in items:
        if item not in allowed:
            raise UserError(f"{flag}: unknown {item!r}; choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise UserError(f"{flag}: {text} repeats a value")
    return items


def parse_sparsities(text: str) -> list[float]:
    values = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--sparsities: {item!r} is not a number") from None
        if not 0 < value < 1:
            raise UserError(f"--sparsities: {item} must lie strictly between 0 and 1")
        values.append(value)
    if not values:
        raise UserError("--sparsities: give at least one value")
    if len(set(values)) != len(values):
        raise UserError(f"--sparsities: {text} repeats a value")
    return values


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's flags, main.py flags after the first `--`)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_passthrough(flags: list[str]) -> None:
    """Parse the pass-through flags with main.py's own parser now, rather than failing in every run later."""
    from lib.cli import build_parser as main_parser
    parser = main_parser()
    messages = io.StringIO()
    try:
        with contextlib.redirect_stdout(messages), contextlib.redirect_stderr(messages):
            parsed = parser.parse_args(flags)
    except SystemExit as exc:
        if exc.code == 0:
            raise UserError("flags after --: -h/--help is not a run flag; see python main.py --help") from None
        reason = messages.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise UserError(f"flags after --: {reason}") from None
    except UserError as exc:  # in case main.py's parser reports its errors this way
        raise UserError(f"flags after --: {exc}") from None
    for dest in CONTROLLED_DESTS:
        if getattr(parsed, dest) != parser.get_default(dest):
            raise UserError(f"flags after --: --{dest} is set by compare_allocations.py itself; "
                            f"use its own options (--model/--demo, --methods, --sparsities, --allocations, "
                            f"--absorption)")


def applying_to(combo: Combination, passthrough: list[str]) -> list[str]:
    """The pass-through flags this combination's run uses: one set of flags serves every cell, and a flag for
    another rule or pruner (or for the search, in a cell without one) is left out of that cell's run."""
    from lib.cli import build_parser as main_parser, config_from_flags, given_settings
    from lib.config import ignored_settings
    parser = main_parser()
    config = config_from_flags(parser.parse_args(["--demo"] + combo.flags() + passthrough))
    drop = set(ignored_settings(config, given_settings(passthrough)))
    options = {opt: action for action in parser._actions for opt in action.option_strings}
    kept, i = [], 0
    while i < len(passthrough):
        flag = passthrough[i].split("=", 1)[0]
        action = options.get(flag)
        takes_value = action is not None and action.nargs != 0 and "=" not in passthrough[i]
        width = 2 if takes_value else 1
        if action is None or action.dest not in drop:
            kept += passthrough[i:i + width]
        i += width
    return kept


def check_output_path(flag: str, path: str | None) -> None:
    if path:
        try:
            check_writable_file(path, flag.lstrip("-"))
        except UserError as exc:
            raise UserError(f"{flag} {exc}") from None


def combinations(methods: list[str], sparsities: list[float], allocations: list[str],
                 absorption: float) -> list[Combination]:
    """Row-major order: method, then sparsity, then each allocation followed by its absorption variant."""
    strengths = [0.0] + ([absorption] if absorption > 0 else [])
    return [Combination(m, s, a, x) for m in methods for s in sparsities for a in allocations for x in strengths]


class _Tee(io.TextIOBase):
    """A text stream that copies everything to several streams (the run log, and the console with --verbose)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _last_error_line(log: str) -> str | None:
    lines = [line.strip() for line in log.splitlines() if "error: " in line]
    return lines[-1].split("error: ", 1)[1] if lines else None


def run_one(model_flags: list[str], combo: Combination, passthrough: list[str], workdir: str,
            verbose: bool) -> dict:
    """Run main.py in-process for one combination: a record with its results or its error message."""
    from lib.cli import main as cli_main
    results_path = os.path.join(workdir, f"run-{combo.method}-{combo.sparsity:g}-{combo.column}.json")
    argv = model_flags + combo.flags() + (["--quiet"] if not verbose else []) + applying_to(combo, passthrough)
    argv += ["--results", results_path]
    log = io.StringIO()
    out_sink, err_sink = (_Tee(log, sys.stdout), _Tee(log, sys.stderr)) if verbose else (log, log)
    started = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stdout(out_sink), contextlib.redirect_stderr(err_sink):
            try:
                code = cli_main(argv)
            except SystemExit as exc:  # argparse rejecting a flag
                code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
            except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
                traceback.print_exc()
                code, error = EXIT_RUN_FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        gc.collect()
        _empty_cuda_cache()
    if code == 130:
        raise KeyboardInterrupt
    if code == 0 and not os.path.isfile(results_path):
        code, error = EXIT_RUN_FAILED, "the run wrote no results file"
    if code != 0:
        error = error or _last_error_line(log.getvalue()) or f"exit code {code}"
        tail = log.getvalue().strip().splitlines()[-ERROR_TAIL_LINES:]
        if not verbose:
            print("\n".join("    " + line for line in tail), file=sys.stderr)
    record = {"method": combo.method, "sparsity": combo.sparsity, "allocation": combo.column,
              "base_allocation": combo.base, "absorption": combo.absorption, "argv": argv,
              "ok": code == 0, "error": error, "seconds": time.perf_counter() - started, "results": None}
    if code == 0:
        with open(results_path, encoding="utf-8") as f:
            record["results"] = json.load(f)
    return record


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(record: dict) -> str:
    if not record["ok"]:
        return f"error: {record['error']}"
    results = record["results"]
    beta = results["allocation"].get("beta")
    return f"ppl {results['perplexity']:.4f}" + (f" at beta={beta:g}" if beta is not None else "")


# ---------------------------------------------------------------- outputs

def _mean_acc(record: dict) -> float | None:
    zero_shot = (record["results"] or {}).get("zero_shot") if record["ok"] else None
    return zero_shot.get("mean_acc") if zero_shot else None


def _ppl(record: dict) -> float | None:
    value = record["results"]["perplexity"] if record["ok"] else None
    return value if value is not None and math.isfinite(value) else None


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def markdown_table(records: list[dict], columns: list[str]) -> str:
    """Rows: method x sparsity; cells: perplexity (and ' / mean zero-shot accuracy' when any run has one), the
    lowest perplexity and highest accuracy of each row in bold; ATP cells name their searched beta."""
    with_acc = any(_mean_acc(r) is not None for r in records)
    rows: dict[tuple[str, float], dict[str, dict]] = {}
    for r in records:
        rows.setdefault((r["method"], r["sparsity"]), {})[r["allocation"]] = r
    header = "| method | sparsity | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for (method, sparsity), cells in rows.items():
        ppls = [p for p in (_ppl(c) for c in cells.values()) if p is not None]
        accs = [a for a in (_mean_acc(c) for c in cells.values()) if a is not None]
        texts = []
        for column in columns:
            record = cells.get(column)
            if record is None:
                texts.append("-")
                continue
            if not record["ok"]:
                texts.append("error: " + record["error"].replace("|", "\\|"))
                continue
            ppl, acc = _ppl(record), _mean_acc(record)
            text = _bold(f"{ppl:.2f}", ppl == min(ppls)) if ppl is not None else "nan"
            if with_acc:
                text += " / " + (_bold(f"{acc:.4f}", acc == max(accs)) if acc is not None else "-")
            beta = record["results"]["allocation"].get("beta")
            if beta is not None:
                text += f" (β={beta:g})"
            texts.append(text)
        lines.append(f"| {method} | {sparsity:g} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def describe(records: list[dict], model_label: str, with_acc: bool) -> str:
    """The lines above the table: what was measured and on what."""
    ok = [r["results"] for r in records if r["ok"]]
    text = f"Layer-wise sparsity allocations on {model_label}."
    if ok:
        ev = ok[0]["eval"]
        text += (f" Perplexity on {os.path.basename(str(ev['data']))} ({ev['windows']} windows of {ev['seqlen']} "
                 f"tokens; lower is better)")
        dense = ok[0].get("dense_perplexity")
        text += f", dense model {dense:.2f}." if dense is not None else "."
    if with_acc:
        text += " After the slash: mean zero-shot accuracy (higher is better)."
    return text + " ATP at its searched best beta. Best of each row in bold."


def plot_profiles(records: list[dict], columns: list[str], sparsities: list[float], path: str) -> bool:
    """PNG of per-block sparsity plans, one subplot per mean sparsity; False when matplotlib is missing.

    Colour names the base allocation, a dashed line its absorption variant. A plan that is identical for every
    pruner is drawn once; one that differs (ATP's searched beta depends on the pruner) gets one line per pruner,
    told apart by marker."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.figure import Figure  # Figure, not pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator
    bases = list(dict.fromkeys(column.split("+")[0] for column in columns))
    markers = ["o", "s", "^", "x"]
    fig = Figure(figsize=(4.2 * len(sparsities) + 2.2, 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(sparsities), squeeze=False)[0]
    for ax, sparsity in zip(axes, sparsities):
        for column in columns:
            plans = [(r["method"], r["results"]["allocation"]["sparsities"]) for r in records
                     if r["ok"] and r["sparsity"] == sparsity and r["allocation"] == column]
            distinct = len({tuple(round(v, 9) for v in plan) for _, plan in plans}) > 1
            for k, (method, plan) in enumerate(plans if distinct else plans[:1]):
                ax.plot(range(len(plan)), plan, "--" if "+" in column else "-", marker=markers[k % len(markers)],
                        ms=3, color=f"C{bases.index(column.split('+')[0])}",
                        label=f"{column} ({method})" if distinct else column)
        ax.set_title(f"mean sparsity {sparsity:g}")
        ax.set_xlabel("decoder block")
        ax.set_ylabel("sparsity")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    labelled = {}
    for ax in axes:  # one legend for the figure, each label once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="outside right center", fontsize=8)
    fig.savefig(path, format="png")
    return True


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    own, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        sparsities = parse_sparsities(args.sparsities)
        methods = parse_list(args.methods, "--methods", PRUNERS.names())
        allocations = parse_list(args.allocations, "--allocations", RULES.names())
        if not (math.isfinite(args.absorption) and args.absorption >= 0):
            raise UserError(f"--absorption must be a non-negative number, got {args.absorption}")
        for flag in ("out_md", "out_png", "out_json"):
            check_output_path(f"--{flag}", getattr(args, flag))
        check_passthrough(passthrough)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    model_flags = ["--model", args.model] if args.model else ["--demo", args.demo]
    model_label = args.model or f"demo:{args.demo}"
    combos = combinations(methods, sparsities, allocations, args.absorption)
    columns = list(dict.fromkeys(c.column for c in combos))
    records = []
    try:
        with tempfile.TemporaryDirectory(prefix="compare-allocations-") as workdir:
            for number, combo in enumerate(combos, 1):
                print(f"[{number}/{len(combos)}] {combo.method} sparsity {combo.sparsity:g} {combo.column} ...",
                      file=sys.stderr, flush=True)
                record = run_one(model_flags, combo, passthrough, workdir, args.verbose)
                print(f"    {_summary(record)} ({record['seconds']:.1f} s)", file=sys.stderr, flush=True)
                records.append(record)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

    with_acc = any(_mean_acc(r) is not None for r in records)
    table = describe(records, model_label, with_acc) + "\n\n" + markdown_table(records, columns) + "\n"
    print(table)
    if args.out_md:
        write_text(args.out_md, table)
    if args.out_png and not plot_profiles(records, columns, sparsities, args.out_png):
        print("matplotlib is not installed: no profile plot written", file=sys.stderr)
    if args.out_json:
        from lib.outputs import write_json_atomic
        write_json_atomic(args.out_json, {"model": model_label, "sparsities": sparsities, "methods": methods,
                                          "columns": columns, "absorption": args.absorption,
                                          "passthrough": passthrough, "runs": records})
    failed = [r for r in records if not r["ok"]]
    if failed:
        print(f"error: {len(failed)} of {len(records)} runs failed (see the table)", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
