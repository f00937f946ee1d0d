"""spava_ds: Spava sequence-parallel approximate attention for long-video multimodal models."""

from .attention import spava_attention
from .config import BACKENDS, MODES, SpavaConfig, default_anchor_len, default_passing_len
from .layout import ZigzagLayout, current_layout, shard_batch, use_layout
from .reference import dense_causal_attention, reference_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MODES",
    "SpavaConfig",
    "ZigzagLayout",
    "current_layout",
    "shard_batch",
    "use_layout",
    "default_anchor_len",
    "default_passing_len",
    "dense_causal_attention",
    "reference_attention",
    "spava_attention",
]
