"""Which values of a searched parameter to try, and in what order (pure orchestration: no model knowledge).

The parameter is whatever a rule declares searchable (`lib.allocation.rule.Searchable`: ATP's beta, OWL's
lambda, ...) or the absorption strength; the caller supplies `evaluate(value)` (prune with that value, return
perplexity) and the largest value to try. Values are k * step for whole k, so trials of every strategy lie on one
grid and are directly comparable; a value is never evaluated twice. The names below say "beta" for the value (and
the trial log keeps that field name) because ATP's beta was the first parameter searched.

Three strategies, each a plan that asks for one round of values at a time (values of one round are independent,
so k workers can score them at once; `lib.search.tune` does that):

- ``grid``: the reference sweep step, 2*step, ... <= beta_hi (optionally starting at 0, the uniform allocation),
  all in one round.
- ``golden``: a coarse grid over [0, beta_hi] (0 included) in one round, then golden-section steps around the
  best coarse point, one value per round. Perplexity is close to unimodal in the parameter, so on such
  objectives it finds the grid's best in far fewer trials.
- ``parallel``: k-point refinement for k workers: k evenly spaced values over [0, beta_hi] (both ends included),
  then each round places k new values in the bracket around the best one (split between its two sides in
  proportion to their widths), until the best value's evaluated neighbours are within the tolerance. Each round
  shrinks the bracket to about 2/(k+2) of its width, against golden's 0.618 per trial, so with k workers it
  needs about log(n)/log((k+2)/2) rounds where golden needs about log(n)/log(1.618) trials.

Trials can be appended to a JSONL log as they finish (`lib.search.trial_log`); rerunning with the same log and
settings key resumes without re-evaluating finished values. To score trials on a subset of eval windows (cheaper,
slightly noisier), let `evaluate` use the subset and then re-score the top few values with `refine_best`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Union

from tqdm import tqdm

from ..errors import UserError
from .trial_log import RESERVED_KEYS, VALUE_DECIMALS, append_record, load_log, trial_from_record

# An evaluation returns the perplexity, optionally with extra JSON-able facts to log (e.g. per-block sparsities).
EvalOutput = Union[float, tuple[float, dict]]
Evaluate = Callable[[float], EvalOutput]
# A plan yields the grid indices of one round and is sent back their scores {index: score}.
Plan = Generator[list[int], dict[int, float], None]

STRATEGIES = ("grid", "golden", "parallel")
BETA_DECIMALS = VALUE_DECIMALS
GOLDEN_FRACTION = (3 - math.sqrt(5)) / 2  # 0.382: where golden-section puts a new point inside a gap
DEFAULT_POINTS = 4  # values per round of the parallel strategy when not given
ELAPSED = "_seconds"  # an evaluation scored elsewhere may report its own duration under this extra key


@dataclass
class SearchResult:
    """Outcome of a search; `trials` are dicts {beta, ppl, seconds, resumed, **extra} in evaluation order."""

    best_beta: float
    best_ppl: float
    trials: list[dict]
    strategy: str
    num_trials: int
    num_evaluated: int = 0  # trials actually run now (the rest came from a resumed log)
    settings: dict = field(default_factory=dict)
    rounds: int = 0  # rounds of independent trials (what k workers wait for, one after the other)


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
    points: int | None = None,
) -> SearchResult:
    """Find the value in [0, beta_hi] with the lowest perplexity, evaluating one trial after the other.

    evaluate: value -> ppl or (ppl, extra_dict); a non-finite ppl counts as +inf (never the best). Exceptions
      propagate; trials finished before them stay in the log, so a rerun resumes.
    beta_hi: largest value to try; grid points above it (beyond float noise of 1e-12) are never evaluated.
    strategy: "grid" (step, 2*step, ...; plus 0 when include_zero), "golden" or "parallel" (see the module
      docstring; both always evaluate 0, the neutral value).
    tol: golden and parallel stop once the unevaluated gaps on both sides of the current best are at most tol
      wide (rounded to whole steps, at least one). The default (one step) leaves no gap, so on a unimodal
      objective they return exactly the best grid value.
    coarse_points: golden's first, evenly spaced grid over [0, beta_hi], both ends included.
    points: the parallel strategy's values per round (at least 2; default 4).
    log_path: JSONL file; each finished trial is appended and flushed as one line {"key", "beta", "ppl",
      "seconds", **extra}; ppl is null when non-finite. Lines already there whose "key" equals `key` are reused
      instead of re-evaluating that value. Lines with a different key (another model, method, sparsity, eval set,
      ...) are skipped, never mixed in, so one log may hold several searches; pass a key that names every
      setting that changes perplexity. Unreadable lines (e.g. cut off by a crash) are skipped with a warning.
    on_trial: called with each trial dict as it joins the result (resumed trials included).
    progress: show a tqdm bar over trials on stderr.
    """
    tol_steps = check_settings(beta_hi, strategy, step, tol, coarse_points, include_zero, points)
    n_max = _max_index(beta_hi, step)
    total = n_max + (1 if include_zero else 0) if strategy == "grid" else None
    runner = _TrialRunner(evaluate, step, log_path, key, on_trial, progress, total)
    rounds = 0
    try:
        plan = make_plan(strategy, n_max, include_zero, coarse_points, tol_steps, points)
        request = next(plan)
        while True:
            rounds += 1
            scores = {k: runner.score(k) for k in request}
            try:
                request = plan.send(scores)
            except StopIteration:
                break
    finally:
        runner.close()

    best = min(runner.trials, key=lambda t: _score(t["ppl"]))
    settings = {"beta_hi": beta_hi, "step": step, "tol_steps": tol_steps, "coarse_points": coarse_points,
                "include_zero": include_zero, "key": key}
    if strategy == "parallel":
        settings["points"] = points or DEFAULT_POINTS
    return SearchResult(best_beta=best["beta"], best_ppl=best["ppl"], trials=runner.trials, strategy=strategy,
                        num_trials=len(runner.trials), num_evaluated=runner.num_evaluated, settings=settings,
                        rounds=rounds)


def check_settings(beta_hi: float, strategy: str, step: float, tol: float | None, coarse_points: int,
                   include_zero: bool, points: int | None) -> int:
    """UserError for settings no search can run with; the tolerance in whole steps."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown search strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not (math.isfinite(step) and step > 0):
        raise UserError(f"search step must be a positive number, got {step}")
    if not (math.isfinite(beta_hi) and beta_hi >= 0):
        raise UserError(f"largest legal beta must be a non-negative number, got {beta_hi}")
    if coarse_points < 2:
        raise UserError(f"coarse_points must be at least 2, got {coarse_points}")
    if points is not None and points < 2:
        raise UserError(f"the parallel search needs at least 2 values per round, got {points}")
    if strategy == "grid" and not include_zero and _max_index(beta_hi, step) < 1:
        raise UserError(f"no beta to try: step {step} is larger than the largest legal beta {beta_hi:.6g}")
    return 1 if tol is None else max(1, round(tol / step))


def make_plan(strategy: str, n_max: int, include_zero: bool, coarse_points: int, tol_steps: int,
              points: int | None) -> Plan:
    """The strategy as a plan over grid indices 0..n_max (see `Plan`)."""
    if strategy == "grid":
        return _grid_plan(n_max, include_zero)
    if strategy == "golden":
        return _golden_plan(n_max, coarse_points, tol_steps)
    return _parallel_plan(n_max, points or DEFAULT_POINTS, tol_steps)


def pending_values(known: "dict[float, float] | Callable[[float], float | None]", beta_hi: float,
                   strategy: str = "golden", step: float = 0.002, tol: float | None = None, coarse_points: int = 3,
                   include_zero: bool = False, points: int | None = None) -> list[float] | None:
    """The values of the current round whose perplexity is not known yet, or None once the search is complete.

    known: {value: perplexity} of finished trials (e.g. other workers'), or a function value -> perplexity or
    None. Replaying the plan on known scores is what lets several workers run one search together: each asks
    what is missing, claims one value, scores it, and asks again; all of them see the same rounds."""
    tol_steps = check_settings(beta_hi, strategy, step, tol, coarse_points, include_zero, points)
    lookup = known if callable(known) else {round(v, BETA_DECIMALS): p for v, p in known.items()}.get
    scores: dict[int, float] = {}
    plan = make_plan(strategy, _max_index(beta_hi, step), include_zero, coarse_points, tol_steps, points)
    request = next(plan)
    while True:
        for k in request:
            if k not in scores:
                ppl = lookup(_beta_at(k, step))
                if ppl is not None:
                    scores[k] = _score(ppl)
        missing = [k for k in request if k not in scores]
        if missing:
            return [_beta_at(k, step) for k in missing]
        try:
            request = plan.send({k: scores[k] for k in request})
        except StopIteration:
            return None


def refine_best(
    evaluate_full: Evaluate,
    result: SearchResult,
    top_k: int = 1,
    log_path: str | None = None,
    key: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Re-score the `top_k` best values of a (cheaply scored) search with the full evaluation.

    Use when the search's `evaluate` scored trials on a subset of eval windows: the subset can misrank values
    whose perplexities are close, so re-scoring a few candidates on the full set makes the final pick and the
    reported perplexity match a plain full evaluation. The returned result holds only the re-scored trials
    (strategy "<strategy>+refine"). log_path/key work as in `search_beta`; use a key distinct from the search's.
    """
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    ranked = refine_candidates(result, top_k)
    runner = _TrialRunner(evaluate_full, None, log_path, key, None, progress, len(ranked))
    try:
        for beta in ranked:
            runner.score_beta(beta)
    finally:
        runner.close()
    best = min(runner.trials, key=lambda t: _score(t["ppl"]))
    return SearchResult(best_beta=best["beta"], best_ppl=best["ppl"], trials=runner.trials,
                        strategy=f"{result.strategy}+refine", num_trials=len(runner.trials),
                        num_evaluated=runner.num_evaluated, settings={**result.settings, "top_k": top_k, "key": key},
                        rounds=1)


def refine_candidates(result: SearchResult, top_k: int) -> list[float]:
    """The `top_k` best values of a search, best first (what `refine_best` re-scores)."""
    return [t["beta"] for t in sorted(result.trials, key=lambda t: _score(t["ppl"]))[:top_k]]


# --- plans -------------------------------------------------------------------------------------------------


def _grid_plan(n_max: int, include_zero: bool) -> Plan:
    yield list(range(0 if include_zero else 1, n_max + 1))


def _golden_plan(n_max: int, coarse_points: int, tol_steps: int) -> Plan:
    """Coarse grid, then golden-section steps on grid indices around the best coarse point.

    Invariant: lo <= best <= hi are evaluated indices, best has the lowest score of all evaluated indices in
    [lo, hi], and (by unimodality) the optimum lies in [lo, hi]. Each step probes the wider of the two gaps next
    to best at its golden fraction and shrinks the bracket by that probe.
    """
    count = min(coarse_points, n_max + 1)
    coarse = sorted({round(i * n_max / (count - 1)) for i in range(count)} if count > 1 else {0})
    known = dict((yield coarse))
    at = min(range(len(coarse)), key=lambda i: known[coarse[i]])
    lo, best, hi = coarse[max(at - 1, 0)], coarse[at], coarse[min(at + 1, len(coarse) - 1)]

    while max(best - lo, hi - best) > tol_steps:
        if hi - best >= best - lo:
            probe = best + min(max(1, round(GOLDEN_FRACTION * (hi - best))), hi - best - 1)
        else:
            probe = best - min(max(1, round(GOLDEN_FRACTION * (best - lo))), best - lo - 1)
        known.update((yield [probe]))
        if known[probe] < known[best]:
            lo, hi = (best, hi) if probe > best else (lo, best)
            best = probe
        elif probe > best:
            hi = probe
        else:
            lo = probe


def _parallel_plan(n_max: int, points: int, tol_steps: int) -> Plan:
    """k-point refinement: `points` values per round.

    Invariant as in golden: best is the lowest-scoring evaluated index, lo and hi its nearest evaluated
    neighbours, and (by unimodality) the optimum lies in [lo, hi]. A round fills the two gaps next to best with
    `points` new indices, evenly spaced within each gap."""
    known = dict((yield _spread(0, n_max, min(points, n_max + 1))))
    while True:
        best = min(sorted(known), key=lambda k: known[k])
        lo = max((k for k in known if k < best), default=best)
        hi = min((k for k in known if k > best), default=best)
        if max(best - lo, hi - best) <= tol_steps:
            return
        room_left, room_right = max(0, best - lo - 1), max(0, hi - best - 1)  # unevaluated indices per side
        left = right = 0
        for _ in range(min(points, room_left + room_right)):
            # the next point goes where it shortens the longest remaining piece (ties: the right side, as golden)
            if right < room_right and (left >= room_left or (hi - best) / (right + 1) >= (best - lo) / (left + 1)):
                right += 1
            else:
                left += 1
        new = [k for k in _inside(lo, best, left) + _inside(best, hi, right) if k not in known]
        if not new:  # cannot happen while a gap has room; a plan must never ask for an empty round
            return
        known.update((yield new))


def _spread(lo: int, hi: int, count: int) -> list[int]:
    """`count` indices evenly spaced over [lo, hi], both ends included (count <= hi - lo + 1)."""
    if count <= 1:
        return [lo]
    return [lo + math.floor(i * (hi - lo) / (count - 1) + 0.5) for i in range(count)]


def _inside(lo: int, hi: int, count: int) -> list[int]:
    """`count` distinct indices evenly spaced strictly between lo and hi (count <= hi - lo - 1)."""
    return [lo + math.floor(j * (hi - lo) / (count + 1) + 0.5) for j in range(1, count + 1)]


# --- internals ---------------------------------------------------------------------------------------------


def _max_index(beta_hi: float, step: float) -> int:
    # The 1e-12 slack keeps beta_hi itself on the grid when it is a multiple of step up to float noise.
    return math.floor((beta_hi + 1e-12) / step)


def _beta_at(k: int, step: float) -> float:
    return round(k * step, BETA_DECIMALS)


def _score(ppl: float | None) -> float:
    return ppl if ppl is not None and math.isfinite(ppl) else math.inf


class _TrialRunner:
    """Evaluates values at most once each, resuming from and appending to a JSONL log, with a progress bar."""

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
        self._logged = load_log(log_path, key) if log_path else {}
        self._bar = tqdm(total=total, desc="search", unit="trial", disable=not progress, leave=False)

    def score(self, k: int) -> float:
        """Score of grid index k (k * step)."""
        return self.score_beta(_beta_at(k, self.step))

    def score_beta(self, beta: float) -> float:
        beta = round(beta, BETA_DECIMALS)
        if beta not in self._seen:
            logged = self._logged.get(beta)
            trial = trial_from_record(beta, logged) if logged is not None else self._run(beta)
            self._seen[beta] = trial
            self.trials.append(trial)
            self._bar.update(1)
            self._bar.set_postfix(beta=f"{beta:g}", ppl=f"{trial['ppl']:.4g}")
            if self.on_trial is not None:
                self.on_trial(trial)
        return _score(self._seen[beta]["ppl"])

    def close(self) -> None:
        self._bar.close()

    def _run(self, beta: float) -> dict:
        start = time.perf_counter()
        out = self.evaluate(beta)
        seconds = time.perf_counter() - start
        ppl, extra = out if isinstance(out, tuple) else (out, {})
        clash = sorted(set(extra) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"evaluate's extra dict may not use the reserved keys {clash}")
        ppl = float(ppl)
        if ELAPSED in extra:  # scored elsewhere (another worker): its own time, not the look-up's
            extra = dict(extra)
            seconds = float(extra.pop(ELAPSED))
        trial = {"beta": beta, "ppl": _score(ppl), "seconds": seconds, "resumed": False, **extra}
        self.num_evaluated += 1
        if self.log_path:
            append_record(self.log_path, self.key, beta, ppl, seconds, extra)
        return trial
