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
from .search import plot_search, refine_best, search_beta


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

    def scorer(max_windows: int | None, label: str):
        def evaluate(beta: float):
            session.restore_dense()
            sparsities = atp_allocation(args.sparsity_ratio, min(beta, beta_hi), num_blocks)
            session.prune(sparsities, args.prune_method, args.n_m)
            ppl, _ = session.perplexity(max_windows)
            print(f"  {label} beta={beta:g} ppl={ppl:.4f}", flush=True)
            return (ppl if math.isfinite(ppl) else float("inf")), {"sparsities": sparsities}
        return evaluate

    key = _settings_key(session, args)
    refined = None
    try:
        result = search_beta(scorer(windows, "trial"), beta_hi, strategy=args.search_strategy,
                             step=args.search_step, tol=args.search_tol, coarse_points=args.search_coarse,
                             include_zero=True, log_path=args.search_log, key=key, progress=progress)
        if args.search_eval_windows and args.search_refine > 0:
            # A window subset can misrank close betas: re-score the best few on every evaluation window.
            refined = refine_best(scorer(args.max_eval_windows, "re-score"), result, top_k=args.search_refine,
                                  log_path=args.search_log, key=f"{key}|all windows")
    finally:
        session.progress = progress
        session.restore_dense()
    if not math.isfinite(result.best_ppl):
        raise UserError("every beta tried gave a non-finite perplexity")
    best_beta = refined.best_beta if refined is not None else result.best_beta
    best_ppl = refined.best_ppl if refined is not None else result.best_ppl
    print(f"Best LLM ppl = {best_ppl} when beta={best_beta:g} "
          f"({result.num_trials} trials, {result.strategy}"
          f"{f', scored on {windows} windows' if windows else ''}"
          f"{f', best {refined.num_trials} re-scored on all' if refined is not None else ''})", flush=True)
    uniform = next((t["ppl"] for t in result.trials if t["beta"] == 0), None)
    plot_path = args.search_plot or (os.path.splitext(args.results)[0] + "_search.png" if args.results else None)
    plotted = bool(plot_path) and plot_search(result, plot_path, uniform)
    if plot_path and not plotted:
        print("matplotlib is not installed: no search plot written", flush=True)
    record = {"strategy": result.strategy, "best_beta": best_beta, "best_ppl_scored": result.best_ppl,
              "subset_best_beta": result.best_beta,
              "rescored": [{"beta": t["beta"], "ppl": t["ppl"]} for t in refined.trials] if refined else None,
              "scored_windows": windows, "num_trials": result.num_trials, "num_evaluated": result.num_evaluated,
              "beta_max": beta_hi, "step": args.search_step, "uniform_ppl_scored": uniform,
              "curve": [{"beta": t["beta"], "ppl": t["ppl"], "seconds": t["seconds"]} for t in result.trials],
              "plot": plot_path if plotted else None}
    return record, best_beta
