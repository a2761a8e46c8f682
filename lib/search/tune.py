"""`--search PARAM` (or `--PARAM search`, e.g. `--beta search`): tune one declared parameter of the allocation in
one process, loading the model and data once. The parameter is whatever the rule declares searchable (ATP's beta,
OWL's lambda, ...) or the absorption correction's strength, over [0, its largest legal value].

Each trial restores the dense weights, allocates through the one allocation route (so the absorption correction
and any other setting of the spec apply to every trial), prunes, and scores perplexity (optionally on the first N
evaluation windows only); lib.search.strategies decides which values to try. A value the rule cannot realise is a
failed trial (infinite perplexity), never the best.

With a store (`lib.compare.store.CellStore`) every trial is also a record there, claimed before it is computed:
this is how the comparison table caches its searches, and how several workers run one search together
(`Tuner.step`: each worker replays the strategy on the finished trials, claims a missing value of the current
round and scores it). `--search_workers K` starts K such workers (`lib.compare.workers`) and then replays the
finished search here, so the log, plot and result are those of a one-process run of the same strategy.
"""
from __future__ import annotations

import math
import os
import time
import warnings

from dataclasses import replace
from typing import Callable

from ..allocation.allocate import AllocationSpec
from ..allocation.rule import ABSORPTION, RULES, Searchable
from ..compare.store import BLOCKED, DONE, PROGRESS
from ..config import RunConfig
from ..errors import IllegalAllocationError, UserError
from ..session import PruningSession
from .plot import plot_search
from .strategies import (DEFAULT_POINTS, ELAPSED, SearchResult, pending_values, refine_best, refine_candidates,
                         search_beta)



def settings_key(session: PruningSession, config: RunConfig) -> str:
    """Everything that changes a trial's perplexity, so a resumed log never mixes settings."""
    prune, data = config.prune, config.data
    return "|".join(str(x) for x in (
        session.loaded.name, prune.method, sorted(prune.params.items()) if prune.pruner.params else "",
        config.allocation.sparsity, prune.sparsity_type, data.nsamples, session.data.seqlen, data.seed,
        data.calib_data, data.eval_data, config.search.eval_windows or data.max_eval_windows, config.model.dtype,
        config.allocation.key(exclude=config.search.param)))


def searchable_of(config: RunConfig) -> Searchable:
    if config.search.param == ABSORPTION.param:
        return ABSORPTION
    return RULES.get(config.allocation.rule).searchable


def with_value(spec: AllocationSpec, param: str, value: float) -> AllocationSpec:
    """`spec` with the searched parameter (a rule parameter or the absorption strength) set to `value`."""
    if param == ABSORPTION.param:
        return replace(spec, absorption=value)
    return spec.with_params(**{param: value})


def points_of(config: RunConfig) -> int | None:
    """Values per round of the parallel strategy: --search_points, else one per worker (4 without workers)."""
    search = config.search
    if search.strategy != "parallel":
        return None
    return search.points or (search.workers if search.workers > 1 else DEFAULT_POINTS)


def seed_everything(text: str) -> None:
    """Seed every generator a trial or a cell could touch from `text` (its key), so its result does not depend on
    which worker computes it or on what that worker computed before."""
    import hashlib
    import random

    import torch
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


class Tuner:
    """One search on a session: its trials, scored here or found in the store."""

    def __init__(self, session: PruningSession, config: RunConfig, store=None, quiet: bool = False):
        self.session, self.config, self.store, self.quiet = session, config, store, quiet
        self.search, self.spec, self.param = config.search, config.allocation, config.search.param
        self.upper = searchable_of(config).upper(self.spec.sparsity, len(session.blocks))
        self.windows = self.search.eval_windows or config.data.max_eval_windows
        self.key = settings_key(session, config)
        self.refine_key = f"{self.key}|all windows"
        self.points = points_of(config)

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def compute(self, value: float, max_windows: int | None, label: str, log_key: str) -> tuple[float, dict]:
        """Prune with the parameter at `value` and score it (the model is dense again afterwards)."""
        session, param = self.session, self.param
        seed_everything(f"trial|{log_key}|{value!r}")
        session.restore_dense()
        try:
            sparsities = session.allocation(with_value(self.spec, param, min(value, self.upper))).sparsities
        except UserError as exc:  # beyond what the rule can realise: a failed trial
            if not isinstance(exc, IllegalAllocationError) and exc.setting not in (param, "allocation"):
                raise
            self._say(f"  {label} {param}={value:g}: {exc}")
            return float("inf"), {"illegal": str(exc)}
        try:
            session.prune(sparsities, self.config.prune.pruner, self.config.prune.params, self.config.prune.n_m)
            ppl, _ = session.perplexity(max_windows)
        finally:
            session.restore_dense()
        self._say(f"  {label} {param}={value:g} ppl={ppl:.4f}")
        return (ppl if math.isfinite(ppl) else float("inf")), {"sparsities": sparsities}

    # --- the store ---------------------------------------------------------------------------------------

    @staticmethod
    def store_key(log_key: str, value: float) -> str:
        return f"trial|{log_key}|{value!r}"

    def _compute_into_store(self, log_key: str, value: float, max_windows: int | None, label: str) -> dict:
        started = time.perf_counter()
        ppl, extra = self.compute(value, max_windows, label, log_key)
        return self.store.put(self.store_key(log_key, value), {
            "kind": "trial", "param": self.param, "beta": value, "ppl": ppl if math.isfinite(ppl) else None,
            "seconds": round(time.perf_counter() - started, 3), "extra": extra})

    def _stored(self, log_key: str, value: float) -> dict | None:
        return self.store.get(self.store_key(log_key, value))

    def scorer(self, max_windows: int | None, label: str, log_key: str):
        """evaluate(value) for the strategies: computed here, or (with a store) taken from it, or claimed there,
        computed and put (waiting while another live worker computes it)."""
        def evaluate(value: float):
            if self.store is None:
                return self.compute(value, max_windows, label, log_key)
            key = self.store_key(log_key, value)
            record = self.store.claim_or_wait(key)
            if record is None:
                try:
                    record = self._compute_into_store(log_key, value, max_windows, label)
                finally:
                    self.store.release(key)
            ppl = float("inf") if record["ppl"] is None else record["ppl"]
            return ppl, {**record.get("extra", {}), ELAPSED: record.get("seconds", 0.0)}
        return evaluate

    def _replay(self, log_key: str):
        """lookup(value) -> stored perplexity (inf for a failed trial) or None."""
        def lookup(value: float):
            record = self._stored(log_key, value)
            if record is None:
                return None
            return float("inf") if record["ppl"] is None else record["ppl"]
        return lookup

    def pending(self) -> list[tuple[str, float, int | None, str]] | None:
        """The trials of the current round nobody has finished: (log key, value, windows, label); None when the
        search, re-scoring included, is complete."""
        search = self.search
        missing = pending_values(self._replay(self.key), self.upper, search.strategy, search.step, search.tol,
                                 search.coarse, True, self.points)
        if missing is not None:
            return [(self.key, value, self.windows, "trial") for value in missing]
        if not (search.eval_windows and search.refine > 0):
            return None
        lookup = self._replay(self.key)
        result = search_beta(lambda v: lookup(v), self.upper, strategy=search.strategy, step=search.step,
                             tol=search.tol, coarse_points=search.coarse, include_zero=True, progress=False,
                             points=self.points)
        refine = self._replay(self.refine_key)
        missing = [v for v in refine_candidates(result, search.refine) if refine(v) is None]
        return [(self.refine_key, v, self.config.data.max_eval_windows, "re-score") for v in missing] or None

    def best(self) -> tuple[float, SearchResult]:
        """(best value, the search's result) replayed from a complete store (see `step`); nothing is computed."""
        search = self.search

        def stored(log_key: str):
            def evaluate(value: float):
                record = self._stored(log_key, value)
                if record is None:
                    raise RuntimeError(f"trial {self.param}={value:g} is not in the store; step() until DONE first")
                ppl = float("inf") if record["ppl"] is None else record["ppl"]
                return ppl, {**record.get("extra", {}), ELAPSED: record.get("seconds", 0.0)}
            return evaluate

        result = search_beta(stored(self.key), self.upper, strategy=search.strategy, step=search.step,
                             tol=search.tol, coarse_points=search.coarse, include_zero=True, progress=False,
                             points=self.points)
        final = result
        if search.eval_windows and search.refine > 0:
            final = refine_best(stored(self.refine_key), result, top_k=search.refine)
        if not math.isfinite(final.best_ppl):
            raise UserError(f"every {self.param} tried gave a non-finite perplexity")
        return final.best_beta, result

    def step(self) -> str:
        """Score one missing trial of the current round if one is free to claim: PROGRESS; BLOCKED when every
        missing trial is being scored by another worker; DONE when the search is complete."""
        pending = self.pending()
        if pending is None:
            return DONE
        for log_key, value, windows, label in pending:
            key = self.store_key(log_key, value)
            if self.store.try_claim(key):
                try:
                    if not self.store.has(key):
                        self._compute_into_store(log_key, value, windows, label)
                finally:
                    self.store.release(key)
                return PROGRESS
        return BLOCKED


def worker_steps(payload, store) -> list:
    """A search worker's setup: load the session with the loader the caller passed (lib.run.load_session), then
    score trials from the shared store until the search is done."""
    config, load = payload
    session = load(config)
    session.keep_dense_copy()
    return [Tuner(session, config, store).step]


def run_search(session: PruningSession, config: RunConfig, store=None,
               load: Callable[[RunConfig], PruningSession] | None = None) -> tuple[dict, float]:
    """(record for the results JSON, best value of the searched parameter). Leaves the model dense.

    With --search_workers K (and no store given) K workers score the trials first, each loading the model with
    `load`; the search is then replayed here from what they stored (any trial they left is scored here)."""
    if config.search.workers > 1 and store is None:
        if load is None:
            raise UserError("--search_workers needs a caller that can load the model in each worker (main.py)",
                            "search_workers")
        from ..compare.workers import search_with_workers
        with search_with_workers(config, worker_steps, load) as filled:
            return run_search(session, config, filled)
    search = config.search
    param = search.param
    tuner = Tuner(session, config, store)
    upper, windows, key = tuner.upper, tuner.windows, tuner.key
    session.keep_dense_copy()
    progress, session.progress = session.progress, False  # one bar over trials instead of nested ones

    refined = None
    try:
        result = search_beta(tuner.scorer(windows, "trial", key), upper, strategy=search.strategy,
                             step=search.step, tol=search.tol, coarse_points=search.coarse, include_zero=True,
                             log_path=search.log, key=key, progress=progress, points=tuner.points)
        if search.eval_windows and search.refine > 0:
            # A window subset can misrank close values: re-score the best few on every evaluation window.
            refined = refine_best(tuner.scorer(config.data.max_eval_windows, "re-score", tuner.refine_key), result,
                                  top_k=search.refine, log_path=search.log, key=tuner.refine_key)
    finally:
        session.progress = progress
        session.restore_dense()
    if not math.isfinite(result.best_ppl):
        raise UserError(f"every {param} tried gave a non-finite perplexity")
    best = refined if refined is not None else result
    rounds = f" in {result.rounds} rounds" if result.rounds != result.num_trials else ""
    print(f"Best LLM ppl = {best.best_ppl} when {param}={best.best_beta:g} "
          f"({result.num_trials} trials{rounds}, {result.strategy}"
          f"{f', scored on {windows} windows' if windows else ''}"
          f"{f', best {refined.num_trials} re-scored on all' if refined is not None else ''})", flush=True)
    if result.num_evaluated < result.num_trials and search.log:
        print(f"resumed {result.num_trials - result.num_evaluated} of {result.num_trials} trials from "
              f"{search.log}", flush=True)
    uniform = next((t["ppl"] for t in result.trials if t["beta"] == 0), None)
    results_path = config.outputs.results
    plot_path = search.plot or (os.path.splitext(results_path)[0] + "_search.png" if results_path else None)
    try:
        plotted = bool(plot_path) and plot_search(result, plot_path, uniform, param)
        if plot_path and not plotted:
            warnings.warn("matplotlib is not installed (pip install matplotlib): no search plot written; the "
                          "search results are complete without it")
    except (OSError, ValueError, RuntimeError) as exc:  # a finished search is worth more than its picture
        plotted = False
        print(f"warning: no search plot written to {plot_path} ({exc})", flush=True)
    record = {"param": param, "strategy": result.strategy, "best": best.best_beta, f"best_{param}": best.best_beta,
              "best_ppl_scored": result.best_ppl, "subset_best": result.best_beta,
              "rescored": [{"value": t["beta"], param: t["beta"], "ppl": t["ppl"]} for t in refined.trials]
              if refined else None,
              "scored_windows": windows, "num_trials": result.num_trials, "num_evaluated": result.num_evaluated,
              "resumed_trials": result.num_trials - result.num_evaluated, "rounds": result.rounds,
              "points_per_round": tuner.points, "workers": search.workers,
              "max_value": upper, "step": search.step, "neutral_ppl_scored": uniform,
              "curve": [{"value": t["beta"], param: t["beta"], "ppl": t["ppl"], "seconds": t["seconds"]}
                        for t in result.trials],
              "plot": plot_path if plotted else None}
    return record, best.best_beta
