"""sparsify_model and the compressed checkpoint round trip on a tiny LLaMA built in code (no network)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lib.pruning.masks import lowest_per_row_mask
from lib.sparse import checkpoint as ckpt
from lib.sparse.checkpoint import load_compressed, save_compressed
from lib.sparse.convert import sparsify_model
from lib.sparse.linear import SparseLinear

NUM_LINEARS = 2 * 7


def tiny_llama(dtype=torch.float32, sparsity=0.7, seed=0, low_sparsity_name=None, vocab_size=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, nn.Linear):
                s = 0.1 if name == low_sparsity_name else sparsity
                module.weight[lowest_per_row_mask(module.weight.abs().float(), s)] = 0
    return model


@pytest.fixture(scope="module")
def tok():
    from lib.demo.tiny import train_tokenizer
    return train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=128)


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_model_keeps_logits_and_tokens(dtype, capsys):
    dense = tiny_llama(dtype, low_sparsity_name="0.mlp.up_proj")
    sparse = copy_of(dense)
    summary = sparsify_model(sparse, min_sparsity=0.5)
    assert len(summary.converted) == NUM_LINEARS - 1
    assert [k["name"] for k in summary.kept_dense] == ["model.layers.0.mlp.up_proj"]
    assert "kept dense" in capsys.readouterr().err
    assert isinstance(sparse.lm_head, nn.Linear) and isinstance(sparse.model.embed_tokens, nn.Embedding)
    assert isinstance(sparse.model.layers[1].mlp.down_proj, SparseLinear)
    assert summary.sparse_bytes <= 0.45 * summary.dense_bytes
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = dense(ids).logits.float(), sparse(ids).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (ref - got).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    if dtype == torch.float32:
        assert torch.equal(greedy(dense, ids[:1]), greedy(sparse, ids[:1]))
        assert torch.equal(greedy(dense, ids), greedy(sparse, ids))


def test_compressed_round_trip(tmp_path, tok):
    dense = tiny_llama()
    out = tmp_path / "compressed"
    info = save_compressed(dense, tok, str(out))
    assert info["sparse_modules"] == NUM_LINEARS and ckpt.is_compressed_dir(str(out))
    dense_dir = tmp_path / "dense"
    dense.save_pretrained(dense_dir)
    dense_bytes = sum(f.stat().st_size for f in dense_dir.iterdir())
    assert info["bytes"] < dense_bytes  # (d) smaller than save_pretrained (tokenizer files included)

    loaded, tok2 = load_compressed(str(out))
    assert tok2("the fox").input_ids == tok("the fox").input_ids
    # (a) converted Linears are SparseLinear, no dense weight anywhere for them
    converted = [m for m in loaded.model.layers.modules() if isinstance(m, SparseLinear)]
    assert len(converted) == NUM_LINEARS
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.layers.modules())
    assert not any(name.endswith(("proj.weight",)) for name, _ in loaded.named_parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # (b) logits, (c) greedy tokens
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(loaded, ids[:1]), greedy(dense, ids[:1]))

    again, _ = load_compressed(str(out), dtype=torch.bfloat16)
    assert again.model.layers[0].self_attn.q_proj.values.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(again(ids).logits.float()).all()


def test_save_of_a_sparsified_model_and_low_sparsity_dense(tmp_path, tok):
    model = tiny_llama(low_sparsity_name="1.self_attn.o_proj")
    sparsify_model(model, verbose=False)
    save_compressed(model, tok, str(tmp_path / "c"))
    loaded, _ = load_compressed(str(tmp_path / "c"))
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, nn.Linear)
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_save_failure_leaves_nothing(tmp_path, tok, monkeypatch):
    model = tiny_llama()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, tok, str(tmp_path / "sub" / "out"))
    assert not (tmp_path / "sub").exists()
    assert os.listdir(tmp_path) == []


def test_refuses_non_empty_target(tmp_path, tok):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_compressed(tiny_llama(), tok, str(tmp_path / "x"))
    assert os.listdir(tmp_path / "x") == ["keep.txt"]


@pytest.mark.parametrize("corruption", ["mask bit flipped", "offsets shifted", "bit past the last column",
                                        "values cut short"])
@pytest.mark.parametrize("kernel", ["default", "off"])
def test_a_corrupt_packed_matrix_is_one_clear_error_on_every_path(corruption, kernel, monkeypatch):
    """The C++ kernel and the PyTorch path accept exactly the same tensors: validity is checked when the
    SparseLinear is built, before any path runs."""
    from lib.sparse import format as fmt
    from lib.sparse.linear import SparseLinear
    if kernel == "off":
        monkeypatch.setenv("ATP_SPARSE_KERNEL", "off")
    torch.manual_seed(0)
    weight = torch.randn(6, 70)
    weight[weight.abs() < 0.8] = 0
    packed = {k: v.clone() for k, v in fmt.pack(weight).items()}
    SparseLinear(70, 6, packed["mask"], packed["values"], packed["row_offsets"])  # intact: accepted
    if corruption == "mask bit flipped":
        packed["mask"][2, 0] ^= 1 << 5
        message = "row 2: its mask marks"
    elif corruption == "offsets shifted":
        packed["row_offsets"][3] += 1
        message = "its mask marks"
    elif corruption == "bit past the last column":
        packed["mask"][1, 1] |= 1 << 62  # column 126 of a 70-column matrix
        message = "its mask marks"  # the count check sees it first
    else:
        packed["values"] = packed["values"][:int(packed["row_offsets"][-1])]
        message = "fewer than the"
    with pytest.raises(ValueError, match=message):
        SparseLinear(70, 6, packed["mask"], packed["values"], packed["row_offsets"])


def test_a_checkpoint_with_corrupted_mask_bytes_is_refused_on_load(tmp_path, tok):
    """The reported case: mask bytes corrupted on disk used to run silently in the C++ kernel with other logits."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = tiny_llama()
    save_compressed(model, tok, str(tmp_path / "c"))
    weights = tmp_path / "c" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith(".mask"))
    tensors[name][0, 0] ^= 0b1011  # three bits of the first row flipped
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match="corrupt"):
        load_compressed(str(tmp_path / "c"))


def test_a_saved_compressed_model_evaluates_like_the_dense_one(tmp_path):
    """README's "Evaluating a saved compressed checkpoint": perplexity and lm-eval zero-shot (the offline smoke task)
    of the loaded compressed model against the pruned dense model it was saved from."""
    from lib.demo.models import tiny_demo_model
    from lib.eval.perplexity import perplexity
    from lib.eval.zeroshot import evaluate_zero_shot
    dense, tokenizer = tiny_demo_model()
    with torch.no_grad():
        for module in dense.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight[lowest_per_row_mask(module.weight.abs(), 0.6)] = 0
    save_compressed(dense, tokenizer, str(tmp_path / "c"))
    model, tok = load_compressed(str(tmp_path / "c"))
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) > 0
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lib.data import evaluation_tokens
    with open(os.path.join(repo, "data", "austen_eval.txt"), encoding="utf-8") as f:
        (tmp_path / "eval.txt").write_text(f.read()[:20000], encoding="utf-8")
    tokens, _ = evaluation_tokens(str(tmp_path / "eval.txt"), tok)
    ppl = perplexity(model, tokens, seqlen=128, max_windows=4, progress=False)
    assert ppl == pytest.approx(perplexity(dense, tokens, seqlen=128, max_windows=4, progress=False), rel=1e-4)
    tasks = os.path.join(repo, "tasks")
    got = evaluate_zero_shot(model, tok, ["tiny_mc"], tasks_dir=tasks, batch_size=4)["tasks"]["tiny_mc"]
    ref = evaluate_zero_shot(dense, tokenizer, ["tiny_mc"], tasks_dir=tasks, batch_size=4)["tasks"]["tiny_mc"]
    assert (got["acc"], got["acc_norm"]) == (ref["acc"], ref["acc_norm"])
