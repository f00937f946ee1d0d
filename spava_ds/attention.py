"""Spava sequence-parallel attention (prefill), one call per layer on every rank.

Rank r holds ``[anchor | block r | block 2W-1-r | query]`` (see ``layout.py``). Per call:

1. score its two blocks' keys against the query, keep the top-k per KV head of each (the passing blocks) and
   all-gather them, one async all-gather per virtual-host half (blocks 0..W-1, then blocks W..2W-1);
2. attend the query rows to this rank's share of the keys (a W-th of the anchor, its two blocks, and on rank 0
   the query itself, causally), and all-gather the partial outputs with their LSE;
3. anchor and block r: causal over ``[anchor | block r]``, block rows also over the passing keys of blocks < r;
4. block 2W-1-r: passing keys of blocks < 2W-1-r and the anchor, plus its own block causally;
5. merge the query partials of all ranks by LSE: the query rows get exact attention.

The all-gathers run under the attention of steps 2-4 (``SpavaConfig.overlap``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import comm, kernels
from .config import SpavaConfig
from .layout import ZigzagLayout
from .select import query_summary, select_passing


def _check_inputs(q, k, v, layout: ZigzagLayout, rank: int, world_size: int) -> None:
    if layout.world_size != world_size:
        raise ValueError(f"spava_attention: the layout is for {layout.world_size} ranks, the group has {world_size}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("spava_attention: q, k and v must be [batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"spava_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"spava_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, "
                         "sequence or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"spava_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if q.shape[1] != layout.local_len(rank):
        raise ValueError(f"spava_attention: rank {rank} got {q.shape[1]} tokens, its share of the layout is "
                         f"{layout.local_len(rank)} ({layout})")
    if layout.query_len == 0:
        raise ValueError("spava_attention needs a query block (query_len >= 1): the passing keys are chosen by "
                         "their score against the query")


def _passing_chunks(gathered: torch.Tensor, ranks, ks) -> List[torch.Tensor]:
    """Trim each source rank's (padded) selection ``[b, kmax, Hkv, 2d]`` to its true length."""
    return [gathered[u][:, :kk] for u, kk in zip(ranks, ks)]


def spava_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                    config: Optional[SpavaConfig] = None, group: Optional[dist.ProcessGroup] = None,
                    layer_idx: Optional[int] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Spava attention for this rank's tokens.

    Args:
        q: ``[b, s_local, Hq, d]`` queries after RoPE, in the layout's local order for this rank.
        k, v: ``[b, s_local, Hkv, d]`` keys (after RoPE) and values; GQA is native (Hq a multiple of Hkv).
        layout: the ``ZigzagLayout`` of the sequence (same on every rank).
        config: defaults to ``layout.config``.
        group: the sequence-parallel process group (default: the world).
        layer_idx: needed when ``config.passing_len`` is a per-layer list.
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns ``[b, s_local, Hq, d]``: the attention output of this rank's tokens, in local order.
    """
    config = config if config is not None else layout.config
    rank, world = comm.group_rank_size(group)
    _check_inputs(q, k, v, layout, rank, world)
    backend = config.backend
    seg = layout.local_segments(rank)
    la = layout.anchor_len
    (b1s, b1e), (b2s, b2e), (qs, qe) = seg.block1, seg.block2, seg.query
    d = q.shape[-1]
    v1, v2 = layout.virtual_hosts(rank)
    passing = config.resolve_passing_len(layout.context_len, layer_idx)
    ks = [min(passing, layout.block_len(u)) for u in range(layout.num_blocks)]  # passing tokens sent by block u
    kmax1, kmax2 = max(ks[:world]), max(ks[world:])
    async_op = config.overlap

    # 1. Passing blocks: select, then gather, half by half so the second selection runs under the first transfer.
    gather1 = gather2 = None
    if passing > 0:
        qbar = query_summary(q[:, qs:qe], k.shape[2])

        def selection(start: int, end: int, kk: int, kmax: int) -> torch.Tensor:
            sel = select_passing(k[:, start:end], v[:, start:end], qbar, kk, config.pool_kernel)
            if kk < kmax:  # blocks differ by one token: pad so every rank sends the same shape
                sel = torch.nn.functional.pad(sel, (0, 0, 0, 0, 0, kmax - kk))
            return sel

        gather1 = comm.all_gather_async(selection(b1s, b1e, ks[v1], kmax1), group, world, async_op)
        if world > 1:
            # Block 2W-1 (rank 0's second) precedes no block: rank 0 sends zeros in its place.
            sel2 = (selection(b2s, b2e, ks[v2], kmax2) if rank > 0
                    else q.new_zeros(q.shape[0], kmax2, k.shape[2], 2 * d, dtype=k.dtype))
            gather2 = comm.all_gather_async(sel2, group, world, async_op)

    # 2. Query rows over this rank's share of the keys; partials travel packed as fp32 [out | lse].
    a0, a1 = layout.anchor_share(rank)
    q_rows = q[:, qs:qe]
    pieces = [kernels.attend(q_rows, k[:, a0:a1], v[:, a0:a1], backend=backend, scale=scale),
              kernels.attend(q_rows, k[:, b1s:b2e], v[:, b1s:b2e], backend=backend, scale=scale)]
    if rank == 0:
        pieces.append(kernels.attend(q_rows, k[:, qs:qe], v[:, qs:qe], causal=True, backend=backend, scale=scale))
    out_q, lse_q = kernels.merge(pieces, torch.float32)
    packed = torch.cat([out_q, lse_q.transpose(1, 2).unsqueeze(-1)], dim=-1)  # [b, lq, Hq, d+1]
    gather_q = comm.all_gather_async(packed, group, world, async_op)

    # 3. Anchor and block r: causal over [anchor | block r]; block rows also see the passing of blocks < r.
    out_ab, lse_ab = kernels.attend(q[:, :b1e], k[:, :b1e], v[:, :b1e], causal=True, backend=backend, scale=scale)
    out_b1 = out_ab[:, la:]
    if v1 > 0 and gather1 is not None:
        p1 = torch.cat(_passing_chunks(gather1.wait(), range(v1), ks[:v1]), dim=1)
        out_b1, _ = kernels.merge([(out_b1, lse_ab[:, :, la:]),
                                   kernels.attend(q[:, b1s:b1e], p1[..., :d], p1[..., d:], backend=backend,
                                                  scale=scale)])

    # 4. Block 2W-1-r: [passing of blocks < 2W-1-r | anchor], then its own block causally.
    kv_prefix = [torch.cat([k[:, :la], v[:, :la]], dim=-1)]
    if gather1 is not None:
        chunks = _passing_chunks(gather1.wait(), range(world), ks[:world])
        if gather2 is not None:
            # Blocks W..2W-2-r live on ranks W-1 down to r+1 (block u on rank 2W-1-u).
            ranks2 = range(world - 1, rank, -1)
            chunks += _passing_chunks(gather2.wait(), ranks2, [ks[2 * world - 1 - u] for u in ranks2])
        kv_prefix = chunks + kv_prefix
    p2 = torch.cat(kv_prefix, dim=1)
    q_b2 = q[:, b2s:b2e]
    out_b2, _ = kernels.merge([kernels.attend(q_b2, p2[..., :d], p2[..., d:], backend=backend, scale=scale),
                               kernels.attend(q_b2, k[:, b2s:b2e], v[:, b2s:b2e], causal=True, backend=backend,
                                              scale=scale)])

    # 5. Exact query rows: LSE merge of every rank's partial.
    partials = gather_q.wait()
    out_q, _ = kernels.merge([(p[..., :d], p[..., d].transpose(1, 2)) for p in partials.unbind(0)])

    return torch.cat([out_ab[:, :la], out_b1.to(q.dtype), out_b2.to(q.dtype), out_q.to(q.dtype)], dim=1)
