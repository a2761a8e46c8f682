"""The comparison table: rows dense / each allocation rule (optionally with the absorption correction), for each
pruner and mean sparsity; columns perplexity, each zero-shot task's accuracy and their mean. Markdown, JSON, a PNG
of the scores and a PNG of the per-block sparsity profiles.

The model and data are loaded once per process; each cell prunes from the restored dense weights. Every finished
cell, and every trial of the searches that tune a row's parameter, is a record in the store (`lib.compare.store`,
`<out>.cells/`), so rerunning the same command resumes, and N workers (`lib.compare.workers`) fill one store
together: each cell and trial is claimed before it is computed and seeded from its key, and the table is assembled
from the store in its own order, so it is the same whoever computed what. A cell whose allocation cannot be
realised (an illegal setting) is kept as an error and shown in its place. Orchestration only: the math lives in
the allocation rules and pruners.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..allocation.allocate import AllocationSpec
from ..allocation.rule import RULES, searchable_params
from ..errors import UserError
from .store import BLOCKED, DONE, PROGRESS, CellStore

DENSE = "dense"


@dataclass(frozen=True)
class Row:
    """One row of the table: an allocation rule (or the dense model) and the absorption strength (0: off)."""

    rule: str
    absorption: float = 0.0

    @property
    def label(self) -> str:
        return self.rule if self.absorption <= 0 else f"{self.rule}+absorption"


@dataclass(frozen=True)
class Cell:
    row: Row
    method: str  # the pruner ("-" for the dense row)
    sparsity: float = 0.7

    def key(self, settings: str) -> str:
        return f"{settings}|{self.method}|{self.row.rule}|{self.row.absorption}"

    @property
    def label(self) -> str:
        return f"{self.method} {self.row.label}"


@dataclass
class TableArgs:
    """What defines a table (everything a worker needs to rebuild it; picklable)."""

    model: str | None
    demo: str | None
    methods: list[str]
    rules: list[str]  # 'dense' and rule names
    sparsities: list[float]
    absorption: float = 0.02
    absorbed: list[str] | None = None  # pruners with absorption rows (None: all)
    rows_of: dict[str, list[str]] = field(default_factory=dict)  # pruner -> the only rules it gets
    tune: str = "needed"
    fixed: dict[str, float] = field(default_factory=dict)  # --set PARAM=VALUE
    zs_limit: float | None = None
    zero_shot: bool = True
    passthrough: list[str] = field(default_factory=list)  # main.py flags

    def rows(self) -> list[Row]:
        return [Row(r) for r in self.rules] + ([Row(r, self.absorption) for r in self.rules if r != DENSE]
                                               if self.absorption > 0 else [])

    def cells(self) -> list[Cell]:
        """The canonical order: the dense row, then per sparsity, per pruner, each row."""
        rows, absorbed = self.rows(), set(self.methods if self.absorbed is None else self.absorbed)
        dense = [Cell(r, "-", self.sparsities[0]) for r in rows if r.rule == DENSE]
        return dense + [Cell(r, m, s) for s in self.sparsities for m in self.methods for r in rows
                        if r.rule != DENSE and (r.absorption <= 0 or m in absorbed)
                        and (m not in self.rows_of or r.rule in self.rows_of[m])]

    def identity(self) -> str:
        fields = {k: v for k, v in self.__dict__.items()}
        fields["rows_of"] = {k: sorted(v) for k, v in sorted(self.rows_of.items())}
        return json.dumps(fields, sort_keys=True, default=str)

    def manifest_key(self) -> str:
        return "manifest|" + self.identity()


class _NotReady(Exception):
    """A search the cell needs is still running (its state: PROGRESS or BLOCKED)."""

    def __init__(self, state: str):
        super().__init__(state)
        self.state = state


def main_config(args: TableArgs, sparsity: float):
    """main.py's RunConfig for the table at one mean sparsity (validated; no model loaded)."""
    from ..cli import build_parser as main_parser, config_from_flags
    model_flags = ["--model", args.model] if args.model else ["--demo", args.demo]
    ns = main_parser().parse_args(model_flags + ["--sparsity_ratio", repr(sparsity), "--quiet"]
                                  + list(args.passthrough))
    if args.zero_shot:
        ns.eval_zero_shot = True
        if args.zs_limit is not None:
            ns.zs_limit = args.zs_limit
    config = config_from_flags(ns)
    config.validate()
    return config


class Table:
    """The table's cells on one process's loaded model; `steps()` are what `work_through` runs."""

    def __init__(self, args: TableArgs, store: CellStore, log: Callable[[str], None] | None = None):
        self.args, self.store = args, store
        self.log = log or (lambda text: print(text, flush=True))
        self.configs = {s: main_config(args, s) for s in args.sparsities}
        self.config = self.configs[args.sparsities[0]]
        self.cells = args.cells()
        self.session = None
        self._chosen: dict[tuple, float] = {}
        from ..cli import given_settings
        self._step_given = "search_step" in given_settings(list(args.passthrough))  # else each parameter's own

    # --- set-up --------------------------------------------------------------------------------------------

    def prepare(self):
        """Checks that need libraries or the model's config, no weights (the coordinator of workers runs only
        these); the zero-shot source."""
        from .. import run as steps
        self.device, self.dtype = steps.prepare(self.config)
        self.source = steps.zero_shot_tasks(self.config) if self.config.zero_shot.enabled else None
        self.tasks = self.source.tasks if self.source else []
        return self.source

    def load(self) -> None:
        """Load the model and data once (a worker, or the one process of an in-process table)."""
        from .. import run as steps
        from ..session import PruningSession
        self.prepare()
        config = self.config
        self.loaded = steps.load_model(config, self.device, self.dtype)
        # calibration data always: rows differ in rule, and it is loaded once for all of them
        data, self.data_records = steps.load_data(config, self.loaded, calibrate=True)
        self.session = PruningSession(self.loaded, data, progress=False)
        self.session.keep_dense_copy()
        if self.source:
            self.log(self.source.describe())

    def settings(self, sparsity: float) -> str:
        from ..search.tune import settings_key
        config = self.configs[sparsity]
        return "|".join(str(x) for x in (
            settings_key(self.session, config), config.zero_shot.limit, ",".join(self.tasks),
            self.source.source if self.source else "", self.args.tune, sorted(self.args.fixed.items())))

    def key(self, cell: Cell) -> str:
        return cell.key(self.settings(cell.sparsity))

    def manifest(self) -> dict:
        """What the table's outputs need besides the cells: written by whoever loads the model first, read by a
        coordinator that never loads it."""
        limit = self.config.zero_shot.limit
        windows = self.config.data.max_eval_windows
        sparsities = ", ".join(f"{s:g}" for s in self.args.sparsities)
        title = (f"{self.loaded.name}, mean sparsity {sparsities}; perplexity on "
                 f"{os.path.basename(self.config.data.eval_data)} ({self.data_records['eval']['seqlen']}-token "
                 f"windows{f', first {windows}' if windows else ''}); "
                 + (f"zero-shot acc on {f'the first {limit} items' if limit else 'all items'} of each task"
                    if self.tasks else "no zero-shot"))
        return {"kind": "manifest", "model": self.loaded.name, "title": title, "tasks": self.tasks,
                "cells": [self.key(c) for c in self.cells], "labels": [c.label for c in self.cells],
                "zs_limit": limit, "zs_source": self.source.record if self.source else None,
                "eval": self.data_records["eval"], "calibration": self.data_records["calibration"]}

    def write_manifest(self) -> dict:
        key = self.args.manifest_key()
        return self.store.get(key) or self.store.put(key, self.manifest())

    # --- the work ------------------------------------------------------------------------------------------

    def steps(self) -> list[Callable[[], str]]:
        return [lambda cell=cell: self.step(cell) for cell in self.cells]

    def step(self, cell: Cell) -> str:
        """Advance one cell: DONE when its record exists, else compute what it needs next (a trial of a search it
        depends on, or the cell itself) if free to claim."""
        key = self.key(cell)
        if self.store.has(key):
            return DONE
        spec, tuned, error, retry = None, {}, None, False
        if cell.row.rule != DENSE:
            try:
                spec, tuned = self.settle(cell)
            except _NotReady as wait:
                return wait.state
            except UserError as exc:  # e.g. a search in which every value failed: the cell shows the error
                error = _message(exc)
            except Exception as exc:  # noqa: BLE001 - a crashed trial must not lose the rest of the table
                error, retry = self._crash(cell, exc), True
        if not self.store.try_claim(key):
            return BLOCKED
        try:
            if not self.store.has(key):
                record = self._failed(cell, error, retry) if error else self.compute(cell, spec, tuned)
                self.store.put(key, record)
                number = self.cells.index(cell) + 1
                self.log(f"[{number}/{len(self.cells)}] {describe(record)}")
        finally:
            self.store.release(key)
        return PROGRESS

    def _crash(self, cell: Cell, exc: Exception) -> str:
        self.log(f"{cell.label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        if self.session is not None:
            self.session.restore_dense()
        return f"{type(exc).__name__}: {exc}".splitlines()[0]

    def _failed(self, cell: Cell, error: str, retry: bool = False) -> dict:
        return {**self._base_record(cell), "error": error, "retry": retry, "ppl": None, "zero_shot": None}

    def _base_record(self, cell: Cell) -> dict:
        return {"kind": "cell", "row": cell.row.label, "rule": cell.row.rule, "absorption": cell.row.absorption,
                "method": cell.method, "sparsity": cell.sparsity if cell.method != "-" else None,
                "by": {"host": socket.gethostname(), "pid": os.getpid()}}

    def compute(self, cell: Cell, spec: AllocationSpec | None, tuned: dict) -> dict:
        """Prune (from the dense weights) and score one cell; an allocation that cannot be realised is an error
        record, any other failure too (marked for a retry on the next run)."""
        from ..pruning.pruner import PRUNERS
        from ..search.tune import seed_everything
        session, config = self.session, self.configs[cell.sparsity]
        started = time.perf_counter()
        seed_everything(self.key(cell))
        record: dict[str, Any] = self._base_record(cell)
        session.restore_dense()
        try:
            if spec is not None:
                allocation = session.allocation(spec)
                session.prune(allocation.sparsities, PRUNERS.get(cell.method), config.prune.params,
                              config.prune.n_m)
                record.update(sparsities=allocation.sparsities, tuned=tuned)
            ppl = session.perplexity(config.data.max_eval_windows)[0]
            record["ppl"] = ppl if math.isfinite(ppl) else None
            record["zero_shot"] = self._zero_shot()
        except UserError as exc:
            return self._failed(cell, _message(exc))
        except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the others
            return self._failed(cell, self._crash(cell, exc), retry=True)
        finally:
            session.restore_dense()
        record["seconds"] = time.perf_counter() - started
        return record

    def _zero_shot(self) -> dict | None:
        if not self.config.zero_shot.enabled:
            return None
        from ..eval.zeroshot import evaluate_zero_shot
        zs = self.config.zero_shot
        with self.session.whole_model_forwards():
            return evaluate_zero_shot(self.session.model, self.loaded.tokenizer, self.tasks, self.source.tasks_dir,
                                      zs.batch_size, zs.limit, self.config.data.seed)

    def settle(self, cell: Cell) -> tuple[AllocationSpec, dict]:
        """The spec a cell uses and what was tuned for it: --set values, then (per --tune) the searched parameter
        and, on an absorption row, the searched strength on top of the base rule's tuned setting."""
        config = self.configs[cell.sparsity]
        base = config.allocation.with_params()
        spec = AllocationSpec(cell.row.rule, base.sparsity, dict(base.params), cell.row.absorption,
                              base.absorption_scale)
        rule = RULES.get(spec.rule)
        fixed = self.args.fixed
        spec = spec.with_params(**{k: v for k, v in fixed.items() if k in {p.name for p in rule.params}})
        tuned: dict[str, float] = {}
        target = rule.searchable.param if rule.searchable else None
        default = next((p.default for p in rule.params if p.name == target), None)
        if target and target not in fixed and (self.args.tune == "all" or spec.params.get(target, default) is None):
            tuned[target] = self.searched(cell, replace(spec, absorption=0.0), target, ())
            spec = spec.with_params(**{target: tuned[target]})
        if spec.absorption > 0 and self.args.tune == "all":
            tuned["absorption"] = self.searched(cell, spec, "absorption", tuple(sorted(tuned.items())))
            spec = replace(spec, absorption=tuned["absorption"])
        return spec, tuned

    def searched(self, cell: Cell, spec: AllocationSpec, param: str, given: tuple) -> float:
        """The best value of `param` for this pruner and spec; raises _NotReady while its trials are running."""
        from ..search.tune import Tuner
        memo = (cell.method, cell.sparsity, spec.rule, param, given)
        if memo in self._chosen:
            return self._chosen[memo]
        config = self.configs[cell.sparsity]
        step = config.search.step if self._step_given else searchable_params()[param].step
        search_config = replace(config, prune=replace(config.prune, method=cell.method), allocation=spec,
                                search=replace(config.search, param=param, step=step, workers=1))
        tuner = Tuner(self.session, search_config, self.store)
        state = tuner.step()
        if state != DONE:
            raise _NotReady(state)
        value, result = tuner.best()
        self.log(f"{cell.method} {spec.rule}{'+absorption' if param == 'absorption' else ''} at {cell.sparsity:g}: "
                 f"best {param}={value:g} ({result.num_trials} trials in {result.rounds} rounds, {result.strategy})")
        self._chosen[memo] = value
        return value


def _message(exc: UserError) -> str:
    """The error as the CLI would print it (naming the flag at fault), without the 'error: ' prefix."""
    return f"--{exc.setting} {exc}" if exc.setting else str(exc)


def describe(record: dict) -> str:
    """One line for a finished cell."""
    label = f"{record['method']} {record['row']}" + (f" at {record['sparsity']:g}" if record.get("sparsity") else "")
    if record.get("error"):
        return f"{label}: error: {record['error']}"
    mean = (record.get("zero_shot") or {}).get("mean_acc")
    ppl = record.get("ppl")
    return (f"{label}: ppl {'nan' if ppl is None else f'{ppl:.3f}'}"
            + (f", mean acc {mean:.4f}" if mean is not None else "") + f" ({record.get('seconds', 0):.0f} s)")


def markdown(records: list[dict], tasks: list[str], title: str) -> str:
    """Rows: pruner (x mean sparsity, when there are several) x allocation; columns: perplexity, each task's acc,
    the mean over the tasks. The lowest perplexity and highest mean accuracy among each pruner's rows at one
    sparsity are bold; a cell that failed shows its error."""
    several = len({r.get("sparsity") for r in records if r["method"] != "-"}) > 1
    header = ["pruner"] + (["sparsity"] if several else []) + ["allocation", "ppl"] + tasks + ["mean acc"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best_ppl: dict[tuple, float] = {}
    best_acc: dict[tuple, float] = {}
    for r in records:
        if r["method"] == "-" or r.get("error"):
            continue
        group = (r["method"], r.get("sparsity"))
        if r.get("ppl") is not None:
            best_ppl[group] = min(best_ppl.get(group, math.inf), r["ppl"])
        mean = (r.get("zero_shot") or {}).get("mean_acc")
        if mean is not None:
            best_acc[group] = max(best_acc.get(group, -math.inf), mean)
    count = sum(1 for r in records if r["method"] != "-")
    for r in records:
        zs = r.get("zero_shot") or {}
        group = (r["method"], r.get("sparsity"))
        bold = r["method"] != "-" and count > 1
        tuned = ", ".join(f"{k}={v:g}" for k, v in (r.get("tuned") or {}).items())
        cells = [r["method"]] + ([f"{r['sparsity']:g}" if r.get("sparsity") is not None else "-"] if several else [])
        cells.append(r["row"] + (f" ({tuned})" if tuned else ""))
        if r.get("error"):
            cells.append("error: " + str(r["error"]).replace("|", "\\|"))
            cells += ["-"] * (len(tasks) + 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        ppl = r.get("ppl")
        text = "-" if ppl is None else f"{ppl:.2f}"
        cells.append(f"**{text}**" if bold and ppl is not None and ppl == best_ppl.get(group) else text)
        cells += ["-" if a is None else f"{a:.3f}" for a in (zs.get("tasks", {}).get(t, {}).get("acc") for t in tasks)]
        mean = zs.get("mean_acc")
        text = "-" if mean is None else f"{mean:.4f}"
        cells.append(f"**{text}**" if bold and mean is not None and mean == best_acc.get(group) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> bool:
    """Perplexity (log scale) and mean accuracy per allocation, one bar group per pruner (and sparsity); False
    without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    scored = [r for r in records if r["method"] != "-" and not r.get("error")]
    several = len({r.get("sparsity") for r in scored}) > 1
    series = list(dict.fromkeys((r["method"], r.get("sparsity")) for r in scored))
    rows = list(dict.fromkeys(r["row"] for r in scored))
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 6.5), dpi=100, layout="constrained")
    ax_ppl, ax_acc = fig.subplots(2, 1)
    width = 0.8 / max(1, len(series))
    for k, (method, sparsity) in enumerate(series):
        by_row = {r["row"]: r for r in scored if (r["method"], r.get("sparsity")) == (method, sparsity)}
        xs = [i + k * width for i in range(len(rows))]
        name = f"{method} {sparsity:g}" if several else method
        ax_ppl.bar(xs, [by_row.get(row, {}).get("ppl") or 0 for row in rows], width, label=name)
        ax_acc.bar(xs, [((by_row.get(row, {}).get("zero_shot") or {}).get("mean_acc") or 0) for row in rows],
                   width, label=name)
    dense = next((r for r in records if r["method"] == "-" and not r.get("error")), None)
    if dense is not None:
        if dense.get("ppl"):
            ax_ppl.axhline(dense["ppl"], color="gray", ls="--", lw=1, label="dense")
        if (dense.get("zero_shot") or {}).get("mean_acc") is not None:
            ax_acc.axhline(dense["zero_shot"]["mean_acc"], color="gray", ls="--", lw=1, label="dense")
    for ax, label in ((ax_ppl, "perplexity (log)"), (ax_acc, "mean zero-shot acc")):
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(rows))], rows, rotation=20,
                      fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    ax_ppl.set_yscale("log")
    fig.savefig(path, format="png")
    return True


def plot_profiles(records: list[dict], path: str) -> bool:
    """PNG of the per-block sparsity plans, one subplot per mean sparsity; False without matplotlib.

    Colour names the rule, a dashed line its absorption row. A plan that is the same for every pruner is drawn
    once; one that differs (a searched parameter depends on the pruner) gets one line per pruner, told apart by
    marker."""
    try:
        from matplotlib.figure import Figure  # Figure, not pyplot: no global backend state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    planned = [r for r in records if r.get("sparsities")]
    sparsities = list(dict.fromkeys(r["sparsity"] for r in planned)) or [None]
    rows = list(dict.fromkeys(r["row"] for r in planned))
    rules = list(dict.fromkeys(r["rule"] for r in planned))
    markers = ["o", "s", "^", "x", "d", "v"]
    fig = Figure(figsize=(4.2 * len(sparsities) + 2.2, 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(sparsities), squeeze=False)[0]
    for ax, sparsity in zip(axes, sparsities):
        for row in rows:
            plans = [(r["method"], r["sparsities"]) for r in planned if r["sparsity"] == sparsity and r["row"] == row]
            distinct = len({tuple(round(v, 9) for v in plan) for _, plan in plans}) > 1
            rule = next(r["rule"] for r in planned if r["row"] == row)
            for k, (method, plan) in enumerate(plans if distinct else plans[:1]):
                ax.plot(range(len(plan)), plan, "--" if "+" in row else "-", marker=markers[k % len(markers)], ms=3,
                        color=f"C{rules.index(rule) % 10}", label=f"{row} ({method})" if distinct else row)
        if sparsity is not None:
            ax.set_title(f"mean sparsity {sparsity:g}")
        ax.set_xlabel("decoder block")
        ax.set_ylabel("sparsity")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    labelled: dict[str, Any] = {}
    for ax in axes:  # one legend for the figure, each label once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="outside right center", fontsize=8)
    fig.savefig(path, format="png")
    return True


def assemble(store: CellStore, manifest: dict) -> tuple[list[dict], list[str]]:
    """(the finished records in the table's order, the labels of the cells not finished yet)."""
    records, missing = [], []
    for key, label in zip(manifest["cells"], manifest["labels"]):
        record = store.get(key)
        if record is None:
            missing.append(label)
        else:
            records.append(record)
    return records, missing


def drop_retryable(store: CellStore) -> int:
    """Forget the failures a new run should try again (crashes, not illegal settings); how many."""
    stale = [key for key, record in store.records().items() if record.get("retry")]
    for key in stale:
        store.discard(key)
    return len(stale)


def write_outputs(args: TableArgs, manifest: dict, records: list[dict], out: str, seconds: float,
                  extra: dict | None = None) -> int:
    """Markdown, JSON, the scores PNG and the profiles PNG; 0, or 1 when a cell failed."""
    from ..outputs import write_json_atomic
    table = markdown(records, manifest["tasks"], manifest["title"])
    print(table, flush=True)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plotted = plot(records, out + ".png")
    profiled = plot_profiles(records, out + ".profiles.png")
    write_json_atomic(out + ".json", {
        "model": manifest["model"], "sparsities": args.sparsities, "methods": args.methods,
        "rows": [r.label for r in args.rows()], "tasks": manifest["tasks"], "zs_limit": manifest["zs_limit"],
        "zs_source": manifest["zs_source"], "tune": args.tune, "set": args.fixed, "eval": manifest["eval"],
        "calibration": manifest["calibration"], "cells": records,
        "plot": out + ".png" if plotted else None, "profiles": out + ".profiles.png" if profiled else None,
        "seconds": seconds, **(extra or {})})
    print(f"table written to {out}.md, .json{', .png, .profiles.png' if plotted else ''}", flush=True)
    failed = [r for r in records if r.get("error")]
    if failed:
        print(f"error: {len(failed)} of {len(records)} cells failed (see the table); "
              + ("rerun the same command to retry the crashed ones" if any(r.get("retry") for r in failed)
                 else "their settings cannot be realised"), flush=True)
        return 1
    return 0


def worker_steps(args, store) -> list:
    """A table worker's setup (lib.compare.workers.Worker): load the model once, then the table's steps."""
    table = Table(args, store)
    table.load()
    table.write_manifest()
    return table.steps()
