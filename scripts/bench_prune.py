"""Benchmark the real pruning and perplexity code paths on a random-initialised LLaMA of a named shape.

No checkpoint or dataset is needed: the weights are random (normal, std 0.02) and the calibration and evaluation
tokens are random ids, so the timings and memory are those of a real run while the perplexities are meaningless.
The model is pruned with an ATP allocation (mean sparsity 0.7, beta 0.01) by every method in --methods, restoring
the dense weights in between, and evaluated after each. One JSON line goes to stdout (progress, if asked, to stderr).

  python scripts/bench_prune.py --shape tiny --device cpu --nsamples 8 --seqlen 128 --eval_windows 4
  python scripts/bench_prune.py --shape llama2-7b            # on one GPU; compares with the issue's H100 figures
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lib.allocation.atp import atp_allocation  # noqa: E402
from lib.calibration.offload import place_for_offload  # noqa: E402
from lib.models.loading import resolve_device  # noqa: E402
from lib.models.structure import find_decoder_blocks  # noqa: E402
from lib.pruning.pruner import PRUNERS, default_params  # noqa: E402
from lib.session import LoadedModel, PruningSession, SessionData  # noqa: E402

SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0),
    "small": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0),
    "llama2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama2-13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
SPARSITY, BETA = 0.7, 0.01
# The figures: LLaMA-2-7B, 128 x 2048 calibration tokens, 166 evaluation windows, fp16, one H100.
REFERENCE = {"shape": "llama2-7b", "hardware": "1x H100", "nsamples": 128, "seqlen": 2048, "eval_windows": 166,
             "wanda_prune_s": 19.6, "sparsegpt_prune_s": 341.9, "eval_s": 10.7, "peak_gib": 25.4}
INIT_STD = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--methods", default="wanda,sparsegpt", help=f"comma-separated, from {', '.join(PRUNERS.names())}")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval_windows", type=int, default=166, help="perplexity windows of --seqlen tokens")
    p.add_argument("--calib_batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=4)
    p.add_argument("--offload", action="store_true", help="keep the decoder blocks on the CPU; each visits the "
                                                          "device only while it is worked on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    p.add_argument("--json_out", default=None, help="also write the JSON record to this file")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in PRUNERS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(PRUNERS.names())}")
    for flag in ("nsamples", "seqlen", "eval_windows", "calib_batch_size", "eval_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    return args


def _skip_init():
    """Construct modules without running their (slow, soon overwritten) random initialisation, where possible."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions: plain init, slower but correct
        return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def build_model(shape: str, seqlen: int, dtype: torch.dtype, build_device: torch.device,
                fill_device: torch.device, seed: int) -> torch.nn.Module:
    """A random LlamaForCausalLM of `shape`, created directly on `build_device`.

    Weights are drawn on `fill_device` (the GPU, even for CPU-resident offloaded blocks: much faster) from one seeded
    generator in parameter order, so offloaded and resident runs get identical models.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig
    spec = dict(SHAPES[shape])
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], seqlen)
    config = LlamaConfig(**spec, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(build_device), _skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=fill_device).manual_seed(seed)
    for _, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm gains
            param.fill_(1.0)
        else:
            draw = torch.empty(param.shape, dtype=dtype, device=fill_device).normal_(0.0, INIT_STD, generator=generator)
            param.copy_(draw)
    model.eval()
    model.config.use_cache = False
    return model


class Phases:
    """Wall time and peak device memory of named phases (CUDA is synchronised before every clock read)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float | None] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = time.perf_counter() - start
        self.peak_gib[name] = (torch.cuda.max_memory_allocated(self.device) / 2**30
                               if self.device.type == "cuda" else None)


def compare_with_reference(result: dict) -> dict | None:
    """Our figures divided by the issue's (below 1: faster or smaller), for llama2-7b on CUDA only."""
    if result["shape"] != REFERENCE["shape"] or not result["device"].startswith("cuda"):
        return None
    methods = result["methods"]
    ratios = {f"{m}_prune": methods[m]["prune_seconds"] / REFERENCE[f"{m}_prune_s"]
              for m in ("wanda", "sparsegpt") if m in methods}
    ratios["eval"] = methods[next(iter(methods))]["eval_seconds"] / REFERENCE["eval_s"]
    peaks = [v for v in result["peak_gib"].values() if v is not None]
    ratios["peak_gib"] = max(peaks) / REFERENCE["peak_gib"] if peaks else None
    same_setup = (result["nsamples"], result["seqlen"], result["eval_windows"], result["dtype"]) == (
        REFERENCE["nsamples"], REFERENCE["seqlen"], REFERENCE["eval_windows"], "float16")
    return {"ours_over_reference": ratios, "same_setup": same_setup and not result["offload"]}


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    phases = Phases(device)
    from transformers import LlamaForCausalLM  # noqa: F401  (import and CUDA start-up are not part of "build")
    torch.zeros(1, device=device)
    build_device = torch.device("cpu") if args.offload else device

    with phases("build"):
        model = build_model(args.shape, args.seqlen, dtype, build_device, device, args.seed)
        blocks = find_decoder_blocks(model)
        if args.offload:
            place_for_offload(model, blocks, device)
    offload_device = device if args.offload else None

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed + 1)
    calib_ids = torch.randint(vocab, (args.nsamples, args.seqlen), generator=generator)
    eval_ids = torch.randint(vocab, (1, args.eval_windows * args.seqlen), generator=generator)
    session = PruningSession(LoadedModel(model, None, blocks, f"bench:{args.shape}", offload_device),
                             SessionData(calib_ids, eval_ids, args.seqlen, args.calib_batch_size,
                                         args.eval_batch_size), args.progress)
    sparsities = atp_allocation(SPARSITY, BETA, len(blocks))
    if len(args.methods) > 1:
        session.keep_dense_copy()

    methods: dict[str, dict] = {}
    for k, method in enumerate(args.methods):
        if k > 0:
            session.restore_dense()
        with phases(f"prune_{method}"):
            pruner = PRUNERS.get(method)
            records = session.prune(sparsities, pruner, default_params(pruner), None)
        with phases(f"eval_{method}"):
            ppl, windows = session.perplexity(args.eval_windows)
        prune_s, eval_s = phases.seconds[f"prune_{method}"], phases.seconds[f"eval_{method}"]
        methods[method] = {
            "prune_seconds": prune_s,
            "calib_tokens_per_s": args.nsamples * args.seqlen / prune_s,
            "achieved_sparsity": sum(r["zeros"] for r in records) / sum(r["weights"] for r in records),
            "eval_seconds": eval_s,
            "eval_tokens_per_s": windows * args.seqlen / eval_s,
            "perplexity": ppl if math.isfinite(ppl) else None,
            "peak_gib_prune": phases.peak_gib[f"prune_{method}"],
            "peak_gib_eval": phases.peak_gib[f"eval_{method}"],
        }

    result = {
        "shape": args.shape,
        "config": {k: v for k, v in SHAPES[args.shape].items() if k != "max_position_embeddings"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "offload": args.offload,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
        "calib_batch_size": args.calib_batch_size, "eval_batch_size": args.eval_batch_size,
        "target_sparsity": SPARSITY, "beta": BETA,
        "build_seconds": phases.seconds["build"],
        "methods": methods,
        "peak_gib": phases.peak_gib,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reference": REFERENCE,
    }
    result["vs_reference"] = compare_with_reference(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lib.errors import UserError
    try:
        result = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
