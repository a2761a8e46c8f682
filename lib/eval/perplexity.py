"""Perplexity the standard way: non-overlapping windows of `seqlen` tokens, ppl = exp(mean token NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.structure import module_device


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """[num_windows, seqlen] non-overlapping windows of a [1, N] token row (the tail that does not fill one is
    dropped, as in the paper's code)."""
    count = tokens.shape[1] // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[0, : count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> torch.Tensor:
    """Mean next-token NLL of every window (fp32), shape [num_windows]."""
    device = module_device(model.get_input_embeddings())
    out = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress,
                      unit="batch"):
        ids = windows[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), ids[:, 1:].reshape(-1).to(
            shift_logits.device), reduction="none")
        out.append(loss.view(ids.shape[0], -1).mean(dim=1).cpu())
        del logits, shift_logits, loss
    return torch.cat(out) if out else torch.empty(0)


def perplexity_from_nlls(nlls: torch.Tensor) -> float:
    return math.exp(nlls.double().mean().item()) if nlls.numel() else float("nan")


def perplexity(model, tokens: torch.Tensor, seqlen: int, batch_size: int = 1, max_windows: int | None = None,
               progress: bool = True) -> float:
    return perplexity_from_nlls(window_nlls(model, eval_windows(tokens, seqlen, max_windows), batch_size, progress))
