"""The fast paths compute what the slow ones do: batched calibration, the stacked shared-Hessian SparseGPT solve,
the optimised SparseGPT solver (against a textbook column-by-column OBS loop written here) and the offload path."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lib.allocation.atp import atp_allocation
from lib.calibration.blocks import capture_block_inputs
from lib.eval.perplexity import perplexity
from lib.calibration.offload import blocks_visit_device, place_for_offload
from lib.models.matrices import block_matrices
from lib.models.structure import find_decoder_blocks
from lib.pruning.pruner import PRUNERS, default_params
from lib.pruning.sequential import prune_sequential
from lib.pruning.sparsegpt_solver import sparsegpt_prune
from lib.calibration.stats import collect_input_stats
from lib.demo.tiny import build_tiny_model

VOCAB, SEQLEN = 512, 32

def prune_linears(linears, stats, method, sparsity, n_m, blocksize=128):
    """Prune one block's Linears with the registered pruner `method` (SparseGPT at `blocksize`)."""
    pruner = PRUNERS.get(method)
    params = {**default_params(pruner), "sparsegpt_blocksize": blocksize}
    pruner.prune(linears, stats, sparsity, n_m, params)



def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return build_tiny_model("llama", seed=seed, num_layers=3, hidden=64, vocab_size=VOCAB, max_positions=128)


def random_tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": lin.weight.detach().clone()
            for i, block in enumerate(find_decoder_blocks(model)) for name, lin in block_matrices(block).items()}


def random_problem(rows: int, cols: int, seed: int, dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and H = 2 X X^T / n from correlated, unevenly scaled inputs (as in a real layer)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * cols, cols, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    X = X * torch.rand(cols, generator=g, dtype=torch.float64).add(0.1)
    X[:, list(dead)] = 0  # inputs that are never active
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, (2 * X.t() @ X / X.shape[0]).float()


# ---------------------------------------------------------------------------------------------------------------
# (a) calibration in batches == one sample at a time

@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batched_calibration_equals_one_sample_at_a_time(method):
    calib, eval_tokens = random_tokens((8, SEQLEN), 1), random_tokens((1, 6 * SEQLEN), 2)
    results = {}
    for batch_size in (1, 4):
        model = tiny_llama()
        blocks = find_decoder_blocks(model)
        sparsities = atp_allocation(0.6, 0.1, len(blocks))
        records = prune_sequential(model, blocks, calib, sparsities, method, batch_size=batch_size, progress=False)
        ppl = perplexity(model, eval_tokens, SEQLEN, batch_size=2, progress=False)
        results[batch_size] = (linear_weights(model), records, ppl)

    (w1, rec1, ppl1), (w4, rec4, ppl4) = results[1], results[4]
    assert [r["zeros"] for r in rec1] == [r["zeros"] for r in rec4]
    for name in w1:
        assert torch.equal(w1[name] == 0, w4[name] == 0), f"{method}: masks differ in {name}"
        if method == "wanda":  # survivors are the untouched dense weights
            assert torch.equal(w4[name], w1[name])
        else:  # the Hessians differ in summation order only; weights are ~0.02, so 1e-5 is a 0.05% error
            torch.testing.assert_close(w4[name], w1[name], rtol=1e-4, atol=1e-5)
    assert math.isfinite(ppl1) and ppl4 == pytest.approx(ppl1, rel=1e-5)
    # the pruning did something: the sparsity plan was applied
    assert rec1[-1]["achieved"] > rec1[0]["achieved"] > 0.4


# ---------------------------------------------------------------------------------------------------------------
# (b) stacked matrices sharing one Hessian == each matrix on its own

@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_stacked_solve_equals_one_matrix_at_a_time(n_m):
    _, H = random_problem(1, 96, seed=3)
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(rows, 96, generator=g) * 0.05 for rows in (24, 40, 8)]
    stacked_w, stacked_mask = sparsegpt_prune(torch.cat(parts), H, 0.55, n_m, blocksize=32,
                                              row_groups=[p.shape[0] for p in parts])
    for part, w, mask in zip(parts, stacked_w.split([24, 40, 8]), stacked_mask.split([24, 40, 8])):
        alone_w, alone_mask = sparsegpt_prune(part, H, 0.55, n_m, blocksize=32)
        assert torch.equal(mask, alone_mask)
        torch.testing.assert_close(w, alone_w, rtol=1e-5, atol=1e-6)
        if n_m is None:  # each matrix gets exactly its own share, not a share of the stack
            assert mask.sum().item() == math.floor(part.numel() * 0.55)


def test_block_pruning_stacks_qkv_and_matches_separate_solves():
    """prune_linears solves q/k/v (and gate/up) together because they read one input; same result as one by one."""
    model = tiny_llama(seed=5)
    blocks = find_decoder_blocks(model)
    batches = capture_block_inputs(model, blocks, random_tokens((4, SEQLEN), 6), batch_size=2)
    linears = block_matrices(blocks[0])
    stats = collect_input_stats(blocks[0], linears, batches, want_sq_norm=False, want_xtx=True)
    groups = {id(s): s.names for s in stats.values()}
    assert sorted(map(sorted, groups.values()))[:2] == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"]]
    assert ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"] in map(sorted, groups.values())

    expected = {name: sparsegpt_prune(lin.weight, stats[name].hessian(), 0.6)[0] for name, lin in linears.items()}
    prune_linears(linears, stats, "sparsegpt", 0.6, None)
    for name, lin in linears.items():
        assert torch.equal(lin.weight == 0, expected[name] == 0), name
        torch.testing.assert_close(lin.weight, expected[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (c) the optimised solver == the textbook column-by-column OBS loop

def textbook_sparsegpt(weight, hessian, sparsity, n_m=None, blocksize=128, percdamp=0.01, row_groups=None):
    """SparseGPT without any lazy batching, in float64: prune one column, immediately update every later column.

    Masks follow SparseGPT's rule: unstructured masks are chosen per `blocksize` columns on the weights as they are
    when the block is reached (exactly floor(rows_g * end * s) pruned in each row group up to column `end`); an N:M
    group is chosen when its first column is reached.
    """
    W, H = weight.double().clone(), hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diag(U)
    groups = row_groups or [rows]
    done = [0] * len(groups)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if n_m is None and i % blocksize == 0:
            end = min(i + blocksize, cols)
            saliency = W[:, i:end] ** 2 / d[i:end] ** 2
            r0 = 0
            for g, size in enumerate(groups):
                due = math.floor(size * end * sparsity + 1e-9) - done[g]
                chosen = torch.zeros(size * (end - i), dtype=torch.bool)
                chosen[torch.argsort(saliency[r0:r0 + size].flatten())[:due]] = True
                mask[r0:r0 + size, i:end] = chosen.view(size, end - i)
                done[g] += due
                r0 += size
        if n_m is not None and i % n_m[1] == 0:
            n, m = n_m
            saliency = W[:, i:i + m] ** 2 / d[i:i + m] ** 2
            mask[:, i:i + m].scatter_(1, torch.argsort(saliency, dim=1)[:, :n], True)
        q = W[:, i].masked_fill(mask[:, i], 0)
        err = (W[:, i] - q) / d[i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
        W[:, i] = q
    return W, mask


@pytest.mark.parametrize("n_m,blocksize,row_groups", [
    (None, 32, None),
    (None, 40, [16, 24]),  # a short last block, partial inner blocks, two row groups
    ((2, 4), 32, None),
    ((4, 8), 40, None),
])
def test_optimised_solver_equals_textbook_obs(n_m, blocksize, row_groups):
    W, H = random_problem(40, 96, seed=7, dead=(5,))
    ours_w, ours_mask = sparsegpt_prune(W, H, 0.6, n_m, blocksize=blocksize, row_groups=row_groups)
    ref_w, ref_mask = textbook_sparsegpt(W, H, 0.6, n_m, blocksize=blocksize, row_groups=row_groups)
    assert ours_w.dtype == torch.float32 and ours_w.shape == W.shape
    assert torch.equal(ours_mask, ref_mask)
    assert torch.all(ours_w[ours_mask] == 0) and torch.all(ours_w[:, 5] == 0)
    torch.testing.assert_close(ours_w.double(), ref_w, rtol=1e-4, atol=1e-5)
    # the compensation changed the kept weights (an unchanged survivor set would mean no OBS update happened)
    kept = ~ours_mask
    kept[:, 5] = False
    assert (ours_w[kept] - W[kept]).abs().max() > 1e-3
    if n_m is not None:
        n, m = n_m
        assert torch.all(ours_mask.view(40, -1, m).sum(-1) == n)


def test_optimised_solver_on_half_precision_input_returns_fp32():
    W, H = random_problem(16, 64, seed=8)
    half_w, half_mask = sparsegpt_prune(W.half(), H, 0.5)
    full_w, full_mask = sparsegpt_prune(W.half().float(), H, 0.5)
    assert half_w.dtype == torch.float32
    assert torch.equal(half_w, full_w) and torch.equal(half_mask, full_mask)


# ---------------------------------------------------------------------------------------------------------------
# (d) the offload path (blocks visit the device one at a time) gives the results of the resident path

@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_path_equals_resident_path(method):
    calib, eval_tokens = random_tokens((6, SEQLEN), 9), random_tokens((1, 4 * SEQLEN), 10)
    resident = tiny_llama(seed=11)
    offloaded = copy.deepcopy(resident)
    device = torch.device("cpu")  # the only device here; the code path is the one used for a GPU
    outcomes = []
    for model, offload in ((resident, False), (offloaded, True)):
        blocks = find_decoder_blocks(model)
        sparsities = atp_allocation(0.5, 0.1, len(blocks))
        if offload:
            place_for_offload(model, blocks, device)
        prune_sequential(model, blocks, calib, sparsities, method, batch_size=3,
                         offload_device=device if offload else None, progress=False)
        if offload:
            with blocks_visit_device(blocks, device):
                ppl = perplexity(model, eval_tokens, SEQLEN, batch_size=2, progress=False)
            assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks), "visit hooks not removed"
        else:
            ppl = perplexity(model, eval_tokens, SEQLEN, batch_size=2, progress=False)
        outcomes.append((linear_weights(model), ppl))
    (w_res, ppl_res), (w_off, ppl_off) = outcomes
    for name in w_res:
        assert torch.equal(w_res[name], w_off[name]), name
    assert ppl_off == ppl_res
