"""Tiny configs, built in code, of the architecture families the pipeline must prune correctly.

Each entry is a function returning a transformers config: 4 decoder blocks, hidden 64, a vocabulary sized for the
test tokenizer, sliding windows shorter than the test sequences, and 4 experts (top 2) for the MoE families.
"""
from __future__ import annotations

import transformers as tf

HIDDEN = 64
LAYERS = 4
WINDOW = 8  # shorter than every sequence the tests replay, so sliding-window masks differ from global ones
EXPERTS = 4

_ATTENTION = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _text(cls, vocab_size: int, **extra):
    return cls(vocab_size=vocab_size, **{**_ATTENTION, **_TOKENS, **extra})


def llama(v):
    return _text(tf.LlamaConfig, v, intermediate_size=160)


def mistral(v):
    return _text(tf.MistralConfig, v, intermediate_size=160, sliding_window=WINDOW)


def qwen2(v):
    return _text(tf.Qwen2Config, v, intermediate_size=160)


def qwen2_sliding(v):
    return _text(tf.Qwen2Config, v, intermediate_size=160, use_sliding_window=True, sliding_window=WINDOW,
                 max_window_layers=2, layer_types=["full_attention", "full_attention", "sliding_attention",
                                                   "sliding_attention"])


def qwen3(v):
    return _text(tf.Qwen3Config, v, intermediate_size=160, head_dim=16)


def phi3(v):
    return _text(tf.Phi3Config, v, intermediate_size=160)


def opt(v):
    return tf.OPTConfig(vocab_size=v, hidden_size=HIDDEN, ffn_dim=160, num_hidden_layers=LAYERS,
                        num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                        do_layer_norm_before=True, **_TOKENS)


def gemma2(v):
    return _text(tf.Gemma2Config, v, intermediate_size=160, head_dim=16, sliding_window=WINDOW)


def gemma3_text(v):
    return _text(tf.Gemma3TextConfig, v, intermediate_size=160, head_dim=16, sliding_window=WINDOW,
                 sliding_window_pattern=2,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def gpt_oss(v):
    return _text(tf.GptOssConfig, v, intermediate_size=32, head_dim=16, num_local_experts=EXPERTS,
                 num_experts_per_tok=2, sliding_window=WINDOW,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def mixtral(v):
    return _text(tf.MixtralConfig, v, intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=2)


def qwen2_moe(v):
    return _text(tf.Qwen2MoeConfig, v, intermediate_size=96, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, num_experts=EXPERTS, num_experts_per_tok=2)


def qwen3_moe(v):
    return _text(tf.Qwen3MoeConfig, v, intermediate_size=96, moe_intermediate_size=32, head_dim=16,
                 num_experts=EXPERTS, num_experts_per_tok=2)


def olmoe(v):
    return _text(tf.OlmoeConfig, v, intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=2)


def deepseek_v3(v):
    return _text(tf.DeepseekV3Config, v, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=EXPERTS,
                 num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                 q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def qwen3_next(v):
    return _text(tf.Qwen3NextConfig, v, intermediate_size=96, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=2, head_dim=16,
                 linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                 layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"])


def llava(v):
    text = llama(v)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, projection_dim=32)
    return tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=v - 1,
                          vision_feature_layer=-1, tie_word_embeddings=False)


def qwen2_5_vl(v):
    text = dict(vocab_size=v, **{**_ATTENTION, **_TOKENS}, intermediate_size=160,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                  fullatt_block_indexes=[1], window_size=16, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)
    return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=v - 1, video_token_id=v - 2,
                               vision_start_token_id=v - 3, tie_word_embeddings=False)


def gemma3(v):
    text = gemma3_text(v)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=32, patch_size=8)
    return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=v - 1,
                           boi_token_index=v - 2, eoi_token_index=v - 3)


# Beyond the list: families that each exercise one more rule (found by a sweep over 58 further families)
_MOE_TOP2 = dict(num_experts_per_tok=2)


def llama4_text(v):  # experts stored [in, out] without saying so (bmm(x, W)): the layout is observed
    return _text(tf.Llama4TextConfig, v, intermediate_size=32, intermediate_size_mlp=96, head_dim=16,
                 num_local_experts=EXPERTS, moe_layers=[1, 3], interleave_moe_layer_step=2,
                 attention_chunk_size=WINDOW, no_rope_layers=[1, 1, 1, 0],
                 layer_types=["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"],
                 **_MOE_TOP2)


def hunyuan_v1_moe(v):  # a router one level below the MoE module (mlp.gate.wg)
    return _text(tf.HunYuanMoEV1Config, v, intermediate_size=32, num_experts=EXPERTS, moe_topk=2, head_dim=16)


def ernie4_5_moe(v):  # a (1, experts) correction vector, dense first and last blocks
    return _text(tf.Ernie4_5_MoeConfig, v, intermediate_size=96, moe_intermediate_size=32, moe_k=2,
                 moe_num_experts=EXPERTS, moe_num_shared_experts=1, moe_layer_start_index=1,
                 moe_layer_end_index=LAYERS - 1, head_dim=16)


def olmo_hybrid(v):  # a stack of two block classes (linear attention and attention)
    return _text(tf.OlmoHybridConfig, v, intermediate_size=160, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16,
                 layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])


def bamba(v):  # Mamba-2 and attention layers
    return _text(tf.BambaConfig, v, intermediate_size=160, attn_layer_indices=[1, 3], mamba_n_heads=8,
                 mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8)


def falcon_h1(v):  # Mamba-2 and attention side by side in every block
    return _text(tf.FalconH1Config, v, intermediate_size=160, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8,
                 mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8)


def qwen3_vl_moe(v):  # fused experts whose hub layout transformers transposes on load (a weight converter)
    text = dict(vocab_size=v, **{**_ATTENTION, **_TOKENS}, intermediate_size=96, moe_intermediate_size=32,
                head_dim=16, num_experts=EXPERTS, num_experts_per_tok=2,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    return tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=v - 1, video_token_id=v - 2,
                               vision_start_token_id=v - 3, tie_word_embeddings=False)


def jamba(v):  # Mamba-1 layers hold a 2-D state matrix (A_log) no rule explains: refused before loading
    return _text(tf.JambaConfig, v, intermediate_size=32, num_experts=EXPERTS, expert_layer_period=2,
                 expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False,
                 mamba_d_state=8, mamba_dt_rank=8, **_MOE_TOP2)


FAMILIES = {f.__name__: f for f in (llama, mistral, qwen2, qwen2_sliding, qwen3, phi3, opt, gemma2, gemma3_text,
                                      gpt_oss, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, qwen3_next, llava,
                                      qwen2_5_vl, gemma3, llama4_text, hunyuan_v1_moe, ernie4_5_moe, olmo_hybrid,
                                      bamba, falcon_h1, qwen3_vl_moe)}
REFUSED = {"jamba": jamba}  # built and loaded fine by transformers, refused by this tool with the parameter named
MOE = {"gpt_oss", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "qwen3_next", "llama4_text",
       "hunyuan_v1_moe", "ernie4_5_moe", "qwen3_vl_moe"}
MULTIMODAL = {"llava", "qwen2_5_vl", "gemma3", "qwen3_vl_moe"}
