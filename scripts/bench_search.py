"""Time a reference-style beta sweep (search.sh: one main.py process per beta) against the in-process search.

Both run on the same model and settings; prints one JSON line with wall times, trial counts, the best betas and
perplexities, and their ratios. Example (offline, tiny demo model):

    python scripts/bench_search.py --demo tiny --sparsity_ratio 0.7 --step 0.01
    python scripts/bench_search.py --demo real --sparsity_ratio 0.7 -- --search_eval_windows 8
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.stdout, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model for both runs")
    source.add_argument("--demo", choices=["tiny", "real"], help="a demo model instead of --model")
    parser.add_argument("--prune_method", default="wanda")
    parser.add_argument("--sparsity_ratio", type=float, default=0.7)
    parser.add_argument("--step", type=float, default=0.002)
    parser.add_argument("--strategy", default="golden", choices=["golden", "grid"])
    parser.add_argument("main_flags", nargs=argparse.REMAINDER, help="flags for main.py after --")
    args = parser.parse_args()
    flags = [f for f in args.main_flags if f != "--"] + ["--quiet"]
    model = ["--model", args.model] if args.model else ["--demo", args.demo]
    common = [*model, "--prune_method", args.prune_method, "--sparsity_ratio", str(args.sparsity_ratio)]

    env = dict(os.environ, EXTRA_ARGS=" ".join(flags))
    sweep_out, sweep_s = _run(["bash", "search.sh", "--quiet", "--include_zero", "--step", str(args.step),
                               *common], env)
    trials = re.findall(r"^beta=(\S+) ppl=(\S+)$", sweep_out, re.M)
    best = re.search(r"Best LLM ppl = (\S+) when beta=(\S+)", sweep_out)

    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "search.json")
        _, inproc_s = _run([sys.executable, "main.py", *common, *flags, "--beta", "search", "--search_step",
                            str(args.step), "--search_strategy", args.strategy, "--results", results])
        with open(results) as f:
            record = json.load(f)
    search = record["search"]
    print(json.dumps({
        "settings": {"model": model, "prune_method": args.prune_method, "sparsity_ratio": args.sparsity_ratio, "step": args.step,
                     "main_flags": flags, "strategy": args.strategy},
        "reference_sweep": {"seconds": round(sweep_s, 2), "trials": len(trials),
                            "best_beta": float(best.group(2)), "best_ppl": float(best.group(1))},
        "in_process": {"seconds": round(inproc_s, 2), "trials": search["num_trials"],
                       "best_beta": search["best_beta"], "best_ppl": record["perplexity"]},
        "time_ratio": round(inproc_s / sweep_s, 3),
        "trial_ratio": round(search["num_trials"] / max(len(trials), 1), 3),
    }))


if __name__ == "__main__":
    main()
