"""The pipeline pieces on tiny real models: block discovery, input statistics, sequential pruning, data, perplexity."""
import json
import math

import pytest
import torch
from torch import nn

from lib.pruning import sequential
from lib.allocation.atp import atp_allocation
from lib.calibration.blocks import advance, capture_block_inputs
from lib.data import calibration_windows, evaluation_tokens, read_local_documents
from lib.errors import UserError
from lib.eval.perplexity import eval_windows, perplexity, perplexity_from_nlls, window_nlls
from lib.models.matrices import block_matrices, block_sparsity
from lib.models.structure import find_decoder_blocks
from lib.pruning.sequential import prune_sequential
from lib.calibration.stats import collect_input_stats

from conftest import FAMILIES, NUM_BLOCKS

SEQLEN = 32


@pytest.fixture(scope="module")
def calib_ids(tokenizer, text_files):
    ids, _ = calibration_windows(str(text_files.calib), tokenizer, 8, SEQLEN, seed=0)
    return ids


@pytest.fixture(scope="module")
def eval_ids(tokenizer, text_files):
    ids, _ = evaluation_tokens(str(text_files.eval), tokenizer)
    return ids


def hidden_of(batches) -> torch.Tensor:
    return torch.cat([b.hidden for b in batches])


# ---------------------------------------------------------------- block discovery and statistics

@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_blocks_are_found_in_every_family(make_model, family):
    model = make_model(family)
    blocks = find_decoder_blocks(model)
    expected = model.model.decoder.layers if family == "opt" else model.model.layers
    assert blocks is expected and len(blocks) == NUM_BLOCKS
    linears = block_matrices(blocks[0])
    assert len(linears) == (6 if family == "opt" else 7)  # q k v o + fc1 fc2 / gate up down


def test_a_model_without_a_block_list_is_an_unsupported_architecture():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UserError, match="unsupported architecture Flat"):
        find_decoder_blocks(Flat())


def test_layers_reading_one_input_share_statistics_equal_to_x_transpose_x(make_model, calib_ids):
    model = make_model("llama")
    blocks = find_decoder_blocks(model)
    batches = capture_block_inputs(model, blocks, calib_ids, batch_size=4)
    linears = block_matrices(blocks[0])
    seen = []
    handle = linears["self_attn.q_proj"].owner.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    stats = collect_input_stats(blocks[0], linears, batches, want_sq_norm=True, want_xtx=True)
    handle.remove()
    attn = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    mlp_in = {"mlp.gate_proj", "mlp.up_proj"}
    assert len({id(stats[n]) for n in attn}) == 1 and set(stats["self_attn.q_proj"].names) == attn
    assert len({id(stats[n]) for n in mlp_in}) == 1 and set(stats["mlp.gate_proj"].names) == mlp_in
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()
    q_stats = stats["self_attn.q_proj"]
    assert q_stats.tokens == calib_ids.numel() == x.shape[0]
    torch.testing.assert_close(q_stats.xtx.double(), x.T @ x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_stats.sq_norm.double(), (x ** 2).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_stats.hessian().double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- sequential pruning

def test_block_one_is_pruned_on_the_outputs_of_the_pruned_block_zero(make_model, calib_ids, monkeypatch):
    model = make_model("llama")
    blocks = find_decoder_blocks(model)
    dense_inputs_1 = advance(blocks[0], capture_block_inputs(model, blocks, calib_ids, 4))

    used = {}  # block index -> (inputs the pruner saw, statistics it computed)
    real_collect = sequential.collect_input_stats

    def spy(block, linears, batches, *flags):
        stats = real_collect(block, linears, batches, *flags)
        used[next(i for i, b in enumerate(blocks) if b is block)] = (hidden_of(batches).clone(), stats)
        return stats

    monkeypatch.setattr(sequential, "collect_input_stats", spy)
    prune_sequential(model, blocks, calib_ids, [0.6] * NUM_BLOCKS, "wanda", batch_size=4, progress=False)
    assert sorted(used) == list(range(NUM_BLOCKS))

    pruned_inputs_1 = advance(blocks[0], capture_block_inputs(model, blocks, calib_ids, 4))
    dense_1, pruned_1 = hidden_of(dense_inputs_1), hidden_of(pruned_inputs_1)
    assert (dense_1 - pruned_1).abs().max() > 1e-3  # pruning block 0 changed what block 1 receives
    torch.testing.assert_close(used[1][0], pruned_1)
    # and block 1's Wanda statistics were those of the pruned inputs, not the dense ones
    q_name = "self_attn.q_proj"
    q = {q_name: block_matrices(blocks[1])[q_name]}
    dense_norms = collect_input_stats(blocks[1], q, dense_inputs_1, True, False)[q_name].sq_norm
    pruned_norms = collect_input_stats(blocks[1], q, pruned_inputs_1, True, False)[q_name].sq_norm
    torch.testing.assert_close(used[1][1][q_name].sq_norm, pruned_norms)
    assert not torch.allclose(used[1][1][q_name].sq_norm, dense_norms, rtol=1e-3)


def prune_and_score(make_model, tokenizer, text_files, eval_ids, method, calib_seed, offload=False):
    model = make_model("llama", seed=0)
    blocks = find_decoder_blocks(model)
    calib, _ = calibration_windows(str(text_files.calib), tokenizer, 8, SEQLEN, calib_seed)
    records = prune_sequential(model, blocks, calib, atp_allocation(0.5, 0.1, NUM_BLOCKS), method, batch_size=4,
                               offload_device=torch.device("cpu") if offload else None, progress=False)
    masks = [lin.weight == 0 for b in blocks for lin in block_matrices(b).values()]
    ppl = perplexity(model, eval_ids, SEQLEN, batch_size=4, max_windows=8, progress=False)
    return masks, ppl, records


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_seed_gives_identical_masks_and_perplexity(make_model, tokenizer, text_files, eval_ids, method):
    masks_a, ppl_a, records_a = prune_and_score(make_model, tokenizer, text_files, eval_ids, method, 0)
    masks_b, ppl_b, records_b = prune_and_score(make_model, tokenizer, text_files, eval_ids, method, 0)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert ppl_a == ppl_b and math.isfinite(ppl_a)
    assert [r["zeros"] for r in records_a] == [r["zeros"] for r in records_b]
    masks_c, ppl_c, _ = prune_and_score(make_model, tokenizer, text_files, eval_ids, method, 1)
    assert not all(torch.equal(a, c) for a, c in zip(masks_a, masks_c))  # the calibration seed matters
    assert ppl_c != ppl_a


def test_offloading_blocks_does_not_change_the_result(make_model, tokenizer, text_files, eval_ids):
    masks_a, ppl_a, _ = prune_and_score(make_model, tokenizer, text_files, eval_ids, "sparsegpt", 0)
    masks_b, ppl_b, _ = prune_and_score(make_model, tokenizer, text_files, eval_ids, "sparsegpt", 0, offload=True)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert ppl_a == pytest.approx(ppl_b, rel=1e-6)


def test_records_report_the_block_sparsity(make_model, calib_ids):
    model = make_model("qwen2")
    blocks = find_decoder_blocks(model)
    plan = atp_allocation(0.5, 0.2, NUM_BLOCKS)
    records = prune_sequential(model, blocks, calib_ids, plan, "magnitude", progress=False)
    for i, (record, block) in enumerate(zip(records, blocks)):
        zeros, total = block_sparsity(block)
        assert record["block"] == i and record["target"] == plan[i]
        assert (record["zeros"], record["weights"]) == (zeros, total)
        assert record["achieved"] == zeros / total
        assert plan[i] - len(block_matrices(block)) / total <= record["achieved"] <= plan[i]
    with pytest.raises(ValueError, match="sparsities for"):
        prune_sequential(model, blocks, calib_ids, plan[:2], "magnitude", progress=False)


# ---------------------------------------------------------------- data

def test_calibration_windows_are_reproducible_slices_of_the_text(tokenizer, text_files):
    first, layout = calibration_windows(str(text_files.calib), tokenizer, 6, SEQLEN, seed=3)
    again, _ = calibration_windows(str(text_files.calib), tokenizer, 6, SEQLEN, seed=3)
    other, _ = calibration_windows(str(text_files.calib), tokenizer, 6, SEQLEN, seed=4)
    assert layout == "text file" and first.shape == (6, SEQLEN)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    document = tokenizer(text_files.calib.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    all_slices = document.unfold(0, SEQLEN, 1)
    for window in first:
        assert bool((all_slices == window).all(dim=1).any())


@pytest.mark.parametrize("source, layout", [("calib_jsonl", "jsonl rows"), ("calib_dataset", "saved dataset rows")])
def test_calibration_from_jsonl_and_saved_dataset(tokenizer, text_files, source, layout):
    path = str(getattr(text_files, source))
    windows, got_layout = calibration_windows(path, tokenizer, 5, 64, seed=0)
    assert got_layout == layout and windows.shape == (5, 64)
    assert torch.equal(windows, calibration_windows(path, tokenizer, 5, 64, seed=0)[0])


def test_short_rows_are_joined_and_too_little_text_is_an_error(tokenizer, tmp_path):
    rows = tmp_path / "short.jsonl"
    rows.write_text("".join(f'{{"text": "Short line number {i}."}}\n' for i in range(40)), encoding="utf-8")
    windows, _ = calibration_windows(str(rows), tokenizer, 4, 24, seed=0)
    assert windows.shape == (4, 24)
    rows.write_text('{"text": "Too short."}\n', encoding="utf-8")
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(str(rows), tokenizer, 4, 24, seed=0)


def test_evaluation_tokens_join_rows_with_blank_lines(tokenizer, text_files):
    joined = tokenizer("\n\n".join(text_files.eval_rows), return_tensors="pt").input_ids
    for source, layout in ((text_files.eval_jsonl, "jsonl rows"), (text_files.eval_dataset, "saved dataset rows")):
        ids, got_layout = evaluation_tokens(str(source), tokenizer)
        assert got_layout == layout
        assert torch.equal(ids, joined)


def test_saved_dataset_dict_prefers_the_test_split(tmp_path):
    from datasets import Dataset, DatasetDict
    DatasetDict({"train": Dataset.from_dict({"text": ["train row"]}),
                 "test": Dataset.from_dict({"text": ["test row"]})}).save_to_disk(str(tmp_path / "dd"))
    assert read_local_documents(str(tmp_path / "dd"), "--eval_data") == (["test row"], "saved dataset rows")


def test_unusable_local_data_is_a_user_error(tmp_path, tokenizer):
    from datasets import Dataset
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        read_local_documents(str(bad_json), "--calib_data")
    Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(UserError, match="no 'text' column"):
        read_local_documents(str(tmp_path / "no_text"), "--calib_data")
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(UserError, match="save_to_disk"):
        read_local_documents(str(tmp_path / "not_a_dataset"), "--calib_data")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-8"):
        read_local_documents(str(tmp_path / "binary.txt"), "--eval_data")
    (tmp_path / "blank.txt").write_text("   \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no text"):
        evaluation_tokens(str(tmp_path / "blank.txt"), tokenizer)


# ---------------------------------------------------------------- perplexity

def test_window_nlls_match_the_model_loss_and_perplexity_is_exp_mean(make_model, eval_ids):
    model = make_model("mistral")
    windows = eval_windows(eval_ids, SEQLEN, max_windows=5)
    assert windows.shape == (5, SEQLEN)
    assert torch.equal(windows.flatten(), eval_ids[0, :5 * SEQLEN])
    nlls = window_nlls(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        losses = torch.stack([model(w[None], labels=w[None]).loss for w in windows])
    torch.testing.assert_close(nlls, losses, rtol=1e-5, atol=1e-5)
    assert perplexity_from_nlls(nlls) == pytest.approx(math.exp(losses.double().mean().item()), rel=1e-5)
    # a random model over a ~500-token vocabulary is close to uniform
    assert 100 < perplexity_from_nlls(nlls) < 2000


def test_eval_windows_drop_the_tail_and_empty_is_nan():
    tokens = torch.arange(100)[None]
    assert eval_windows(tokens, 30).shape == (3, 30)
    assert eval_windows(tokens, 30, max_windows=2).tolist() == [list(range(30)), list(range(30, 60))]
    assert math.isnan(perplexity_from_nlls(torch.empty(0)))


def test_json_array_sources_read_strings_and_text_objects(tmp_path):
    from lib.data import read_local_documents
    objects, strings, broken = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    objects.write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    strings.write_text(json.dumps(["one", "two", "three"]))
    broken.write_text(json.dumps([{"body": "no text field"}]))
    assert read_local_documents(str(objects), "--calib_data") == (["first", "second"], "json rows")
    assert read_local_documents(str(strings), "--eval_data") == (["one", "two", "three"], "json rows")
    with pytest.raises(UserError, match="--calib_data .*JSON array"):
        read_local_documents(str(broken), "--calib_data")


def test_weight_size_is_estimated_from_the_config_alone(model_dir, make_model):
    from lib.models.loading import estimated_weight_bytes, fits_on_device
    params = sum(p.numel() for p in make_model("llama").parameters())
    assert estimated_weight_bytes(str(model_dir("llama")), torch.float16) == 2 * params
    assert estimated_weight_bytes(str(model_dir("llama")), torch.float32) == 4 * params
    assert fits_on_device(10 ** 15, torch.device("cpu"))  # the CPU never triggers offloading
