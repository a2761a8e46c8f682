"""One CLI run: load, allocate, prune, evaluate, write results. Flags arrive as an argparse Namespace already
validated by lib.cli; everything below it takes explicit parameters."""
from __future__ import annotations

import argparse
import math
import time

import torch

from .allocation import format_plan, max_beta
from .errors import UserError
from .pipeline import PruningSession, timed


DEFAULT_NSAMPLES = 128


def _log(message: str) -> None:
    print(message, flush=True)


def _apply_demo(args: argparse.Namespace) -> None:
    """Point the data flags at the shipped text and size the run for a CPU, unless the user chose otherwise."""
    from .demo import CALIB_TEXT, DEMO_DEFAULTS, EVAL_TEXT
    if args.calib_data == "c4":
        args.calib_data = CALIB_TEXT
    if args.eval_data == "wikitext2":
        args.eval_data = EVAL_TEXT
    args.eval_dense = True
    for flag, value in DEMO_DEFAULTS[args.demo].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)


def _load(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, offload: bool):
    """(model, tokenizer, model name for the records), with the weights on the GPU unless offloading."""
    from .loading import load_model_and_tokenizer
    if args.demo == "tiny":
        from .demo import tiny_demo_model
        model, tokenizer = tiny_demo_model(seed=args.seed)
        return model.to(dtype), tokenizer, "demo:tiny-llama"
    name = _checkpoint_name(args)
    device_map = args.device_map
    if device_map is None and device.type == "cuda" and not offload:
        device_map = {"": str(device)}
    model, tokenizer = load_model_and_tokenizer(name, dtype, device_map=device_map)
    return model, tokenizer, ("demo:smollm2-135m" if args.demo == "real" else name)


def _checkpoint_name(args: argparse.Namespace) -> str:
    if args.demo == "real":
        from .demo import real_demo_checkpoint
        return real_demo_checkpoint()
    return args.model


def run(args: argparse.Namespace) -> dict:
    from .cli import allocation_spec
    from .data import calibration_windows, evaluation_tokens
    from .loading import (estimated_weight_bytes, fits_on_device, model_max_positions, num_blocks_from_config,
                          place_for_offload, resolve_device, resolve_dtype)
    from .model_utils import find_decoder_blocks
    from .outputs import save_model_atomic, versions, write_json_atomic

    timings: dict[str, float] = {}
    started = time.perf_counter()
    if args.demo:
        _apply_demo(args)
    if args.quiet:  # transformers' own bars would otherwise precede a one-line error
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    if args.nsamples is None:
        args.nsamples = DEFAULT_NSAMPLES
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)

    zero_shot_tasks = None
    if args.eval_zero_shot:
        from .zeroshot import DEFAULT_TASKS, SHIPPED_TASKS_DIR, check_tasks
        zero_shot_tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else DEFAULT_TASKS
        args.tasks_dir = args.tasks_dir or str(SHIPPED_TASKS_DIR)
        check_tasks(zero_shot_tasks, args.tasks_dir)

    if args.model is not None and not args.model.endswith(".gguf"):
        # Check the allocation against the config before loading any weights.
        num_blocks = num_blocks_from_config(args.model)
        if num_blocks is not None:
            allocation_spec(args, None if args.beta == "search" else args.beta).validate(num_blocks)

    offload = False
    if device.type == "cuda" and args.device_map is None:
        offload = args.offload
        if not offload and args.demo != "tiny" and not fits_on_device(
                estimated_weight_bytes(_checkpoint_name(args), dtype), device):
            _log("the model does not fit in GPU memory: offloading decoder blocks to the CPU (--offload)")
            offload = True
    (model, tokenizer, model_name), timings["load_model"] = timed(_load, args, dtype, device, offload)
    blocks = find_decoder_blocks(model)
    num_blocks = len(blocks)
    beta = None if args.beta == "search" else args.beta
    allocation_spec(args, beta).validate(num_blocks)

    offload_device = device if offload else None
    if offload:
        place_for_offload(model, blocks, device)
    elif args.device_map is None:
        model.to(device)

    max_pos = model_max_positions(model)
    seqlen = args.seqlen or min(2048, max_pos or 2048)
    if max_pos is not None and seqlen > max_pos:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions")

    spec = allocation_spec(args, beta)
    needs_calib = args.prune_method != "magnitude" or spec.needs_calibration()
    calib_ids = None
    calib_layout = None
    if needs_calib:
        (calib, timings["load_calibration"]) = timed(calibration_windows, args.calib_data, tokenizer,
                                                      args.nsamples, seqlen, args.seed)
        calib_ids, calib_layout = calib
    (ev, timings["load_eval"]) = timed(evaluation_tokens, args.eval_data, tokenizer)
    eval_ids, eval_layout = ev
    if eval_ids.shape[1] < seqlen:
        raise UserError(f"--eval_data {args.eval_data}: only {eval_ids.shape[1]} tokens, fewer than one window of "
                        f"--seqlen {seqlen}")

    session = PruningSession(model, tokenizer, blocks, calib_ids, eval_ids, seqlen, model_name,
                             args.calib_batch_size, args.eval_batch_size, offload_device, not args.quiet)
    _log(f"model {model_name}: {num_blocks} decoder blocks, {dtype}, device {device}"
         f"{' (offloaded blocks)' if offload_device is not None else ''}")

    dense_ppl = None
    if args.eval_dense:
        (dense, timings["eval_dense"]) = timed(session.perplexity, args.max_eval_windows)
        dense_ppl = dense[0]
        _log(f"dense perplexity {dense_ppl}")

    search_record = None
    if args.beta == "search":
        from .beta_search import run_beta_search
        (search_record, best_beta), timings["search"] = timed(run_beta_search, session, args, num_blocks)
        spec = allocation_spec(args, best_beta)

    (alloc, timings["allocation"]) = timed(session.allocation, spec)
    sparsities, allocation_info = alloc
    _log(f"layer-wise sparsity plan ({spec.name}"
         f"{f', beta={spec.beta:g}' if spec.beta is not None else ''}):")
    _log(format_plan(sparsities))

    records, timings["prune"] = timed(session.prune, sparsities, args.prune_method, args.n_m)
    zeros = sum(r["zeros"] for r in records)
    total = sum(r["weights"] for r in records)
    _log("sparsity sanity check (Linear layers of each decoder block):")
    for r in records:
        _log(f"  block {r['block']:3d}: target {r['target']:.4f} achieved {r['achieved']:.4f}")
    _log(f"  overall sparsity {zeros / total:.4f} (target mean {sum(sparsities) / len(sparsities):.4f})")

    (ppl_windows, timings["eval_ppl"]) = timed(session.perplexity, args.max_eval_windows)
    ppl, windows = ppl_windows
    if not math.isfinite(ppl):
        raise UserError(f"perplexity is {ppl} after pruning: the pruned model is numerically broken "
                        f"(try a lower --sparsity_ratio or --dtype bfloat16/float32); no results written")
    _log(f"wikitext perplexity {ppl}")

    timings["total"] = time.perf_counter() - started
    results = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "model": {"name": model_name, "num_blocks": num_blocks, "dtype": str(dtype), "device": str(device),
                  "offload": offload_device is not None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "allocation": {**allocation_info, "sparsities": sparsities, "mean": sum(sparsities) / num_blocks,
                       "max_beta": max_beta(args.sparsity_ratio, num_blocks)},
        "blocks": records,
        "overall_sparsity": zeros / total,
        "perplexity": ppl,
        "dense_perplexity": dense_ppl,
        "eval": {"data": args.eval_data, "layout": eval_layout, "seqlen": seqlen, "windows": windows,
                 "tokens": int(eval_ids.shape[1])},
        "calibration": {"data": args.calib_data, "layout": calib_layout, "nsamples": args.nsamples,
                        "seqlen": seqlen, "seed": args.seed} if needs_calib else None,
        "search": search_record,
        "timings_s": timings,
        "versions": versions(),
    }
    if args.save_model:
        _, timings["save_model"] = timed(save_model_atomic, model, tokenizer, args.save_model)
        _log(f"pruned model saved to {args.save_model}")
    if args.results:
        write_json_atomic(args.results, results)
        _log(f"results written to {args.results}")

    if args.eval_zero_shot:
        from .zeroshot import evaluate_zero_shot, format_zero_shot_table
        batch = int(args.zs_batch_size) if args.zs_batch_size.isdigit() else args.zs_batch_size
        limit = args.zs_limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        with session.whole_model_forwards():
            zs, timings["zero_shot"] = timed(evaluate_zero_shot, model, tokenizer, zero_shot_tasks,
                                             args.tasks_dir, batch,
                                             limit, args.seed, None)
        _log(format_zero_shot_table(zs))
        results["zero_shot"] = zs
        if args.results:
            write_json_atomic(args.results, results)
    return results
