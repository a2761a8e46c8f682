"""Benchmark the real pruning and perplexity code paths on a random-initialised LLaMA of a named shape.

No checkpoint or dataset is needed: the weights are random (normal, std 0.02) and the calibration and evaluation
tokens are random ids, so the timings and memory are those of a real run while the perplexities are meaningless.
The model is pruned with an ATP allocation (mean sparsity 0.7, beta 0.01) by every method in --methods, restoring
the dense weights in between, and evaluated after each. One JSON line goes to stdout (progress, if asked, to stderr).

With --reference DIR (a checkout of the reference implementation, github.com/wzhuang-xmu/ATP, never part of this
repository) its own prune_wanda / prune_sparsegpt and eval_ppl run right after ours on the same model object (dense
weights restored), the same calibration windows, evaluation tokens and per-block sparsities, so every figure
becomes a ratio measured side by side ("reference_implementation" in the JSON). --beta_search runs the in-process
ATP beta search (lib.search) on the same model. --num_layers keeps a shape's widths with fewer blocks.

  python scripts/bench_prune.py --shape tiny --device cpu --nsamples 8 --seqlen 128 --eval_windows 4
  python scripts/bench_prune.py --shape llama2-7b            # on one GPU; compares with the issue's H100 figures
  python scripts/bench_prune.py --shape llama2-7b --num_layers 4 --methods sparsegpt --reference .reference/ATP
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
import types

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from lib.allocation.atp import atp_allocation  # noqa: E402
from lib.calibration.offload import place_for_offload  # noqa: E402
from lib.models.loading import resolve_device  # noqa: E402
from lib.models.matrices import block_matrices  # noqa: E402
from lib.models.structure import find_decoder_blocks  # noqa: E402
from lib.pruning.pruner import PRUNERS, default_params  # noqa: E402
from lib.session import LoadedModel, PruningSession, SessionData  # noqa: E402
from lib.sparse import cpu  # noqa: E402

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
REFERENCE_METHODS = ("wanda", "sparsegpt")  # what the reference implementation prunes with
REFERENCE_MAX_NSAMPLES = 128


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
    p.add_argument("--json_out", default=None, help="also write the JSON record to this file (rewritten after each "
                                                     "phase, with complete=false until the end)")
    p.add_argument("--num_layers", type=int, default=None, help="keep the shape's widths with this many blocks")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of the reference implementation (wzhuang-xmu/ATP): run its wanda/sparsegpt and "
                        "eval_ppl side by side on the same model and data")
    p.add_argument("--beta_search", action="store_true",
                   help="also run the in-process ATP beta search (golden) with the first of --methods")
    p.add_argument("--search_only", action="store_true", help="with --beta_search: skip the per-method runs")
    p.add_argument("--search_step", type=float, default=0.004, help="beta grid step of --beta_search")
    p.add_argument("--search_eval_windows", type=int, default=4, help="windows that score a --beta_search trial")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in PRUNERS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(PRUNERS.names())}")
    for flag in ("nsamples", "seqlen", "eval_windows", "calib_batch_size", "eval_batch_size", "search_eval_windows"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.num_layers is not None and args.num_layers < 2:
        p.error("--num_layers must be at least 2 (ATP's beta needs two blocks)")
    if args.search_only and not args.beta_search:
        p.error("--search_only needs --beta_search")
    if args.reference is not None and args.nsamples > REFERENCE_MAX_NSAMPLES:
        p.error(f"--reference: the reference implementation holds at most {REFERENCE_MAX_NSAMPLES} calibration "
                f"windows (a fixed buffer), got --nsamples {args.nsamples}")
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
                fill_device: torch.device, seed: int, num_layers: int | None = None) -> torch.nn.Module:
    """A random LlamaForCausalLM of `shape`, created directly on `build_device`.

    Weights are drawn on `fill_device` (the GPU, even for CPU-resident offloaded blocks: much faster) from one seeded
    generator in parameter order, so offloaded and resident runs get identical models.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig
    spec = dict(SHAPES[shape])
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], seqlen)
    if num_layers is not None:
        spec["num_hidden_layers"] = num_layers
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
    if result.get("config", {}).get("num_hidden_layers", SHAPES[REFERENCE["shape"]]["num_hidden_layers"]) != \
            SHAPES[REFERENCE["shape"]]["num_hidden_layers"]:
        return None  # fewer blocks than the full-depth figures
    methods = result["methods"]
    ratios = {f"{m}_prune": methods[m]["prune_seconds"] / REFERENCE[f"{m}_prune_s"]
              for m in ("wanda", "sparsegpt") if m in methods}
    ratios["eval"] = methods[next(iter(methods))]["eval_seconds"] / REFERENCE["eval_s"]
    peaks = [v for v in result["peak_gib"].values() if v is not None]
    ratios["peak_gib"] = max(peaks) / REFERENCE["peak_gib"] if peaks else None
    same_setup = (result["nsamples"], result["seqlen"], result["eval_windows"], result["dtype"]) == (
        REFERENCE["nsamples"], REFERENCE["seqlen"], REFERENCE["eval_windows"], "float16")
    return {"ours_over_reference": ratios, "same_setup": same_setup and not result["offload"]}


# ---------------------------------------------------------------- the reference implementation, side by side
# Its code is never part of this repository: --reference names a checkout (scripts/gpu_check.sh looks in
# $ATP_REFERENCE_DIR, default .reference/ATP). Its package is also called `lib`, so it is imported under another
# name. What this adapter supplies, and nothing more: its data module (which downloads C4 and WikiText-2 through
# `datasets`) is replaced by one serving our calibration windows and evaluation tokens; the attributes its code
# reads from models loaded its way (hf_device_map, seqlen); and the rotary position embeddings that transformers 5
# decoder layers take as an argument (the reference calls layers as transformers 4.3x did, with position_ids only).

REFERENCE_PACKAGE = "atp_reference_impl"


def reference_commit(directory: str) -> str | None:
    """The checkout's commit: its own git repository's HEAD, or a COMMIT file beside an exported tree."""
    if os.path.exists(os.path.join(directory, ".git")):  # (git -C alone would find an enclosing repository)
        try:
            out = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    path = os.path.join(directory, "COMMIT")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


class ReferenceImplementation:
    """The reference's lib/prune.py and lib/eval.py, imported from a checkout and fed our data."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        lib_dir = os.path.join(self.directory, "lib")
        if not os.path.isfile(os.path.join(lib_dir, "prune.py")):
            raise FileNotFoundError(f"{directory}: no lib/prune.py (expected a checkout of wzhuang-xmu/ATP)")
        self.calib_ids: torch.Tensor | None = None
        self.eval_ids: torch.Tensor | None = None
        for name in [m for m in sys.modules if m == REFERENCE_PACKAGE or m.startswith(REFERENCE_PACKAGE + ".")]:
            del sys.modules[name]
        package = types.ModuleType(REFERENCE_PACKAGE)
        package.__path__ = [lib_dir]
        sys.modules[REFERENCE_PACKAGE] = package
        data = types.ModuleType(f"{REFERENCE_PACKAGE}.data")
        data.get_loaders = self._get_loaders
        sys.modules[data.__name__] = data
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:  # its sparsegpt module turns TF32 off at import, for every later matmul of the process
            self.prune = importlib.import_module(f"{REFERENCE_PACKAGE}.prune")
            self.eval = importlib.import_module(f"{REFERENCE_PACKAGE}.eval")
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        self.commit = reference_commit(self.directory)

    def _get_loaders(self, name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        if "wikitext2" in name:
            return None, types.SimpleNamespace(input_ids=self.eval_ids)
        return [(self.calib_ids[i:i + 1].clone(), self.calib_ids[i:i + 1].clone()) for i in range(nsamples)], None

    @contextlib.contextmanager
    def _prepared(self, model, seqlen: int, device: torch.device):
        blocks = model.model.layers
        rotary = getattr(model.model, "rotary_emb", None)
        computed = {}  # the same positions every call: computed once, so the adapter adds no time per call

        def add_rotary(module, args, kwargs):
            if rotary is None or kwargs.get("position_embeddings") is not None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            # keyed without reading values (no device sync): the reference passes the one tensor it captured
            key = (None if positions is None else positions.data_ptr(), hidden.shape[1], hidden.dtype, hidden.device)
            if key not in computed:
                if positions is None:
                    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
                computed[key] = (positions, rotary(hidden, positions))  # kept alive: no other tensor takes its address
            kwargs["position_embeddings"] = computed[key][1]
            return args, kwargs

        handles = [b.register_forward_pre_hook(add_rotary, with_kwargs=True) for b in blocks]
        had_map = hasattr(model, "hf_device_map")
        if not had_map:
            model.hf_device_map = {}
        model.seqlen = seqlen
        synchronize = torch.cuda.synchronize
        if device.type != "cuda":  # its SparseGPT synchronises CUDA unconditionally (for CPU dry runs only)
            torch.cuda.synchronize = lambda *a, **k: None
        try:
            yield
        finally:
            torch.cuda.synchronize = synchronize
            for h in handles:
                h.remove()
            if not had_map:
                del model.hf_device_map
            del model.seqlen

    def run_prune(self, method: str, model, calib_ids: torch.Tensor, sparsities: list[float], seed: int,
                  seqlen: int, device: torch.device) -> list[str]:
        """Prune `model` in place with the reference's own function; returns what it printed."""
        self.calib_ids = calib_ids
        args = types.SimpleNamespace(nsamples=calib_ids.shape[0], seed=seed, sparsity_ratio=SPARSITY,
                                     sparsity_type="unstructured", use_variant=False, prune_method=method,
                                     beta=BETA)
        fn = {"wanda": self.prune.prune_wanda, "sparsegpt": self.prune.prune_sparsegpt}[method]
        printed = io.StringIO()
        with self._prepared(model, seqlen, device), contextlib.redirect_stdout(printed):
            fn(args, model, None, device, sparsity_rates=list(sparsities))
        return printed.getvalue().splitlines()

    def run_eval(self, model, eval_ids: torch.Tensor, seqlen: int, device: torch.device) -> float:
        self.eval_ids = eval_ids
        with self._prepared(model, seqlen, device), contextlib.redirect_stdout(io.StringIO()):
            return float(self.eval.eval_ppl(types.SimpleNamespace(), model, None, device))


def mask_snapshot(blocks, which: list[int]) -> dict:
    """{(block, matrix name): bool zero mask on the CPU} for the chosen blocks."""
    return {(i, name): (m.weight == 0).cpu() for i in which for name, m in block_matrices(blocks[i]).items()}


def mask_agreement(ours: dict, theirs: dict) -> dict:
    """Share of weights whose pruned/kept state agrees, per snapshot block, and each side's zero share."""
    out = {}
    for block in sorted({b for b, _ in ours}):
        keys = [k for k in ours if k[0] == block]
        total = sum(ours[k].numel() for k in keys)
        out[f"block_{block}"] = {
            "agreement": sum(int((ours[k] == theirs[k]).sum()) for k in keys) / total,
            "ours_zeros": sum(int(ours[k].sum()) for k in keys) / total,
            "reference_zeros": sum(int(theirs[k].sum()) for k in keys) / total}
    return out


def environment(device: torch.device) -> dict:
    import transformers
    identity = cpu.identity()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu.describe(identity),
           "cpu_identity": identity}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def beta_search(args, session: PruningSession, device: torch.device) -> dict:
    """The CLI's in-process beta search (lib.search.tune) on this model; its trial lines go to stderr."""
    from lib.cli import build_parser, config_from_flags
    from lib.search.tune import run_search
    flags = ["--model", f"bench:{args.shape}", "--prune_method", args.methods[0], "--sparsity_ratio", str(SPARSITY),
             "--beta", "search", "--search_step", str(args.search_step), "--search_eval_windows",
             str(args.search_eval_windows), "--search_refine", "1", "--nsamples", str(args.nsamples),
             "--seqlen", str(args.seqlen), "--max_eval_windows", str(args.eval_windows), "--quiet"]
    config = config_from_flags(build_parser().parse_args(flags))
    phases = Phases(device)
    with phases("search"), contextlib.redirect_stdout(sys.stderr):
        record, best = run_search(session, config)
    trials = record.get("curve", [])
    return {"method": args.methods[0], "flags": flags, "seconds": phases.seconds["search"],
            "peak_gib": phases.peak_gib["search"], "best_beta": best, "num_trials": record.get("num_trials"),
            "trial_seconds": [t.get("seconds") for t in trials], "record": record}


def _write_json(path: str | None, record: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)


def _progress(message: str) -> None:
    print(f"[bench_prune] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    phases = Phases(device)
    from transformers import LlamaForCausalLM  # noqa: F401  (import and CUDA start-up are not part of "build")
    torch.zeros(1, device=device)
    build_device = torch.device("cpu") if args.offload else device
    reference, reference_status = None, None
    if args.reference is not None:
        try:
            reference = ReferenceImplementation(args.reference)
            reference_status = "ran"
        except Exception as error:  # noqa: BLE001 - the reference is a comparison, not what is measured
            reference_status = f"not available: {type(error).__name__}: {error}"
        if reference is not None and args.offload:
            reference, reference_status = None, "not run: the reference implementation cannot offload blocks"

    with phases("build"):
        model = build_model(args.shape, args.seqlen, dtype, build_device, device, args.seed, args.num_layers)
        blocks = find_decoder_blocks(model)
        if args.offload:
            place_for_offload(model, blocks, device)
    offload_device = device if args.offload else None
    _progress(f"built {args.shape} with {len(blocks)} blocks on {device}{' (offloaded)' if args.offload else ''} "
              f"in {phases.seconds['build']:.1f} s")

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed + 1)
    calib_ids = torch.randint(vocab, (args.nsamples, args.seqlen), generator=generator)
    eval_ids = torch.randint(vocab, (1, args.eval_windows * args.seqlen), generator=generator)
    session = PruningSession(LoadedModel(model, None, blocks, f"bench:{args.shape}", offload_device),
                             SessionData(calib_ids, eval_ids, args.seqlen, args.calib_batch_size,
                                         args.eval_batch_size), args.progress)
    sparsities = atp_allocation(SPARSITY, BETA, len(blocks))
    methods_to_run = [] if args.search_only else args.methods
    prunes = len(methods_to_run) + sum(reference is not None and m in REFERENCE_METHODS for m in methods_to_run)
    if prunes > 1 or (args.beta_search and prunes):
        session.keep_dense_copy()

    config = {k: v for k, v in SHAPES[args.shape].items() if k != "max_position_embeddings"}
    config["num_hidden_layers"] = len(blocks)
    result = {
        "shape": args.shape,
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "offload": args.offload,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
        "calib_batch_size": args.calib_batch_size, "eval_batch_size": args.eval_batch_size,
        "target_sparsity": SPARSITY, "beta": BETA,
        "build_seconds": phases.seconds["build"],
        "methods": {},
        "peak_gib": phases.peak_gib,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reference": REFERENCE,
        "environment": environment(device),
        "complete": False,
    }
    if args.reference is not None:
        result["reference_implementation"] = {
            "status": reference_status, "directory": os.path.abspath(args.reference),
            "commit": reference.commit if reference is not None else None, "methods": {}, "ours_over_reference": {}}
    _write_json(args.json_out, result)

    pruned = False
    for method in methods_to_run:
        if pruned:
            session.restore_dense()
        with phases(f"prune_{method}"):
            pruner = PRUNERS.get(method)
            records = session.prune(sparsities, pruner, default_params(pruner), None)
        with phases(f"eval_{method}"):
            ppl, windows = session.perplexity(args.eval_windows)
        pruned = True
        prune_s, eval_s = phases.seconds[f"prune_{method}"], phases.seconds[f"eval_{method}"]
        result["methods"][method] = {
            "prune_seconds": prune_s,
            "calib_tokens_per_s": args.nsamples * args.seqlen / prune_s,
            "achieved_sparsity": sum(r["zeros"] for r in records) / sum(r["weights"] for r in records),
            "eval_seconds": eval_s,
            "eval_tokens_per_s": windows * args.seqlen / eval_s,
            "perplexity": ppl if math.isfinite(ppl) else None,
            "peak_gib_prune": phases.peak_gib[f"prune_{method}"],
            "peak_gib_eval": phases.peak_gib[f"eval_{method}"],
        }
        _progress(f"ours {method}: prune {prune_s:.2f} s, eval {eval_s:.2f} s, peak "
                  f"{phases.peak_gib[f'prune_{method}'] or 0:.2f} GiB")
        _write_json(args.json_out, result)
        if reference is not None and method in REFERENCE_METHODS:
            result["reference_implementation"]["methods"][method] = compare_side_by_side(
                reference, method, session, result["methods"][method], sparsities, calib_ids, eval_ids, args,
                device)
            result["reference_implementation"]["ours_over_reference"].update(
                ratios_over_reference(method, result["methods"][method],
                                      result["reference_implementation"]["methods"][method]))
            _write_json(args.json_out, result)

    if args.beta_search:
        if pruned:
            session.restore_dense()
        result["beta_search"] = beta_search(args, session, device)
        _progress(f"beta search: {result['beta_search']['num_trials']} trials in "
                  f"{result['beta_search']['seconds']:.1f} s, best beta {result['beta_search']['best_beta']:g}")

    result["vs_reference"] = compare_with_reference(result) if result["methods"] else None
    result["complete"] = True
    return result


def compare_side_by_side(reference: ReferenceImplementation, method: str, session: PruningSession, ours: dict,
                         sparsities: list[float], calib_ids: torch.Tensor, eval_ids: torch.Tensor, args,
                         device: torch.device) -> dict:
    """Restore the dense weights and run the reference's `method` and evaluation on the same model and data."""
    blocks = session.blocks
    which = sorted({0, len(blocks) - 1})
    our_masks = mask_snapshot(blocks, which)
    session.restore_dense()
    phases = Phases(device)
    record = {}
    try:
        with phases("prune"):
            printed = reference.run_prune(method, session.model, calib_ids, sparsities, args.seed, args.seqlen,
                                          device)
        with phases("eval"):
            ppl = reference.run_eval(session.model, eval_ids, args.seqlen, device)
    except Exception as error:  # noqa: BLE001 - recorded; our own figures stand
        layers = session.model.model.layers
        if hasattr(layers[0], "module") and not block_matrices(layers[0]):  # its input catcher, left by a failure
            layers[0] = layers[0].module
        record["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
        _progress(f"reference {method} failed: {record['status']}")
        return record
    zeros = total = 0
    for block in blocks:
        for m in block_matrices(block).values():
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    record.update(status="ran", prune_seconds=phases.seconds["prune"], eval_seconds=phases.seconds["eval"],
                  peak_gib_prune=phases.peak_gib["prune"], peak_gib_eval=phases.peak_gib["eval"],
                  perplexity=ppl if math.isfinite(ppl) else None, achieved_sparsity=zeros / total,
                  printed_lines=len(printed), mask_agreement=mask_agreement(our_masks, mask_snapshot(blocks, which)))
    _progress(f"reference {method}: prune {record['prune_seconds']:.2f} s, eval {record['eval_seconds']:.2f} s "
              f"(ours/reference prune {ours['prune_seconds'] / record['prune_seconds']:.3f}x)")
    return record


def ratios_over_reference(method: str, ours: dict, theirs: dict) -> dict:
    if theirs.get("status") != "ran":
        return {}
    ratios = {f"{method}_prune": ours["prune_seconds"] / theirs["prune_seconds"],
              f"{method}_eval": ours["eval_seconds"] / theirs["eval_seconds"]}
    if ours.get("peak_gib_prune") and theirs.get("peak_gib_prune"):
        ratios[f"{method}_peak_gib_prune"] = ours["peak_gib_prune"] / theirs["peak_gib_prune"]
    return ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        result = run(args)
        _write_json(args.json_out, result)
        print(json.dumps(result), flush=True)
        return 0
    from lib.cli import run_command
    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
