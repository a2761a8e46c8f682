"""Shared by the tests in tests/cuda (a plain module, not a conftest: tests elsewhere import `conftest` by name).

The CUDA-marked tests run where torch sees a GPU (scripts/gpu_check.sh runs them on one) and are skipped with the
reason everywhere else. Nothing here needs `datasets` or `lm_eval`, which the GPU machine does not have.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
SKIP_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False here (scripts/gpu_check.sh runs these on one)"
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=SKIP_REASON)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_texts(root: Path) -> SimpleNamespace:
    """Small calibration and evaluation .txt files from the shipped text (no `datasets` needed)."""
    calib, evaluation = root / "calib.txt", root / "eval.txt"
    calib.write_text((REPO / "data" / "austen_calib.txt").read_text(encoding="utf-8")[:15000], encoding="utf-8")
    evaluation.write_text((REPO / "data" / "austen_eval.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return SimpleNamespace(calib=calib, eval=evaluation)


def prune_2_4_(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs, in place."""
    from lib.pruning.masks import n_m_mask
    weight[n_m_mask(weight.abs().float(), 2, 4)] = 0
    return weight


def prune_unstructured_(weight: torch.Tensor, sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight[(torch.rand(weight.shape, generator=gen) < sparsity).to(weight.device)] = 0
    return weight


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def block_zero_masks(model: nn.Module) -> list[torch.Tensor]:
    """The zero mask of every prunable matrix of every decoder block, on the CPU, in a fixed order."""
    from lib.models.matrices import block_matrices
    from lib.models.structure import find_decoder_blocks
    return [m.weight.detach().cpu() == 0 for b in find_decoder_blocks(model) for m in block_matrices(b).values()]


def perplexity_of(model: nn.Module, tokenizer, eval_path: Path, seqlen: int, windows: int, batch_size: int) -> float:
    """The CLI's perplexity (same windows and batching as `--seqlen --max_eval_windows --eval_batch_size`)."""
    from lib.data import evaluation_tokens
    from lib.eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls
    tokens, _ = evaluation_tokens(str(eval_path), tokenizer)
    with torch.no_grad():
        nlls = window_nlls(model, eval_windows(tokens, seqlen, windows), batch_size, False)
    value = perplexity_from_nlls(nlls)
    assert math.isfinite(value)
    return value
