"""spava_ds: Spava sequence-parallel approximate attention for long-video multimodal models."""

from .attention import mesh_attention, sp_attention, spava_attention, ulysses_attention
from .config import BACKENDS, MODE_TABLE, MODES, SpavaConfig, default_anchor_len, default_passing_len
from .layout import MeshLayout, ZigzagLayout, current_layout, make_layout, shard_batch, use_layout
from .integrations.deepspeed import DistributedAttention
from .kernels import dense_causal_attention
from .reference import reference_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DistributedAttention",
    "MODES",
    "MODE_TABLE",
    "MeshLayout",
    "SpavaConfig",
    "ZigzagLayout",
    "current_layout",
    "shard_batch",
    "use_layout",
    "default_anchor_len",
    "default_passing_len",
    "dense_causal_attention",
    "make_layout",
    "mesh_attention",
    "reference_attention",
    "sp_attention",
    "spava_attention",
    "ulysses_attention",
]
