"""The models the benchmarks time: random-weight models of published shapes (Qwen2.5-VL-3B/7B, InternVL3-2B,
Qwen3-VL-8B), the embedded tiny checkpoint and tiny random models of the other families (CPU runs)."""

from __future__ import annotations

import torch

from . import tiny

# Shapes of the published checkpoints (text: language model; vision: tower), random weights. The family picks the
# transformers class (spava_ds.models); the special tokens come from the tiny tokenizer of the family.
QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                     fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SHAPES = {
    "3b": dict(family="qwen2_5_vl", vision=QWEN25_VISION, text=dict(
        num_hidden_layers=36, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
        vocab_size=151936, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
    "7b": dict(family="qwen2_5_vl", vision=QWEN25_VISION, text=dict(
        num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        vocab_size=152064, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})),
    # InternVL3-2B: InternViT-300M (448x448 tiles, 256 tokens a frame) + Qwen2.5-1.5B
    "internvl3-2b": dict(family="internvl", vision=dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=[448, 448],
        patch_size=[14, 14]), text=dict(
        num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        vocab_size=151674, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen3-VL-8B: 27-block ViT with DeepStack taps at 8, 16, 24 + Qwen3-8B (interleaved M-RoPE)
    "qwen3-vl-8b": dict(family="qwen3_vl", vision=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]), text=dict(
        num_hidden_layers=36, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True})),
}


TINY_FAMILIES = {"tiny-qwen3-vl": "qwen3_vl", "tiny-internvl": "internvl"}  # CPU runs of the other families
SHAPE_LABELS = {"3b": "Qwen2.5-VL-3B", "7b": "Qwen2.5-VL-7B", "internvl3-2b": "InternVL3-2B",
                "qwen3-vl-8b": "Qwen3-VL-8B", "tiny": "tiny Qwen2.5-VL", "tiny-qwen3-vl": "tiny Qwen3-VL",
                "tiny-internvl": "tiny InternVL3"}


def shape_tokenizer(shape: str):
    """The tiny tokenizer of the shape's family (its special tokens and chat template): prompts only need these.
    ``shape``: one of ``SHAPES``, ``tiny`` (the embedded checkpoint) or one of ``TINY_FAMILIES``."""
    family = TINY_FAMILIES.get(shape) or (None if shape == "tiny" else SHAPES[shape]["family"])
    spec = tiny.FAMILIES.get(family)
    if spec is None:  # Qwen2.5-VL: the embedded checkpoint's tokenizer
        return tiny.build_tokenizer()
    return tiny.build_tokenizer(spec["specials"], spec["template"])


def build_config(shape: str, tokenizer):
    """The transformers config of ``shape`` (``SHAPES``) with the tokenizer's special token ids."""
    from transformers import InternVLConfig, Qwen2_5_VLConfig, Qwen3VLConfig

    spec = SHAPES[shape]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = dict(spec["text"], max_position_embeddings=262144, rms_norm_eps=1e-6, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    if spec["family"] == "internvl":
        return InternVLConfig(vision_config=spec["vision"], text_config=dict(text, model_type="qwen2"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=256,
                              downsample_ratio=0.5, tie_word_embeddings=False)
    config_class = Qwen3VLConfig if spec["family"] == "qwen3_vl" else Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=dict(spec["vision"], out_hidden_size=text["hidden_size"]),
                        video_token_id=ids["<|video_pad|>"], image_token_id=ids["<|image_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        eos_token_id=ids["<|im_end|>"])


def build_model(shape: str, tokenizer, device):
    """A random-weight model of ``shape`` in bf16: built on the meta device, then materialised on ``device`` and
    initialised there by transformers' own ``initialize_weights`` (normal weights, unit norms, the rotary buffers);
    no initialisation loop on the CPU. Its language model runs ``attn_implementation="spava"``."""
    from ..integrations.transformers import spava_attn_implementation
    from ..models import family_class

    config = build_config(shape, tokenizer)
    model_class = family_class(config.model_type).model_class()
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16,
                                         attn_implementation=spava_attn_implementation(config))
    model.to_empty(device=device)
    with torch.no_grad():
        model.initialize_weights()
    model.tie_weights()
    return model.eval()


def load_model(shape: str, tokenizer, device: torch.device):
    """The model of any shape: a published one (``build_model``, on ``device``), the embedded tiny checkpoint
    (``tiny``) or a tiny random model of another family (``TINY_FAMILIES``), these two in fp32 on the CPU."""
    from ..integrations.transformers import spava_attn_implementation
    from ..models import family_class

    if shape == "tiny":
        from ..assets import tiny_model_dir
        from ..models import load

        return load(tiny_model_dir(), torch.device("cpu"), torch.float32, tokenizer=False)[0].eval()
    if shape in TINY_FAMILIES:
        config = tiny.build_family_config(TINY_FAMILIES[shape], tokenizer)
        model = family_class(config.model_type).model_class()._from_config(
            config, dtype=torch.float32, attn_implementation=spava_attn_implementation(config)).eval()
        tiny.init_weights(model)
        return model
    return build_model(shape, tokenizer, device)
