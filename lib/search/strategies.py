"""Search for the ATP rate beta that minimises perplexity (pure orchestration: no model knowledge).

The caller supplies `evaluate(beta)` (prune with that beta, return perplexity) and the largest legal beta
(`lib.allocation.max_beta`). Two strategies:

- ``grid``: the reference sweep beta = step, 2*step, ... <= beta_hi (optionally starting at 0, the uniform
  allocation).
- ``golden``: a coarse grid over [0, beta_hi] (0 included), then golden-section refinement around the best
  coarse point. Every beta is snapped to the same step grid, so its trials are directly comparable with a grid
  sweep, and a beta is never evaluated twice. Perplexity is close to unimodal in beta, so on such objectives it
  finds the grid's best in far fewer trials.

Trials can be appended to a JSONL log as they finish; rerunning with the same log and settings key resumes
without re-evaluating finished betas. To score trials on a subset of eval windows (cheaper, slightly noisier),
let `evaluate` use the subset and then re-score the top few betas on the full set with `refine_best`.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from tqdm import tqdm

from ..errors import UserError
from ..outputs import append_jsonl

# An evaluation returns the perplexity, optionally with extra JSON-able facts to log (e.g. per-block sparsities).
EvalOutput = Union[float, tuple[float, dict]]
Evaluate = Callable[[float], EvalOutput]

STRATEGIES = ("grid", "golden")
BETA_DECIMALS = 10  # betas are k*step rounded to this many decimals: no float drift, stable log keys
RESERVED_KEYS = ("key", "beta", "ppl", "seconds", "resumed")
GOLDEN_FRACTION = (3 - math.sqrt(5)) / 2  # 0.382: where golden-section puts a new point inside a gap


@dataclass
class SearchResult:
    """Outcome of a beta search; `trials` are dicts {beta, ppl, seconds, resumed, **extra} in evaluation order."""

    best_beta: float
    best_ppl: float
    trials: list[dict]
    strategy: str
    num_trials: int
    num_evaluated: int = 0  # trials actually run now (the rest came from a resumed log)
    settings: dict = field(default_factory=dict)


def grid_betas(beta_hi: float, step: float, include_zero: bool = False) -> list[float]:
    """The reference sweep step, 2*step, ... up to beta_hi (0 first when include_zero)."""
    first = 0 if include_zero else 1
    return [_beta_at(k, step) for k in range(first, _max_index(beta_hi, step) + 1)]


def search_beta(
    evaluate: Evaluate,
    beta_hi: float,
    strategy: str = "golden",
    step: float = 0.002,
    tol: float | None = None,
    coarse_points: int = 3,
    include_zero: bool = False,
    log_path: str | None = None,
    key: str | None = None,
    on_trial: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Find the beta in [0, beta_hi] with the lowest perplexity.

    evaluate: beta -> ppl or (ppl, extra_dict); a non-finite ppl counts as +inf (never the best). Exceptions
      propagate; trials finished before them stay in the log, so a rerun resumes.
    beta_hi: largest legal beta (from `lib.allocation.max_beta`); grid points above it (beyond float noise of
      1e-12) are never evaluated.
    strategy: "grid" (step, 2*step, ...; plus 0 when include_zero) or "golden" (see module docstring; it always
      evaluates beta=0, the uniform baseline).
    tol: golden stops once the unevaluated gaps on both sides of the current best are at most tol wide (rounded
      to whole steps, at least one). The default (one step) leaves no gap, so on a unimodal objective golden
      returns exactly the best grid beta.
    coarse_points: golden's first, evenly spaced grid over [0, beta_hi], both ends included.
    log_path: JSONL file; each finished trial is appended and flushed as one line {"key", "beta", "ppl",
      "seconds", **extra}; ppl is null when non-finite. Lines already there whose "key" equals `key` are reused
      instead of re-evaluating that beta. Lines with a different key (another model, method, sparsity, eval set,
      ...) are skipped, never mixed in, so one log may hold several searches; pass a key that names every
      setting that changes perplexity. Unreadable lines (e.g. cut off by a crash) are skipped with a warning.
    on_trial: called with each trial dict as it joins the result (resumed trials included).
    progress: show a tqdm bar over trials on stderr.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown search strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    _check_grid(beta_hi, step)
    if coarse_points < 2:
        raise UserError(f"coarse_points must be at least 2, got {coarse_points}")
    tol_steps = 1 if tol is None else max(1, round(tol / step))

    n_max = _max_index(beta_hi, step)
    total = n_max + (1 if include_zero else 0) if strategy == "grid" else None
    runner = _TrialRunner(evaluate, step, log_path, key, on_trial, progress, total)
    try:
        if strategy == "grid":
            first = 0 if include_zero else 1
            if first > n_max:
                raise UserError(f"no beta to try: step {step} is larger than the largest legal beta {beta_hi:.6g}")
            for k in range(first, n_max + 1):
                runner.score(k)
        else:
            _golden(runner, n_max, coarse_points, tol_steps)
    finally:
        runner.close()

    best = min(runner.trials, key=lambda t: _score(t["ppl"]))
    settings = {"beta_hi": beta_hi, "step": step, "tol_steps": tol_steps, "coarse_points": coarse_points,
                "include_zero": include_zero, "key": key}
    return SearchResult(best_beta=best["beta"], best_ppl=best["ppl"], trials=runner.trials, strategy=strategy,
                        num_trials=len(runner.trials), num_evaluated=runner.num_evaluated, settings=settings)


def refine_best(
    evaluate_full: Evaluate,
    result: SearchResult,
    top_k: int = 1,
    log_path: str | None = None,
    key: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Re-score the `top_k` best betas of a (cheaply scored) search with the full evaluation.

    Use when the search's `evaluate` scored trials on a subset of eval windows: the subset can misrank betas
    whose perplexities are close, so re-scoring a few candidates on the full set makes the final pick and the
    reported perplexity match a plain full evaluation. The returned result holds only the re-scored trials
    (strategy "<strategy>+refine"). log_path/key work as in `search_beta`; use a key distinct from the search's.
    """
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    ranked = sorted(result.trials, key=lambda t: _score(t["ppl"]))[:top_k]
    runner = _TrialRunner(evaluate_full, None, log_path, key, None, progress, len(ranked))
    try:
        for trial in ranked:
            runner.score_beta(trial["beta"])
    finally:
        runner.close()
    best = min(runner.trials, key=lambda t: _score(t["ppl"]))
    return SearchResult(best_beta=best["beta"], best_ppl=best["ppl"], trials=runner.trials,
                        strategy=f"{result.strategy}+refine", num_trials=len(runner.trials),
                        num_evaluated=runner.num_evaluated, settings={**result.settings, "top_k": top_k, "key": key})


def plotting_available() -> bool:
    """Whether matplotlib (an optional extra) can be imported, without importing it."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot_search(result: SearchResult, path: str, uniform_ppl: float | None = None, param: str = "beta") -> bool:
    """Save a PNG of perplexity vs beta (best point and uniform beta=0 marked); False when matplotlib is missing.

    uniform_ppl: the beta=0 perplexity when it is known but not among the trials (e.g. the grid strategy).
    Non-finite perplexities are left out of the curve.
    """
    try:
        from matplotlib.figure import Figure  # lazy: optional dependency; Figure avoids pyplot's global backend
    except ImportError:
        return False
    points = sorted((t["beta"], t["ppl"]) for t in result.trials if math.isfinite(t["ppl"]))
    if uniform_ppl is None:
        uniform_ppl = next((ppl for beta, ppl in points if beta == 0), None)

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if points:
        ax.plot([b for b, _ in points], [p for _, p in points], "o-", color="tab:blue", ms=4, label="trials")
    if math.isfinite(result.best_ppl):
        ax.plot([result.best_beta], [result.best_ppl], "*", color="tab:red", ms=14,
                label=f"best: {param}={result.best_beta:g}, ppl={result.best_ppl:.3f}")
    if uniform_ppl is not None and math.isfinite(uniform_ppl):
        ax.axhline(uniform_ppl, color="gray", ls="--", lw=1)
        ax.plot([0.0], [uniform_ppl], "s", color="gray", label=f"{param}=0: ppl={uniform_ppl:.3f}")
    ax.set_xlabel(param)
    ax.set_ylabel("perplexity")
    ax.set_title(f"{param} search ({result.strategy}, {result.num_trials} trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return True


# --- internals ---------------------------------------------------------------------------------------------


def _check_grid(beta_hi: float, step: float) -> None:
    if not (math.isfinite(step) and step > 0):
        raise UserError(f"search step must be a positive number, got {step}")
    if not (math.isfinite(beta_hi) and beta_hi >= 0):
        raise UserError(f"largest legal beta must be a non-negative number, got {beta_hi}")


def _max_index(beta_hi: float, step: float) -> int:
    # The 1e-12 slack keeps beta_hi itself on the grid when it is a multiple of step up to float noise.
    return math.floor((beta_hi + 1e-12) / step)


def _beta_at(k: int, step: float) -> float:
    return round(k * step, BETA_DECIMALS)


def _score(ppl: float) -> float:
    return ppl if math.isfinite(ppl) else math.inf


def _golden(runner: "_TrialRunner", n_max: int, coarse_points: int, tol_steps: int) -> None:
    """Coarse grid, then golden-section steps on grid indices around the best coarse point.

    Invariant: lo <= best <= hi are evaluated indices, best has the lowest score of all evaluated indices in
    [lo, hi], and (by unimodality) the optimum lies in [lo, hi]. Each step probes the wider of the two gaps next
    to best at its golden fraction and shrinks the bracket by that probe.
    """
    count = min(coarse_points, n_max + 1)
    coarse = sorted({round(i * n_max / (count - 1)) for i in range(count)} if count > 1 else {0})
    scores = [runner.score(k) for k in coarse]
    at = min(range(len(coarse)), key=lambda i: scores[i])
    lo, best, hi = coarse[max(at - 1, 0)], coarse[at], coarse[min(at + 1, len(coarse) - 1)]

    while max(best - lo, hi - best) > tol_steps:
        if hi - best >= best - lo:
            probe = best + min(max(1, round(GOLDEN_FRACTION * (hi - best))), hi - best - 1)
        else:
            probe = best - min(max(1, round(GOLDEN_FRACTION * (best - lo))), best - lo - 1)
        if runner.score(probe) < runner.score(best):
            lo, hi = (best, hi) if probe > best else (lo, best)
            best = probe
        elif probe > best:
            hi = probe
        else:
            lo = probe


class _TrialRunner:
    """Evaluates betas at most once each, resuming from and appending to a JSONL log, with a progress bar."""

    def __init__(self, evaluate: Evaluate, step: float | None, log_path: str | None, key: str | None,
                 on_trial: Callable[[dict], None] | None, progress: bool, total: int | None):
        self.evaluate = evaluate
        self.step = step
        self.log_path = log_path
        self.key = key
        self.on_trial = on_trial
        self.trials: list[dict] = []
        self.num_evaluated = 0
        self._seen: dict[float, dict] = {}
        self._logged = _load_log(log_path, key) if log_path else {}
        self._bar = tqdm(total=total, desc="beta search", unit="trial", disable=not progress, leave=False)

    def score(self, k: int) -> float:
        """Score of grid index k (k * step)."""
        return self.score_beta(_beta_at(k, self.step))

    def score_beta(self, beta: float) -> float:
        beta = round(beta, BETA_DECIMALS)
        if beta not in self._seen:
            trial = self._from_log(beta) or self._run(beta)
            self._seen[beta] = trial
            self.trials.append(trial)
            self._bar.update(1)
            self._bar.set_postfix(beta=f"{beta:g}", ppl=f"{trial['ppl']:.4g}")
            if self.on_trial is not None:
                self.on_trial(trial)
        return _score(self._seen[beta]["ppl"])

    def close(self) -> None:
        self._bar.close()

    def _from_log(self, beta: float) -> dict | None:
        record = self._logged.get(beta)
        if record is None:
            return None
        extra = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
        ppl = math.inf if record.get("ppl") is None else float(record["ppl"])
        return {"beta": beta, "ppl": _score(ppl), "seconds": float(record.get("seconds", 0.0)), "resumed": True,
                **extra}

    def _run(self, beta: float) -> dict:
        start = time.perf_counter()
        out = self.evaluate(beta)
        seconds = time.perf_counter() - start
        ppl, extra = out if isinstance(out, tuple) else (out, {})
        clash = sorted(set(extra) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"evaluate's extra dict may not use the reserved keys {clash}")
        ppl = float(ppl)
        trial = {"beta": beta, "ppl": _score(ppl), "seconds": seconds, "resumed": False, **extra}
        self.num_evaluated += 1
        if self.log_path:
            _append_log(self.log_path, self.key, beta, ppl, seconds, extra)
        return trial


def _append_log(path: str, key: str | None, beta: float, ppl: float, seconds: float, extra: dict) -> None:
    append_jsonl(path, {"key": key, "beta": beta, "ppl": ppl if math.isfinite(ppl) else None,
                        "seconds": round(seconds, 3), **extra}, default=_to_json)


def _load_log(path: str, key: str | None) -> dict[float, dict]:
    """Records of `path` written under `key`, by rounded beta (the last line for a beta wins)."""
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
            records[round(float(record["beta"]), BETA_DECIMALS)] = record
    if unreadable:
        warnings.warn(f"{path}: skipped {unreadable} unreadable line(s)")
    if invalid:
        warnings.warn(f"{path}: skipped {invalid} record(s) with an impossible beta, perplexity or time; "
                      f"those trials run again")
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_log_record(record: dict) -> bool:
    """A trial record this search could have written: a beta in [0, 1], a perplexity that is a finite number
    >= 1 or null (a diverged trial), and a non-negative time when present."""
    beta, ppl, seconds = record.get("beta"), record.get("ppl"), record.get("seconds", 0.0)
    if not (_is_number(beta) and 0 <= beta <= 1):
        return False
    if ppl is not None and not (_is_number(ppl) and ppl >= 1):
        return False
    return _is_number(seconds) and seconds >= 0


def _to_json(value: Any) -> Any:
    # numpy arrays/scalars and torch tensors as plain lists/numbers.
    if hasattr(value, "tolist"):
        return value.tolist()
    return float(value)
