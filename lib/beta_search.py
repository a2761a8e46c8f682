"""`--beta search`: find ATP's best beta in one process, loading the model and data once.

Each trial restores the dense weights, prunes with that beta and scores perplexity (optionally on the first N
evaluation windows only); lib.search decides which betas to try.
"""
from __future__ import annotations

import argparse
import math
import os

from .allocation import atp_allocation, max_beta
from .errors import UserError
from .pipeline import PruningSession
from .search import plot_search, search_beta


def _settings_key(session: PruningSession, args: argparse.Namespace) -> str:
    """Everything that changes a trial's perplexity, so a resumed log never mixes settings."""
    return "|".join(str(x) for x in (
        session.model_key, args.prune_method, args.sparsity_ratio, args.sparsity_type, args.nsamples,
        session.seqlen, args.seed, args.calib_data, args.eval_data, args.search_eval_windows or
        args.max_eval_windows, args.dtype))


def run_beta_search(session: PruningSession, args: argparse.Namespace, num_blocks: int) -> tuple[dict, float]:
    """(record for the results JSON, best beta). Leaves the model dense."""
    beta_hi = max_beta(args.sparsity_ratio, num_blocks)
    windows = args.search_eval_windows or args.max_eval_windows
    session.keep_dense_copy()
    progress, session.progress = session.progress, False  # one bar over trials instead of nested ones

    def evaluate(beta: float):
        session.restore_dense()
        sparsities = atp_allocation(args.sparsity_ratio, min(beta, beta_hi), num_blocks)
        session.prune(sparsities, args.prune_method, args.n_m)
        ppl, _ = session.perplexity(windows)
        print(f"  trial beta={beta:g} ppl={ppl:.4f}", flush=True)
        return (ppl if math.isfinite(ppl) else float("inf")), {"sparsities": sparsities}

    try:
        result = search_beta(evaluate, beta_hi, strategy=args.search_strategy, step=args.search_step,
                             tol=args.search_tol, coarse_points=args.search_coarse, include_zero=True,
                             log_path=args.search_log, key=_settings_key(session, args), progress=progress)
    finally:
        session.progress = progress
        session.restore_dense()
    if not math.isfinite(result.best_ppl):
        raise UserError("every beta tried gave a non-finite perplexity")
    print(f"Best LLM ppl = {result.best_ppl} when beta={result.best_beta:g} "
          f"({result.num_trials} trials, {result.strategy}"
          f"{f', scored on {windows} windows' if windows else ''})", flush=True)
    uniform = next((t["ppl"] for t in result.trials if t["beta"] == 0), None)
    plot_path = args.search_plot or (os.path.splitext(args.results)[0] + "_search.png" if args.results else None)
    plotted = bool(plot_path) and plot_search(result, plot_path, uniform)
    if plot_path and not plotted:
        print("matplotlib is not installed: no search plot written", flush=True)
    record = {"strategy": result.strategy, "best_beta": result.best_beta, "best_ppl_scored": result.best_ppl,
              "scored_windows": windows, "num_trials": result.num_trials, "num_evaluated": result.num_evaluated,
              "beta_max": beta_hi, "step": args.search_step, "uniform_ppl_scored": uniform,
              "curve": [{"beta": t["beta"], "ppl": t["ppl"], "seconds": t["seconds"]} for t in result.trials],
              "plot": plot_path if plotted else None}
    return record, result.best_beta
