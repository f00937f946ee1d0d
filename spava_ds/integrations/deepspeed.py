"""DeepSpeed integration: a drop-in for ``deepspeed.sequence.layer.DistributedAttention`` and the JSON config.

Changing one import moves a DeepSpeed-Ulysses model to Spava::

    from deepspeed.sequence.layer import DistributedAttention      # before
    from spava_ds.integrations.deepspeed import DistributedAttention  # after

The constructor and ``forward`` take the same arguments as DeepSpeed 0.19.8's. What changes is the sharding: Ulysses
feeds each rank a contiguous slice of the sequence, Spava the zigzag share of ``ZigzagLayout`` (anchor, blocks r
and 2W-1-r, query), so the batch is sharded with ``sp_shard_batch`` and the forward runs inside
``with spava_ds.use_layout(layout):``. See docs/deepspeed.md.

This module imports DeepSpeed only in ``sequence_parallel_group``: the attention itself runs on torch.distributed.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import comm
from ..attention import sp_attention
from ..config import SpavaConfig
from ..layout import ZigzagLayout, current_layout, shard_batch

__all__ = ["DistributedAttention", "bind_sequence_parallel_group", "replicated_token_weights",
           "read_deepspeed_json", "sequence_parallel_group", "sp_shard_batch", "spava_config_from_deepspeed"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: the NeoX RoPE convention DeepSpeed applies."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of ``t``; the rest pass through (partial rotary)."""
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    t_rot = t_rot * cos + _rotate_half(t_rot) * sin
    return t_rot if t_pass.shape[-1] == 0 else torch.cat((t_rot, t_pass), dim=-1)


class DistributedAttention(torch.nn.Module):
    """Sequence-parallel attention with the interface of ``deepspeed.sequence.layer.DistributedAttention``.

    Args:
        local_attention: DeepSpeed's local attention module. Called only in mode ``"ulysses"``, exactly as DeepSpeed
            calls it: on the full sequence with ``heads/W`` heads, in the input's layout (``[b, S, h/W, d]`` for
            ``batch_dim_idx=0``, ``[S, b, h/W, d]`` for 1), with the forward's extra ``*args, **kwargs``; it must
            return the same 4-D layout. ``None`` means causal SDPA. The other modes run Spava's own causal kernels.
        sequence_process_group: the sequence-parallel group (see ``sequence_parallel_group``); ``None`` = world.
        scatter_idx, gather_idx, sp_stream: accepted for compatibility and unused: Spava does not all-to-all the
            inputs, and its communication overlap is ``SpavaConfig.overlap``.
        num_kv_heads: optional; when given, every forward checks that the key tensor has this many heads (GQA is
            native here, so no uneven head partition needs it).
        config: the ``SpavaConfig`` (its ``mode`` picks the algorithm); ``None`` uses the layout's config.
        layer_idx: this layer's index, needed when ``config.passing_len`` is a per-layer list.
    """

    def __init__(self, local_attention: Optional[Callable], sequence_process_group: Optional[dist.ProcessGroup],
                 scatter_idx: int = 2, gather_idx: int = 0, sp_stream=None, num_kv_heads: Optional[int] = None,
                 config: Optional[SpavaConfig] = None, layer_idx: Optional[int] = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, SpavaConfig):
            raise TypeError(f"DistributedAttention: config must be a SpavaConfig or None, got {type(config).__name__}"
                            " (use spava_config_from_deepspeed to read the JSON's \"spava\" block)")
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx, self.gather_idx, self.sp_stream = scatter_idx, gather_idx, sp_stream
        self.num_kv_heads = num_kv_heads
        self.config = config
        self.layer_idx = layer_idx
        self._warned_unused_args = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_dim_idx: int,
                rotary_pos_emb=None, *args: Any, layout: Optional[ZigzagLayout] = None,
                layer_idx: Optional[int] = None, **kwargs: Any) -> torch.Tensor:
        """Attention over this rank's tokens, in the input's layout.

        Args:
            query, key, value: this rank's tokens in the layout's local order, ``[b, s_local, h, d]`` when
                ``batch_dim_idx=0`` or ``[s_local, b, h, d]`` when 1; ``key``/``value`` may have fewer heads (GQA).
            batch_dim_idx: 0 or 1, as in DeepSpeed.
            rotary_pos_emb: ``None`` when q/k are already rotated (they carry their global positions, so RoPE before
                this call is right). Or DeepSpeed's ``(cos, sin)`` for the *whole* sequence, each
                ``[b|1, S, 1|h, rot_dim]`` in global order: it is sharded to this rank's tokens and applied here,
                which gives what DeepSpeed computes by applying it after its all-to-all.
            *args, **kwargs: passed to ``local_attention`` in mode ``"ulysses"``; ignored (with one warning) in the
                other modes.
            layout: the batch's ``ZigzagLayout``; default ``spava_ds.current_layout()``.
            layer_idx: overrides the constructor's ``layer_idx``.
        """
        if batch_dim_idx not in (0, 1):
            raise ValueError(f"DistributedAttention: batch_dim_idx must be 0 ([b, s, h, d]) or 1 ([s, b, h, d]), "
                             f"got {batch_dim_idx!r}")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"DistributedAttention: {name} must be a 4-D tensor "
                                 f"({'[b, s, h, d]' if batch_dim_idx == 0 else '[s, b, h, d]'}), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if self.num_kv_heads is not None and key.shape[2] != self.num_kv_heads:
            raise ValueError(f"DistributedAttention: built with num_kv_heads={self.num_kv_heads}, but the key has "
                             f"{key.shape[2]} heads")
        layout = layout if layout is not None else current_layout()
        if layout is None:
            raise ValueError("DistributedAttention needs the batch's ZigzagLayout: run the forward inside "
                             "`with spava_ds.use_layout(layout):` or pass layout=... (see sp_shard_batch)")
        config = self.config if self.config is not None else layout.config
        if layout.zigzag != (config.mode_spec.layout == "zigzag"):
            raise ValueError(f"DistributedAttention: mode {config.mode!r} needs a {config.mode_spec.layout} layout, "
                             f"got {layout}; build the layout with the same SpavaConfig")
        rank, _ = comm.group_rank_size(self.spg)
        if layout.world_size > 1 and not layout.sharded_for(rank):
            # DeepSpeed's contiguous shards have the same local length when there is no anchor and no query, and
            # would give wrong attention without an error: only tokens this layout sharded are accepted (one rank
            # holds the whole sequence in either order).
            raise ValueError(f"DistributedAttention: the tokens of rank {rank} were not sharded with this layout "
                             f"({layout}); it needs this layout's zigzag order, not DeepSpeed's contiguous slices: "
                             "shard the batch with sp_shard_batch (or layout.shard) and use the layout it returns")

        # The core API is [b, s, h, d]; a transpose is a view, so the seq-first layout costs no copy here.
        to_bshd = (lambda t: t) if batch_dim_idx == 0 else (lambda t: t.transpose(0, 1))
        q, k, v = to_bshd(query), to_bshd(key), to_bshd(value)
        if rotary_pos_emb is not None:
            cos, sin = self._local_rotary(rotary_pos_emb, layout, rank)
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)

        local = None
        if config.mode == "ulysses":
            local = self._local_attention_in_layout(batch_dim_idx, args, kwargs)
        elif (args or kwargs) and not self._warned_unused_args:
            warnings.warn(f"spava_ds DistributedAttention: mode {config.mode!r} runs its own causal attention; the "
                          f"extra forward arguments ({len(args)} positional, keywords {sorted(kwargs)}) are not "
                          "used (masks other than causal are not supported)", stacklevel=2)
            self._warned_unused_args = True

        out = sp_attention(q, k, v, layout, config, self.spg,
                           layer_idx=layer_idx if layer_idx is not None else self.layer_idx, local_attention=local)
        return out if batch_dim_idx == 0 else out.transpose(0, 1)

    def _local_attention_in_layout(self, batch_dim_idx: int, args, kwargs) -> Optional[Callable]:
        """``local_attention`` as sp_attention calls it ([b, S, h/W, d]), seen in the module's own layout."""
        if self.local_attn is None:
            return None

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if batch_dim_idx == 1:
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            out = self.local_attn(q, k, v, *args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape[:3] != q.shape[:3] or out.dim() != 4:
                raise ValueError("DistributedAttention: local_attention must return a 4-D tensor in its input's "
                                 f"layout {tuple(q.shape[:3])} + (head_dim,), as DeepSpeed requires; got "
                                 f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            return out if batch_dim_idx == 0 else out.transpose(0, 1)

        return call

    @staticmethod
    def _local_rotary(rotary_pos_emb, layout: ZigzagLayout, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(rotary_pos_emb, (tuple, list)) and len(rotary_pos_emb) == 2):
            raise ValueError("DistributedAttention: rotary_pos_emb must be None or a (cos, sin) pair")
        out = []
        for t in rotary_pos_emb:
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != layout.total_len:
                raise ValueError(
                    "DistributedAttention: rotary_pos_emb (cos, sin) must each be [b|1, S, 1|h, rot_dim] for the "
                    f"whole sequence (S = {layout.total_len} in this layout), as DeepSpeed takes it; got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}. If q/k are already "
                    "rotated with their global positions, pass rotary_pos_emb=None")
            out.append(layout.shard(t, rank, dim=1))
        return out[0], out[1]


# ---- the DeepSpeed JSON ---------------------------------------------------------------------------------------------
def read_deepspeed_json(path: Union[str, os.PathLike]) -> dict:
    """The DeepSpeed JSON at ``path`` as a dict; a missing file or bad JSON is a ``ValueError`` that names the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            ds_config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path!r}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path!r}: not valid JSON ({e})") from None
    if not isinstance(ds_config, dict):
        raise ValueError(f"DeepSpeed config {path!r}: expected a JSON object, got {type(ds_config).__name__}")
    return ds_config


def spava_config_from_deepspeed(ds_config: Union[str, os.PathLike, Mapping[str, Any]]) -> Tuple[SpavaConfig, int]:
    """``(SpavaConfig, sequence_parallel_size)`` from the JSON (a path or the dict) given to ``deepspeed.initialize``.

    The ``"spava"`` block is validated by ``SpavaConfig.from_dict`` (an unknown key is an error that lists the valid
    ones); without the block the defaults apply. ``sequence_parallel_size`` defaults to 1.
    """
    source = "DeepSpeed config"
    if isinstance(ds_config, (str, os.PathLike)):
        source = os.fspath(ds_config)
        ds_config = read_deepspeed_json(source)
    if not isinstance(ds_config, Mapping):
        raise TypeError(f"spava_config_from_deepspeed: expected a path or a dict, got {type(ds_config).__name__}")
    for key in ("sequence_parallel_size", "data_parallel_size"):
        value = ds_config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: {key} must be an int >= 1, got {value!r}")
    block = ds_config.get("spava")
    if block is not None and not isinstance(block, Mapping):
        raise ValueError(f"{source}: the \"spava\" block must be an object, got {type(block).__name__}")
    try:
        config = SpavaConfig.from_dict(block)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: \"spava\" block: {e}") from None
    return config, ds_config.get("sequence_parallel_size", 1)


def sequence_parallel_group(engine=None) -> dist.ProcessGroup:
    """The sequence-parallel group DeepSpeed built (``engine.seq_parallel_group`` when the engine has one).

    ``deepspeed.initialize`` builds it from ``sequence_parallel_size`` and ``data_parallel_size`` in the JSON (a
    ``(data_parallel, sequence_parallel)`` mesh: SP groups are blocks of consecutive ranks), from ``mesh_param=``, or
    takes it from ``mpu=``.
    """
    group = getattr(engine, "seq_parallel_group", None) if engine is not None else None
    if group is not None:
        return group
    from deepspeed.utils import groups  # imported here so that the attention works without DeepSpeed

    try:
        return groups._get_sequence_parallel_group()
    except KeyError:
        raise RuntimeError("DeepSpeed has no sequence-parallel group: give both \"sequence_parallel_size\" and "
                           "\"data_parallel_size\" in the JSON (deepspeed.initialize builds the mesh from them), or "
                           "pass mesh_param=(dp, sp) or an mpu to deepspeed.initialize") from None


def bind_sequence_parallel_group(model: torch.nn.Module, group: dist.ProcessGroup) -> int:
    """Give ``group`` to every spava_ds ``DistributedAttention`` in ``model``; returns how many were bound.

    When the JSON builds the SP group, it exists only once ``deepspeed.initialize`` has run, after the model was
    built: build the attention modules with ``sequence_process_group=None`` and bind the group afterwards.
    """
    found = [m for m in model.modules() if isinstance(m, DistributedAttention)]
    if not found:
        raise ValueError("bind_sequence_parallel_group: the model has no spava_ds DistributedAttention module")
    for m in found:
        m.spg = group
    return len(found)


def sp_shard_batch(batch: Dict[str, Any], query_len: int, group: Optional[dist.ProcessGroup] = None,
                   config: Optional[SpavaConfig] = None, seq_len: Optional[int] = None,
                   seq_dims: Optional[Dict[str, int]] = None) -> Tuple[ZigzagLayout, Dict[str, Any]]:
    """``(layout, local batch)`` for this rank of the sequence-parallel ``group``.

    The batch holds whole sequences (the last ``query_len`` tokens are the query); ``seq_len`` defaults to
    ``batch["input_ids"].shape[1]``. Tensors are sharded by ``spava_ds.shard_batch`` (ids, labels, 1-D and M-RoPE
    ``position_ids``...). Put the global ``position_ids`` in the batch before sharding: a model that builds positions
    from the local length would rotate the tokens with wrong positions.
    """
    if seq_len is None:
        tokens = next((batch[key] for key in ("input_ids", "inputs_embeds")
                       if isinstance(batch.get(key), torch.Tensor)), None)
        if tokens is None:
            raise ValueError("sp_shard_batch: the batch has no input_ids or inputs_embeds tensor; pass seq_len=")
        seq_len = tokens.shape[1]
    rank, world = comm.group_rank_size(group)
    layout = ZigzagLayout(seq_len - query_len, query_len, world, config)
    return layout, shard_batch(batch, layout, rank, seq_dims)


def replicated_token_weights(layout: ZigzagLayout, rank: int, device=None) -> torch.Tensor:
    """``layout.replicated_token_weights(rank, device)``: per-token loss weights, ``1/W`` for the anchor and the
    query that every rank holds, 1 elsewhere (see docs/deepspeed.md on summing the gradients over the SP ranks)."""
    return layout.replicated_token_weights(rank, device)
