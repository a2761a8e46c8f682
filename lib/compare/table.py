"""The paper's comparison table in one process: the model and data are loaded once, and each row (an allocation,
optionally with the absorption correction) is pruned by each pruner from the restored dense weights, scored by
perplexity and zero-shot accuracy. Every finished cell is appended to a JSONL cache, so an interrupted table
resumes where it stopped. Orchestration only: the math lives in the allocation rules and pruners."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..allocation.allocate import AllocationSpec
from ..outputs import append_jsonl
from ..session import PruningSession

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

    def key(self, settings: str) -> str:
        return f"{settings}|{self.method}|{self.row.rule}|{self.row.absorption}"


def load_cache(path: str | None, settings: str) -> dict[str, dict]:
    """Finished cells of an earlier run with the same settings (unreadable lines, e.g. cut by a crash, skipped)."""
    cells: dict[str, dict] = {}
    if not path or not os.path.exists(path):
        return cells
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and str(record.get("key", "")).startswith(settings + "|"):
                cells[record["key"]] = record
    return cells


def append_cache(path: str | None, record: dict) -> None:
    if path:
        append_jsonl(path, record)


def run_table(session: PruningSession, rows: list[Row], methods: list[str], base: AllocationSpec,
              prune: Callable[[str, list[float]], None], perplexity: Callable[[], float],
              zero_shot: Callable[[], dict | None],
              settle: Callable[[str, AllocationSpec], tuple[AllocationSpec, dict]],
              cache_path: str | None, settings: str, log: Callable[[str], None] = print,
              absorbed: set[str] | None = None, rows_of: dict[str, set[str]] | None = None) -> list[dict]:
    """Score every cell; returns one record per cell: {key, row, method, ppl, zero_shot, sparsities, tuned, ...}.
    Rows with the absorption correction are run for the pruners in `absorbed` (default: all); `rows_of` limits a
    pruner to the named rules (default: every row).

    prune(method, sparsities) prunes the dense model in place. settle(method, spec) returns the spec a cell uses
    and the values it chose for it ({param: value}, e.g. a searched beta), which the record keeps.
    """
    absorbed = set(methods) if absorbed is None else absorbed
    cached = load_cache(cache_path, settings)
    session.keep_dense_copy()
    records = []
    cells = [Cell(r, "-") for r in rows if r.rule == DENSE] + \
        [Cell(r, m) for m in methods for r in rows if r.rule != DENSE and (r.absorption <= 0 or m in absorbed)
         and (rows_of is None or m not in rows_of or r.rule in rows_of[m])]
    for number, cell in enumerate(cells, 1):
        key = cell.key(settings)
        if key in cached:
            log(f"[{number}/{len(cells)}] {cell.method} {cell.row.label}: cached")
            records.append(cached[key])
            continue
        started = time.perf_counter()
        session.restore_dense()
        record: dict[str, Any] = {"key": key, "row": cell.row.label, "rule": cell.row.rule,
                                  "absorption": cell.row.absorption, "method": cell.method}
        if cell.row.rule != DENSE:
            spec = AllocationSpec(cell.row.rule, base.sparsity, dict(base.params), cell.row.absorption,
                                  base.absorption_scale)
            spec, tuned = settle(cell.method, spec)
            session.restore_dense()  # a search leaves the model dense; this makes it explicit
            allocation = session.allocation(spec)
            prune(cell.method, allocation.sparsities)
            record.update(sparsities=allocation.sparsities, tuned=tuned)
        ppl = perplexity()
        record["ppl"] = ppl if math.isfinite(ppl) else None
        record["zero_shot"] = zero_shot()
        record["seconds"] = time.perf_counter() - started
        mean = (record["zero_shot"] or {}).get("mean_acc")
        log(f"[{number}/{len(cells)}] {cell.method} {cell.row.label}: ppl {ppl:.3f}"
            + (f", mean acc {mean:.4f}" if mean is not None else "") + f" ({record['seconds']:.0f} s)")
        append_cache(cache_path, record)
        records.append(record)
    session.restore_dense()
    return records


def markdown(records: list[dict], tasks: list[str], title: str) -> str:
    """Rows: method x allocation; columns: perplexity, each task's acc, the mean over the tasks."""
    header = ["pruner", "allocation", "ppl"] + tasks + ["mean acc"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        zs = r.get("zero_shot") or {}
        accs = [zs.get("tasks", {}).get(t, {}).get("acc") for t in tasks]
        tuned = ", ".join(f"{k}={v:g}" for k, v in (r.get("tuned") or {}).items())
        cells = [r["method"], r["row"] + (f" ({tuned})" if tuned else ""),
                 "-" if r["ppl"] is None else f"{r['ppl']:.2f}"]
        cells += ["-" if a is None else f"{a:.3f}" for a in accs]
        cells.append("-" if zs.get("mean_acc") is None else f"{zs['mean_acc']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> bool:
    """Perplexity (log scale) and mean accuracy per allocation, one bar group per pruner; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "-"))
    rows = list(dict.fromkeys(r["row"] for r in records if r["method"] != "-"))
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 6.5), dpi=100, layout="constrained")
    ax_ppl, ax_acc = fig.subplots(2, 1)
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        by_row = {r["row"]: r for r in records if r["method"] == method}
        xs = [i + k * width for i in range(len(rows))]
        ax_ppl.bar(xs, [by_row.get(row, {}).get("ppl") or 0 for row in rows], width, label=method)
        ax_acc.bar(xs, [((by_row.get(row, {}).get("zero_shot") or {}).get("mean_acc") or 0) for row in rows],
                   width, label=method)
    dense = next((r for r in records if r["method"] == "-"), None)
    if dense is not None:
        if dense["ppl"]:
            ax_ppl.axhline(dense["ppl"], color="gray", ls="--", lw=1, label="dense")
        if (dense.get("zero_shot") or {}).get("mean_acc") is not None:
            ax_acc.axhline(dense["zero_shot"]["mean_acc"], color="gray", ls="--", lw=1, label="dense")
    for ax, label in ((ax_ppl, "perplexity (log)"), (ax_acc, "mean zero-shot acc")):
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(rows))], rows, rotation=20,
                      fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    ax_ppl.set_yscale("log")
    fig.savefig(path, format="png")
    return True
