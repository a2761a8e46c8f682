"""The architectures researchers prune now, each built tiny from a config in code (tests/families.py): block replay
is exact, every block parameter is pruned or dense by a stated rule, the zero fraction of every prunable matrix is
the target within each matrix's rounding, what the run reports is what the weights hold, and a save and reload
keeps it."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lib.calibration.blocks import advance, capture_block_inputs, run_block
from lib.models.loading import auto_model_class
from lib.models.matrices import (CONVOLUTION, EXPERT_VECTOR, ROUTER, SHARED_GATE, VECTOR, block_sparsity,
                                 classify_block, model_inventory)
from lib.models.structure import find_decoder_blocks, final_norm
from lib.pruning.sequential import prune_sequential

from families import FAMILIES, LAYERS, MOE, MULTIMODAL, WINDOW

SEQLEN = 3 * WINDOW  # longer than every sliding window
DENSE_REASONS = {VECTOR, ROUTER, SHARED_GATE, EXPERT_VECTOR, CONVOLUTION}
SPARSITY = 0.7


def build(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    config = FAMILIES[family](vocab_size)
    torch.manual_seed(seed)
    return auto_model_class(config).from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(tokenizer):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, len(tokenizer), (4, SEQLEN), generator=generator)


def prunable_param_zeros(model) -> tuple[int, int]:
    """(zeros, total) over every block parameter that is not dense by design, read from the parameters
    themselves rather than through the pruner's view of them."""
    zeros = total = 0
    for block in find_decoder_blocks(model):
        dense = classify_block(block).dense
        for name, param in block.named_parameters():
            if name not in dense:
                zeros += int((param == 0).sum())
                total += param.numel()
    return zeros, total


def promised_zeros(block, method: str, sparsity: float) -> int:
    """Wanda prunes floor(cols * s) per row, SparseGPT floor(numel * s) per matrix."""
    total = 0
    for matrix in classify_block(block).matrices.values():
        rows, cols = matrix.weight.shape
        total += rows * math.floor(cols * sparsity + 1e-9) if method == "wanda" else \
            math.floor(rows * cols * sparsity + 1e-9)
    return total


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_replay_reproduces_the_models_own_hidden_states(family, tokenizer, ids):
    model = build(family, len(tokenizer))
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        blocks = find_decoder_blocks(model)
        assert len(blocks) == LAYERS
        batches = capture_block_inputs(model, blocks, ids, batch_size=2)
        outputs = []
        for i, block in enumerate(blocks):
            outputs.append(torch.cat([run_block(block, b) for b in batches]))
            if i + 1 < len(blocks):
                batches = advance(block, batches)
        for i in range(len(blocks) - 1):
            assert (outputs[i] - reference[i + 1]).abs().max() <= 1e-5, f"block {i}"
        # the model's last hidden state is the last block's output, after the final norm in most families
        norm = final_norm(model, blocks)
        candidates = [outputs[-1]] + ([norm(outputs[-1])] if norm is not None else [])
        assert min(float((c - reference[-1]).abs().max()) for c in candidates) <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_parameter_is_pruned_or_dense_by_a_stated_rule(family, tokenizer):
    model = build(family, len(tokenizer))
    blocks = find_decoder_blocks(model)
    inventory = model_inventory(model, blocks)
    assert inventory.unclassified == []
    assert set(inventory.dense_in_blocks) <= DENSE_REASONS
    # every weight of the model is counted exactly once
    dense_in_blocks = sum(entry["weights"] for entry in inventory.dense_in_blocks.values())
    assert inventory.prunable_weights + dense_in_blocks + sum(inventory.outside_blocks.values()) == \
        sum(p.numel() for p in model.parameters())
    if family in MOE:
        assert inventory.expert_slices > 0 and ROUTER in inventory.dense_in_blocks
        for block in blocks:
            for fused in classify_block(block).fused:
                assert len(fused.matrices) == fused.parameter.shape[0]
    else:
        assert inventory.expert_slices == 0
    if family in MULTIMODAL:  # the vision tower is outside the language model's blocks and stays dense
        vision = [name for name in inventory.outside_blocks if "vision" in name or "visual" in name]
        assert vision, inventory.outside_blocks


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_reaches_the_target_on_every_matrix_and_survives_save_and_reload(family, method, tokenizer, ids,
                                                                                 tmp_path):
    model = build(family, len(tokenizer))
    blocks = find_decoder_blocks(model)
    records = prune_sequential(model, blocks, ids, [SPARSITY] * len(blocks), method, batch_size=2,
                               progress=False)
    for record, block in zip(records, blocks):
        assert record["zeros"] == promised_zeros(block, method, SPARSITY)
        assert (record["zeros"], record["weights"]) == block_sparsity(block)
        assert record["magnitude_fallback"] == []  # every expert got tokens at this size
    reported = sum(r["zeros"] for r in records), sum(r["weights"] for r in records)
    assert prunable_param_zeros(model) == reported
    assert abs(reported[0] / reported[1] - SPARSITY) < 0.02
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1], use_cache=False).logits).all()

    model.save_pretrained(tmp_path)
    reloaded = auto_model_class(model.config).from_pretrained(tmp_path, dtype=torch.float32)
    assert prunable_param_zeros(reloaded) == reported
    for before, after in zip(blocks, find_decoder_blocks(reloaded)):
        assert block_sparsity(before) == block_sparsity(after)
