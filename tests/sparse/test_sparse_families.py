"""Compressed checkpoints of every architecture family in tests/families.py: with every block Linear (routers too,
as another pruning tool might leave them) and every expert's matrix 70% zeros, save_compressed packs the Linears
and the fused experts of transformers' experts interface, the lines of the directory's model card (transformers'
own from_pretrained, hf_quantizer.py) give the pruned model's logits, and so does the in-memory conversion
(sparsify_model).

Two rules come from this sweep: a Linear subclass with its own forward (Llama 4's router) is never replaced by a
SparseLinear, and a SparseLinear answers `.weight` reads (HunYuan's router checks its dtype) with the dense weight.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lib.models.loading import auto_model_class
from lib.pruning.masks import lowest_per_row_mask
from lib.sparse.checkpoint import MANIFEST, load_compressed, save_compressed
from lib.sparse import experts
from lib.sparse.convert import block_linears, fused_expert_tensors, fused_experts_modules, sparsify_model
from lib.sparse.linear import SparseLinear

from families import FAMILIES, MOE

SPARSITY = 0.7


def build(family: str, vocab_size: int) -> nn.Module:
    config = FAMILIES[family](vocab_size)
    torch.manual_seed(0)
    return auto_model_class(config).from_config(config, dtype=torch.float32).eval()


def prune_every_block_linear(model: nn.Module) -> None:
    """Zero the 70% smallest weights of each row of every block nn.Linear (subclasses included) and of every
    expert's matrix in fused expert tensors."""
    with torch.no_grad():
        for _, module in block_linears(model):
            module.weight[lowest_per_row_mask(module.weight.abs().float(), SPARSITY)] = 0
        for name in fused_expert_tensors(model):
            for matrix in model.get_parameter(name):
                matrix[lowest_per_row_mask(matrix.abs().float(), SPARSITY)] = 0


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.randint(3, len(tokenizer) - 4, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_loads_natively_with_the_pruned_models_logits(family, tokenizer, ids, tmp_path):
    model = build(family, len(tokenizer))
    prune_every_block_linear(model)
    expected = logits(model, ids)
    save_compressed(model, tokenizer, str(tmp_path / "c"))
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    plain = {n for n, m in block_linears(model) if type(m) is nn.Linear}
    assert set(manifest["sparse_modules"]) == plain and plain  # every plain Linear packed, subclasses kept dense
    interface = {n for n, m in fused_experts_modules(model) if experts.has_interface(m)}
    assert set(manifest["sparse_experts"]) == interface and bool(interface) == (family in MOE - {"llama4_text"})
    assert {n.rpartition(".")[0] for n in manifest["dense_fused_experts"]} == \
        {n for n, _ in fused_experts_modules(model)} - interface  # Llama 4's bmm experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HunYuan reads its router's .weight (tested below)
        card = (tmp_path / "c" / "README.md").read_text()  # its code loads the directory as a reader would
        namespace = {}
        exec(card.split("```python\n")[1].split("```")[0].replace("path/to/this/directory", str(tmp_path / "c")),
             namespace)
        loaded = namespace["model"]
        assert type(loaded) is type(model)
        assert set(experts.packed_experts_modules(loaded)) == interface
        assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == len(plain) + sum(
            e["experts"] for module in manifest["sparse_experts"].values() for e in module.values())
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)
        in_memory = copy.deepcopy(model)
        summary = sparsify_model(in_memory, verbose=False)
        assert len(summary.converted) == len(plain) + 2 * len(interface)
        torch.testing.assert_close(logits(in_memory, ids), expected, rtol=1e-4, atol=1e-5)
        in_memory.save_pretrained(tmp_path / "converted")  # the compressed format too (the quantizer is attached)
        tokenizer.save_pretrained(tmp_path / "converted")
        reloaded, _ = load_compressed(str(tmp_path / "converted"))
        torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-4, atol=1e-5)


def test_a_linear_subclass_with_its_own_forward_stays_dense_and_says_why(tokenizer):
    model = build("llama4_text", len(tokenizer))
    prune_every_block_linear(model)
    summary = sparsify_model(model, verbose=False)
    routers = [k for k in summary.kept_dense if "Llama4Router has its own forward" in k["reason"]]
    assert len(routers) == 2  # the two MoE blocks' routers
    for k in routers:
        assert type(model.get_submodule(k["name"])).__name__ == "Llama4Router"
    assert "Llama4Router has its own forward" in summary.text()


def test_a_checkpoint_that_packed_such_a_subclass_is_refused(tokenizer, tmp_path, monkeypatch):
    """As an earlier version wrote them: the router packed, which loading would silently turn into a plain
    Linear (in Llama 4 a crash, in another model wrong numbers)."""
    import lib.sparse.checkpoint as checkpoint
    model = build("llama4_text", len(tokenizer))
    prune_every_block_linear(model)
    monkeypatch.setattr(checkpoint, "replaces_exactly", lambda m: isinstance(m, nn.Linear))
    save_compressed(model, tokenizer, str(tmp_path / "old"))
    packed = json.loads((tmp_path / "old" / MANIFEST).read_text())["sparse_modules"]
    assert any(name.endswith("feed_forward.router") for name in packed)
    with pytest.raises(ValueError, match="router is packed, but Llama4Router has its own forward"):
        load_compressed(str(tmp_path / "old"))


def test_reading_weight_gives_the_dense_weight_and_warns_once():
    torch.manual_seed(0)
    linear = nn.Linear(40, 6)
    with torch.no_grad():
        linear.weight[lowest_per_row_mask(linear.weight.abs(), SPARSITY)] = 0
    sparse = SparseLinear.from_linear(linear)
    with pytest.warns(UserWarning, match=r"SparseLinear\(40 -> 6\): the model's code reads its .weight"):
        first = sparse.weight
    assert torch.equal(first, linear.weight) and first.dtype == sparse.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read does not warn again
        assert torch.equal(sparse.weight, linear.weight)
    first.zero_()  # a copy: the packed weight is untouched
    torch.testing.assert_close(sparse(torch.ones(1, 40)), linear(torch.ones(1, 40)))
    assert "weight" not in dict(sparse.named_parameters()) and "weight" not in sparse.state_dict()


def test_experts_left_dense_run_beside_packed_ones(tokenizer, ids, tmp_path):
    """Only block 0's experts pruned: block 1's stay dense fused tensors (too little sparsity), yet the model's
    experts forward is the packed one for all blocks; it runs the dense experts as they are, in memory and after
    a save and a native load."""
    model = build("qwen3_moe", len(tokenizer))
    with torch.no_grad():
        for name in fused_expert_tensors(model):
            if ".layers.0." in name:
                for matrix in model.get_parameter(name):
                    matrix[lowest_per_row_mask(matrix.abs().float(), SPARSITY)] = 0
    expected = logits(model, ids)
    in_memory = copy.deepcopy(model)
    summary = sparsify_model(in_memory, verbose=False)
    assert experts.packed_experts_modules(in_memory) == ["model.layers.0.mlp.experts"]
    kept = {k["name"]: k["reason"] for k in summary.kept_dense}
    assert kept["model.layers.1.mlp.experts.gate_up_proj"].startswith("sparsity below min_sparsity")
    assert in_memory.config._experts_implementation == experts.IMPLEMENTATION
    torch.testing.assert_close(logits(in_memory, ids), expected, rtol=1e-4, atol=1e-5)
    save_compressed(model, tokenizer, str(tmp_path / "c"))
    loaded, _ = load_compressed(str(tmp_path / "c"))
    assert experts.packed_experts_modules(loaded) == ["model.layers.0.mlp.experts"]
    assert loaded.get_parameter("model.layers.1.mlp.experts.down_proj").dim() == 3
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)


def test_qwen3_vl_moe_packed_experts_pass_by_its_weight_converters(tokenizer, ids, tmp_path):
    """transformers converts Qwen3-VL-MoE's fused expert tensors on load (a transpose whose pattern also matches
    the packed experts' keys); the quantizer leaves those converters out, so the directory loads, and the loaded
    model's save_pretrained writes it back."""
    model = build("qwen3_vl_moe", len(tokenizer))
    prune_every_block_linear(model)
    expected = logits(model, ids)
    saved = save_compressed(model, tokenizer, str(tmp_path / "c"))
    assert saved["sparse_experts"] == 4
    loaded, _ = load_compressed(str(tmp_path / "c"))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-4, atol=1e-5)
    loaded.save_pretrained(tmp_path / "round_trip")
    tokenizer.save_pretrained(tmp_path / "round_trip")
    again, _ = load_compressed(str(tmp_path / "round_trip"))
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-4, atol=1e-5)
