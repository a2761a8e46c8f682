"""Load a causal LM and its tokenizer from a hub id, a local directory or a .gguf file, and place it on devices."""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..errors import UserError
from ..hub import hub_reachable
from .load_report import check_loading_info

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_device(name: str) -> torch.device | None:
    """The device `name` means (None for 'auto'); ValueError for anything but auto, cpu, cuda and cuda:N, or for
    a CUDA device this machine does not have."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_device(name: str) -> torch.device:
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on a GPU (as in the paper) and fp32 on the CPU, where half precision is slow."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
def check_model_path(name: str) -> None:
    """A name meant as a path must exist; a name that could be a hub id ('name' or 'owner/name') but is no local
    path needs the hub, so an unreachable hub is said at once instead of after the client's retries."""
    if os.path.exists(name):
        return
    if name.endswith(".gguf") or not HUB_ID.match(name):
        raise UserError(f"{name}: no such file or directory", "model")
    if not hub_reachable():
        raise UserError(f"{name}: no such local directory, and the HuggingFace hub is unreachable to fetch it as a "
                        f"hub id; give a local model directory or .gguf file", "model")


def _hub_error(name: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"{name}: cannot load it ({first}). Give a local model directory or .gguf file, "
                     f"or a hub id with the HuggingFace hub reachable", "model")


def config_from_checkpoint(name: str):
    """The transformers config of a hub id, a directory or a .gguf file (from its metadata: no tensor is read).
    For a .gguf file, None when transformers cannot read one from it (the real load then reports why)."""
    from transformers import AutoConfig
    if not name.endswith(".gguf"):
        return AutoConfig.from_pretrained(name)
    from .gguf import check_gguf_file
    check_gguf_file(name)
    folder, file = os.path.split(os.path.abspath(name))
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=file)
    except Exception:  # noqa: BLE001 - an architecture or file transformers cannot map: let the real load decide
        return None


def checkpoint_config(name: str):
    """config_from_checkpoint for a run's checks: a missing path or an unreachable hub is one UserError."""
    check_model_path(name)
    try:
        return config_from_checkpoint(name)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None


def shape_from_config(config) -> tuple[int | None, set[int]]:
    """(number of decoder blocks or None, the Linear input widths it names) from a config (None: nothing known)."""
    if config is None:
        return None, set()
    config = getattr(config, "text_config", config)
    widths = {getattr(config, key) for key in ("hidden_size", "intermediate_size", "ffn_dim")
              if isinstance(getattr(config, key, None), int)}
    return getattr(config, "num_hidden_layers", None), widths


def auto_model_class(config):
    """The transformers auto class that builds a text-generating model for `config`: a causal LM, or a
    vision-language model (whose language model is pruned on text) when the config is one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise UserError(f"{type(config).__name__.removesuffix('Config')} is neither a causal language model nor a "
                    f"vision-language model that transformers can build", "model")


def skeleton_from_config(config) -> nn.Module | None:
    """The model built on the meta device from its config alone (no weights read); None for no config or one that
    cannot be built that way (the real load then decides)."""
    if config is None:
        return None
    try:
        from accelerate import init_empty_weights
        with init_empty_weights():
            return auto_model_class(config).from_config(config)
    except Exception:  # noqa: BLE001 - any config we cannot instantiate: let the real load decide
        return None


def load_model_and_tokenizer(name: str, dtype: torch.dtype, device_map=None, progress: bool = True):
    """(model in eval mode, tokenizer). `device_map` is passed to from_pretrained (e.g. "auto" for several GPUs)."""
    from transformers import AutoConfig, AutoTokenizer
    check_model_path(name)
    if name.endswith(".gguf"):
        from .gguf import load_gguf_model
        model, tokenizer = load_gguf_model(name, dtype=dtype, progress=progress)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(name, exc) from None
        auto = auto_model_class(config)
        try:
            model, info = auto.from_pretrained(name, dtype=dtype, device_map=device_map, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - a corrupt or truncated checkpoint raises many kinds of error
            raise _hub_error(name, exc) from None
        check_loading_info(name, info)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def model_max_positions(model: nn.Module) -> int | None:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


def estimated_weight_bytes(name: str, dtype: torch.dtype) -> int | None:
    """Size of the model's weights in `dtype`, from its config alone (built on the meta device); None if unknown."""
    try:
        skeleton = skeleton_from_config(config_from_checkpoint(name))
    except Exception:  # noqa: BLE001 - only an estimate: unknown when the config cannot be read
        skeleton = None
    if skeleton is None:
        if name.endswith(".gguf") and os.path.isfile(name):
            return os.path.getsize(name) * 4  # a quantized file unpacked to fp32 at most: a rough upper bound
        return None
    return sum(p.numel() for p in skeleton.parameters()) * torch.tensor([], dtype=dtype).element_size()


def fits_on_device(weight_bytes: int | None, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether weights of this size fit in `headroom` of the device's free memory (always true on the CPU)."""
    if device.type != "cuda" or weight_bytes is None:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return weight_bytes <= headroom * free
