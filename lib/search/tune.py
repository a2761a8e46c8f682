"""`--search PARAM` (or `--PARAM search`, e.g. `--beta search`): tune one declared parameter of the allocation in
one process, loading the model and data once. The parameter is whatever the rule declares searchable (ATP's beta,
OWL's lambda, ...) or the absorption correction's strength, over [0, its largest legal value].

Each trial restores the dense weights, allocates through the one allocation route (so the absorption correction
and any other setting of the spec apply to every trial), prunes, and scores perplexity (optionally on the first N
evaluation windows only); lib.search.strategies decides which values to try. A value the rule cannot realise is a
failed trial (infinite perplexity), never the best.
"""
from __future__ import annotations

import math
import os
import warnings

from dataclasses import replace

from ..allocation.allocate import AllocationSpec
from ..allocation.rule import ABSORPTION, RULES, Searchable
from ..config import RunConfig
from ..errors import IllegalAllocationError, UserError
from ..session import PruningSession
from .strategies import plot_search, refine_best, search_beta


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


def run_search(session: PruningSession, config: RunConfig) -> tuple[dict, float]:
    """(record for the results JSON, best value of the searched parameter). Leaves the model dense."""
    search, spec = config.search, config.allocation
    param = search.param
    upper = searchable_of(config).upper(spec.sparsity, len(session.blocks))
    windows = search.eval_windows or config.data.max_eval_windows
    session.keep_dense_copy()
    progress, session.progress = session.progress, False  # one bar over trials instead of nested ones

    def scorer(max_windows: int | None, label: str):
        def evaluate(value: float):
            session.restore_dense()
            try:
                sparsities = session.allocation(with_value(spec, param, min(value, upper))).sparsities
            except UserError as exc:  # beyond what the rule can realise: a failed trial
                if not isinstance(exc, IllegalAllocationError) and exc.setting not in (param, "allocation"):
                    raise
                print(f"  {label} {param}={value:g}: {exc}", flush=True)
                return float("inf"), {"illegal": str(exc)}
            session.prune(sparsities, config.prune.pruner, config.prune.params, config.prune.n_m)
            ppl, _ = session.perplexity(max_windows)
            print(f"  {label} {param}={value:g} ppl={ppl:.4f}", flush=True)
            return (ppl if math.isfinite(ppl) else float("inf")), {"sparsities": sparsities}
        return evaluate

    key = settings_key(session, config)
    refined = None
    try:
        result = search_beta(scorer(windows, "trial"), upper, strategy=search.strategy, step=search.step,
                             tol=search.tol, coarse_points=search.coarse, include_zero=True, log_path=search.log,
                             key=key, progress=progress)
        if search.eval_windows and search.refine > 0:
            # A window subset can misrank close values: re-score the best few on every evaluation window.
            refined = refine_best(scorer(config.data.max_eval_windows, "re-score"), result, top_k=search.refine,
                                  log_path=search.log, key=f"{key}|all windows")
    finally:
        session.progress = progress
        session.restore_dense()
    if not math.isfinite(result.best_ppl):
        raise UserError(f"every {param} tried gave a non-finite perplexity")
    best = refined if refined is not None else result
    print(f"Best LLM ppl = {best.best_ppl} when {param}={best.best_beta:g} "
          f"({result.num_trials} trials, {result.strategy}"
          f"{f', scored on {windows} windows' if windows else ''}"
          f"{f', best {refined.num_trials} re-scored on all' if refined is not None else ''})", flush=True)
    if result.num_evaluated < result.num_trials:
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
              "resumed_trials": result.num_trials - result.num_evaluated,
              "max_value": upper, "step": search.step, "neutral_ppl_scored": uniform,
              "curve": [{"value": t["beta"], param: t["beta"], "ppl": t["ppl"], "seconds": t["seconds"]}
                        for t in result.trials],
              "plot": plot_path if plotted else None}
    return record, best.best_beta
