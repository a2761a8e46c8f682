"""The JSONL trial log of a search: one line per finished trial, appended and flushed as it finishes, so a rerun
with the same log resumes. The field that holds the tried value is named "beta" whatever parameter is searched
(the log format predates searching other parameters, and existing logs stay readable).

A line is {"key", "beta", "ppl", "seconds", **extra}: `key` names every setting that changes perplexity (lines
with another key belong to another search and are never mixed in), `ppl` is null for a diverged trial (strict JSON
has no NaN), `extra` holds JSON-able facts of the trial (e.g. per-block sparsities).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

from ..outputs import append_jsonl

VALUE_DECIMALS = 10  # tried values are k*step rounded to this many decimals: no float drift, stable log keys
RESERVED_KEYS = ("key", "beta", "ppl", "seconds", "resumed")


def append_record(path: str, key: str | None, beta: float, ppl: float, seconds: float, extra: dict) -> None:
    """Append one finished trial to the log at `path` (created with its directories)."""
    append_jsonl(path, {"key": key, "beta": beta, "ppl": ppl if math.isfinite(ppl) else None,
                        "seconds": round(seconds, 3), **extra}, default=to_json)


def load_log(path: str, key: str | None) -> dict[float, dict]:
    """Records of `path` written under `key`, by rounded value (the last line for a value wins). Lines that do
    not parse (e.g. cut off by a crash) and records no search could have written are skipped with a warning."""
    if not os.path.exists(path):
        return {}
    records: dict[float, dict] = {}
    unreadable = invalid = 0
    with open(path, encoding="utf-8", errors="replace") as f:  # a corrupt byte spoils one line, not the log
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                unreadable += 1
                continue
            if not isinstance(record, dict) or record.get("key") != key:
                unreadable += not isinstance(record, dict)
                continue
            if not valid_log_record(record):
                invalid += 1
                continue
            records[round(float(record["beta"]), VALUE_DECIMALS)] = record
    if unreadable:
        warnings.warn(f"{path}: skipped {unreadable} unreadable line(s)")
    if invalid:
        warnings.warn(f"{path}: skipped {invalid} record(s) with an impossible beta, perplexity or time; "
                      f"those trials run again")
    return records


def trial_from_record(beta: float, record: dict) -> dict:
    """The trial dict a search keeps for a logged record: {beta, ppl (inf when null), seconds, resumed, **extra}."""
    extra = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
    ppl = math.inf if record.get("ppl") is None else float(record["ppl"])
    return {"beta": beta, "ppl": ppl if math.isfinite(ppl) else math.inf,
            "seconds": float(record.get("seconds", 0.0)), "resumed": True, **extra}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_log_record(record: dict) -> bool:
    """A trial record a search could have written: a value in [0, 1], a perplexity that is a finite number
    >= 1 or null (a diverged trial), and a non-negative time when present."""
    beta, ppl, seconds = record.get("beta"), record.get("ppl"), record.get("seconds", 0.0)
    if not (_is_number(beta) and 0 <= beta <= 1):
        return False
    if ppl is not None and not (_is_number(ppl) and ppl >= 1):
        return False
    return _is_number(seconds) and seconds >= 0


def to_json(value: Any) -> Any:
    """numpy arrays/scalars and torch tensors as plain lists/numbers (json.dumps' `default`)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return float(value)
