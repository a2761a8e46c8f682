"""How a compressed checkpoint directory names itself (checkpoint.py writes it, hf_quantizer.py reads it). Only
json and os: the CLI asks `is_compressed_dir` before it imports torch."""
from __future__ import annotations

import json
import os

QUANT_METHOD = "atp_sparse"  # config.json's quantization_config.quant_method
FORMAT = "atp-bitmask-v2"
FORMAT_V1 = "atp-bitmask-v1"  # the first version: a manifest, no quantization_config
MANIFEST = "sparse_manifest.json"


def quant_method(directory: str) -> str | None:
    """config.json's quantization_config.quant_method, or None (no such file, field or readable JSON)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            quantization = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def is_compressed_dir(directory: str) -> bool:
    """A save_compressed directory (either version), or a save_pretrained one of a model loaded from one."""
    return os.path.isfile(os.path.join(directory, MANIFEST)) or quant_method(directory) == QUANT_METHOD
