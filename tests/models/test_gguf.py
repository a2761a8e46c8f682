"""GGUF loading: a tiny LLaMA written to a .gguf here must come back with the same weights, tokenizer and logits,
and the loaded model must save and reload like any plain transformers model."""
import json
import os

import numpy as np
import pytest
import torch

from lib.models import gguf as gguf_loading
from lib.errors import UserError
from lib.models.gguf import find_smollm2_gguf, is_gguf_file, load_gguf_model
from lib.demo.tiny import build_tiny_model, train_tokenizer

gguf = pytest.importorskip("gguf")

CORPUS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "The family of Dashwood had long been settled in Sussex. Their estate was large.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
] * 4
PROBE = "A single man of good fortune settled in Sussex, handsome and clever."

# Hugging Face LLaMA parameter name -> llama.cpp tensor name (per block, then the ones outside blocks).
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def to_llama_cpp_rope_layout(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows of each head interleaved for its rotary layout; transformers undoes this on load."""
    rows_per_half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows_per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, block, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{block}.{BLOCK_NAMES[module]}.{suffix}"


def write_tiny_llama_gguf(path, model, tokenizer) -> None:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    specials = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)

    for hf_name, tensor in model.state_dict().items():
        weight = tensor.detach().numpy().astype(np.float32)
        if ".q_proj." in hf_name:
            weight = to_llama_cpp_rope_layout(weight, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            weight = to_llama_cpp_rope_layout(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_tensor_name(hf_name), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = train_tokenizer(CORPUS, vocab_size=320)
    model = build_tiny_model("llama", seed=3, num_layers=2, hidden=64, vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(path, model, tokenizer)
    loaded_model, loaded_tokenizer = load_gguf_model(str(path))
    return model, tokenizer, path, loaded_model, loaded_tokenizer


def test_loaded_weights_equal_written_weights(tiny_gguf):
    original, _, _, loaded, _ = tiny_gguf
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 64
    expected, got = original.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for name in expected:  # q/k included: their rotary re-layout must round-trip exactly
        assert torch.equal(got[name], expected[name]), name


def test_loaded_model_computes_the_same_logits(tiny_gguf):
    original, tokenizer, _, loaded, _ = tiny_gguf
    ids = torch.tensor([tokenizer(PROBE).input_ids])
    with torch.no_grad():
        want, got = original(ids).logits, loaded(ids).logits
    assert got.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # rms eps goes through float32 in the file


def test_tokenizer_from_metadata_matches_the_trained_one(tiny_gguf):
    _, tokenizer, _, _, loaded_tokenizer = tiny_gguf
    assert loaded_tokenizer(PROBE).input_ids == tokenizer(PROBE).input_ids
    assert loaded_tokenizer.decode(tokenizer(PROBE).input_ids) == PROBE
    assert loaded_tokenizer.bos_token == "<s>" and loaded_tokenizer.eos_token == "</s>"


def test_special_tokens_are_set_from_the_files_metadata(tiny_gguf):
    """transformers before 5.20 gave a GGUF tokenizer its BOS token as EOS; the loader puts back what the file
    names (here on a copy of the loaded tokenizer spoiled the same way, since this transformers no longer does it)."""
    import copy

    from lib.models.gguf import _special_tokens_from_metadata

    _, _, path, _, loaded_tokenizer = tiny_gguf
    spoiled = copy.deepcopy(loaded_tokenizer)
    spoiled.eos_token = spoiled.bos_token
    assert spoiled.eos_token == "<s>"
    _special_tokens_from_metadata(spoiled, str(path))
    assert spoiled.bos_token == "<s>" and spoiled.eos_token == "</s>"
    assert spoiled.eos_token_id == loaded_tokenizer.convert_tokens_to_ids("</s>")


def test_saves_and_reloads_as_plain_checkpoint(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, _, loaded, loaded_tokenizer = tiny_gguf
    assert getattr(loaded, "hf_quantizer", None) is None
    assert not hasattr(loaded.config, "quantization_config")
    loaded.save_pretrained(tmp_path)
    loaded_tokenizer.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    before, after = loaded.state_dict(), reloaded.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert AutoTokenizer.from_pretrained(tmp_path)(PROBE).input_ids == loaded_tokenizer(PROBE).input_ids


def test_is_gguf_file(tiny_gguf, tmp_path):
    _, _, path, _, _ = tiny_gguf
    assert is_gguf_file(str(path))
    assert not is_gguf_file(str(tmp_path / "missing.gguf"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    assert not is_gguf_file(str(other))


def test_unreadable_file_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="cannot load GGUF"):
        load_gguf_model(str(bad))
    with pytest.raises(UserError, match="not an existing"):
        load_gguf_model(str(tmp_path / "absent.gguf"))


def test_missing_gguf_package_is_a_user_error(tiny_gguf, monkeypatch):
    _, _, path, _, _ = tiny_gguf
    real_find_spec = gguf_loading.importlib.util.find_spec
    monkeypatch.setattr(gguf_loading.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(UserError, match="pip install gguf"):
        load_gguf_model(str(path))


def test_find_smollm2_gguf_is_none_or_an_existing_file():
    found = find_smollm2_gguf()
    assert found is None or (os.path.isfile(found) and found.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_quiet_loading_silences_the_gguf_conversion_bar(tiny_gguf, capfd):
    path = tiny_gguf[2]
    load_gguf_model(str(path), progress=True)
    assert "Converting and de-quantizing" in capfd.readouterr().err  # the bar this test is about exists
    load_gguf_model(str(path), progress=False)
    assert "Converting and de-quantizing" not in capfd.readouterr().err


def test_bad_allocation_for_a_gguf_model_is_refused_before_its_tensors_are_read(tiny_gguf, cli, text_files,
                                                                                monkeypatch, tmp_path):
    """The allocation's checks need the number of decoder blocks: read from the file's metadata (as a directory's
    config.json is read) rather than after unpacking every tensor, which takes minutes for a large quantized model.
    The file's own block count in the error shows where it came from."""
    import lib.models.loading as loading
    _, _, path, loaded, _ = tiny_gguf
    loads = []
    real = loading.load_model_and_tokenizer
    monkeypatch.setattr(loading, "load_model_and_tokenizer",
                        lambda *args, **kwargs: loads.append(args[0]) or real(*args, **kwargs))
    reads = []  # the metadata read takes seconds for a real model's file: once per run
    read_config = loading.config_from_checkpoint
    monkeypatch.setattr(loading, "config_from_checkpoint",
                        lambda name: reads.append(name) or read_config(name))
    base = ["--model", path, "--calib_data", text_files.calib, "--eval_data", text_files.eval, "--nsamples", "2",
            "--seqlen", "32", "--max_eval_windows", "2", "--quiet", "--results", tmp_path / "run.json"]
    blocks = loaded.config.num_hidden_layers
    code, _, err = cli(*base, "--sparsity_ratio", "0.7", "--beta", "0.9")
    assert code == 3 and f"--beta 0.9 is illegal for sparsity 0.7 and {blocks} blocks" in err, err
    assert loads == [] and not (tmp_path / "run.json").exists() and reads == [str(path)]
    code, _, err = cli(*base, "--sparsity_type", "2:3")  # a width check from the file's shapes, also before loading
    assert code == 2 and "--sparsity_type 2:3" in err and loads == [], err
    code, _, err = cli(*base, "--sparsity_ratio", "0.5", "--beta", "0.01")  # control: a legal run loads the file
    assert code == 0 and loads == [str(path)], err
