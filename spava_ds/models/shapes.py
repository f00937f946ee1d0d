"""The published shapes of the supported checkpoints: one table, read by fine-tuning (``train_model``), the
inference benchmarks (``benchmarks.shapes``) and the cost models of the launch scripts (``scaling_model``,
``host_before_after``). Numbers only; each builder adds what its own runs need (token ids, context length).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of one model's transformers config.

    Args:
        label: the name a reader knows it by ("Qwen2.5-VL-7B").
        family: the checkpoint's ``model_type`` (``spava_ds.models`` picks the class by it).
        text: the language model's config fields (layers, widths, heads, vocabulary, RoPE).
        vision: the vision tower's config fields (without the merger's output width: the language model's).
        tie_word_embeddings: the checkpoint's own value; None where this table does not record it.
        tokens: the checkpoint's special token ids; None where this table does not record them.
    """

    label: str
    family: str
    text: dict
    vision: dict
    tie_word_embeddings: Optional[bool] = None
    tokens: Optional[dict] = None

    @property
    def heads(self) -> int:
        return self.text["num_attention_heads"]

    @property
    def kv_heads(self) -> int:
        return self.text["num_key_value_heads"]

    @property
    def head_dim(self) -> int:
        return self.text.get("head_dim", self.text["hidden_size"] // self.heads)

    @property
    def layers(self) -> int:
        return self.text["num_hidden_layers"]


# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (config.json): the language models differ; the vision tower is the
# same 32-layer ViT, its merger projecting to the language model's width.
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
_QWEN25_TOKENS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                      vision_end_token_id=151653, image_token_id=151655, video_token_id=151656)
_QWEN25_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}

PUBLISHED_SHAPES: Dict[str, ModelShape] = {
    "3b": ModelShape("Qwen2.5-VL-3B", "qwen2_5_vl", text=dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, rope_parameters=_QWEN25_ROPE),
        vision=_QWEN25_VISION, tie_word_embeddings=True, tokens=_QWEN25_TOKENS),
    "7b": ModelShape("Qwen2.5-VL-7B", "qwen2_5_vl", text=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_parameters=_QWEN25_ROPE),
        vision=_QWEN25_VISION, tie_word_embeddings=False, tokens=_QWEN25_TOKENS),
    # InternVL3-2B: InternViT-300M (448x448 tiles, 256 tokens a frame) + Qwen2.5-1.5B
    "internvl3-2b": ModelShape("InternVL3-2B", "internvl", text=dict(
        num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        vocab_size=151674, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), vision=dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=[448, 448],
        patch_size=[14, 14])),
    # Qwen3-VL-8B: 27-block ViT with DeepStack taps at 8, 16, 24 + Qwen3-8B (interleaved M-RoPE)
    "qwen3-vl-8b": ModelShape("Qwen3-VL-8B", "qwen3_vl", text=dict(
        num_hidden_layers=36, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True}), vision=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
}
