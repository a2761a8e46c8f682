"""Compressed checkpoints of pruned models: save_compressed / load_compressed.

Why not compressed-tensors. compressed-tensors 0.20 (checked by downloading the wheel) keeps only the
`sparse-bitmask` *config* class, marked legacy; its sparse compressors are no longer shipped, and transformers'
CompressedTensors quantizer either dequantizes every weight at load (`dequantize=True`) or leaves
compressed-tensors to decompress on the first forward pass: either way the model ends up dense in memory. So
this module uses its own format, in a directory that is otherwise a normal transformers one:

* ``config.json`` (+ ``generation_config.json``) and the tokenizer files, written by transformers;
* ``model.safetensors``: for each converted Linear ``<name>.mask`` (int64 bit words), ``<name>.values`` (packed
  nonzeros, model dtype), ``<name>.row_offsets`` (int64) and ``<name>.bias`` when present (see format.py); every
  other tensor of the state dict under its usual name, dense (embeddings, norms, lm_head, Linears kept dense,
  and fused 3-D mixture-of-experts tensors, whose zeros are kept but not packed);
* ``sparse_manifest.json``: ``{"format": "atp-bitmask-v1", "sparse_modules": {name: {in_features,
  out_features, bias, sparsity}}, "tied": {alias: canonical}, "dtype": ...,
  "dense_fused_experts": [name, ...]}``.

`load_compressed` builds the model skeleton with empty (meta) weights, swaps in SparseLinear modules built
straight from the packed tensors and assigns the dense tensors: no converted Linear's dense weight is ever
materialised. A plain `from_pretrained` cannot read this directory (the Linears' `weight` is missing); use
`load_compressed`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from ..outputs import make_parents, publish_directory, remove_empty
from . import format as fmt
from .convert import DEFAULT_MIN_SPARSITY, block_linears, fused_expert_tensors, weight_sparsity
from .linear import SparseLinear

FORMAT = "atp-bitmask-v1"
MANIFEST = "sparse_manifest.json"
WEIGHTS = "model.safetensors"
_PACKED = ("mask", "values", "row_offsets")


def _packed_modules(model: nn.Module, min_sparsity: float) -> dict[str, dict]:
    """name -> {'tensors': {mask, values, row_offsets[, bias]}, 'meta': {...}} without modifying the model."""
    out = {}
    for name, module in block_linears(model):
        if isinstance(module, SparseLinear):
            tensors = {k: getattr(module, k) for k in _PACKED}
            sparsity = 1.0 - module.density
        else:
            if module.weight.dtype not in fmt.SUPPORTED_DTYPES or module.weight.device.type == "meta":
                continue
            sparsity = weight_sparsity(module.weight)
            if sparsity < min_sparsity:
                continue
            tensors = fmt.pack(module.weight.data)
        if module.bias is not None:
            tensors["bias"] = module.bias.data
        out[name] = {"tensors": tensors, "meta": {"in_features": module.in_features,
                                                  "out_features": module.out_features,
                                                  "bias": module.bias is not None, "sparsity": sparsity}}
    return out


def _check_target(directory: str) -> None:
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise FileExistsError(f"{directory}: already exists and is not an empty directory")


def save_compressed(model: nn.Module, tokenizer, directory: str,
                    min_sparsity: float = DEFAULT_MIN_SPARSITY) -> dict:
    """Write `model` (pruned, dense or already sparsified) and `tokenizer` to `directory` in the compressed format.

    Decoder-block Linears with at least `min_sparsity` zeros are stored bitmask-packed, everything else dense.
    Atomic: written into a temporary sibling directory that is renamed into place only when complete; on any
    exception nothing is left behind. `directory` must not exist or be empty. The model is not modified.
    Returns {'directory', 'bytes', 'sparse_modules', 'dense_tensors'}.
    """
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    _check_target(directory)
    created = make_parents(os.path.dirname(directory))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=os.path.dirname(directory))
    try:
        packed = _packed_modules(model, min_sparsity)
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in packed.items():
            for key, t in entry["tensors"].items():
                tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
        skip = {f"{name}.{k}" for name in packed for k in ("weight", "bias", *_PACKED)}
        tied: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for key, t in model.state_dict().items():
            if key in skip:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and ident in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once
                tied[key] = seen[ident]
                continue
            seen[ident] = key
            tensors[key] = t.detach().cpu().contiguous()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        fused = fused_expert_tensors(model)
        manifest = {"format": FORMAT, "dtype": str(dtype).replace("torch.", ""),
                    "sparse_modules": {n: e["meta"] for n, e in packed.items()}, "tied": tied,
                    "dense_fused_experts": fused}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        directory = publish_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"directory": directory, "bytes": size, "sparse_modules": len(packed),
            "dense_tensors": len(tensors) - sum(len(e["tensors"]) for e in packed.values()),
            "dense_fused_experts": len(fused)}


def is_compressed_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def load_compressed(directory: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a save_compressed directory, the converted Linears as SparseLinear, in eval mode.

    `dtype` converts the stored floating-point tensors (packed values included); None keeps the saved dtype.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown sparse format {manifest.get('format')!r}")
    saved_dtype = getattr(torch, manifest["dtype"])
    dtype = dtype or saved_dtype
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):  # parameters on meta; computed buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(os.path.join(directory, WEIGHTS))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    for name, meta in manifest["sparse_modules"].items():
        bias = state.pop(f"{name}.bias", None)
        module = SparseLinear(meta["in_features"], meta["out_features"], state.pop(f"{name}.mask"),
                              cast(state.pop(f"{name}.values")), state.pop(f"{name}.row_offsets"),
                              None if bias is None else cast(bias))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    for alias, canonical in manifest.get("tied", {}).items():
        state[alias] = state[canonical]
    missing, unexpected = model.load_state_dict({k: cast(v) for k, v in state.items()}, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{directory}: tensors not in the model: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{directory}: tensors missing from the checkpoint: {still_meta[:5]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer
