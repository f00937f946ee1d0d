"""The models the benchmarks time: random-weight models of published shapes (Qwen2.5-VL-3B/7B, InternVL3-2B,
Qwen3-VL-8B), the embedded tiny checkpoint and tiny random models of the other families (CPU runs)."""

from __future__ import annotations

import copy

import torch

from ..models.shapes import PUBLISHED_SHAPES
from . import tiny

# The published checkpoints' shapes (``models.shapes``), random weights. The family picks the transformers class
# (spava_ds.models); the special tokens come from the tiny tokenizer of the family.
SHAPES = PUBLISHED_SHAPES


TINY_FAMILIES = {"tiny-qwen3-vl": "qwen3_vl", "tiny-internvl": "internvl"}  # CPU runs of the other families
SHAPE_LABELS = {**{name: shape.label for name, shape in SHAPES.items()}, "tiny": "tiny Qwen2.5-VL",
                "tiny-qwen3-vl": "tiny Qwen3-VL", "tiny-internvl": "tiny InternVL3"}


def shape_tokenizer(shape: str):
    """The tiny tokenizer of the shape's family (its special tokens and chat template): prompts only need these.
    ``shape``: one of ``SHAPES``, ``tiny`` (the embedded checkpoint) or one of ``TINY_FAMILIES``."""
    family = TINY_FAMILIES.get(shape) or (None if shape == "tiny" else SHAPES[shape].family)
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
    # tie_word_embeddings is left to each config class (untied for Qwen2.5-VL, also at 3B whose checkpoint ties them):
    # the benchmarks' models have always been built so
    text = dict(copy.deepcopy(spec.text), max_position_embeddings=262144, rms_norm_eps=1e-6,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = copy.deepcopy(spec.vision)
    if spec.family == "internvl":
        return InternVLConfig(vision_config=vision, text_config=dict(text, model_type="qwen2"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=256,
                              downsample_ratio=0.5, tie_word_embeddings=False)
    config_class = Qwen3VLConfig if spec.family == "qwen3_vl" else Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
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
