"""Megatron-core integration: ``SpavaCoreAttention``, a ``core_attention`` submodule, and a GPT layer spec using it.

Megatron calls core attention after the q/k/v projections and RoPE, with this rank's tokens of the sequence,
sequence first: query ``[sq, b, np, hn]``, key/value ``[sq, b, ng, hn]`` (GQA heads not repeated), and expects
``[sq, b, np * hn]`` back. The tokens are in one of two orders:

* Megatron's own context-parallel sharding (``get_batch_on_this_cp_rank``): the sequence cut into 2*CP chunks,
  rank r holding chunks r and 2*CP-1-r. That is ``ZigzagLayout(S, 0, CP, anchor_len=0)``, so when no layout is
  set this module uses it; only the exact modes (``ring``, ``ulysses``, and ``dense`` at CP = 1) apply, since
  Spava needs a query block.
* A ``ZigzagLayout`` the user sharded the batch with (``spava_ds.shard_batch``) and made current with
  ``spava_ds.use_layout(layout)`` around the forward (and backward) pass: anchor and query replicated on every
  rank, as Spava needs.

Works with megatron-core 0.16 and 0.19: the constructor takes the keywords of Megatron's ``CoreAttentionBuilder``
protocol and ignores any others (newer versions add some), and the context-parallel group comes from
``pg_collection.cp`` when given, else from ``parallel_state``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from .. import comm
from ..attention import sp_attention
from ..config import MODE_TABLE, SpavaConfig
from ..layout import ZigzagLayout, current_layout

# Modes that need no replicated query block and use the zigzag chunks, so they run in Megatron's own CP sharding
# without a user layout.
_MEGATRON_LAYOUT_MODES = tuple(m for m, spec in MODE_TABLE.items() if spec.layout == "zigzag" and not spec.needs_query)


def _mask_type_name(mask_type: Any) -> str:
    # AttnMaskType is an enum in every release so far; accept its name as a string too.
    return mask_type.name if isinstance(mask_type, AttnMaskType) else str(mask_type)


class SpavaCoreAttention(MegatronModule):
    """Megatron ``core_attention`` computing ``spava_ds.sp_attention`` over the context-parallel group.

    Args (as Megatron's ``SelfAttention`` passes them, all keywords):
        config: the ``TransformerConfig``.
        layer_number: 1-based global layer number; layer ``layer_number - 1`` picks a per-layer ``passing_len``.
        attn_mask_type: must be causal (Spava is causal by construction).
        attention_type: ``"self"`` only.
        attention_dropout: must be 0 when training (defaults to ``config.attention_dropout``).
        softmax_scale: default ``head_dim ** -0.5``.
        cp_comm_type: ignored (the mode decides the communication).
        pg_collection: its ``cp`` group is the sequence-parallel group; without it, ``parallel_state``'s.
        spava_config: a ``SpavaConfig`` (mode, lengths, backend), given through the spec's ``params``; default:
            the current layout's config, or mode ``ring`` when no layout is set.
        **kwargs: anything newer Megatron versions pass (``k_channels``, ...) is accepted and ignored.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 spava_config: Optional[SpavaConfig] = None, **kwargs):
        super().__init__(config=config)
        if spava_config is not None and not isinstance(spava_config, SpavaConfig):
            raise TypeError(f"SpavaCoreAttention: spava_config must be a SpavaConfig, got {type(spava_config)}")
        if attention_type != "self":
            raise ValueError(f"SpavaCoreAttention supports self-attention only, got attention_type={attention_type!r}")
        if _mask_type_name(attn_mask_type) != "causal":
            raise ValueError(f"SpavaCoreAttention is causal attention; attn_mask_type {attn_mask_type} is not "
                             "supported")
        # Features that change the attention itself, which Spava does not implement: fail at build time.
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SpavaCoreAttention: softmax_type={config.softmax_type!r} is not supported (vanilla only)")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SpavaCoreAttention: sliding-window attention (config.window_size) is not supported")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise ValueError("SpavaCoreAttention: qk_clip / log_max_attention_logit are not supported")
        # config.apply_query_key_layer_scaling needs nothing here: Megatron divides the scale by the layer number
        # and multiplies it back inside the softmax, which is the identity in exact arithmetic.
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.spava_config = spava_config
        if spava_config is not None and getattr(config, "num_layers", None):
            spava_config.check_num_layers(config.num_layers)
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _group(self) -> Optional[dist.ProcessGroup]:
        group = self.cp_group
        if group is None:
            group = parallel_state.get_context_parallel_group(check_initialized=False)
        if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # group=None would mean the whole world to sp_attention: refuse rather than attend across DP ranks.
            raise RuntimeError("SpavaCoreAttention: no context-parallel group; call megatron.core.parallel_state."
                               "initialize_model_parallel(..., context_parallel_size=CP) or pass a pg_collection "
                               "with a cp group")
        return group

    def _layout_and_config(self, sq: int, cp: int):
        layout = current_layout()
        if layout is not None:
            if layout.world_size != cp:
                raise ValueError(f"SpavaCoreAttention: the current layout is for {layout.world_size} ranks, the "
                                 f"context-parallel group has {cp}")
            return layout, self.spava_config if self.spava_config is not None else layout.config
        config = self.spava_config if self.spava_config is not None else SpavaConfig(mode="ring")
        if config.mode not in _MEGATRON_LAYOUT_MODES:
            raise ValueError(f"SpavaCoreAttention: mode {config.mode!r} needs a layout with a query block: shard the "
                             "batch with a ZigzagLayout (spava_ds.shard_batch) and run the model inside "
                             f"spava_ds.use_layout(layout); without one only {_MEGATRON_LAYOUT_MODES} work")
        if cp > 1 and sq % 2:
            raise ValueError(f"SpavaCoreAttention: {sq} local tokens cannot be Megatron's two CP chunks; the "
                             f"sequence length must be a multiple of 2 * context_parallel_size = {2 * cp}")
        # Megatron's CP sharding: 2*CP equal chunks, no anchor, no query block.
        config = dataclasses.replace(config, anchor_len=0)
        return ZigzagLayout(sq * cp, 0, cp, config), config

    def _check_mask(self, attention_mask: Optional[torch.Tensor], layout: ZigzagLayout, rank: int) -> None:
        """Accept no mask or Megatron's causal mask (True = hidden), in local or global key order; refuse others.

        Spava is causal by construction, so a causal mask carries no information; a padding mask would be
        silently ignored, hence the error.
        """
        if attention_mask is None:
            return
        sq, total = layout.local_len(rank), layout.total_len
        pos_q = layout.positions(rank, device=attention_mask.device)
        if attention_mask.shape[-1] == sq:  # keys in local order (e.g. CP = 1, or a mask sharded on both dims)
            pos_k = pos_q
        elif attention_mask.shape[-1] == total:  # keys in global order (get_batch_on_this_cp_rank shards dim 2)
            pos_k = torch.arange(total, device=attention_mask.device)
        else:
            pos_k = None
        ok = (pos_k is not None and attention_mask.dim() >= 2 and attention_mask.shape[-2] == sq
              and attention_mask.dtype == torch.bool)
        if ok:
            causal_hidden = pos_k[None, :] > pos_q[:, None]
            ok = bool((attention_mask == causal_hidden).all())
        if not ok:
            raise ValueError(f"SpavaCoreAttention supports causal attention only: got an attention_mask of shape "
                             f"{tuple(attention_mask.shape)} ({attention_mask.dtype}) that is not the causal mask of "
                             f"this rank's tokens; padding masks are not supported (pass attention_mask=None)")

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SpavaCoreAttention: packed sequences (packed_seq_params / THD) are not "
                                      "supported; use one sequence per batch row")
        if attention_bias is not None:
            raise NotImplementedError("SpavaCoreAttention: attention_bias is not supported")
        if attn_mask_type is not None and _mask_type_name(attn_mask_type) != "causal":
            raise ValueError(f"SpavaCoreAttention is causal attention; attn_mask_type {attn_mask_type} is not "
                             "supported")
        if self.training and self.dropout:
            raise ValueError(f"SpavaCoreAttention has no attention dropout: set attention_dropout=0.0 in the "
                             f"TransformerConfig (got {self.dropout})")
        if query.dim() != 4 or key.shape[0] != query.shape[0]:
            raise ValueError(f"SpavaCoreAttention expects query [sq, b, np, hn] and key/value of the same length "
                             f"(no KV cache); got query {tuple(query.shape)}, key {tuple(key.shape)}")
        group = self._group()
        rank, cp = comm.group_rank_size(group)
        sq, b, heads, head_dim = query.shape
        layout, config = self._layout_and_config(sq, cp)
        self._check_mask(attention_mask, layout, rank)
        # sbhd -> bshd, the core API's layout (views: no copy here).
        out = sp_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), layout, config,
                           group, layer_idx=self.layer_number - 1, scale=self.softmax_scale)
        return out.transpose(0, 1).reshape(sq, b, heads * head_dim)


def get_gpt_layer_spec_with_spava(spava_config: Optional[SpavaConfig] = None, **local_spec_kwargs) -> ModuleSpec:
    """Megatron's local (Transformer-Engine-free) GPT layer spec with ``SpavaCoreAttention`` as core attention.

    ``spava_config`` is handed to every layer's ``SpavaCoreAttention`` (None: the current layout's config, or
    exact ring attention without a layout). ``local_spec_kwargs`` go to ``get_gpt_layer_local_spec``
    (``normalization``, ``qk_layernorm``, ``num_experts``, ...). Use it as ``TransformerBlock(config, spec)`` or
    ``GPTModel(config, transformer_layer_spec=spec, ...)``.
    """
    if local_spec_kwargs.get("multi_latent_attention"):
        raise ValueError("get_gpt_layer_spec_with_spava: multi-latent attention is not supported")
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SpavaCoreAttention, params={"spava_config": spava_config})
    return spec
