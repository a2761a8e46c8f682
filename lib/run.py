"""One run of the CLI as a handful of named steps: prepare, load the model, load the data, (search,) allocate,
prune, evaluate, write outputs, zero-shot. Takes a validated RunConfig; knows nothing of argparse."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from .allocation.allocate import AllocationSpec, check_spec, format_plan
from .config import RunConfig, setting_error
from .errors import UserError
from .models import loading
from .session import LoadedModel, PruningSession, SessionData


def _log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        return out


def checkpoint_path(config: RunConfig) -> str:
    if config.model.demo == "real":
        from .demo.models import real_demo_checkpoint
        return real_demo_checkpoint()
    return config.model.model


def prepare(config: RunConfig) -> tuple[torch.device, torch.dtype]:
    """Checks that need libraries or the model's config but no weights; the device and dtype to use."""
    if config.outputs.quiet:  # transformers' own bars would otherwise precede a one-line error
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    device = loading.resolve_device(config.model.device)
    dtype = loading.resolve_dtype(config.model.dtype, device)
    torch.manual_seed(config.data.seed)
    if config.zero_shot.enabled:
        zero_shot_tasks(config)
    if config.model.demo == "real":
        checkpoint_path(config)  # says how to install the checkpoint before anything else runs
    if config.model.demo != "tiny":  # a checkpoint (a .gguf file too): its config read, no weights
        model_config = loading.checkpoint_config(checkpoint_path(config))  # read once: a .gguf's takes seconds
        num_blocks, widths = loading.shape_from_config(model_config)
        skeleton = loading.skeleton_from_config(model_config)
        if skeleton is not None:  # the whole structure, checked before any weight is read
            check_structure(config, skeleton)
            check_room_for_the_model(config, skeleton, dtype)
        else:
            if num_blocks is not None:
                check_allocation(config, num_blocks)
            check_n_m_widths(config, widths)
    return device, dtype


def check_room_for_the_model(config: RunConfig, skeleton, dtype: torch.dtype) -> None:
    """A saved model must fit where it goes: said before the run rather than after it, when the disk fills."""
    from .outputs import check_free_space
    if not config.outputs.save_model:
        return
    dense_bytes = sum(p.numel() for p in skeleton.parameters()) * torch.tensor([], dtype=dtype).element_size()
    # the packed format stores a pruned weight in about (1 - S) of its bytes plus a bit per weight
    share = 1.0 if config.outputs.save_format == "dense" else max(0.2, 1.0 - config.allocation.sparsity + 0.05)
    check_free_space(config.outputs.save_model, int(dense_bytes * share), "save_model")


def check_structure(config: RunConfig, model) -> tuple:
    """The decoder blocks and what pruning will touch: every block parameter is prunable or dense by a stated
    rule, the allocation fits the number of blocks, and N:M fits every matrix's input width."""
    from .models.matrices import model_inventory
    from .models.structure import find_decoder_blocks
    blocks = find_decoder_blocks(model)
    inventory = model_inventory(model, blocks)
    if inventory.unclassified:
        shown = ", ".join(inventory.unclassified[:3])
        more = f" and {len(inventory.unclassified) - 3} more" if len(inventory.unclassified) > 3 else ""
        raise UserError(f"{type(model).__name__}: block parameter(s) {shown}{more} are neither a matrix this tool "
                        f"prunes nor dense by a rule it knows; refusing rather than leave them dense silently",
                        "model")
    if not inventory.matrices:
        raise UserError(f"{type(model).__name__}: its decoder blocks hold no matrix to prune", "model")
    check_allocation(config, len(blocks))
    check_n_m_widths(config, inventory.input_widths)
    return blocks, inventory


def zero_shot_tasks(config: RunConfig):
    """The zero-shot source (hub or the offline real items) with its task names and task directory, checked:
    lm-eval is installed and every name is known."""
    from .eval.sources import prepare_zero_shot_source
    from .eval.zeroshot import DEFAULT_TASKS, SHIPPED_TASKS_DIR, check_tasks
    source = prepare_zero_shot_source(config.zero_shot.source, config.zero_shot.tasks or DEFAULT_TASKS,
                                      config.zero_shot.tasks_dir)
    if source.tasks_dir is None:
        source.tasks_dir = str(SHIPPED_TASKS_DIR)
    check_tasks(source.tasks, source.tasks_dir)
    return source


def check_n_m_widths(config: RunConfig, widths: set[int]) -> None:
    """N:M groups M consecutive inputs: every Linear's input width must be a multiple of M."""
    n_m = config.prune.n_m
    bad = sorted(w for w in widths if n_m is not None and w % n_m[1])
    if bad:
        raise UserError(f"{config.prune.sparsity_type} needs every Linear input width to be a multiple of "
                        f"{n_m[1]}; this model has widths {', '.join(map(str, bad))}", "sparsity_type")


def check_allocation(config: RunConfig, num_blocks: int) -> None:
    spec = config.search.start(config.allocation)
    try:
        check_spec(spec, num_blocks)
    except ValueError as exc:
        raise setting_error("allocation", exc) from None


def load_model(config: RunConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model on `device` (or with offloaded blocks when asked, or when it does not fit)."""
    from .calibration.offload import place_for_offload
    offload = False
    if device.type == "cuda" and config.model.device_map is None:
        offload = config.model.offload
        if not offload and config.model.demo != "tiny" and not loading.fits_on_device(
                loading.estimated_weight_bytes(checkpoint_path(config), dtype), device):
            _log("the model does not fit in GPU memory: offloading decoder blocks to the CPU (--offload)")
            offload = True
    if config.model.demo == "tiny":
        from .demo.models import tiny_demo_model
        model, tokenizer = tiny_demo_model()
        model, name = model.to(dtype), "demo:tiny-llama"
    else:
        device_map = config.model.device_map
        if device_map is None and device.type == "cuda" and not offload:
            device_map = {"": str(device)}
        model, tokenizer = loading.load_model_and_tokenizer(checkpoint_path(config), dtype, device_map=device_map,
                                                            progress=not config.outputs.quiet)
        name = "demo:smollm2-135m" if config.model.demo == "real" else config.model.model
    blocks, inventory = check_structure(config, model)
    if offload:
        place_for_offload(model, blocks, device)
    elif config.model.device_map is None:
        model.to(device)
    return LoadedModel(model, tokenizer, blocks, name, device if offload else None, inventory)


@dataclass
class Texts:
    calibration: tuple[list[str], str] | None  # (documents, layout); None when nothing needs calibration data
    evaluation: tuple[list[str], str]


def needs_calibration(config: RunConfig) -> bool:
    return config.prune.pruner.requires_calibration_data or config.allocation.requires_calibration_data


def read_texts(config: RunConfig, calibrate: bool | None = None) -> Texts:
    """The calibration and evaluation documents, read and checked before any model is loaded. `calibrate`: None
    reads the calibration documents when the pruner or the rule needs them, True always (a table whose rows use
    different rules)."""
    from .data import calibration_documents, check_calibration_size, evaluation_documents
    calibration = None
    if needs_calibration(config) if calibrate is None else calibrate:
        calibration = calibration_documents(config.data.calib_data)
        if config.data.seqlen is not None:
            check_calibration_size(config.data.calib_data, calibration[0], config.data.nsamples, config.data.seqlen)
    return Texts(calibration, evaluation_documents(config.data.eval_data))


def data_location(name: str) -> str:
    """Where a data source was read from, as the record keeps it: a local file or directory as its absolute path,
    symbolic links resolved (a relative one would mean nothing beside the results file); a hub name as given."""
    return os.path.realpath(name) if os.path.exists(name) else name


def load_data(config: RunConfig, loaded: LoadedModel, texts: Texts | None = None,
              calibrate: bool | None = None) -> tuple[SessionData, dict]:
    """Calibration windows (when the pruner or the rule needs them, or always with `calibrate=True`) and evaluation
    tokens, and what to record."""
    from .data import calibration_windows, evaluation_tokens
    texts = texts or read_texts(config, calibrate)
    max_pos = loading.model_max_positions(loaded.model)
    seqlen = config.data.seqlen or min(2048, max_pos or 2048)
    if max_pos is not None and seqlen > max_pos:
        raise UserError(f"{seqlen} exceeds the model's {max_pos} positions", "seqlen")
    needs_calib = needs_calibration(config) if calibrate is None else calibrate
    calib_ids, calib_layout = None, None
    if needs_calib:
        check_calibration_memory(config, loaded, seqlen)
        calib_ids, calib_layout = calibration_windows(config.data.calib_data, loaded.tokenizer,
                                                      config.data.nsamples, seqlen, config.data.seed,
                                                      progress=not config.outputs.quiet, documents=texts.calibration)
    eval_ids, eval_layout = evaluation_tokens(config.data.eval_data, loaded.tokenizer, documents=texts.evaluation)
    if eval_ids.shape[1] < seqlen:
        raise UserError(f"{config.data.eval_data}: only {eval_ids.shape[1]} tokens, fewer than one window of "
                        f"--seqlen {seqlen}", "eval_data")
    records = {
        "eval": {"data": data_location(config.data.eval_data), "layout": eval_layout, "seqlen": seqlen,
                 "tokens": int(eval_ids.shape[1])},
        "calibration": {"data": data_location(config.data.calib_data), "layout": calib_layout,
                        "nsamples": config.data.nsamples,
                        "seqlen": seqlen, "seed": config.data.seed} if needs_calib else None}
    data = SessionData(calib_ids, eval_ids, seqlen, config.data.calib_batch_size, config.data.eval_batch_size)
    return data, records


def host_memory_available() -> int:
    """Bytes of RAM available to a new allocation (MemAvailable: free memory plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_calibration_memory(config: RunConfig, loaded: LoadedModel, seqlen: int) -> None:
    """The captured block inputs and outputs of every calibration window must fit where they are kept."""
    hidden = loaded.model.get_input_embeddings().weight.shape[1]
    element = next(loaded.model.parameters()).element_size()
    needed = 2 * config.data.nsamples * seqlen * hidden * element  # one block's inputs and its outputs
    store = next(loaded.model.parameters()).device
    if loaded.offload_device is None and store.type == "cuda":
        available = torch.cuda.mem_get_info(store)[0]
    else:
        available = host_memory_available()
    if needed > 0.8 * available:
        raise UserError(f"{config.data.nsamples} windows of {seqlen} tokens need about {needed / 2**30:.1f} GiB for "
                        f"the block activations, more than the {available / 2**30:.1f} GiB free where they are kept; "
                        f"lower --nsamples or --seqlen", "nsamples")


def describe_spec(spec: AllocationSpec) -> str:
    """The rule and its numeric settings, e.g. 'atp, beta=0.01' or 'owl, owl_m=5, owl_lambda=0.08'."""
    numbers = [f"{k}={v:g}" for k, v in spec.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if spec.absorption > 0:
        numbers.append(f"absorption={spec.absorption:g}")
    return ", ".join([spec.rule, *numbers])


def rule_record(spec: AllocationSpec, num_blocks: int) -> dict:
    """What the rule adds to the results' allocation record (e.g. ATP's largest legal beta)."""
    from .allocation.rule import RULES
    rule = RULES.get(spec.rule)
    return rule.record(spec.sparsity, num_blocks, spec.params) if rule.record is not None else {}


def prune_and_report(session: PruningSession, config: RunConfig, sparsities: list[float]) -> tuple[list[dict], float]:
    records = session.prune(sparsities, config.prune.pruner, config.prune.params, config.prune.n_m)
    zeros = sum(r["zeros"] for r in records)
    total = sum(r["weights"] for r in records)
    _log("sparsity sanity check (every prunable matrix of each decoder block):")
    for r in records:
        _log(f"  block {r['block']:3d}: target {r['target']:.4f} achieved {r['achieved']:.4f}")
    _log(f"  overall sparsity {zeros / total:.4f} over {total:,} prunable weights "
         f"(target mean {sum(sparsities) / len(sparsities):.4f})")
    fallback = [f"block {r['block']}: {name}" for r in records for name in r.get("magnitude_fallback", [])]
    if fallback:
        _log(f"  {len(fallback)} matrices received no calibration input (experts the router never picked, or weights "
             f"used without a call of their module) and were pruned by magnitude: {', '.join(fallback[:4])}"
             f"{' ...' if len(fallback) > 4 else ''}")
    return records, zeros / total


def evaluate_pruned(session: PruningSession, config: RunConfig) -> tuple[float, int]:
    ppl, windows = session.perplexity(config.data.max_eval_windows)
    if not math.isfinite(ppl):
        raise UserError(f"perplexity is {ppl} after pruning: the pruned model is numerically broken "
                        f"(try a lower --sparsity_ratio or --dtype bfloat16/float32); no results written")
    if config.data.eval_data != "wikitext2":  # the line below keeps its name for scripts that read it
        _log(f"perplexity measured on {config.data.eval_data} ({windows} windows of {session.data.seqlen} tokens)")
    _log(f"wikitext perplexity {ppl}")
    return ppl, windows


def write_outputs(config: RunConfig, loaded: LoadedModel, results: dict, timings: Timings) -> None:
    """The pruned model and the results JSON, each written whole or not at all; a write the file system refuses
    (disk full, quota, a name it does not take) is one error line."""
    from .outputs import save_model_atomic, write_error
    if config.outputs.save_model:
        try:
            if config.outputs.save_format == "compressed":
                from .sparse.checkpoint import save_compressed
                saved = timings("save_model", save_compressed, loaded.model, loaded.tokenizer,
                                config.outputs.save_model)
            else:
                saved = {"directory": timings("save_model", save_model_atomic, loaded.model, loaded.tokenizer,
                                              config.outputs.save_model)}
        except OSError as exc:
            raise write_error(config.outputs.save_model, exc, "save_model") from None
        results["saved_model"] = {**saved, "format": config.outputs.save_format}
        if saved.get("sparse_experts"):
            _log(f"compressed checkpoint: the fused expert tensors of {saved['sparse_experts']} experts module(s) "
                 "packed one matrix per expert")
        if saved.get("dense_fused_experts"):
            _log(f"compressed checkpoint: {saved['dense_fused_experts']} fused expert tensor(s) stored dense "
                 f"with their zeros (their experts module does not use transformers' experts interface, or they "
                 f"are too dense; the manifest lists them)")
        how = (" (compressed: lib.sparse.register(), then from_pretrained; its README.md says more)"
               if config.outputs.save_format == "compressed" else "")
        _log(f"pruned model saved to {saved['directory']}{how}")
    if config.outputs.results:
        write_results(config, results)
        _log(f"results written to {config.outputs.results}")


def write_results(config: RunConfig, results: dict) -> None:
    from .outputs import write_error, write_json_atomic
    try:
        write_json_atomic(config.outputs.results, results)
    except OSError as exc:
        raise write_error(config.outputs.results, exc, "results") from None


def run_zero_shot(session: PruningSession, config: RunConfig, results: dict, timings: Timings) -> None:
    from .eval.zeroshot import evaluate_zero_shot, format_zero_shot_table
    zs = config.zero_shot
    source = zero_shot_tasks(config)
    _log(source.describe())
    with session.whole_model_forwards():
        outcome = timings("zero_shot", evaluate_zero_shot, session.model, session.loaded.tokenizer, source.tasks,
                          source.tasks_dir, zs.batch_size, zs.limit, config.data.seed)
    outcome["data_source"] = source.record
    _log(format_zero_shot_table(outcome))
    results["zero_shot"] = outcome
    if config.outputs.results:
        write_results(config, results)


def run(config: RunConfig) -> dict:
    """Claim the outputs, then run the steps (a second run given the same outputs is refused up front)."""
    from .outputs import claimed_outputs
    search = config.search
    with claimed_outputs({"results": config.outputs.results, "save_model": config.outputs.save_model,
                          "search_log": search.log if search.enabled else None,
                          "search_plot": search.plot if search.enabled else None}):
        return run_steps(config)


def load_session(config: RunConfig) -> PruningSession:
    """The model and data of `config` as a quiet session (what each search worker loads)."""
    device, dtype = prepare(config)
    loaded = load_model(config, device, dtype)
    data, _ = load_data(config, loaded)
    return PruningSession(loaded, data, progress=False)


def run_steps(config: RunConfig) -> dict:
    from .outputs import versions
    started = time.perf_counter()
    timings = Timings()
    device, dtype = prepare(config)
    texts = timings("read_data", read_texts, config)
    loaded = timings("load_model", load_model, config, device, dtype)
    data, data_records = timings("load_data", load_data, config, loaded, texts)
    session = PruningSession(loaded, data, progress=not config.outputs.quiet)
    num_blocks = len(loaded.blocks)
    _log(f"model {loaded.name}: {num_blocks} decoder blocks, {dtype}, device {device}"
         f"{' (offloaded blocks)' if loaded.offload_device is not None else ''}")

    dense_ppl = None
    if config.data.eval_dense:
        dense_ppl, _ = timings("eval_dense", session.perplexity, config.data.max_eval_windows)
        _log(f"dense perplexity {dense_ppl}")

    spec: AllocationSpec = config.allocation
    search_record = None
    if config.search.enabled:
        from .search.tune import run_search, with_value
        search_record, best = timings("search", run_search, session, config, load=load_session)
        spec = with_value(spec, config.search.param, best)

    allocation = timings("allocation", session.allocation, spec)
    sparsities = allocation.sparsities
    _log(f"layer-wise sparsity plan ({describe_spec(spec)}):")
    _log(format_plan(sparsities))
    _log(loaded.inventory.text())

    records, overall = timings("prune", prune_and_report, session, config, sparsities)
    ppl, windows = timings("eval_ppl", evaluate_pruned, session, config)
    timings.seconds["total"] = time.perf_counter() - started
    results = {
        "args": {k: v for k, v in config.record.items() if not k.startswith("_")},
        "model": {"name": loaded.name, "num_blocks": num_blocks, "dtype": str(dtype), "device": str(device),
                  "offload": loaded.offload_device is not None,
                  "parameters": sum(p.numel() for p in loaded.model.parameters())},
        "allocation": {**allocation.info, "sparsities": sparsities, "mean": sum(sparsities) / num_blocks,
                       **rule_record(spec, num_blocks)},
        "structure": loaded.inventory.as_dict(),
        "blocks": records,
        "overall_sparsity": overall,
        "perplexity": ppl,
        "dense_perplexity": dense_ppl,
        "eval": {**data_records["eval"], "windows": windows},
        "calibration": data_records["calibration"],
        "search": search_record,
        "timings_s": timings.seconds,
        "versions": versions(),
    }
    write_outputs(config, loaded, results, timings)
    if config.zero_shot.enabled:
        run_zero_shot(session, config, results, timings)
    return results
