"""Compressed checkpoints of pruned models: save_compressed / load_compressed.

Why not compressed-tensors. compressed-tensors 0.20 (checked by downloading the wheel) keeps only the
`sparse-bitmask` *config* class, marked legacy; its sparse compressors are no longer shipped, and transformers'
CompressedTensors quantizer either dequantizes every weight at load (`dequantize=True`) or leaves
compressed-tensors to decompress on the first forward pass: either way the model ends up dense in memory. So
this module uses its own format (version "atp-bitmask-v2"), in a directory that is otherwise a normal
transformers one:

* ``config.json`` (+ ``generation_config.json``) and the tokenizer files, written by transformers; config.json
  has ``"quantization_config": {"quant_method": "atp_sparse", "format": "atp-bitmask-v2", "sparse_modules":
  [name, ...], "sparse_experts": [name, ...], "dense_fused_experts": [name, ...]}`` and the dtype of the stored
  tensors;
* ``model.safetensors``: for each converted Linear ``<name>.mask`` (int64 bit words), ``<name>.values`` (packed
  nonzeros, model dtype), ``<name>.row_offsets`` (int64), ``<name>.bias`` when present (see format.py) and
  ``<name>.weight``, an empty uint8 marker that plain transformers refuses to load (hf_quantizer.py says why);
  for each packed experts module (experts.py) and projection, ``<experts>.<projection>.<expert>.{mask, values,
  row_offsets}`` per expert (its matrix as [out, in]) and ``<experts>.<projection>``, the marker under the fused
  parameter's name; every other tensor of the state dict under its usual name, dense (embeddings, norms,
  lm_head, Linears kept dense, expert biases, and fused expert tensors not packed, whose zeros are kept);
* ``sparse_manifest.json`` (for people and tools; loading does not need it): ``{"format": ..., "sparse_modules":
  {name: {in_features, out_features, bias, sparsity}}, "tied": {alias: canonical}, "dtype": ...,
  "sparse_experts": {name: {projection: {experts, in_features, out_features, sparsity}}},
  "dense_fused_experts": [name, ...]}``;
* ``README.md``, a model card for whoever receives the directory: what is packed, why plain transformers refuses
  it, and the lines that load it (`model_card`).

Loading: `lib.sparse.register()` teaches transformers the "atp_sparse" quantization method (hf_quantizer.py);
after it, ``AutoModelForCausalLM.from_pretrained(directory)`` returns the model with SparseLinear modules and
never materialises a converted Linear's dense weight, and the model's save_pretrained writes this format back.
`load_compressed` is that call plus the tokenizer. Directories of the first version ("atp-bitmask-v1": no
quantization_config, no markers) are still read by `load_compressed`, with the loader of that version; re-save
them (``save_compressed(*load_compressed(old), new)``) to make them safe for plain transformers.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from torch import nn

from ..errors import UserError
from ..outputs import make_parents, publish_directory, remove_empty
from . import format as fmt
from . import experts
from .convert import (DEFAULT_MIN_SPARSITY, block_linears, experts_problem, fused_expert_tensors,
                      fused_experts_modules, weight_sparsity)
from . import hf_quantizer as hfq
from .linear import SparseLinear, replaces_exactly
from .markers import FORMAT, FORMAT_V1, MANIFEST, QUANT_METHOD, quant_method
from .markers import is_compressed_dir  # noqa: F401 - part of this module's API

WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
_PACKED = ("mask", "values", "row_offsets")


def _packed_modules(model: nn.Module, min_sparsity: float) -> dict[str, dict]:
    """name -> {'tensors': {mask, values, row_offsets[, bias]}, 'meta': {...}} without modifying the model
    (the SparseLinears of packed experts are `_packed_experts`' business)."""
    out = {}
    inside_experts = tuple(f"{name}." for name in experts.packed_experts_modules(model))
    for name, module in block_linears(model):
        if name.startswith(inside_experts):
            continue
        if isinstance(module, SparseLinear):
            tensors = {k: getattr(module, k) for k in _PACKED}
            sparsity = 1.0 - module.density
        else:
            if not replaces_exactly(module):
                continue
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


def _packed_experts(model: nn.Module, min_sparsity: float) -> dict[str, dict]:
    """experts module name -> {'tensors': {'<projection>.<expert>.<mask|values|row_offsets>': ...}, 'meta':
    {projection: {experts, in_features, out_features, sparsity}}} for every experts module packed in memory or
    sparse enough to be (experts.py), without modifying the model."""
    out = {}
    candidates = [(name, model.get_submodule(name)) for name in experts.packed_experts_modules(model)]
    candidates += [(name, module) for name, module in fused_experts_modules(model)
                   if experts_problem(module, min_sparsity)[0] is None]
    for name, module in candidates:
        tensors, meta = {}, {}
        for proj in experts.projections(module):
            if experts.is_packed(module):
                linears = getattr(module, proj)
                packed = [{k: getattr(linear, k) for k in _PACKED} for linear in linears]
                out_features, in_features = linears[0].out_features, linears[0].in_features
            else:
                count = getattr(module, proj).shape[0]
                packed = [fmt.pack(experts.expert_matrix(module, proj, e).detach()) for e in range(count)]
                out_features, in_features = experts.expert_matrix(module, proj, 0).shape
            for e, entry in enumerate(packed):
                tensors.update({f"{proj}.{e}.{k}": t for k, t in entry.items()})
            nonzero = sum(int(entry["row_offsets"][-1]) for entry in packed)
            meta[proj] = {"experts": len(packed), "in_features": in_features, "out_features": out_features,
                          "sparsity": 1.0 - nonzero / max(1, len(packed) * in_features * out_features)}
        out[name] = {"tensors": tensors, "meta": meta}
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
    Returns {'directory', 'bytes', 'sparse_modules', 'dense_tensors', 'sparse_experts', 'dense_fused_experts'}
    (the last two: how many experts modules are packed, how many fused expert tensors are stored dense).
    """
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    _check_target(directory)
    created = make_parents(os.path.dirname(directory))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=os.path.dirname(directory))
    try:
        packed = _packed_modules(model, min_sparsity)
        packed_experts = _packed_experts(model, min_sparsity)
        tensors: dict[str, torch.Tensor] = {}
        for name, entry in packed.items():
            for key, t in entry["tensors"].items():
                tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
            tensors[f"{name}.weight"] = hfq.marker()
        for name, entry in packed_experts.items():
            for key, t in entry["tensors"].items():
                tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
            for proj in entry["meta"]:
                tensors[f"{name}.{proj}"] = hfq.marker()  # the fused parameter's name: plain transformers refuses
        skip = {f"{name}.{k}" for name in packed for k in ("weight", "bias", *_PACKED)}
        fused_packed = [f"{name}.{proj}" for name, entry in packed_experts.items() for proj in entry["meta"]]
        skip |= set(fused_packed)
        inside_fused = tuple(f"{name}." for name in fused_packed)  # the SparseLinears of experts packed in memory
        tied: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for key, t in model.state_dict().items():
            if key in skip or key.startswith(inside_fused):
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and ident in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once
                tied[key] = seen[ident]
                continue
            seen[ident] = key
            tensors[key] = t.detach().cpu().contiguous()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        dtype_name = str(dtype).replace("torch.", "")
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "atp_sparse_format": FORMAT})
        fused = [n for n in fused_expert_tensors(model) if n.rpartition(".")[0] not in packed_experts]
        manifest = {"format": FORMAT, "dtype": dtype_name,
                    "sparse_modules": {n: e["meta"] for n, e in packed.items()}, "tied": tied,
                    "sparse_experts": {n: e["meta"] for n, e in packed_experts.items()},
                    "dense_fused_experts": fused}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(tmp, MODEL_CARD), "w") as f:
            f.write(model_card(type(model).__name__, manifest, _loading_class(model)))
        model.config.save_pretrained(tmp)
        quantization = hfq.AtpSparseConfig(sparse_modules=list(packed), dense_fused_experts=fused,
                                           sparse_experts=list(packed_experts)).to_dict()
        _edit_config(tmp, lambda c: c.update(quantization_config=quantization, dtype=dtype_name))
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
            "dense_tensors": len(tensors) - sum(len(e["tensors"]) + 1 for e in packed.values())
            - sum(len(e["tensors"]) + len(e["meta"]) for e in packed_experts.values()),  # markers not counted
            "sparse_experts": len(packed_experts), "dense_fused_experts": len(fused)}


def _loading_class(model: nn.Module) -> str:
    """The transformers class a reader loads the directory with: the auto class main.py uses for this config
    (AutoModelForImageTextToText for most vision-language models), else the model's own class."""
    from ..models.loading import auto_model_class
    try:
        return auto_model_class(model.config).__name__
    except UserError:
        return type(model).__name__


def model_card(model_class: str, manifest: dict, loading_class: str = "AutoModelForCausalLM") -> str:
    """README.md of a compressed directory: what it holds and how to load it (from the manifest alone);
    `loading_class` is the transformers class its code loads it with."""
    matrices = [(1, m) for m in manifest["sparse_modules"].values()]
    fused = [(p["experts"], p) for e in manifest.get("sparse_experts", {}).values() for p in e.values()]
    weights = sum(n * m["in_features"] * m["out_features"] for n, m in matrices + fused)
    zeros = sum(n * m["sparsity"] * m["in_features"] * m["out_features"] for n, m in matrices + fused)
    what = f"{len(matrices)} decoder-block Linears" + (
        f" and {len(fused)} fused expert tensors ({sum(n for n, _ in fused)} expert matrices)" if fused else "")
    packed = (f"{what} are stored bitmask-packed ({zeros / weights:.1%} of their {weights:,} weights are zero; per "
              f"module in `{MANIFEST}`); every other tensor is stored dense." if weights else
              "No Linear was sparse enough to be stored packed: every tensor is stored dense.")
    refusal = ("Plain transformers refuses this directory on purpose (a size-mismatch `RuntimeError`): it does not "
               "know the packed\nformat, and reading it as dense weights would leave the packed ones randomly "
               "initialised. Load it with the ATP\nlayer-wise sparsity project (the repository that wrote it) "
               "importable:" if weights else
               "Plain transformers loads it as it is (it warns about the unknown `quantization_config`); with the "
               "ATP layer-wise\nsparsity project (the repository that wrote it) importable:")
    dense_fused = manifest.get("dense_fused_experts") or []
    dense_experts = (f" {len(dense_fused)} fused mixture-of-experts tensors are stored dense, zeros included "
                     f"(`dense_fused_experts` in `{MANIFEST}`)." if dense_fused else "")
    return f"""---
library_name: transformers
tags:
- sparse
- {QUANT_METHOD}
---
# A pruned {model_class}, compressed ({manifest["format"]}, {manifest["dtype"]})

{packed}{dense_experts}

{refusal}

```python
import lib.sparse
from transformers import {loading_class}, AutoTokenizer

lib.sparse.register()  # teaches transformers the "{QUANT_METHOD}" format
model = {loading_class}.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

The packed Linears become `SparseLinear` modules (CPU kernels; `dtype=` float32, bfloat16 or float16) and their
dense weights are never built; `model.save_pretrained` writes this format back, `model.dequantize()` turns them
into dense `nn.Linear` modules. `lib.sparse.checkpoint.load_compressed(directory)` returns model and tokenizer.
"""


def _edit_config(directory: str, edit) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_compressed(directory: str, dtype: torch.dtype | None = None, device_map=None):
    """(model, tokenizer) from a compressed directory, the converted Linears as SparseLinear, in eval mode.

    `dtype` converts the stored floating-point tensors (packed values included); None keeps the saved dtype.
    For the current format this is ``from_pretrained`` after `lib.sparse.register()`; first-version
    directories go through that version's loader.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ..models.loading import auto_model_class
    from . import register

    if quant_method(directory) is None and os.path.isfile(os.path.join(directory, MANIFEST)):
        model = _load_v1(directory, dtype)
    else:
        register()
        config = AutoConfig.from_pretrained(directory)
        model = auto_model_class(config).from_pretrained(directory, config=config, dtype=dtype or "auto",
                                                         device_map=device_map)
    model.eval()
    return model, AutoTokenizer.from_pretrained(directory)


def _load_v1(directory: str, dtype: torch.dtype | None):
    """The loader of "atp-bitmask-v1" directories (weights without markers, no quantization_config)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_V1:
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
    return model
