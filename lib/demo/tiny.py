"""Tiny, offline, seeded models and tokenizers for the demo and the tests.

Nothing here touches a hub: the tokenizer is a byte-level BPE trained on local text in about a second, and the
models are random-initialised from a small config of a real architecture family.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (deterministic for the same input)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_config(family: str = "llama", vocab_size: int = 512, num_layers: int = 4, hidden: int = 64,
                max_positions: int = 256) -> PretrainedConfig:
    """A small config of a real architecture family: llama, mistral, qwen2 or opt."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return cls(hidden_size=hidden, intermediate_size=hidden * 2 + 32, num_hidden_layers=num_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                   tie_word_embeddings=False, **common)
    if family == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=hidden * 2 + 32, num_hidden_layers=num_layers,
                         num_attention_heads=4, max_position_embeddings=max_positions,
                         word_embed_proj_dim=hidden, do_layer_norm_before=True, **common)
    raise ValueError(f"unknown tiny model family {family!r}")


def build_tiny_model(family: str = "llama", seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A random-initialised causal LM, identical for the same seed and config."""
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
