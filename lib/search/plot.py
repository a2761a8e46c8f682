"""The picture of a search: perplexity against the searched value. matplotlib is an optional extra."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .strategies import SearchResult


def plotting_available() -> bool:
    """Whether matplotlib (an optional extra) can be imported, without importing it."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def plot_search(result: "SearchResult", path: str, uniform_ppl: float | None = None, param: str = "beta") -> bool:
    """Save a PNG of perplexity vs the searched value (best point and the neutral value 0 marked); False when
    matplotlib is missing.

    uniform_ppl: the perplexity at 0 when it is known but not among the trials (e.g. the grid strategy).
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
    rounds = f", {result.rounds} rounds" if result.rounds and result.rounds != result.num_trials else ""
    ax.set_title(f"{param} search ({result.strategy}, {result.num_trials} trials{rounds})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return True
