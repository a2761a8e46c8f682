"""Loading compressed checkpoints with `from_pretrained`, through transformers' quantizer extension point.

`register()` adds the quantization method "atp_sparse" to transformers (`register_quantization_config` and
`register_quantizer` from transformers.quantizers.auto). A compressed checkpoint's config.json carries
``"quantization_config": {"quant_method": "atp_sparse", "format": "atp-bitmask-v2", "sparse_modules": [...],
"sparse_experts": [...], "dense_fused_experts": [...]}``, so `from_pretrained` hands the load to
`AtpSparseHfQuantizer`:

1. `_process_model_before_weight_loading` (the model is still on the meta device): each listed nn.Linear is
   replaced by a `PackedLinearSlot` holding meta tensors named like SparseLinear's state (``mask``, ``values``,
   ``row_offsets``, ``bias``), ``values`` sized from the checkpoint header. The Linear's dense weight never leaves
   the meta device. Each fused projection of a listed experts module likewise becomes an nn.ModuleList of
   slots, one per expert.
2. transformers loads the checkpoint tensors into those slots by name, as for any model (the packed ``values``
   take the load dtype; the int64 mask and offsets are not cast).
3. `_process_model_after_weight_loading`: every slot becomes a SparseLinear built by its own constructor from the
   loaded tensors (which checks them); a packed tensor missing from the checkpoint is an error. With packed
   experts the model is switched to the experts forward of experts.py (transformers' experts interface).

Why a slot and not a SparseLinear directly: SparseLinear's constructor validates real tensors (it reads
``row_offsets[-1]``), which meta tensors cannot give, and building one around its constructor would copy its
internals into this file.

Why plain transformers cannot load these directories silently wrong. transformers 5.24 does not refuse an
unknown quant_method: it logs "Unknown quantization type, got atp_sparse ... Hence, we will skip the
quantization" and loads the model as a dense one. So each packed Linear also has a ``<name>.weight`` entry of
shape (0,) (`marker`): without this quantizer that is a size mismatch with the dense (out, in) weight, which
`from_pretrained` refuses (RuntimeError) unless called with ignore_mismatched_sizes=True, and even then it prints
the mismatch. With this quantizer the entry is ignored. save_pretrained of a model loaded this way writes the
markers again (`get_state_dict_and_metadata`), so its output is as safe as save_compressed's.

Only the CPU is supported (SparseLinear's kernels are CPU kernels): a device_map naming another device, or
"auto" on a machine with an accelerator, is refused.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import experts
from . import format as fmt
from .linear import SparseLinear, own_forward_reason, replaces_exactly
from .markers import FORMAT, QUANT_METHOD

PACKED = ("mask", "values", "row_offsets")


def marker() -> torch.Tensor:
    """The ``<name>.weight`` entry stored for each packed Linear: a shape plain transformers refuses to load."""
    return torch.zeros(0, dtype=torch.uint8)


class AtpSparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed checkpoint (see the module docstring)."""

    def __init__(self, format: str = FORMAT, sparse_modules=(), dense_fused_experts=(), sparse_experts=(),
                 quant_method: str = QUANT_METHOD, **unknown):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"AtpSparseConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format != FORMAT:
            raise ValueError(f"unknown {QUANT_METHOD} checkpoint format {format!r}; this code reads {FORMAT!r}")
        if unknown:  # a later version's field: loading without it could leave its tensors unused, so refuse
            raise ValueError(f"this {QUANT_METHOD} checkpoint's quantization_config has {', '.join(sorted(unknown))}, "
                             "which this version of the project does not read (written by a newer one?): update it")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.sparse_modules = list(sparse_modules)
        self.dense_fused_experts = list(dense_fused_experts)
        self.sparse_experts = list(sparse_experts)


class PackedLinearSlot(nn.Module):
    """Placeholder for one packed Linear while transformers loads the checkpoint: meta tensors with the names,
    shapes and dtypes of the SparseLinear state it receives. Replaced by a SparseLinear once loaded."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, stored_values: int,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        meta = torch.device("meta")
        self.register_buffer("mask", torch.empty(out_features, fmt.words_for(in_features), dtype=torch.int64,
                                                 device=meta))
        self.register_buffer("values", torch.empty(stored_values, dtype=dtype, device=meta))
        self.register_buffer("row_offsets", torch.empty(out_features + 1, dtype=torch.int64, device=meta))
        self.bias = None if bias_dtype is None else nn.Parameter(
            torch.empty(out_features, dtype=bias_dtype, device=meta), requires_grad=False)

    @classmethod
    def for_linear(cls, linear: nn.Linear, stored_values: int) -> "PackedLinearSlot":
        return cls(linear.in_features, linear.out_features, linear.weight.dtype, stored_values,
                   None if linear.bias is None else linear.bias.dtype)

    def forward(self, x):
        raise RuntimeError("PackedLinearSlot is a loading placeholder; the load did not finish")


def _resolve(model: nn.Module, name: str) -> str:
    """`name` (as saved) as a module path of `model`, which may lack or add the base-model prefix (AutoModel vs
    AutoModelForCausalLM)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise ValueError(f"{QUANT_METHOD} checkpoint: module {name!r} is not in {type(model).__name__}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _stored_value_counts(checkpoint_files: list[str], names: list[str]) -> dict[str, int]:
    """name -> number of stored packed values, read from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open
    wanted = {f"{n}.values": n for n in names}
    counts = {}
    for path in checkpoint_files:
        if not path.endswith(".safetensors"):
            raise ValueError(f"{QUANT_METHOD} checkpoints are safetensors files, got {path}")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    shape = f.get_slice(key).get_shape()
                    if len(shape) != 1:
                        raise ValueError(f"{path}: {key} must be 1-D, has shape {shape}")
                    counts[wanted[key]] = shape[0]
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"{QUANT_METHOD} checkpoint: no packed values for {len(missing)} module(s) its config "
                         f"lists, e.g. {missing[:3]}")
    return counts


def _device_names(device_map) -> list[str]:
    if device_map is None:
        return []
    if isinstance(device_map, dict):
        return [str(v) for v in device_map.values()]
    return [str(device_map)]


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


class AtpSparseHfQuantizer(HfQuantizer):
    """Loads compressed checkpoints (pre-packed only: `requires_calibration`) into SparseLinear modules."""

    requires_calibration = True
    quantization_config: AtpSparseConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        for device in _device_names(device_map):
            if device == "cpu":
                continue
            if device in ("auto", "balanced", "balanced_low_0", "sequential") and not _accelerator_available():
                continue
            raise ValueError(f"{QUANT_METHOD} checkpoints run on the CPU only (SparseLinear's kernels are CPU "
                             f"kernels); device_map={device_map!r} would place modules on {device!r}. Use "
                             f"device_map='cpu' or no device_map; for dense weights on {device!r}, load on the CPU, "
                             f"then model.dequantize().to({device!r})")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in fmt.SUPPORTED_DTYPES:
            raise ValueError(f"{QUANT_METHOD} checkpoints load in one of {fmt.SUPPORTED_DTYPES}, not {dtype}")
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        names = self.quantization_config.sparse_modules
        expert_names = getattr(self.quantization_config, "sparse_experts", [])
        self._slots, self._packed_experts = [], bool(expert_names)
        if not names and not expert_names:
            return model
        if not checkpoint_files:
            raise ValueError(f"{QUANT_METHOD}: loading needs the checkpoint's safetensors files")
        counts = _stored_value_counts(checkpoint_files, names)
        slots, ignore = [], set(model._keys_to_ignore_on_load_unexpected or ())
        for saved in names:
            name = _resolve(model, saved)
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{QUANT_METHOD} checkpoint: {name} is a {type(linear).__name__}, not an nn.Linear")
            if not replaces_exactly(linear):  # packed by an older version: loading it would change the model
                raise ValueError(f"{QUANT_METHOD} checkpoint: {name} is packed, but {own_forward_reason(linear)}. "
                                 "An older version of this tool wrote this checkpoint; save the pruned model again "
                                 "with this one (it keeps such modules dense)")
            _set_module(model, name, PackedLinearSlot.for_linear(linear, counts[saved]))
            slots.append(name)
            # the marker (see marker()), under its checkpoint key and, once transformers has added or removed the
            # base-model prefix, under the model's
            ignore |= {rf"^{re.escape(n)}\.weight$" for n in (saved, name)}
        modules = {saved: model.get_submodule(_resolve(model, saved)) for saved in expert_names}
        for saved, module in modules.items():
            if not experts.has_interface(module):
                raise ValueError(f"{QUANT_METHOD} checkpoint: {saved} is a {type(module).__name__}, not an experts "
                                 "module of transformers' experts interface")
        counts = _stored_value_counts(checkpoint_files, [
            f"{saved}.{proj}.{e}" for saved, module in modules.items() for proj in experts.projections(module)
            for e in range(getattr(module, proj).shape[0])])  # one pass over the headers
        for saved, module in modules.items():
            name = _resolve(model, saved)
            for proj in experts.projections(module):
                fused = getattr(module, proj)
                rows, cols = fused.shape[1:]
                out_features, in_features = (cols, rows) if module.is_transposed else (rows, cols)
                keys = [f"{saved}.{proj}.{e}" for e in range(fused.shape[0])]
                delattr(module, proj)
                setattr(module, proj, nn.ModuleList(PackedLinearSlot(in_features, out_features, fused.dtype,
                                                                     counts[key]) for key in keys))
                slots += [f"{name}.{proj}.{e}" for e in range(len(keys))]
                ignore |= {rf"^{re.escape(n)}\.{proj}$" for n in (saved, name)}  # the marker
        model._keys_to_ignore_on_load_unexpected = ignore
        self._slots = slots
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name in getattr(self, "_slots", []):
            slot = model.get_submodule(name)
            tensors = {key: getattr(slot, key) for key in (*PACKED, "bias") if getattr(slot, key) is not None}
            # transformers flags every tensor it loaded from the checkpoint; a missing one would be left
            # uninitialised memory
            missing = [k for k, t in tensors.items() if t.is_meta or not getattr(t, "_is_hf_initialized", False)]
            if missing:
                raise ValueError(f"{QUANT_METHOD} checkpoint: {name}.{{{', '.join(missing)}}} missing")
            _set_module(model, name, SparseLinear(slot.in_features, slot.out_features, tensors["mask"],
                                                  tensors["values"], tensors["row_offsets"], tensors.get("bias")))
        self._slots = []
        if getattr(self, "_packed_experts", False):
            experts.use_packed_experts(model)
            # save_pretrained would otherwise rewrite fused expert names into the hub layout the model's
            # conversion mapping describes, which packed experts do not have; this format keeps the model's names
            model._weight_conversions = []
        return model

    def update_weight_conversions(self, weight_conversions, *args, **kwargs):
        """transformers' own converters, less those that would rewrite packed experts: they describe hub layouts
        of the fused tensors (Qwen3-VL-MoE's transposes them), while this format stores the model's own names
        (`<experts>.<projection>.<expert>.mask`, ...), which a converter's pattern also matches. (transformers
        passes the model too from 5.21 on, not before: whatever it passes goes on to its own method.)"""
        from transformers.core_model_loading import WeightConverter

        updated = super().update_weight_conversions(weight_conversions, *args, **kwargs)
        keys = [f"{name}.{proj}{suffix}" for name in getattr(self.quantization_config, "sparse_experts", [])
                for proj in ("gate_up_proj", "up_proj", "down_proj") for suffix in ("", ".0.mask")]

        def touches_packed(converter) -> bool:
            if not isinstance(converter, WeightConverter):
                return False
            for pattern in converter._original_source_patterns:
                try:
                    if any(re.search(pattern, key) for key in keys):
                        return True
                except re.error:
                    continue
            return False

        return [c for c in updated if not touches_packed(c)]

    def get_state_dict_and_metadata(self, model):
        """save_pretrained's state dict: the model's (SparseLinear state = packed tensors) plus a marker per
        SparseLinear; the config's module list is updated to the model's SparseLinear modules."""
        state = model.state_dict()
        expert_modules = experts.packed_experts_modules(model)
        inside = tuple(f"{name}." for name in expert_modules)
        names = [name for name, module in model.named_modules()
                 if isinstance(module, SparseLinear) and not name.startswith(inside)]
        for name in names:
            state[f"{name}.weight"] = marker()
        for name in expert_modules:
            for proj in experts.projections(model.get_submodule(name)):
                state[f"{name}.{proj}"] = marker()
        self.quantization_config.sparse_modules = names
        self.quantization_config.sparse_experts = expert_modules
        return state, {"atp_sparse_format": FORMAT}

    def _dequantize(self, model, dtype=None):
        """transformers' `model.dequantize()`: every SparseLinear back to a dense nn.Linear (this does build the
        dense weights)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        expert_modules = experts.packed_experts_modules(model)
        for name in expert_modules:
            experts.unpack(model.get_submodule(name), dtype)
        if expert_modules:
            model.set_experts_implementation(None)  # transformers' default for the model again
        for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]:
            weight = module.dense_weight().to(dtype or module.dtype)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta", dtype=weight.dtype)
            linear.weight = nn.Parameter(weight)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype))
            _set_module(model, name, linear)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make "atp_sparse" known to transformers (idempotent)."""
    for mapping, cls, decorator in ((AUTO_QUANTIZATION_CONFIG_MAPPING, AtpSparseConfig, register_quantization_config),
                                    (AUTO_QUANTIZER_MAPPING, AtpSparseHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is None:
            decorator(QUANT_METHOD)(cls)
        elif existing is not cls:
            raise RuntimeError(f"transformers already has a different {QUANT_METHOD!r} registered: {existing}")
