"""Compressed checkpoints and transformers' from_pretrained: refused without this project (in a subprocess that
never imports it), loaded natively as SparseLinear modules with it (hf_quantizer.py), written back by
save_pretrained. Tiny models built in code, no network."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lib.sparse
from lib.pruning.masks import lowest_per_row_mask
from lib.sparse import hf_quantizer as hfq
from lib.sparse.checkpoint import WEIGHTS, is_compressed_dir, load_compressed, save_compressed
from lib.sparse.linear import SparseLinear

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_LINEARS = 2 * 7
# the dense (out, in) shapes of the tiny LLaMA's block Linears; nothing else in the model has them
DENSE_SHAPES = {(64, 64), (32, 64), (160, 64), (64, 160)}


def pruned_llama(seed=0):
    """A tiny LLaMA with biased attention projections, every block Linear 70% zeros per row."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight[lowest_per_row_mask(module.weight.abs().float(), 0.7)] = 0
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return model


def tiny_mixtral(layers: int):
    """A tiny Mixtral (fused experts: 4 experts, top 2), random init."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return MixtralForCausalLM(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok():
    from lib.demo.tiny import train_tokenizer
    return train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=128)


@pytest.fixture(scope="module")
def dense():
    return pruned_llama()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, dense, tok):
    directory = tmp_path_factory.mktemp("hf") / "compressed"
    save_compressed(dense, tok, str(directory))
    return directory


@pytest.fixture(scope="module")
def native(compressed):
    lib.sparse.register()
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(compressed)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, native):
    directory = tmp_path_factory.mktemp("hf") / "round_trip"
    native.save_pretrained(directory)
    return directory


def test_the_directory_says_what_it_is(compressed):
    config = json.loads((compressed / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "atp_sparse" and quant["format"] == hfq.FORMAT
    assert len(quant["sparse_modules"]) == NUM_LINEARS and config["dtype"] == "float32"
    stored = load_file(compressed / WEIGHTS)
    for name in quant["sparse_modules"]:
        assert stored[f"{name}.weight"].shape == (0,)  # the marker
        assert stored[f"{name}.mask"].dtype == torch.int64
        assert (f"{name}.bias" in stored) == ("self_attn" in name)  # attention_bias=True, no MLP bias
    assert is_compressed_dir(str(compressed))


def test_the_model_card_says_what_is_packed_and_its_code_loads_it(compressed, dense):
    card = (compressed / "README.md").read_text()
    linears = [m for m in dense.model.layers.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert f"{NUM_LINEARS} decoder-block Linears are stored bitmask-packed" in card
    assert f"({zeros / weights:.1%} of their {weights:,} weights are zero" in card
    assert "# A pruned LlamaForCausalLM, compressed (atp-bitmask-v2, float32)" in card
    assert "Plain transformers refuses this directory on purpose" in card
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/directory", str(compressed))
    namespace = {}
    exec(code, namespace)  # the card's own lines, as a reader would paste them
    model = namespace["model"]
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == NUM_LINEARS
    torch.testing.assert_close(logits(model, IDS), logits(dense, IDS), rtol=1e-4, atol=1e-4)
    assert namespace["tokenizer"].get_vocab()


@pytest.fixture(scope="module")
def nothing_packed(tmp_path_factory, dense, tok):
    directory = tmp_path_factory.mktemp("hf") / "nothing_packed"
    save_compressed(dense, tok, str(directory), min_sparsity=0.99)
    return directory


@pytest.fixture(scope="module")
def experts_only(tmp_path_factory, tok):
    """A tiny Mixtral whose fused expert tensors are the only packed ones (its Linears are dense)."""
    moe = tiny_mixtral(layers=1)
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() == 3:
                p[p.abs() < p.abs().median()] = 0
    directory = tmp_path_factory.mktemp("hf") / "experts_only"
    saved = save_compressed(moe, tok, str(directory))
    assert saved["sparse_modules"] == 0 and saved["sparse_experts"] == 1
    return directory


@pytest.fixture(scope="module")
def converted_in_memory(tmp_path_factory, tok):
    """sparsify_model, then the model's own save_pretrained (no save_compressed)."""
    from lib.sparse.convert import sparsify_model
    model = pruned_llama()
    sparsify_model(model, verbose=False)
    directory = tmp_path_factory.mktemp("hf") / "converted_in_memory"
    model.save_pretrained(directory)
    return directory


def test_plain_transformers_refuses_packed_directories(compressed, round_trip, nothing_packed, experts_only,
                                                       converted_in_memory):
    """Without this project (nothing of `lib` importable in the child), from_pretrained raises, and says why; a
    directory where nothing was packed loads, as its model card says."""
    assert "Plain transformers loads it as it is" in (nothing_packed / "README.md").read_text()
    assert "No Linear was sparse enough to be stored packed" in (nothing_packed / "README.md").read_text()
    script = textwrap.dedent("""
        import sys
        from transformers import AutoModelForCausalLM
        for directory in sys.argv[1:]:
            try:
                AutoModelForCausalLM.from_pretrained(directory)
                print("LOADED", directory)
            except Exception as error:
                print("REFUSED", type(error).__name__, str(error).splitlines()[0])
        print("lib imported:", any(m == "lib" or m.startswith("lib.") for m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    run = subprocess.run([sys.executable, "-c", script, str(compressed), str(round_trip), str(nothing_packed),
                          str(experts_only), str(converted_in_memory)],
                         cwd=compressed.parent,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "lib imported: False"
    refusals = [line for line in lines if line.startswith("REFUSED RuntimeError")]
    assert len(refusals) == 4 and "ignore_mismatched_sizes" in refusals[0], run.stdout
    assert f"LOADED {nothing_packed}" in lines
    assert run.stderr.count("Unknown quantization type, got atp_sparse") == 5
    assert "Reinit due to size mismatch - ckpt: torch.Size([0]) vs model:torch.Size([64, 64])" in run.stderr
    assert "ckpt: torch.Size([0]) vs model:torch.Size([4, 192, 64])" in run.stderr  # the fused gate_up marker


def test_import_is_cheap():
    run = subprocess.run([sys.executable, "-c", "import sys, lib.sparse; print(sorted({'torch', 'transformers'} & "
                          "set(sys.modules)))"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[]", run.stderr


class AllocationLog(TorchDispatchMode):
    """Shapes of every tensor that an operation produces off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes |= {tuple(t.shape) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        return out


def test_native_load_never_builds_a_dense_weight_and_matches(compressed, dense, monkeypatch):
    lib.sparse.register()
    lib.sparse.register()  # idempotent
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # load in this thread, where the dispatch mode sees it
    log = AllocationLog()
    with log:
        model, info = AutoModelForCausalLM.from_pretrained(compressed, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert {(64, 64), (128, 64)} & log.shapes == {(128, 64)}  # the log works: the embedding was materialised
    assert not DENSE_SHAPES & log.shapes
    sparse = [m for m in model.model.layers.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == NUM_LINEARS and not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    held = {name for m in sparse for name, _ in [*m.named_parameters(), *m.named_buffers()]}
    assert held == {"mask", "values", "row_offsets", "bias"}  # no dense weight kept (`.weight` unpacks on read)
    biased = [m for m in sparse if m.bias is not None]
    assert len(biased) == 2 * 4 and not any(m.bias.requires_grad for m in biased)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    torch.testing.assert_close(logits(model, IDS), logits(dense, IDS), rtol=1e-4, atol=1e-4)
    old, _ = load_compressed(str(compressed))
    assert torch.equal(logits(model, IDS), logits(old, IDS))
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], **greedy), dense.generate(IDS[:1], **greedy))


def test_save_pretrained_writes_the_same_checkpoint_back(compressed, round_trip, native):
    written, original = load_file(round_trip / WEIGHTS), load_file(compressed / WEIGHTS)
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor) and written[key].dtype == tensor.dtype, key
    quant = json.loads((round_trip / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((compressed / "config.json").read_text())["quantization_config"]
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(round_trip)
    assert sum(isinstance(m, SparseLinear) for m in again.modules()) == NUM_LINEARS
    assert torch.equal(logits(again, IDS), logits(native, IDS))
    again.dequantize()  # transformers' API: back to dense nn.Linear modules and a plain config
    assert not any(isinstance(m, SparseLinear) for m in again.modules()) and not again.is_quantized
    assert not hasattr(again.config, "quantization_config")
    torch.testing.assert_close(logits(again, IDS), logits(native, IDS), rtol=1e-5, atol=1e-5)


def test_base_model_and_causal_lm_load_each_others_saves(compressed, native, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM
    base = AutoModel.from_pretrained(compressed)  # the checkpoint's keys carry the "model." prefix, base's do not
    assert isinstance(base.layers[0].mlp.down_proj, SparseLinear)
    base.save_pretrained(tmp_path / "base")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(model, IDS), logits(native, IDS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_and_device_map(compressed, dtype):
    lib.sparse.register()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(compressed, dtype=dtype, device_map="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, SparseLinear) and q_proj.values.dtype == dtype and q_proj.bias.dtype == dtype
    assert q_proj.mask.dtype == torch.int64 and q_proj.row_offsets.dtype == torch.int64
    assert model.model.embed_tokens.weight.dtype == dtype
    # the saved (fp32-pruned) model cast, not one pruned in bf16: bf16's rounding moves 158 weights across the 70% cut
    reference = pruned_llama().to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), rtol=tol, atol=tol)


def test_non_cpu_device_map_and_unsupported_dtype_are_refused(compressed):
    lib.sparse.register()
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"CPU only.*load on the CPU, then model\.dequantize\(\)\.to\('cuda:0'\)"):
        AutoModelForCausalLM.from_pretrained(compressed, device_map={"": "cuda:0"})
    with pytest.raises(ValueError, match="float64"):
        AutoModelForCausalLM.from_pretrained(compressed, dtype=torch.float64)


def test_a_packed_tensor_missing_from_the_checkpoint_is_an_error(compressed, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    state = load_file(broken / WEIGHTS)
    del state["model.layers.1.mlp.up_proj.row_offsets"]
    save_file(state, broken / WEIGHTS, metadata={"format": "pt"})
    lib.sparse.register()
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.\{row_offsets\} missing"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_a_config_field_of_a_later_version_is_refused_by_name(compressed, tmp_path):
    """A field this code does not know may describe tensors it would leave unused: refused, naming the field."""
    later = tmp_path / "later"
    shutil.copytree(compressed, later)
    config = json.loads((later / "config.json").read_text())
    config["quantization_config"]["sparse_attention_heads"] = ["model.layers.0.self_attn"]
    (later / "config.json").write_text(json.dumps(config))
    lib.sparse.register()
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"has sparse_attention_heads, which this version .* does not read"):
        AutoModelForCausalLM.from_pretrained(later)


def test_first_version_directories_still_load(compressed, dense, tmp_path):
    """A directory as the previous save_compressed wrote it: no quantization_config, no markers, v1 manifest."""
    old = tmp_path / "v1"
    shutil.copytree(compressed, old)
    config = json.loads((old / "config.json").read_text())
    names = config.pop("quantization_config")["sparse_modules"]
    (old / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(old / WEIGHTS).items() if k not in {f"{n}.weight" for n in names}}
    save_file(state, old / WEIGHTS, metadata={"format": "atp-bitmask-v1"})
    manifest = json.loads((old / "sparse_manifest.json").read_text())
    (old / "sparse_manifest.json").write_text(json.dumps({**manifest, "format": "atp-bitmask-v1"}))
    model, _ = load_compressed(str(old))
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == NUM_LINEARS
    torch.testing.assert_close(logits(model, IDS), logits(dense, IDS), rtol=1e-4, atol=1e-4)


def test_fused_moe_experts_are_packed_one_matrix_per_expert(tmp_path, tok, monkeypatch):
    """Mixtral's fused expert tensors ([experts, out, in]) load as lists of SparseLinear, never as a dense fused
    tensor, run through transformers' experts interface (experts.py), write back by save_pretrained, and
    `dequantize()` gives the fused tensors back."""
    from transformers import AutoModelForCausalLM
    moe = tiny_mixtral(layers=2)
    with torch.no_grad():
        for module in moe.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight[lowest_per_row_mask(module.weight.abs(), 0.7)] = 0
        for name, p in moe.model.layers.named_parameters():
            if p.dim() == 3:
                p[p.abs() < p.abs().median()] = 0
    fused = {n: p.detach().clone() for n, p in moe.named_parameters() if p.dim() == 3}
    assert sorted(fused) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    saved = save_compressed(moe, tok, str(tmp_path / "moe"))
    assert saved["sparse_experts"] == 2 and saved["dense_fused_experts"] == 0
    quant = json.loads((tmp_path / "moe" / "config.json").read_text())["quantization_config"]
    assert quant["sparse_experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert len(quant["sparse_modules"]) == 8 and quant["dense_fused_experts"] == []
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "8 decoder-block Linears and 4 fused expert tensors (16 expert matrices) are stored bitmask-packed" in card
    lib.sparse.register()
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    log = AllocationLog()
    with log:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert not {tuple(t.shape) for t in fused.values()} & log.shapes  # no fused tensor was ever built
    assert not any(p.dim() == 3 for p in model.parameters())
    assert model.config._experts_implementation == "atp_sparse"
    for name, tensor in fused.items():
        linears = model.get_submodule(name)
        assert len(linears) == 4 and all(isinstance(m, SparseLinear) for m in linears)
        assert all(torch.equal(linears[e].dense_weight(), tensor[e]) for e in range(4))
    torch.testing.assert_close(logits(model, IDS), logits(moe, IDS), rtol=1e-4, atol=1e-4)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(IDS[:1], **greedy), moe.generate(IDS[:1], **greedy))
    model.save_pretrained(tmp_path / "round_trip")
    assert load_file(tmp_path / "round_trip" / WEIGHTS).keys() == load_file(tmp_path / "moe" / WEIGHTS).keys()
    model.dequantize()
    assert model.config._experts_implementation != "atp_sparse"
    for name, tensor in fused.items():
        assert torch.equal(model.get_parameter(name), tensor) and model.get_parameter(name).requires_grad
    torch.testing.assert_close(logits(model, IDS), logits(moe, IDS), rtol=1e-4, atol=1e-4)
