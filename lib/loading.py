"""Load a causal LM and its tokenizer from a hub id, a local directory or a .gguf file, and place it on devices."""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .errors import UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on a GPU (as in the paper) and fp32 on the CPU, where half precision is slow."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_model_path(name: str) -> None:
    """A name meant as a path must exist (hub ids are 'name' or 'owner/name'; anything else, or a .gguf, is a path)."""
    meant_as_path = name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1 \
        or name.endswith("/")
    if meant_as_path and not os.path.exists(name):
        raise UserError(f"--model {name}: no such file or directory")


def _hub_error(name: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"--model {name}: cannot load it ({first}). Give a local model directory or .gguf file, "
                     f"or a hub id with the HuggingFace hub reachable")


def num_blocks_from_config(name: str) -> int | None:
    """The number of decoder blocks from the config alone (cheap), or None when it cannot be read this way."""
    if name.endswith(".gguf"):
        return None
    from transformers import AutoConfig
    check_model_path(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    config = getattr(config, "text_config", config)
    return getattr(config, "num_hidden_layers", None)


def load_model_and_tokenizer(name: str, dtype: torch.dtype, device_map=None):
    """(model in eval mode, tokenizer). `device_map` is passed to from_pretrained (e.g. "auto" for several GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model_path(name)
    if name.endswith(".gguf"):
        from .gguf_loading import load_gguf_model
        model, tokenizer = load_gguf_model(name, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise _hub_error(name, exc) from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def model_max_positions(model: nn.Module) -> int | None:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


def place_for_offload(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Everything but the decoder blocks on `device`; the blocks stay on the CPU until they are worked on."""
    block_modules = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in block_modules:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)
    blocks.to("cpu")


@contextlib.contextmanager
def blocks_visit_device(blocks: nn.ModuleList, device: torch.device):
    """During whole-model forwards (evaluation), move each offloaded block to `device` only while it runs."""
    def pre(module, args):
        module.to(device)

    def post(module, args, output):
        module.to("cpu")

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def estimated_weight_bytes(name: str, dtype: torch.dtype) -> int | None:
    """Size of the model's weights in `dtype`, from its config alone (built on the meta device); None if unknown."""
    if name.endswith(".gguf"):
        return os.path.getsize(name) * 4 if os.path.isfile(name) else None  # quantized file: a rough upper bound
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name))
    except Exception:  # any config we cannot instantiate: let the real load decide
        return None
    return sum(p.numel() for p in skeleton.parameters()) * torch.tensor([], dtype=dtype).element_size()


def fits_on_device(weight_bytes: int | None, device: torch.device, headroom: float = 0.8) -> bool:
    """Whether weights of this size fit in `headroom` of the device's free memory (always true on the CPU)."""
    if device.type != "cuda" or weight_bytes is None:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return weight_bytes <= headroom * free
